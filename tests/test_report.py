"""Pictures: show-batch, lr-find and report write readable PNGs of the expected size and one HTML page whose every
reference exists; the confusion matrix counts are exactly the stored predictions."""

import base64
import re
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastcls import report
from fastcls.report.pages import _valid_images
from fastcls.recipe import Recipe
from fastcls.runs import RunData, RunStore
from fastcls.config import RunConfig

from .conftest import shared_data

pytestmark = pytest.mark.usefixtures("one_thread")

def _png(path, size=None) -> np.ndarray:
    """The PNG at `path` as an array, after checking it is a real, non-blank picture of `size` pixels."""
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, f"{path} is missing or empty"
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size, f"{path.name}: {im.size} != expected {size}"
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    assert arr.std() > 10, f"{path.name} is blank"
    return arr


def _panels_drawn(arr: np.ndarray, rows: int, cols: int) -> int:
    """How many grid cells hold a picture (enough non-white pixels below the title band)."""
    n = 0
    for r in range(rows):
        for c in range(cols):
            y0 = report.HEADER_PX + r * report.PANEL_PX
            cell = arr[y0 + 40:y0 + report.PANEL_PX, c * report.PANEL_PX:(c + 1) * report.PANEL_PX]
            n += (cell < 200).mean() > 0.2
    return n


def _grid_size(n, pairs=False):
    rows, cols = report.grid_shape(n, pairs)
    return cols * report.PANEL_PX, rows * report.PANEL_PX + report.HEADER_PX


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.imgs = [], 0

    def handle_starttag(self, tag, attrs):
        self.imgs += tag == "img"
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def _check_html(page: Path) -> _Refs:
    """Every src/href of the page is an embedded PNG or a file that exists next to it."""
    p = _Refs()
    p.feed(page.read_text(encoding="utf-8"))
    assert p.refs, "the page references nothing"
    for ref in p.refs:
        if ref.startswith("data:image/png;base64,"):
            assert base64.b64decode(ref.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert "://" not in ref and not ref.startswith("/"), f"non-relative reference {ref}"
            assert (page.parent / ref).is_file(), f"{page.name} references missing file {ref}"
    return p


# -- show-batch ------------------------------------------------------------------------------------------------------
def test_show_batch_grid_of_labelled_network_inputs(cli, tmp_path):
    out = tmp_path / "batch.png"
    res = cli("show-batch", "digits", "--n", "9", "--size", "16", "--sample", "100", "--out", out)
    assert res.exit_code == 0, res.output
    assert str(out) in res.stdout.replace("\n", "")
    arr = _png(out, _grid_size(9))
    assert _panels_drawn(arr, 3, 3) == 9
    res = cli("show-batch", "digits", "--n", "4", "--sample", "100", "--originals", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    arr = _png(tmp_path / "runs" / "pictures" / "digits-batch.png", _grid_size(4, pairs=True))
    assert _panels_drawn(arr, 2, 4) == 8, "each original must sit beside its crop"



def test_show_batch_progressive_size_one_grid_per_size(cli, tmp_path):
    """`--size 16,24` (progressive resizing) draws the batch at each size a run trains at, one picture each."""
    out = tmp_path / "batch.png"
    res = cli("show-batch", "digits", "--n", "4", "--size", "16,24", "--sample", "100", "--out", out)
    assert res.exit_code == 0, res.output
    small, large = tmp_path / "batch-16px.png", tmp_path / "batch-24px.png"
    assert str(small) in res.stdout.replace("\n", "") and str(large) in res.stdout.replace("\n", "")
    assert not out.exists()
    a, b = _png(small, _grid_size(4)), _png(large, _grid_size(4))
    assert not np.array_equal(a, b), "the two sizes must be drawn from differently resized inputs"
    res = cli("show-batch", "digits", "--size", "16,x", "--out", out)
    assert res.exit_code == 2 and "--size" in res.output and "Traceback" not in res.output

def test_show_batch_decodes_the_training_pipeline():
    """The pictures are the real training batch, decoded: augmentation changes them, the labels are the items'."""
    from fastcls.data import dls, read_items
    recipe = Recipe(name="digits-like", layout="digits", size=16, aug=True, max_rotate=30.0, flip=False)
    items = read_items(recipe)
    d = dls(recipe, items, seed=1, sample=60)
    rows, dec = report.preview_batch(d, n=6, seed=3)
    assert len(rows) == len(dec) == 6
    assert [str(lbl) for _, lbl in dec] == rows["label"].tolist()
    imgs = np.stack([np.asarray(img) for img, _ in dec])
    assert imgs.shape == (6, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 255 and imgs.max() > 100
    _, dec2 = report.preview_batch(d, n=6, seed=4)
    _, dec_same = report.preview_batch(d, n=6, seed=3)
    assert np.array_equal(imgs, np.stack([np.asarray(i) for i, _ in dec_same])), "same seed, same picture"
    assert not np.array_equal(imgs, np.stack([np.asarray(i) for i, _ in dec2]))


def test_show_batch_real_photos_trim_crop_with_originals(cli, tmp_path):
    data = shared_data("imagenette-mini")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "nette.py").write_text(
        "from fastcls.recipe import Recipe\n"
        "recipe = Recipe(name='nette', layout='folder', train_dir='train', test_dir=None, size=64, crop='trim',\n"
        "                trim=(0.1, 0.1, 0.2, 0.2))\n")
    out = tmp_path / "nette.png"
    res = cli("show-batch", "nette", "--data", data, "--recipes", tmp_path / "recipes", "--n", "4", "--originals",
              "--sample", "40", "--out", out)
    assert res.exit_code == 0, res.output
    arr = np.asarray(Image.open(out).convert("RGB")).astype(int)
    red = (arr[..., 0] > 200) & (arr[..., 1] < 60) & (arr[..., 2] < 60)
    left = red[:, :report.PANEL_PX].sum()
    assert left > 100 and red[:, report.PANEL_PX:2 * report.PANEL_PX].sum() < left / 10, \
        "the crop box is drawn on the original, not on the network input"
    _png(out, _grid_size(4, pairs=True))
    from fastcls.data import dls, read_items
    from fastcls.recipe import get_recipe
    recipe = get_recipe("nette", [tmp_path / "recipes"])
    _, dec = report.preview_batch(dls(recipe, read_items(recipe, data), sample=40), n=2)
    assert tuple(dec[0][0].shape) == (3, 64, 64)


def test_show_batch_bad_input(cli, tmp_path):
    res = cli("show-batch", "digits", "--n", "0", "--out", tmp_path / "x.png")
    assert res.exit_code == 2 and "--n must be at least 1" in res.stderr and not (tmp_path / "x.png").exists()
    res = cli("show-batch", "digits", "--crop", "sideways", "--out", tmp_path / "x.png")
    assert res.exit_code == 2 and "'crop' must be one of" in res.stderr


# -- lr-find ---------------------------------------------------------------------------------------------------------
def test_lr_find_plot_and_suggestions(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("lr-find", "digits", "simple_cnn", "--size", "16", "--sample", "100", "--bs", "16", "--num-it", "20",
              "--no-pretrained", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    rows = {line.split()[1]: float(line.split()[3]) for line in res.stdout.splitlines()
            if line.startswith("│") and line.split()[1] in ("minimum", "steep", "valley")}
    assert len(rows) == 3 and all(1e-7 <= v <= 10 for v in rows.values()), res.stdout
    assert re.search(r"from \d+ steps of the mock training", res.stdout), res.stdout
    _png(tmp_path / "runs" / "pictures" / "digits-simple_cnn-lr-find.png", (800, 500))
    assert not (tmp_path / "models").exists(), "fastai's temporary weights must not land in the working folder"


def test_lr_find_bad_input(cli, tmp_path):
    res = cli("lr-find", "digits", "simple_cnn", "--num-it", "3", "--out", tmp_path / "x.png")
    assert res.exit_code == 2 and "--num-it must be at least 10" in res.stderr


# -- report ----------------------------------------------------------------------------------------------------------
def test_report_of_a_trained_run(cli, digits_copy):
    rid = next(p.name for p in digits_copy.iterdir() if p.is_dir() and (p / "config.json").exists())
    res = cli("report", "tiny-digits", "--runs-dir", digits_copy, "--top", "9")
    assert res.exit_code == 0, res.output
    folder = digits_copy / rid / "report"
    assert f"{folder / 'index.html'}" in res.stdout.replace("\n", "")
    n = 10
    for name in ("confusion", "confusion_normalized"):
        _png(folder / f"{name}.png", tuple(int(v * report.DPI) for v in report.confusion_figsize(n)))
    _png(folder / "per_class.png", tuple(int(v * report.DPI) for v in report.per_class_figsize(n)))
    arr = _png(folder / "top_losses.png", _grid_size(9))
    assert _panels_drawn(arr, 3, 3) == 9
    _png(folder / "history.png", (1100, 400))

    # the confusion counts are exactly the stored plain predictions
    probs, targets = np.load(digits_copy / rid / "valid_probs.npy"), np.load(digits_copy / rid / "valid_targets.npy")
    cm = pd.read_csv(folder / "confusion.csv", index_col=0)
    pred = probs[0].argmax(1)
    expected = np.array([[np.sum((targets == i) & (pred == j)) for j in range(n)] for i in range(n)])
    np.testing.assert_array_equal(cm.to_numpy(), expected)
    assert cm.to_numpy().sum() == len(targets)
    metrics = json.loads((digits_copy / rid / "metrics.json").read_text())
    assert np.trace(cm.to_numpy()) / len(targets) == pytest.approx(metrics["accuracy"])
    pc = pd.read_csv(folder / "per_class.csv")
    assert pc["support"].tolist() == np.bincount(targets, minlength=n).tolist()
    assert pc["recall"].tolist() == pytest.approx([expected[i, i] / max(1, expected[i].sum()) for i in range(n)])

    page = _check_html(folder / "index.html")
    assert page.imgs == 6
    _png(folder / "reliability.png", (650, 600))
    for ref in ("confusion.csv", "per_class.csv", "top_losses.png", "history.png", "reliability.png",
                "reliability.csv"):
        assert ref in page.refs


def _fake_run(store, recipe, data, probs, targets, ids, **kw):
    cfg = RunConfig(recipe, kw.pop("arch", "simple_cnn"), str(data) if data else None, seed=0)
    probs = np.asarray(probs, dtype=np.float32)
    name = recipe.metric
    acc = float((probs.argmax(1) == targets).mean())
    return store.save(RunData(config={**cfg.to_dict(), **kw.pop("config", {})}, vocab=kw.pop("vocab"),
                              valid_probs=probs[None], valid_targets=targets, valid_ids=ids,
                              metrics={"metric_name": name, name: acc, f"{name}_tta": acc}, **kw))


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture
def store42(tmp_path):
    """A stored run on a synthetic 42-class npz data set with long class names (no training needed)."""
    rng = np.random.default_rng(0)
    vocab = [f"charles_montgomery_burns_{i:02d}" if i % 2 else f"c{i}" for i in range(42)]
    n = 84
    labels = np.repeat(np.arange(42), 2)
    images = rng.integers(0, 255, (n, 12, 12), dtype=np.uint8)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "train.npz", images=images, labels=labels, classes=np.array(vocab))
    recipe = Recipe(name="c42-not-registered", layout="npz", npz_test=None, size=16)
    probs = _softmax(rng.normal(0, 1, (n, 42)) + 3 * np.eye(42)[labels] * (rng.random(n) < 0.6)[:, None])
    store = RunStore(tmp_path / "runs")
    sorted_vocab = sorted(vocab)  # the data layer's vocab order
    targets = np.array([sorted_vocab.index(vocab[i]) for i in labels])
    rid = _fake_run(store, recipe, tmp_path / "data", probs, targets, [f"train-{i}" for i in range(n)],
                    vocab=sorted_vocab, name="c42")
    return store, rid, tmp_path


def test_report_with_42_long_class_names_stays_readable(store42):
    store, rid, tmp_path = store42
    rep = report.write_report(store, rid)
    assert rep.notes == []
    w, h = (int(v * report.DPI) for v in report.confusion_figsize(42))
    arr = _png(rep.files["confusion"], (w, h))
    assert h / 42 >= 30, "each class gets at least 30 pixels"
    _png(rep.files["per_class"], tuple(int(v * report.DPI) for v in report.per_class_figsize(42)))
    _png(rep.files["top_losses"], _grid_size(16))
    assert arr.shape[0] > _png(report.save_figure(report.plot_confusion(report.confusion(
        [0, 1], np.eye(2), ["a", "b"])), tmp_path / "small.png")).shape[0]
    assert report.short_label("charles_montgomery_burns_41", 16) == "charles…burns_41"
    _check_html(rep.html)


def test_report_top_losses_align_by_id_and_skip_cleanly_without_images(store42):
    store, rid, tmp_path = store42
    run = store.load(rid)
    worst = report.top_losses(run.valid_targets, run.valid_probs[0], 3)
    imgs = _valid_images(store, run, worst["row"].to_numpy())
    raw = np.load(tmp_path / "data" / "train.npz")["images"]
    for img, row in zip(imgs, worst["row"]):
        idx = int(run.valid_ids[row].split("-")[1])
        assert img.shape == (16, 16, 3)
        assert np.corrcoef(np.asarray(Image.fromarray(raw[idx]).resize((16, 16), Image.BILINEAR), float).ravel(),
                           img[..., 0].astype(float).ravel())[0, 1] > 0.8, "the image of the stored id"
    (tmp_path / "data").rename(tmp_path / "moved")
    rep = report.write_report(store, rid, out=tmp_path / "rep")
    assert "top_losses" not in rep.files and "could not be read back" in rep.notes[0]
    assert "could not be read back" in rep.html.read_text()
    _check_html(rep.html)


def test_report_of_an_ensemble_shows_members_side_by_side(tmp_path):
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, 30)
    store = RunStore(tmp_path / "runs")
    recipe = Recipe(name="digits", layout="digits", size=16)
    ids = [f"digit-{i:04d}" for i in range(30)]
    members = [_fake_run(store, recipe, None, _softmax(rng.normal(0, 1, (30, 3)) + 2 * np.eye(3)[targets]), targets,
                         ids, vocab=["0", "1", "2"], arch=a, name=f"m-{a}") for a in ("resnet18", "simple_cnn")]
    ens = _fake_run(store, recipe, None, _softmax(3 * np.eye(3)[targets]), targets, ids, vocab=["0", "1", "2"],
                    kind="ensemble", name="ens", config={"members": members, "arch": "ensemble"})
    rep = report.write_report(store, "ens", top=0)
    table = pd.read_csv(rep.files["members_csv"])
    assert table["id"].tolist() == [ens, *members]
    assert table["accuracy"].tolist() == pytest.approx([store.load(r).metrics["accuracy"] for r in (ens, *members)])
    _png(rep.files["members"])
    page = _check_html(rep.html)
    assert "members.csv" in page.refs and "m-simple_cnn" in rep.html.read_text()


def test_report_of_runs_tagged_with_a_sweep_id_draws_the_curve(tmp_path):
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 3, 30)
    store = RunStore(tmp_path / "runs")
    ids = [f"digit-{i:04d}" for i in range(30)]
    for ps in (0.0, 0.25, 0.5):
        recipe = Recipe(name="digits", layout="digits", size=16, ps=ps)
        _fake_run(store, recipe, None, _softmax(rng.normal(0, 1, (30, 3)) + 2 * np.eye(3)[targets]), targets, ids,
                  vocab=["0", "1", "2"], sweep="sw1", name=f"ps{ps}")
    rep = report.write_report(store, "ps0.25", top=0)
    _png(rep.files["sweep"], (640, 420))
    table, x, groups, name = report.sweep_results(store, "sw1")
    assert (x, groups, name, len(table)) == ("ps", [], "accuracy", 3)
    assert table.loc[table["best"] == "best", "accuracy"].item() == table["accuracy"].max()
    _check_html(rep.html)


def test_report_of_a_dropout_sweep_and_its_trials(cli, tmp_path):
    runs = tmp_path / "runs"
    fast = ["--epochs", "0", "--freeze-epochs", "1", "--size", "16", "--bs", "32", "--sample", "120", "--tta", "1",
            "--no-pretrained", "--quiet"]
    res = cli("sweep-dropout", "digits", "simple_cnn", "--ps", "0,0.5", *fast, "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    (sid,) = [p.name for p in (runs / "sweeps").iterdir()]
    res = cli("report", sid, "--runs-dir", runs, "--top", "4")
    assert res.exit_code == 0, res.output
    folder = runs / "sweeps" / sid / "report"
    _png(folder / "sweep.png", (640, 420))
    assert len(pd.read_csv(folder / "results.csv")) == 2
    page = _check_html(folder / "index.html")  # includes the relative link to the best trial's report
    best = json.loads((runs / "sweeps" / sid / "sweep.json").read_text())["best"]["run_id"]
    assert f"../../../{best}/report/index.html" in page.refs
    _png(runs / best / "report" / "top_losses.png", _grid_size(4))
    trial = store_run = RunStore(runs).load(best)
    rep = report.write_report(RunStore(runs), trial.id, top=0)
    _png(rep.files["sweep"], (640, 420))
    assert store_run.row["sweep"] == sid


def test_report_unknown_run(cli, tmp_path):
    res = cli("report", "nope", "--runs-dir", tmp_path)
    assert res.exit_code == 2 and "No run 'nope'" in res.stderr


def test_stored_config_wins_over_the_recipe_file():
    from fastcls.recipe import get_recipe
    cfg = RunConfig(get_recipe("digits").override(size=16, crop="center", ps_grid=(0.1, 0.3)), "simple_cnn",
                    seed=3).to_dict()
    cfg = json.loads(json.dumps(cfg))  # as read back from config.json
    rc = RunConfig.from_dict(cfg, lenient=True)  # the one way a stored config is read back
    r = rc.recipe
    assert (r.size, r.crop, r.ps_grid, r.data, r.layout) == (16, "center", (0.1, 0.3), "builtin", "digits")
    assert (rc.arch, rc.seed, rc.recipe) == ("simple_cnn", 3, r)
    gone = RunConfig.from_dict({**cfg, "recipe": "deleted-recipe", "data": "/some/folder"}, lenient=True)
    assert (gone.recipe.name, gone.recipe.size, gone.data) == ("deleted-recipe", 16, "/some/folder")
