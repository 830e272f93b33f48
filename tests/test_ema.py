"""--ema DECAY: the average timm's ModelEmaV3 keeps during the unfrozen stage is the closed-form exponential average of
the weights after each step; the run scores the raw and the averaged model and keeps the better on valid."""

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from safetensors.torch import load_file

from fastcls.config import RunConfig
from fastcls.metrics import get_metric
from fastcls.runs import RunStore
from fastcls.train import fit_run

from .conftest import TINY
from .test_cli import _assert_clean_error

pytestmark = pytest.mark.usefixtures("one_thread")
DECAY = 0.8


class Steps(Callback):
    """The model's state dict at the start of each fit and after every optimizer step."""

    def __init__(self):
        self.fits = []

    def before_fit(self):
        self.fits.append([self._state()])

    def after_step(self):
        self.fits[-1].append(self._state())

    def _state(self):
        return {k: v.detach().clone().double() for k, v in self.learn.model.state_dict().items()
                if v.dtype.is_floating_point}


def test_ema_is_the_closed_form_average_of_the_unfrozen_stage_and_the_better_model_is_kept(tmp_path, body_weights):
    steps = Steps()
    cfg = RunConfig.from_options("digits", "simple_cnn", weights=body_weights, sample=160, size=16, freeze_epochs=1,
                                 epochs=2, bs=32, tta=0, seed=2, ema=DECAY)
    store = RunStore(tmp_path / "runs")
    res = fit_run(cfg, store, progress="none", cbs=(steps,))
    frozen, unfrozen = steps.fits  # the average starts with the unfrozen stage, from the weights it starts with
    assert len(frozen) > 1 and len(unfrozen) == 1 + 2 * 4  # 128 training items / bs 32: 4 steps per epoch
    ema = res.learn.run_ema
    assert ema.updates == len(unfrozen) - 1
    k = ema.updates
    for name, got in ema.weights.items():
        if not got.dtype.is_floating_point:
            continue
        # ema_k = d^k w_0 + sum_i (1 - d) d^(k - i) w_i over the weights w_i after step i
        want = DECAY ** k * unfrozen[0][name] + sum((1 - DECAY) * DECAY ** (k - i) * unfrozen[i][name]
                                                    for i in range(1, k + 1))
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), name
    assert any(not torch.allclose(ema.weights[n].double(), w, atol=1e-4) for n, w in unfrozen[-1].items())
    # both models scored; the stored run is the better one (a tie keeps the raw model), its weights and predictions
    run = store.load(res.run_id)
    m, meta = run.metrics, run.meta["ema"]
    raw, avg = m["accuracy_raw_model"], m["accuracy_ema_model"]
    assert m["ema_used"] == (avg > raw) and meta["used"] == ("ema" if avg > raw else "raw")
    assert meta["valid"] == {"raw": raw, "ema": avg} and meta["updates"] == k and m["ema_decay"] == DECAY
    assert m["accuracy"] == pytest.approx(max(raw, avg))
    assert m["accuracy"] == pytest.approx(get_metric("accuracy")(run.valid_targets, np.asarray(run.valid_probs)[0]))
    stored = load_file(run.weights_path)
    kept = ema.weights if m["ema_used"] else res.learn.model.state_dict()
    assert all(torch.equal(stored[n], kept[n].cpu()) for n in stored)


def test_ema_flag_reaches_the_config_and_bad_decays_are_refused(cli, tmp_path):
    runs = tmp_path / "runs"
    res = cli("train", "digits", "simple_cnn", *TINY, "--runs-dir", runs, "--ema", "0.9", "--name", "e")
    assert res.exit_code == 0, res.output
    run = RunStore(runs).load("e")
    assert run.config["ema"] == 0.9 and "accuracy_ema_model" in run.metrics
    for bad in ("1", "0", "-0.5"):
        _assert_clean_error(cli("train", "digits", "simple_cnn", *TINY, "--runs-dir", tmp_path / "bad", "--ema", bad),
                            "'ema' must be a decay in (0, 1)", runs=tmp_path / "bad")


@pytest.mark.parametrize("ema_better", [True, False])
def test_choose_keeps_the_model_better_on_valid_and_its_weights(ema_better):
    from types import SimpleNamespace
    from torch import nn
    from fastcls.recipe import get_recipe
    from fastcls.train.ema import Ema, choose
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = Ema(0.5)
    ema.start(model)
    with torch.no_grad():
        ema.avg.module.weight.fill_(-1.0)
    y = np.array([0, 1, 1, 1])

    def predict():  # right on all items with the better model, on one with the other
        good = (model.weight[0, 0] > 0) != ema_better
        p = np.eye(2)[y if good else [0, 0, 0, 0]] * 0.8 + 0.1
        return p[None], y, None
    (probs, targets, _), metrics, meta = choose(SimpleNamespace(model=model), ema, get_recipe("digits"), predict)
    assert metrics["ema_used"] is ema_better and meta["used"] == ("ema" if ema_better else "raw")
    assert (metrics["accuracy_ema_model"], metrics["accuracy_raw_model"]) == ((1.0, 0.25) if ema_better else (0.25, 1.0))
    assert (probs[0].argmax(1) == y).all()
    assert float(model.weight[0, 0]) == (-1.0 if ema_better else 1.0)  # the learner's model holds the kept weights
