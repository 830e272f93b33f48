"""Submission formats (argmax label, top-k labels, one probability per class, one binary probability), each read back;
leaderboard bookkeeping: every written submission recorded with its run and sha256, `fastcls lb`, `fastcls runs`."""

import numpy as np
import pandas as pd
import pytest

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.recipe import Recipe
from fastcls.runs import RunData, RunStore
from fastcls.submission import record_lb, submission_for_run, submissions_table, write_submission

VOCAB = ["ant", "bee", "cat"]
IDS = ["a.png", "b.png", "c.png"]
P = np.array([[0.2, 0.5, 0.3],
              [0.6, 0.1, 0.3],
              [0.1, 0.1, 0.8]], dtype=np.float32)


def read(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_label_format_is_the_argmax(tmp_path):
    write_submission(Recipe(name="t"), IDS, P, VOCAB, tmp_path / "s.csv")
    assert read(tmp_path / "s.csv").to_dict("list") == {"id": ["a", "b", "c"], "label": ["bee", "ant", "cat"]}


def test_topk_format_writes_k_guesses_best_first(tmp_path):
    write_submission(Recipe(name="t", sub_format="topk", sub_k=2, sub_label_col="word"), IDS, P, VOCAB,
                     tmp_path / "s.csv")
    assert read(tmp_path / "s.csv")["word"].tolist() == ["bee cat", "ant cat", "cat ant"]  # ties: lower class first
    write_submission(Recipe(name="t", sub_format="topk", sub_k=5, sub_label="index"), IDS, P, VOCAB,
                     tmp_path / "i.csv")
    assert read(tmp_path / "i.csv")["label"].tolist() == ["1 2 0", "0 2 1", "2 0 1"]  # k capped at the classes


def test_probs_format_writes_one_column_per_class_in_the_recipes_order(tmp_path):
    r = Recipe(name="t", sub_format="probs", classes=("cat", "ant", "bee"))
    write_submission(r, IDS, P, VOCAB, tmp_path / "s.csv")
    df = pd.read_csv(tmp_path / "s.csv")
    assert list(df.columns) == ["id", "cat", "ant", "bee"]
    assert np.allclose(df[["ant", "bee", "cat"]].to_numpy(), P)


def test_binary_format_writes_the_second_class_probability(tmp_path):
    p2 = np.array([[0.9, 0.1], [0.25, 0.75]], dtype=np.float32)
    write_submission(Recipe(name="t", sub_format="binary", sub_label_col="target"), IDS[:2], p2, ["benign", "malign"],
                     tmp_path / "s.csv")
    assert np.allclose(pd.read_csv(tmp_path / "s.csv")["target"], [0.1, 0.75])
    with pytest.raises(FastclsError, match="sub_format='probs'"):
        write_submission(Recipe(name="t", sub_format="binary"), IDS, P, VOCAB, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_formats_fill_a_template(tmp_path):
    pd.DataFrame({"id": ["c", "a", "b"], "note": ["x", "y", "z"]}).to_csv(tmp_path / "sample.csv", index=False)
    r = Recipe(name="t", sub_format="probs", sub_template="sample.csv")
    df = write_submission(r, IDS, P, VOCAB, tmp_path / "s.csv", data=tmp_path)
    back = pd.read_csv(tmp_path / "s.csv")
    assert list(back.columns) == ["id", "note", "ant", "bee", "cat"] and back["id"].tolist() == ["c", "a", "b"]
    assert np.allclose(back[VOCAB].to_numpy(), P[[2, 0, 1]]) and len(df) == 3


def test_sub_k_must_be_positive():
    with pytest.raises(FastclsError, match="sub_k"):
        Recipe(name="t", sub_k=0)


# -- leaderboard bookkeeping ---------------------------------------------------------------------------------------

def _run(store, local=0.8, fmt="label", test=P):
    cfg = RunConfig(Recipe(name="toy", sub_format=fmt), "simple_cnn").to_dict()
    return store.save(RunData(config=cfg, vocab=VOCAB, valid_probs=P[None], valid_targets=np.array([1, 0, 2]),
                              valid_ids=IDS, metrics={"metric_name": "accuracy", "accuracy": local},
                              test_probs=test[None], test_ids=IDS, name=f"run{local}"))


def test_a_single_view_submission_records_the_plain_view(tmp_path):
    """Submitting at the run's own blend when the run stored one view writes that plain view: its record says so."""
    from fastcls.files import read_json
    store = RunStore(tmp_path / "runs")
    submission_for_run(store.load(_run(store, 0.8)), tmp_path / "a.csv")
    rec, = read_json(store.root / "submissions.json")
    assert rec["tta_beta"] is None and rec["local"] == 0.8


def test_written_submissions_are_recorded_and_scored(tmp_path):
    store = RunStore(tmp_path / "runs")
    a, b = _run(store, 0.8), _run(store, 0.9, test=P[:, ::-1].copy())  # different files
    submission_for_run(store.load(a), tmp_path / "a.csv", beta=None)
    submission_for_run(store.load(b), tmp_path / "b.csv", beta=None)
    subs = submissions_table(store.root)
    assert subs["run"].tolist() == [a, b] and subs["local"].tolist() == [0.8, 0.9]
    assert subs["sha256"].str.len().eq(64).all()
    (tmp_path / "a.csv").rename(tmp_path / "renamed.csv")  # found by contents, not name
    rec = record_lb(store, str(tmp_path / "renamed.csv"), public=0.71)
    assert rec["run"] == a and rec["public"] == 0.71 and rec["private"] is None
    rec = record_lb(store, "run0.9", public=0.75, private=0.74)  # a run: its newest submission
    assert rec["run"] == b and rec["sha256"] == subs["sha256"].iloc[1]
    assert submissions_table(store.root)[["public", "private"]].fillna(-1).to_numpy().tolist() == \
        [[0.71, -1], [0.75, 0.74]]


def test_lb_refuses_unknown_files_runs_and_missing_scores(tmp_path):
    store = RunStore(tmp_path / "runs")
    a = _run(store)
    other = tmp_path / "other.csv"
    other.write_text("id,label\na,bee\n")
    with pytest.raises(FastclsError, match="No recorded submission has the contents"):
        record_lb(store, str(other), public=0.5)
    with pytest.raises(FastclsError, match="neither a submission file nor a run"):
        record_lb(store, "nope", public=0.5)
    with pytest.raises(FastclsError, match="has no recorded submission"):
        record_lb(store, a, public=0.5)
    with pytest.raises(FastclsError, match="--public"):
        record_lb(store, a)


def test_lb_and_runs_through_the_cli(cli, tmp_path):
    runs = tmp_path / "runs"
    store = RunStore(runs)
    a = _run(store, fmt="topk")
    res = cli("submit", a, "--out", tmp_path / "s.csv", "--no-tta", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    assert read(tmp_path / "s.csv")["label"].tolist() == ["bee cat ant", "ant cat bee", "cat ant bee"]
    res = cli("lb", tmp_path / "s.csv", "--public", "0.912", "--private", "0.905", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    assert "public 0.912" in res.stdout
    listing = cli("runs", "--runs-dir", runs).stdout
    assert "public" in listing and "0.912" in listing and "0.905" in listing
    (tmp_path / "x.csv").write_text("id,label\n")
    res = cli("lb", tmp_path / "x.csv", "--public", "0.5", "--runs-dir", runs)
    assert res.exit_code == 2 and "Traceback" not in res.output and "No recorded submission" in res.stderr
