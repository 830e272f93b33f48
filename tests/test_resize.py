"""--size 128,224: progressive resizing. Each epoch trains at its size (a spy on the batches), validation and the
stored predictions are at the final size (predict reproduces them at the run's size), bad settings are refused."""

import numpy as np
import pytest
from fastai.callback.core import Callback

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.inference import predict
from fastcls.runs import RunStore
from fastcls.train import fit_run
from fastcls.train.resize import epoch_sizes

from .conftest import TINY
from .test_cli import _assert_clean_error

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(sample=160, bs=32, tta=0, pretrained=False, seed=3)


class Sizes(Callback):
    """The image size of every training and validation batch, per epoch."""

    order = 90

    def __init__(self):
        self.train, self.valid, self.seen = [], [], []  # (not `order`: fastai sorts callbacks by it)

    def before_epoch(self):
        self.train.append(set())
        self.valid.append(set())
        self.seen.append([])

    def before_batch(self):
        (self.train if self.training else self.valid)[-1].add(tuple(self.xb[0].shape[-2:]))
        if self.training:
            self.seen[-1] += self.yb[0].tolist()


def test_epoch_sizes_split_the_epochs_in_order():
    r = RunConfig.from_options("digits", size="16,24").recipe
    assert (r.progressive_sizes, r.size) == ((16,), 24)
    assert epoch_sizes(r, 4) == [16, 16, 24, 24]
    assert epoch_sizes(r, 3) == [16, 24, 24]  # the later sizes get the extra epochs
    r3 = RunConfig.from_options("digits", size=(16, 20, 24)).recipe
    assert epoch_sizes(r3, 3) == [16, 20, 24] and epoch_sizes(r3, 5) == [16, 20, 20, 24, 24]


def test_each_epoch_trains_at_its_size_and_the_run_stores_the_final_size(tmp_path):
    store = RunStore(tmp_path / "runs")
    spy = Sizes()
    cfg = RunConfig.from_options("digits", "simple_cnn", size="16,24", epochs=4, freeze_epochs=0, **RUN)
    res = fit_run(cfg, store, progress="none", cbs=(spy,))
    assert spy.train == [{(16, 16)}, {(16, 16)}, {(24, 24)}, {(24, 24)}]
    assert spy.valid == [{(24, 24)}] * 4  # every validation pass (and the best epoch's choice) at the final size
    run = store.load(res.run_id)
    assert (run.config["size"], run.config["progressive_sizes"]) == (24, [16])
    assert run.meta["epoch_sizes"] == [16, 16, 24, 24]
    again = predict(store, res.run_id, tta=False)  # rebuilt at the run's size, 24
    np.testing.assert_allclose(again.members[run.id][0], run.test_probs[0], atol=1e-4)
    plain = Sizes()  # the items come in the order of a run at one size: one shuffling stream over the sizes
    fit_run(RunConfig.from_options("digits", "simple_cnn", size=24, epochs=4, freeze_epochs=0, **RUN), store,
            progress="none", cbs=(plain,))
    assert spy.seen == plain.seen and spy.seen[2] != spy.seen[0]


def test_sizes_follow_the_stages(tmp_path, body_weights):
    """A frozen stage then an unfrozen one, three sizes over their three epochs: one size per epoch, in order."""
    spy = Sizes()
    cfg = RunConfig.from_options("digits", "simple_cnn", size="16,20,24", epochs=2, freeze_epochs=1,
                                 weights=body_weights, **RUN)
    fit_run(cfg, RunStore(tmp_path / "runs"), progress="none", cbs=(spy,))
    assert spy.train == [{(16, 16)}, {(20, 20)}, {(24, 24)}]
    assert spy.valid == [{(24, 24)}] * 3


def test_bad_sizes_are_refused(cli, tmp_path):
    runs = tmp_path / "runs"
    args = [a for a in TINY if a != "--quiet"]
    res = cli("train", "digits", "simple_cnn", *args, "--size", "16,24", "--quiet", "--runs-dir", runs)
    _assert_clean_error(res, "trains at 2 sizes in turn, but the run has 1 epoch(s)", runs=runs)
    res = cli("train", "digits", "simple_cnn", "--size", "16,x", "--runs-dir", runs)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--size takes an image size in pixels" in res.output.replace("\n", " ") or "--size takes" in res.stderr
    with pytest.raises(FastclsError, match="'progressive_sizes' must be positive"):
        RunConfig.from_options("digits", sets=["progressive_sizes=0"])
