"""Imbalance toolkit: each strategy changes the loss / sampler / predictions as intended on tiny known inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import fastai.callback.data  # noqa: F401  (registers Datasets.weighted_dataloaders, which the oversampling tests use)
from fastai.data.core import Datasets, DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, FocalLossFlat, LabelSmoothingCrossEntropyFlat
from sklearn.metrics import f1_score
from torch import nn

from fastcls.errors import FastclsError
from fastcls.imbalance import (STRATEGIES, ImbalancePlan, WeightedFocalLossFlat, class_counts, class_weights,
                               loss_func, oversample_weights, parse_imbalance, plan)
from fastcls.posthoc import _macro_f1, apply_offsets, fit_thresholds, logit_adjust, tune_tau
from fastcls.metrics import score

COUNTS = np.array([8, 4, 2, 1])


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 4, generator=g) * 2, torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 3, 3, 1, 0])


def _macro(y, probs):
    return score("macro_f1", y, probs)


# ----------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("spec, expected", [
    ("none", ("none",)),
    ("", ("none",)),
    ("weights", ("weights",)),
    ("oversample, Focal", ("focal", "oversample")),
    ("logit_adjust,weights", ("weights", "logit-adjust")),
    ("focal,focal,", ("focal",)),
    ("weights,focal,logit-adjust", ("weights", "focal", "logit-adjust")),
    (("focal", "oversample"), ("focal", "oversample")),
])
def test_parse_valid(spec, expected):
    assert parse_imbalance(spec) == expected
    assert parse_imbalance(parse_imbalance(spec)) == expected  # a parsed tuple passes through


def test_parse_unknown_suggests():
    with pytest.raises(FastclsError, match=r"Unknown imbalance strategy 'focall'.*Did you mean: focal\?"):
        parse_imbalance("focall,oversample")
    with pytest.raises(FastclsError, match="Known strategies: " + ", ".join(STRATEGIES)):
        parse_imbalance("smote")


@pytest.mark.parametrize("spec, match", [
    ("none,focal", "'none' with other strategies"),
    ("weights,oversample", "over-correct"),
])
def test_parse_contradictions(spec, match):
    with pytest.raises(FastclsError, match=match):
        parse_imbalance(spec)


# ----------------------------------------------------------------------------------------------------- counts / weights
def test_class_counts():
    assert class_counts([0, 2, 2, 3], 5).tolist() == [1, 0, 2, 1, 0]
    assert class_counts(torch.tensor([1, 1]), 2).tolist() == [0, 2]
    with pytest.raises(FastclsError, match="outside"):
        class_counts([0, 3], 3)


def test_class_weights():
    w = class_weights(COUNTS)
    assert w.dtype == torch.float32 and w.mean().item() == pytest.approx(1.0)
    assert np.allclose(w.numpy() * COUNTS, (w[0] * COUNTS[0]).item())  # inverse frequency
    ws = class_weights(COUNTS, power=0.5)
    assert np.allclose(ws.numpy() ** 2 * COUNTS, (ws[0] ** 2 * COUNTS[0]).item())  # inverse square root
    assert torch.allclose(class_weights(COUNTS, power=0.0), torch.ones(4))
    wz = class_weights([4, 0, 1])  # an absent class gets the rarest present class's weight, not inf
    assert torch.isfinite(wz).all() and wz[1] == wz[2]


# ----------------------------------------------------------------------------------------------------- losses
def test_plain_ce(batch):
    x, y = batch
    loss = loss_func("none", COUNTS)
    assert isinstance(loss, CrossEntropyLossFlat)
    assert torch.allclose(loss(x, y), F.cross_entropy(x, y))


def test_weighted_ce_matches_manual(batch):
    x, y = batch
    w = class_weights(COUNTS)
    nll = -F.log_softmax(x, 1)[torch.arange(len(y)), y]
    manual = (w[y] * nll).sum() / w[y].sum()
    assert torch.allclose(loss_func("weights", COUNTS)(x, y), manual)
    assert not torch.allclose(manual, F.cross_entropy(x, y))


def test_weights_need_counts():
    with pytest.raises(FastclsError, match="class counts"):
        loss_func("weights")


def test_focal_gamma0_is_ce(batch):
    x, y = batch
    assert torch.allclose(loss_func("focal", COUNTS, gamma=0.0)(x, y), F.cross_entropy(x, y))
    w = class_weights(COUNTS)
    assert torch.allclose(loss_func("weights,focal", COUNTS, gamma=0.0)(x, y), F.cross_entropy(x, y, weight=w))


def test_focal_matches_fastai_and_downweights_easy(batch):
    x, y = batch
    focal = loss_func("focal", COUNTS, gamma=2.0)
    assert isinstance(focal, WeightedFocalLossFlat)
    assert torch.allclose(focal(x, y), FocalLossFlat(gamma=2.0)(x, y))
    # an easy (confident, correct) and a hard example: focal shrinks the easy one's loss far more
    logits, targ = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]), torch.tensor([0, 0])
    focal.reduction = "none"
    ce = F.cross_entropy(logits, targ, reduction="none")
    ratio = focal(logits, targ) / ce
    assert (ratio < 1).all() and ratio[0] < ratio[1] / 10


def test_weighted_focal_uses_true_probability(batch):
    x, y = batch
    w = class_weights(COUNTS)
    logp = F.log_softmax(x, 1)[torch.arange(len(y)), y]
    per_item = -(1 - logp.exp()) ** 2 * logp
    manual = (w[y] * per_item).sum() / w[y].sum()
    assert torch.allclose(loss_func("weights,focal", COUNTS, gamma=2.0)(x, y), manual)


def test_label_smoothing_matches_manual(batch):
    x, y = batch
    eps, n_cls = 0.1, x.shape[1]
    logp = F.log_softmax(x, 1)
    q = F.one_hot(y, n_cls) * (1 - eps) + eps / n_cls
    manual = -(q * logp).sum(1).mean()
    ls = loss_func("none", COUNTS, label_smoothing=eps)
    assert isinstance(ls, LabelSmoothingCrossEntropyFlat)
    assert torch.allclose(ls(x, y), manual)
    assert torch.allclose(loss_func("focal", COUNTS, label_smoothing=eps, gamma=0.0)(x, y), manual)


def test_label_smoothing_with_weights_matches_fastai_formula(batch):
    x, y = batch
    eps, n_cls, w = 0.1, x.shape[1], class_weights(COUNTS)
    logp = F.log_softmax(x, 1)
    nll = -logp[torch.arange(len(y)), y]
    # fastai: uniform part unweighted, NLL part class-weighted (weighted mean)
    manual = eps / n_cls * (-logp.sum(1)).mean() + (1 - eps) * (w[y] * nll).sum() / w[y].sum()
    loss = loss_func("weights", COUNTS, label_smoothing=eps)
    assert torch.allclose(loss(x, y), manual)
    assert not torch.allclose(loss(x, y), loss_func("none", COUNTS, label_smoothing=eps)(x, y))
    # focal + smoothing + weights: every term weighted by the target's class weight
    q = F.one_hot(y, n_cls) * (1 - eps) + eps / n_cls
    per_item = -(q * (1 - logp.exp()) ** 2 * logp).sum(1)
    manual_focal = (w[y] * per_item).sum() / w[y].sum()
    assert torch.allclose(loss_func("weights,focal", COUNTS, label_smoothing=eps)(x, y), manual_focal)


@pytest.mark.parametrize("spec, ls", [("weights", 0.0), ("weights", 0.1), ("weights,focal", 0.1)])
def test_weight_follows_device(spec, ls):
    loss = loss_func(spec, COUNTS, label_smoothing=ls)
    loss.to(torch.device("meta"))  # what fastai's TrainEvalCallback does with the learner's device
    assert loss.func.weight.device.type == "meta"


@pytest.mark.parametrize("kwargs, match", [({"label_smoothing": 1.0}, "label_smoothing"), ({"gamma": -1}, "gamma")])
def test_loss_rejects_bad_values(kwargs, match):
    with pytest.raises(FastclsError, match=match):
        loss_func("focal", COUNTS, **kwargs)


@pytest.mark.parametrize("spec", ["none", "weights", "focal", "weights,focal"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_losses_have_activation_and_decodes(batch, spec, ls):
    x, _ = batch
    loss = loss_func(spec, COUNTS, label_smoothing=ls)
    assert torch.allclose(loss.activation(x).sum(1), torch.ones(len(x)))
    assert torch.equal(loss.decodes(x), x.argmax(1))


# ----------------------------------------------------------------------------------------------------- oversampling
def test_oversample_weights_equal_class_mass():
    labels = np.array([0] * 8 + [1] * 4 + [2] * 1 + [3] * 3)
    w = oversample_weights(labels)
    assert w.shape == (16,) and w.sum() == pytest.approx(1.0)
    mass = np.bincount(labels, weights=w)
    assert np.allclose(mass, 0.25)
    ws = oversample_weights(["cat"] * 9 + ["dog"])  # raw (string) labels work too
    assert ws[-1] == pytest.approx(0.5) and ws[:9].sum() == pytest.approx(0.5)


def test_oversample_with_fastai_weighted_dataloaders():
    labels = np.array([0] * 160 + [1] * 32 + [2] * 8)
    x = torch.randn(len(labels), 3)
    items = list(range(len(labels)))
    dsets = Datasets(items, tfms=[[lambda i: x[i]], [lambda i: torch.tensor(labels[i])]],
                     splits=(items, []))
    np.random.seed(0)
    dls = dsets.weighted_dataloaders(oversample_weights(labels), bs=50, device="cpu")
    drawn = np.concatenate([yb.numpy() for _ in range(15) for _, yb in dls.train])  # 15 epochs, 3000 draws
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(freq, 1 / 3, atol=0.05), freq
    assert np.bincount(labels)[2] / len(labels) == 0.04  # the rare class really was rare


# ----------------------------------------------------------------------------------------------------- logit adjustment
def _probs(logits):
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()


def test_logit_adjust_identity_cases():
    p = _probs(np.random.default_rng(0).normal(size=(6, 3)))
    assert np.allclose(logit_adjust(p, np.ones(3) / 3, tau=1.0), p)
    assert np.allclose(logit_adjust(p, [0.7, 0.2, 0.1], tau=0.0), p)


def test_logit_adjust_formula_and_shift_to_rare():
    p = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1]])
    prior = np.array([0.7, 0.2, 0.1])
    adj = logit_adjust(p, prior * 10, tau=1.0)  # counts are normalised into a prior
    expected = torch.softmax(torch.log(torch.tensor(p)) - torch.log(torch.tensor(prior)), 1).numpy()
    assert np.allclose(adj, expected) and np.allclose(adj.sum(1), 1)
    assert (adj[:, 2] > p[:, 2]).all() and (adj[:, 0] < p[:, 0]).all()
    assert p[1].argmax() == 0 and adj[1].argmax() == 2  # the rare class now wins row 1
    assert logit_adjust(torch.tensor(p), prior).shape == (3, 3)


def _biased_case(seed=0, n=600):
    """A model biased towards the majority class by exactly the training prior."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.8, 0.15, 0.05])
    y = rng.integers(0, 3, n)  # balanced evaluation set
    logits = rng.normal(size=(n, 3)) + 1.2 * np.eye(3)[y] + np.log(prior)
    return _probs(logits), y, prior


def test_tune_tau_improves_biased_model():
    p, y, prior = _biased_case()
    tau = tune_tau(p, y, prior)
    assert 0.5 <= tau <= 1.5
    assert _macro(y, logit_adjust(p, prior, tau)) > _macro(y, p) + 0.05
    assert tune_tau(p, y, prior, grid=[0.0]) == 0.0
    assert tune_tau(p, y, prior, metric="accuracy") > 0


# ----------------------------------------------------------------------------------------------------- offsets
def test_fast_macro_f1_matches_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y, pred = rng.integers(0, 5, 30), rng.integers(0, 4, 30)
        assert _macro_f1(y, pred, 6) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_apply_offsets():
    p = np.array([[0.6, 0.3, 0.1], [0.45, 0.1, 0.45]], dtype=np.float32)
    assert np.allclose(apply_offsets(p, np.zeros(3)), p)
    adj = apply_offsets(p, [0.0, 0.0, np.log(2.0)])
    assert adj.dtype == np.float32 and np.allclose(adj.sum(1), 1)
    assert np.allclose(adj[0], np.array([0.6, 0.3, 0.2]) / 1.1)
    with pytest.raises(FastclsError, match="offsets"):
        apply_offsets(p, [0.0, 1.0])


def test_fit_thresholds_finds_under_predicted_rare_class():
    rng = np.random.default_rng(0)
    n = 400
    y = np.where(rng.random(n) < 0.1, 2, rng.integers(0, 2, n))
    logits = rng.normal(scale=0.5, size=(n, 3)) + 2.0 * np.eye(3)[y]
    logits[:, 2] -= 2.5  # the rare class is systematically under-scored
    p = _probs(logits)
    assert (p.argmax(1) == 2).sum() < (y == 2).sum() / 2
    offsets = fit_thresholds(p, y)
    assert offsets[2] - offsets[:2].max() > 1.0
    before, after = _macro(y, p), _macro(y, apply_offsets(p, offsets))
    assert after > before + 0.1
    assert np.array_equal(offsets, fit_thresholds(p, y))  # deterministic


@pytest.mark.parametrize("seed", range(12))
def test_fit_thresholds_never_decreases(seed):
    rng = np.random.default_rng(seed)
    n, n_cls = int(rng.integers(3, 300)), int(rng.integers(2, 7))
    y = rng.integers(0, n_cls, n)
    p = rng.dirichlet(np.full(n_cls, 0.5), n)
    if seed % 3 == 0:
        p = np.round(p, 1) + 1e-9  # many exact ties
    offsets = fit_thresholds(p, y, iters=3)
    assert _macro(y, apply_offsets(p, offsets)) >= _macro(y, p)


def test_fit_thresholds_keeps_zeros_when_perfect():
    y = np.array([0, 1, 2, 1])
    assert not fit_thresholds(np.eye(3)[y] * 0.9 + 0.1 / 3, y).any()


# ----------------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("spec, loss_type, sampler, la", [
    ("none", CrossEntropyLossFlat, False, False),
    ("weights", CrossEntropyLossFlat, False, False),
    ("focal", WeightedFocalLossFlat, False, False),
    ("oversample", CrossEntropyLossFlat, True, False),
    ("logit-adjust", CrossEntropyLossFlat, False, True),
    ("focal,oversample,logit-adjust", WeightedFocalLossFlat, True, True),
])
def test_plan(spec, loss_type, sampler, la):
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    p = plan(spec, labels, 4)
    assert isinstance(p, ImbalancePlan) and isinstance(p.loss, loss_type)
    assert p.strategies == parse_imbalance(spec) and p.logit_adjust is la
    assert (p.sample_weights is not None) is sampler
    if sampler:
        assert len(p.sample_weights) == len(labels)
    assert p.counts.tolist() == [4, 2, 1, 0] and np.allclose(p.prior, [4 / 7, 2 / 7, 1 / 7, 0])
    assert isinstance(plan(spec, labels, 4, label_smoothing=0.1).loss,
                      WeightedFocalLossFlat if "focal" in spec else LabelSmoothingCrossEntropyFlat)


# ------------------------------------------------------------------------------------------------- fastai end to end
@pytest.mark.parametrize("spec", ["none", "weights", "focal", "oversample", "logit-adjust", "weights,focal",
                                  "focal,oversample", "weights,logit-adjust"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_learner_fit_and_get_preds(spec, ls):
    torch.manual_seed(0)
    np.random.seed(0)
    n_cls = 3
    labels = np.array([0] * 40 + [1] * 12 + [2] * 4)
    x = torch.randn(len(labels), 5) + torch.eye(n_cls, 5)[labels]
    items = list(range(len(labels)))
    dsets = Datasets(items, tfms=[[lambda i: x[i]], [lambda i: torch.tensor(labels[i])]],
                     splits=(items[::2], items[1::2]))
    train_labels = labels[dsets.splits[0]]
    p = plan(spec, train_labels, n_cls, label_smoothing=ls)
    if p.sample_weights is not None:
        dls = dsets.weighted_dataloaders(p.sample_weights, bs=8, device="cpu")
    else:
        dls = dsets.dataloaders(bs=8, device="cpu")
    assert isinstance(dls, DataLoaders)
    learn = Learner(dls, nn.Linear(5, n_cls), loss_func=p.loss)
    with learn.no_logging():
        learn.fit(1, lr=1e-2)
    probs, targs = learn.get_preds()
    assert probs.shape == (len(dsets.valid), n_cls)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-5) and (probs >= 0).all()
    if p.logit_adjust:
        tau = tune_tau(probs, targs, p.prior)
        assert np.allclose(logit_adjust(probs, p.prior, tau).sum(1), 1, atol=1e-5)
    offsets = fit_thresholds(probs, targs)
    assert _macro(targs.numpy(), apply_offsets(probs, offsets)) >= _macro(targs.numpy(), probs)
