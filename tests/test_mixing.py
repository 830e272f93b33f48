"""Mixing (--mixup / --cutmix, --mix-off-epoch): the batches a run trains on and their targets are mixed, the last
epochs are not, and the settings that make no sense are refused before anything trains."""

import pytest
import torch
from fastai.callback.core import Callback
from fastai.layers import NoneReduce

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.imbalance import parse_imbalance
from fastcls.runs import RunStore
from fastcls.train import fit_run
from fastcls.train.mixing import CutMixOff, MixUpOff, check_mixing

from .conftest import TINY
from .test_cli import _assert_clean_error

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(sample=128, size=16, epochs=3, freeze_epochs=0, bs=32, tta=0, pretrained=False, seed=1)


class Spy(Callback):
    """Record each training batch before mixing (order -1, before fastai's mixing at 0) and after it, with the loss."""

    order = -1

    def __init__(self):
        self.batches = []

    def before_batch(self):
        if self.training:
            self.batches.append(dict(epoch=self.epoch, x=_plain(self.x), y=_plain(self.y)))

    def after_loss(self):
        if self.training:
            mix = next(cb for cb in self.learn.cbs if isinstance(cb, (MixUpOff, CutMixOff)))
            b = self.batches[-1]
            b.update(mixed_x=_plain(self.x), pred=_plain(self.pred), loss=_plain(self.loss),
                     on=mix.on, lam=getattr(mix, "lam", None), y1=_plain(mix.yb1[0]) if mix.on else None,
                     lf=mix.old_lf if mix.on else self.learn.loss_func)


def _plain(t):
    """A plain tensor copy (fastai's TensorImage / TensorCategory refuse to index each other)."""
    return t.detach().as_subclass(torch.Tensor).clone()


def _train(tmp_path, **kw):
    spy = Spy()
    cfg = RunConfig.from_options("digits", "simple_cnn", **{**RUN, **kw})
    fit_run(cfg, RunStore(tmp_path / "runs"), progress="none", cbs=(spy,))
    return spy.batches


def _per_item(lf, pred, y):
    with NoneReduce(lf) as f:
        return f(pred, y)


@pytest.mark.parametrize("imbalance", ["none", "focal,oversample"])
def test_mixup_mixes_inputs_and_targets_until_the_mix_off_epochs(tmp_path, imbalance):
    batches = _train(tmp_path, mixup=2.0, mix_off_epoch=1, imbalance=imbalance, label_smoothing=0.1)
    assert {b["epoch"] for b in batches} == {0, 1, 2}
    for b in batches:
        x, xm, y, lam = b["x"], b["mixed_x"], b["y"], b["lam"]
        if b["epoch"] == 2:  # the last (mix-off) epoch: plain batches, the recipe's own loss
            assert not b["on"] and torch.equal(xm, x)
            assert torch.allclose(b["loss"], b["lf"](b["pred"], y))
            continue
        assert b["on"] and not torch.equal(xm, x)
        assert lam.shape == (len(y),) and (lam >= 0.5).all() and (lam < 1).all()
        # each mixed image is lam * its own + (1 - lam) * one other image of the batch, whose label is y1
        lam4 = lam[:, None, None, None]
        partner = (xm - lam4 * x) / (1 - lam4)
        dist = ((partner[:, None] - x[None]) ** 2).flatten(2).mean(2)
        j = dist.argmin(1)
        assert dist.min(1).values.max() < 1e-6
        assert torch.equal(y[j], b["y1"])
        assert (b["y1"] != y).any()
        # the target is mixed the same way: the loss is lam * loss(y) + (1 - lam) * loss(partner's y), per item
        want = torch.lerp(_per_item(b["lf"], b["pred"], b["y1"]), _per_item(b["lf"], b["pred"], y), lam).mean()
        assert torch.allclose(b["loss"], want, atol=1e-6)
        assert not torch.allclose(b["loss"], b["lf"](b["pred"], y), atol=1e-4)


def test_cutmix_pastes_one_patch_and_weights_the_targets_by_its_area(tmp_path):
    batches = _train(tmp_path, cutmix=1.0, mix_off_epoch=2, epochs=3)
    assert [b["on"] for b in batches if b["epoch"] == 0] and all(b["on"] for b in batches if b["epoch"] == 0)
    assert not any(b["on"] for b in batches if b["epoch"] > 0)
    pasted = 0
    for b in (b for b in batches if b["on"]):
        x, xm, y, lam = b["x"], b["mixed_x"], b["y"], float(b["lam"])
        changed = (xm != x).any(1)  # (bs, H, W): pixels the patch replaced (where the partner differs)
        H, W = x.shape[-2:]
        if changed.any():
            rows, cols = changed.any(0).any(1).nonzero(), changed.any(0).any(0).nonzero()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert h * w <= round((1 - lam) * H * W)  # inside one box of area (1 - lam) * H * W
            pasted += 1
        want = torch.lerp(_per_item(b["lf"], b["pred"], b["y1"]), _per_item(b["lf"], b["pred"], y),
                          torch.tensor(lam)).mean()
        assert torch.allclose(b["loss"], want, atol=1e-6)
    assert pasted
    for b in (b for b in batches if not b["on"]):
        assert torch.equal(b["mixed_x"], b["x"]) and torch.allclose(b["loss"], b["lf"](b["pred"], b["y"]))


@pytest.mark.parametrize("kw, phrase", [
    (dict(mixup=0.4, cutmix=1.0), "give one of them"),
    (dict(mix_off_epoch=1), "stops a mixing that is not on"),
    (dict(mixup=0.4, mix_off_epoch=4, epochs=3), "more than the 3 epochs"),
    (dict(mixup=0.4, imbalance="weights"), "cannot wrap the class-weighted loss"),
    (dict(cutmix=1.0, imbalance="focal,weights"), "--imbalance oversample"),
])
def test_check_mixing_refuses(kw, phrase):
    r = RunConfig.from_options("digits", "simple_cnn", **kw).recipe
    with pytest.raises(FastclsError, match=None) as e:
        check_mixing(r, parse_imbalance(r.imbalance))
    assert phrase in str(e.value)


def test_mixing_flags_reach_the_config_and_bad_values_stop_before_training(cli, tmp_path):
    runs = tmp_path / "runs"
    res = cli("train", "digits", "simple_cnn", *TINY, "--runs-dir", runs, "--mixup", "0.4", "--epochs", "2",
              "--mix-off-epoch", "1", "--name", "m")
    assert res.exit_code == 0, res.output
    c = RunStore(runs).load("m").config
    assert (c["mixup"], c["cutmix"], c["mix_off_epoch"]) == (0.4, 0.0, 1)
    assert RunConfig.from_options("digits", sets=["cutmix=1", "mix_off_epoch=1"]).recipe.cutmix == 1.0
    bad = tmp_path / "bad"
    base = ["train", "digits", "simple_cnn", *TINY, "--runs-dir", bad]
    _assert_clean_error(cli(*base, "--mixup", "-1"), "'mixup' must be >= 0", runs=bad)
    _assert_clean_error(cli(*base, "--mixup", "0.4", "--imbalance", "weights"), "cannot wrap the class-weighted",
                        runs=bad)
    _assert_clean_error(cli(*base, "--mix-off-epoch", "1"), "stops a mixing that is not on", runs=bad)
    _assert_clean_error(cli(*base, "--mixup", "0.4", "--cutmix", "1"), "give one of them", runs=bad)
