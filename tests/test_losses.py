"""The seeds' other losses: LDAM with deferred re-weighting (DRW) and a soft-F1 loss, against values computed by
hand on tiny tensors; DRW's weights switch on when they should in a real run; contradictory settings are refused."""

import math

import pytest
import torch
from fastai.callback.core import Callback

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.imbalance import (LDAMLossFlat, SoftF1LossFlat, drw_weights, ldam_margins, loss_func, parse_imbalance,
                               plan)
from fastcls.runs import RunStore
from fastcls.train import fit_run, prepare

from .conftest import TINY
from .test_cli import _assert_clean_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ldam_margins_and_drw_weights_by_hand():
    m = ldam_margins([100, 1, 16])  # n ** -1/4: 0.3162, 1, 0.5; the rarest class's margin is 0.5
    torch.testing.assert_close(m, torch.tensor([0.5 * 100 ** -0.25, 0.5, 0.25]))
    b = 0.9999
    eff = [(1 - b ** n) / (1 - b) for n in (100, 1)]  # effective numbers: 99.505..., 1
    w = [1 / e for e in eff]
    torch.testing.assert_close(drw_weights([100, 1]), torch.tensor([2 * v / sum(w) for v in w]))
    assert drw_weights([5, 0]).tolist() == pytest.approx([1.0, 1.0])  # an empty class weighs like the rarest


def test_ldam_loss_by_hand():
    m = ldam_margins([100, 1])  # [0.1581, 0.5]
    x, y = torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1])
    # item 0: logits (2 - m0, 1), true class 0; item 1: logits (0, 1 - m1), true class 1
    l0 = math.log(1 + math.exp(1 - (2 - m[0].item())))
    l1 = math.log(1 + math.exp(0 - (1 - 0.5)))
    assert LDAMLossFlat(m)(x, y).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    w = torch.tensor([0.2, 1.8])  # weighted: sum(w_y * l) / sum(w_y), like F.cross_entropy
    assert LDAMLossFlat(m, weight=w)(x, y).item() == pytest.approx((0.2 * l0 + 1.8 * l1) / 2.0, rel=1e-6)
    probs = LDAMLossFlat(m).activation(x)  # predictions: the softmax of the logits themselves, no margin
    torch.testing.assert_close(probs, torch.softmax(x, -1))


def test_soft_f1_loss_by_hand():
    x = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # probabilities (0.5, 0.5) and (0.75, 0.25)
    y = torch.tensor([0, 1])
    f1_0 = 2 * 0.5 / (2 * 0.5 + 0.75 + 0.5)  # class 0: tp 0.5, fp 0.75, fn 0.5
    f1_1 = 2 * 0.25 / (2 * 0.25 + 0.5 + 0.75)  # class 1: tp 0.25, fp 0.5, fn 0.75
    assert SoftF1LossFlat()(x, y).item() == pytest.approx(1 - (f1_0 + f1_1) / 2, rel=1e-5)
    perfect = torch.tensor([[30.0, -30.0], [-30.0, 30.0]])
    assert SoftF1LossFlat()(perfect, y).item() == pytest.approx(0.0, abs=1e-6)


def test_plan_picks_the_losses():
    labels = [0] * 30 + [1] * 3
    p = plan("ldam,drw", labels, 2)
    assert isinstance(p.loss, LDAMLossFlat) and p.loss.func.weight is None  # unweighted until DRW switches it on
    torch.testing.assert_close(p.drw, drw_weights([30, 3]))
    q = plan("drw", labels, 2)
    x, y = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    assert q.loss(x, y).item() == pytest.approx(torch.nn.functional.cross_entropy(x, y).item(), rel=1e-6)
    assert isinstance(plan("soft-f1,oversample", labels, 2).loss, SoftF1LossFlat)


@pytest.mark.parametrize("spec, phrase", [
    ("focal,ldam", "both are the training loss"), ("soft-f1,ldam", "both are the training loss"),
    ("weights,drw", "switched on late"), ("drw,oversample", "over-correct"), ("soft-f1,weights", "no class weights"),
])
def test_contradictions_are_refused(spec, phrase):
    with pytest.raises(FastclsError, match=phrase):
        parse_imbalance(spec)


def test_bad_combinations_with_other_settings_are_refused():
    with pytest.raises(FastclsError, match="takes no label smoothing"):
        loss_func("soft-f1", [3, 3], label_smoothing=0.1)
    for kw, phrase in [(dict(imbalance="soft-f1", mixup=0.4), "one number per batch"),
                       (dict(imbalance="ldam,drw", cutmix=1.0), "cannot wrap the deferred re-weighting")]:
        with pytest.raises(FastclsError, match=phrase):
            prepare(RunConfig.from_options("digits", "simple_cnn", **kw))
    with pytest.raises(FastclsError, match="'drw_start' must be in"):
        RunConfig.from_options("digits", sets=["drw_start=1.0"])


class Weights(Callback):
    """The loss's class weights at each training epoch."""

    order = 90

    def __init__(self):
        self.seen = []

    def before_train(self):
        w = self.learn.loss_func.func.weight
        self.seen.append(None if w is None else w.clone())


def test_drw_switches_the_weights_on_late_in_a_run(tmp_path):
    spy = Weights()
    cfg = RunConfig.from_options("digits", "simple_cnn", sample=160, size=16, epochs=4, freeze_epochs=0, bs=32,
                                 tta=0, pretrained=False, imbalance="ldam,drw", sets=["drw_start=0.5"])
    res = fit_run(cfg, RunStore(tmp_path / "runs"), progress="none", cbs=(spy,))
    assert spy.seen[:2] == [None, None]
    want = drw_weights(res.learn.imbalance.counts)
    for w in spy.seen[2:]:
        torch.testing.assert_close(w, want)


def test_cli_trains_with_each_loss_and_refuses_bad_ones(cli, tmp_path):
    runs = tmp_path / "runs"
    for spec in ("ldam,drw", "soft-f1"):
        res = cli("train", "digits", "simple_cnn", *TINY, "--imbalance", spec, "--runs-dir", runs)
        assert res.exit_code == 0, res.output
    res = cli("train", "digits", "simple_cnn", *TINY, "--imbalance", "focal,ldam", "--runs-dir", tmp_path / "bad")
    _assert_clean_error(res, "both are the training loss", runs=tmp_path / "bad")
