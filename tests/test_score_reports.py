"""`fastcls report`'s reliability diagram and ECE (before and after temperature scaling), and `fastcls report --cv-lb`:
local CV against the public leaderboard over the recorded submissions, with Pearson and Spearman correlations."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr, spearmanr

from fastcls.config import RunConfig
from fastcls.posthoc import PostHoc, apply_temperature
from fastcls.recipe import Recipe
from fastcls.runs import RunData, RunStore
from fastcls.submission import record_lb, submission_for_run

VOCAB = ["ant", "bee"]


def _run(store, probs, targets, local=0.8, posthoc=None):
    cfg = RunConfig(Recipe(name="toy", sub_format="probs"), "simple_cnn").to_dict()  # files differ by `local`
    ids = [f"i{k}.png" for k in range(len(targets))]
    return store.save(RunData(config=cfg, vocab=VOCAB, valid_probs=np.asarray(probs, np.float32)[None],
                              valid_targets=np.asarray(targets), valid_ids=ids,
                              metrics={"metric_name": "accuracy", "accuracy": local},
                              test_probs=np.asarray(probs, np.float32)[None] * 0 + [[local, 1 - local]],
                              test_ids=ids, extra={"posthoc": posthoc} if posthoc else {}))


def test_report_has_a_reliability_diagram_with_a_known_ece(cli, tmp_path):
    # 10 items at confidence 0.9 of which 6 are right: ECE = |0.6 - 0.9| = 0.3, all in the bin [0.8667, 0.9333)
    probs = np.tile([[0.9, 0.1]], (10, 1))
    targets = np.array([0] * 6 + [1] * 4)
    runs = tmp_path / "runs"
    rid = _run(RunStore(runs), probs, targets)
    res = cli("report", rid, "--top", "0", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    folder = runs / rid / "report"
    assert (folder / "reliability.png").is_file()
    table = pd.read_csv(folder / "reliability.csv")
    assert set(table["view"]) == {"stored"} and table["items"].sum() == 10
    full = table[table["items"] > 0]
    assert len(full) == 1 and full["accuracy"].iloc[0] == pytest.approx(0.6)
    assert full["confidence"].iloc[0] == pytest.approx(0.9) and full["low"].iloc[0] < 0.9 <= full["high"].iloc[0]
    assert "ECE stored 0.3000" in (folder / "index.html").read_text()


def test_calibrated_run_shows_before_and_after_temperature(tmp_path):
    from fastcls.report import write_report
    rng = np.random.default_rng(0)
    raw = rng.dirichlet([0.3, 0.3], size=200)  # over-confident: labels drawn at 70% from the argmax
    targets = np.where(rng.random(200) < 0.7, raw.argmax(1), 1 - raw.argmax(1))
    t = 2.5
    store = RunStore(tmp_path / "runs")
    rid = _run(store, apply_temperature(raw, t), targets, posthoc=PostHoc(temperature=t).to_dict())
    rep = write_report(store, rid, top=0)
    table = pd.read_csv(rep.files["reliability_csv"])
    assert set(table["view"]) == {"before temperature scaling", "calibrated (T=2.5)"}
    before = table[table["view"] == "before temperature scaling"]
    # the stored probabilities with the temperature undone are the raw ones: their bins match a direct count
    conf = raw.max(1)
    in_top = (conf >= 14 / 15)
    top = before[np.isclose(before["low"], 14 / 15)]
    assert top["items"].iloc[0] == in_top.sum()
    assert top["accuracy"].iloc[0] == pytest.approx((raw.argmax(1) == targets)[in_top].mean())


def _scored(store, tmp_path, local, public, k):
    rid = _run(store, np.array([[0.6, 0.4]]), np.array([0]), local=local)
    submission_for_run(store.load(rid), tmp_path / f"s{k}.csv", beta=None)
    if public is not None:
        record_lb(store, str(tmp_path / f"s{k}.csv"), public=public)
    return rid


def test_cv_lb_table_correlations_and_figure(cli, tmp_path):
    runs = tmp_path / "runs"
    store = RunStore(runs)
    res = cli("report", "--cv-lb", "--runs-dir", runs)
    assert res.exit_code == 2 and "needs at least 2" in res.stderr and "Traceback" not in res.output
    local, public = [0.80, 0.85, 0.90, 0.95], [0.70, 0.74, 0.73, 0.79]
    for k, (lo, pu) in enumerate(zip(local, public)):
        _scored(store, tmp_path, lo, pu if k else None, k)  # the first one has no public score yet
    _scored(store, tmp_path, 0.99, None, 9)
    res = cli("report", "--cv-lb", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    r, rho = pearsonr(local[1:], public[1:])[0], spearmanr(local[1:], public[1:])[0]
    assert f"Pearson {r:.4f}" in res.stdout and f"Spearman {rho:.4f}" in res.stdout and "over 3 submissions" in res.stdout
    assert (runs / "pictures" / "cv_vs_lb.png").is_file()
    res = cli("report", "--runs-dir", runs)
    assert res.exit_code == 2 and "Give a RUN" in res.stderr
