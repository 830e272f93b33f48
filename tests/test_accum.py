"""--accum N: N micro-batches step exactly like one batch N times larger (a tiny linear model: no batch-norm, no
dropout), the run steps once per N micro-batches, and bad values are refused."""

import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch import nn

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.runs import RunStore
from fastcls.train import fit_run
from fastcls.train.schedules import accumulation

from .test_cli import _assert_clean_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(bs: int, accum: int, epochs: int = 2, drop_last: bool = False):
    """A 4 -> 3 linear model after `epochs` epochs over 16 fixed items in order, batches of `bs`, plain SGD."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    items = list(zip(x, y))
    dls = DataLoaders(DataLoader(items, bs=bs, drop_last=drop_last), DataLoader(items, bs=16), device="cpu")
    torch.manual_seed(1)
    learn = Learner(dls, nn.Linear(4, 3), loss_func=nn.CrossEntropyLoss(), opt_func=SGD, lr=0.5)
    recipe = RunConfig.from_options("digits", "simple_cnn", accum=accum).recipe
    cb = accumulation(recipe)
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, lr=0.5, cbs=[cb] if cb is not None else [])
    return learn.model.weight.detach().clone(), learn.model.bias.detach().clone()


@pytest.mark.parametrize("bs, accum", [(8, 2), (4, 4), (2, 8)])
def test_micro_batches_step_like_one_big_batch(bs, accum):
    w, b = _fit(16, 1)
    w2, b2 = _fit(bs, accum)
    torch.testing.assert_close(w2, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b2, b, rtol=1e-5, atol=1e-6)
    w3, _ = _fit(bs, 1)  # the same micro-batches stepping one by one end elsewhere
    assert (w3 - w).abs().max() > 1e-3


def test_an_epochs_leftover_micro_batches_are_dropped():
    """4 micro-batches of 4 with --accum 3: each epoch steps once on its first 12 items, like one batch of 12 (the 4th
    micro-batch's gradient is not carried into the next epoch)."""
    w, b = _fit(12, 1, drop_last=True)
    w2, b2 = _fit(4, 3)
    torch.testing.assert_close(w2, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b2, b, rtol=1e-5, atol=1e-6)


class Steps(Callback):
    """Counts optimizer steps and training micro-batches per epoch."""

    order = 90

    def __init__(self):
        self.steps, self.batches = [], []

    def before_epoch(self):
        self.steps.append(0)
        self.batches.append(0)

    def after_step(self):
        self.steps[-1] += 1

    def after_batch(self):
        if self.training:
            self.batches[-1] += 1


@pytest.mark.parametrize("accum, steps", [(1, 4), (2, 2), (3, 1)])
def test_a_run_steps_once_per_accum_micro_batches(tmp_path, accum, steps):
    """160 items, 20% valid: 4 micro-batches of 32 per epoch; with --accum 3 the 4th fills no step and is dropped."""
    spy = Steps()
    cfg = RunConfig.from_options("digits", "simple_cnn", sample=160, size=16, epochs=2, freeze_epochs=0, bs=32, tta=0,
                                 pretrained=False, accum=accum)
    res = fit_run(cfg, RunStore(tmp_path / "runs"), progress="none", cbs=(spy,))
    assert spy.batches == [4, 4] and spy.steps == [steps, steps]
    assert RunStore(tmp_path / "runs").load(res.run_id).config["accum"] == accum


def test_bad_accum_is_refused(cli, tmp_path):
    with pytest.raises(FastclsError, match="'accum' must be >= 1"):
        RunConfig.from_options("digits", accum=0)
    res = cli("train", "digits", "simple_cnn", "--accum", "0", "--runs-dir", tmp_path / "runs")
    _assert_clean_error(res, "'accum' must be >= 1 micro-batch per step", runs=tmp_path / "runs")
