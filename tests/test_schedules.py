"""--opt / --momentum / nesterov and --sched / --warmup: each schedule's lr per batch follows its formula, the
optimizers are the ones asked for, and the seeds' three schedules run from the command line."""

import math

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.runs import RunStore
from fastcls.train import fit_run
from fastcls.train.schedules import _sgd, check_schedule

pytestmark = pytest.mark.usefixtures("one_thread")
LR, N_ITER = 0.01, 4  # 160 items, 20% valid: 128 training items, 4 batches of 32 per epoch
RUN = dict(sample=160, size=16, epochs=4, freeze_epochs=0, bs=32, tta=0, pretrained=False, seed=4, lr=LR)


class Lrs(Callback):
    """The lr of the last parameter group at every training batch (after the schedulers set it)."""

    order = 70

    def __init__(self):
        self.seen = []

    def before_batch(self):
        if self.training:
            self.seen.append(self.opt.hypers[-1]["lr"])


def _lrs(tmp_path, **kw):
    spy = Lrs()
    res = fit_run(RunConfig.from_options("digits", "simple_cnn", **{**RUN, **kw}), RunStore(tmp_path / "runs"),
                  progress="none", cbs=(spy,))
    return np.array(spy.seen), res


def _cos(lo, hi, p):
    return hi + (lo - hi) * (1 + math.cos(math.pi * p)) / 2


def _expected(sched, warmup=0.0, gamma=None, step=None):
    total = RUN["epochs"] * N_ITER
    out = []
    for t in range(total):
        pos, epoch = t / total, t // N_ITER
        w = warmup / RUN["epochs"]
        if pos < w:
            out.append(LR / 25 + (LR - LR / 25) * pos / w)
            continue
        p = (pos - w) / (1 - w)
        e = epoch - int(warmup)
        out.append({"cosine": lambda: _cos(LR, 0, p), "flat-cos": lambda: LR if p < 0.75 else _cos(LR, 0, (p - .75) / .25),
                    "step": lambda: LR * gamma ** (e // step), "exp": lambda: LR * gamma ** e}[sched]())
    return np.array(out)


@pytest.mark.parametrize("sched, kw", [
    ("cosine", dict(warmup=1.0)),
    ("flat-cos", {}),
    ("step", dict(sets=["lr_gamma=0.5", "lr_step=2"])),
    ("exp", dict(warmup=1.0, sets=["lr_gamma=0.9"])),
])
def test_each_schedule_gives_its_lr_curve(tmp_path, sched, kw):
    lrs, _ = _lrs(tmp_path, sched=sched, **kw)
    gamma = {"step": 0.5, "exp": 0.9}.get(sched)
    want = _expected(sched, kw.get("warmup", 0.0), gamma, 2 if sched == "step" else None)
    assert lrs.shape == want.shape
    np.testing.assert_allclose(lrs, want, rtol=1e-6, atol=1e-12)


def test_one_cycle_warmup_is_its_rising_part(tmp_path):
    lrs, _ = _lrs(tmp_path, warmup=1.0)
    assert int(np.argmax(lrs)) == N_ITER and lrs.max() == pytest.approx(LR, rel=1e-3)  # peak after 1 of 4 epochs
    lrs2, _ = _lrs(tmp_path, warmup=2.0)
    assert int(np.argmax(lrs2)) == 2 * N_ITER


def test_plateau_cuts_the_lr_after_lr_patience_epochs_without_improvement(tmp_path):
    lrs, res = _lrs(tmp_path, sched="plateau", epochs=6, sets=["lr_gamma=0.5", "lr_patience=1"], lr=1e-4)
    per_epoch = lrs.reshape(6, N_ITER)
    assert (per_epoch == per_epoch[:, :1]).all()  # constant within an epoch
    acc = res.history["accuracy"].to_numpy()
    lr, best, want = 1e-4, -np.inf, []
    for a in acc:  # fastai's ReduceLROnPlateau with patience 1: a cut after each epoch that does not improve
        want.append(lr)
        if a > best:
            best = a
        else:
            lr *= 0.5
    np.testing.assert_allclose(per_epoch[:, 0], want, rtol=1e-9)
    assert len(set(want)) > 1, f"the metric never stalled: {acc}"


def _steppers(res):
    return [getattr(c, "func", c).__name__ for c in res.learn.opt.cbs]


def test_optimizers_are_the_ones_asked_for(tmp_path):
    _, res = _lrs(tmp_path, opt="sgd", momentum=0.9, epochs=1)
    h = res.learn.opt.hypers[0]
    assert h["mom"] == 0.9 and "sqr_mom" not in h
    _, res = _lrs(tmp_path, opt="adam", epochs=1)
    assert "l2_reg" in _steppers(res) and "weight_decay" not in _steppers(res)
    _, res = _lrs(tmp_path, epochs=1)  # the default: fastai's Adam, decoupled weight decay
    assert "weight_decay" in _steppers(res) and res.learn.opt.hypers[0]["sqr_mom"] == 0.99
    for opt in ("lamb", "ranger"):
        _, res = _lrs(tmp_path, opt=opt, epochs=1)
        assert np.isfinite(res.metrics["accuracy"])


def test_nesterov_sgd_steps_as_torch_does():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    ours, ref = _sgd([a], 0.1, mom=0.9, nesterov=True), torch.optim.SGD([b], lr=0.1, momentum=0.9, nesterov=True)
    for i in range(4):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert torch.allclose(a, b, atol=1e-7), i
    plain = _sgd([torch.nn.Parameter(torch.zeros(1))], 0.1, mom=0.9)
    assert "nesterov_step" not in [c.__name__ for c in plain.cbs]


@pytest.mark.parametrize("kw, phrase", [
    (dict(sets=["nesterov=true"], opt="sgd"), "needs --opt sgd and --momentum > 0"),
    (dict(sets=["nesterov=true"], momentum=0.9), "needs --opt sgd"),
    (dict(sched="plateau", warmup=1.0), "--warmup with --sched plateau"),
    (dict(warmup=3.0, epochs=3), "not shorter than the 3 epochs"),
])
def test_check_schedule_refuses(kw, phrase):
    with pytest.raises(FastclsError) as e:
        check_schedule(RunConfig.from_options("digits", "simple_cnn", **kw).recipe)
    assert phrase in str(e.value)


def test_bad_values_stop_before_training(cli, tmp_path):
    from .conftest import TINY
    from .test_cli import _assert_clean_error
    runs = tmp_path / "runs"
    base = ["train", "digits", "simple_cnn", *TINY, "--runs-dir", runs]
    _assert_clean_error(cli(*base, "--opt", "adamax"), "'opt' must be one of", runs=runs)
    _assert_clean_error(cli(*base, "--sched", "linear"), "'sched' must be one of", runs=runs)
    _assert_clean_error(cli(*base, "--momentum", "1.5"), "'momentum' must be in [0, 1)", runs=runs)
    _assert_clean_error(cli(*base, "--sched", "plateau", "--warmup", "1"), "--warmup with --sched plateau", runs=runs)


def test_the_seeds_schedules_run_from_the_cli(cli, tmp_path, body_weights):
    body = body_weights
    runs = tmp_path / "runs"
    tiny = ["--size", "16", "--bs", "32", "--sample", "160", "--tta", "0", "--quiet", "--runs-dir", runs]
    seeds = {  # Simpsons: frozen epochs, then unfrozen ones with early stopping on macro-F1 (3 + 50 at full size)
        "simpsons": ["--weights", body, "--freeze-epochs", "1", "--epochs", "4", "--patience", "1",
                     "--set", "monitor=macro_f1", "--set", "extra_metrics=macro_f1"],
        # QuickDraw: ReduceLROnPlateau
        "quickdraw": ["--no-pretrained", "--freeze-epochs", "0", "--epochs", "2", "--sched", "plateau",
                      "--set", "lr_patience=1"],
        # masks: Adam at 1e-4, x0.995 per epoch
        "masks": ["--no-pretrained", "--freeze-epochs", "0", "--epochs", "2", "--opt", "adam", "--lr", "1e-4",
                  "--sched", "exp", "--set", "lr_gamma=0.995"],
    }
    for name, args in seeds.items():
        res = cli("train", "digits", "simple_cnn", *tiny, *args, "--name", name)
        assert res.exit_code == 0, (name, res.output)
    store = RunStore(runs)
    s, q, m = (store.load(n) for n in seeds)
    assert list(s.history["stage"])[0] == "frozen" and "unfrozen" in set(s.history["stage"])
    assert (s.config["patience"], s.config["monitor"], s.metrics["metric_name"]) == (1, "macro_f1", "accuracy")
    assert len(s.history) <= 5
    assert (q.config["sched"], q.config["lr_patience"]) == ("plateau", 1)
    assert (m.config["opt"], m.config["lr"], m.config["sched"], m.config["lr_gamma"]) == ("adam", 1e-4, "exp", 0.995)
