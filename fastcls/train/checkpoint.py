"""Resumable training without pickle: a fastai callback that checkpoints every epoch into the run's folder.

A checkpoint is one `checkpoint.safetensors` file, replaced atomically after every epoch: the model, the best
epoch's weights (so a resumed run keeps tracking the best and never replaces it by a worse one), the optimizer
state flattened to tensors, the RNG states (torch, CUDA, numpy, python, and each DataLoader's own shuffling RNG)
as uint8 tensors, and in the safetensors metadata a JSON document with everything else: stage, epoch, the
history so far, the trackers' best values, the optimizer's per-parameter scalars and hyper-parameters.

Resuming rebuilds the learner from the stored config and restarts `fit_one_cycle` with fastai's `start_epoch`,
so the one-cycle schedule continues where it stopped; the state is restored at the first epoch that really
runs. With the same seed the result matches an uninterrupted run (see the tests for the measured tolerance).
"""

__all__ = ["Checkpointer", "RunInterrupted", "interrupt_signals", "rng_state", "set_rng_state", "optimizer_state",
           "load_optimizer_state", "read_checkpoint"]

import json
import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from fastai.callback.core import Callback

from .._faults import fault
from .callbacks import EarlyStop, EpochLine, KeepBest, ordered, skipped_epoch
from .distributed import bare_model
from ..errors import FastclsError, RunInterrupted  # noqa: F401  (RunInterrupted: re-exported)
from ..files import write_atomic

FORMAT = 1


@contextmanager
def interrupt_signals():
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt while training, as Ctrl-C already is, so both save state."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
            if s is not None and signal.getsignal(s) is signal.SIG_DFL]  # e.g. `nohup` ignores SIGHUP: keep that
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- RNG states as uint8 tensors ---------------------------------------------------------------------------------------
def _words(state_words) -> torch.Tensor:
    return torch.from_numpy(np.asarray(state_words, dtype="<u4").view(np.uint8).copy())


def _unwords(t: torch.Tensor) -> tuple:
    return tuple(int(v) for v in t.numpy().view("<u4"))


def rng_state(dls=None) -> tuple[dict, dict]:
    """Every RNG a training epoch draws from: (tensors, JSON-able rest)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = _words(keys)
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    gens = {"python": random}
    if dls is not None:  # fastai DataLoaders shuffle with their own random.Random
        gens.update({f"dl{i}": dl.rng for i, dl in enumerate(dls.loaders) if hasattr(dl, "rng")})
    for name, gen in gens.items():
        version, words, gauss = gen.getstate()
        tensors[f"rng.{name}"] = _words(words)
        meta[name] = [version, gauss]
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict, dls=None):
    """Restore what `rng_state` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(_unwords(tensors["rng.numpy"]), dtype=np.uint32), pos, has_gauss, cached))
    gens = {"python": random}
    if dls is not None:
        gens.update({f"dl{i}": dl.rng for i, dl in enumerate(dls.loaders) if hasattr(dl, "rng")})
    for name, gen in gens.items():
        if f"rng.{name}" in tensors:
            version, gauss = meta[name]
            gen.setstate((version, _unwords(tensors[f"rng.{name}"]), gauss))


# -- optimizer state as tensors + JSON ---------------------------------------------------------------------------------
def _plain(v):
    """A JSON-able scalar from a python / numpy / 0-d torch value."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def optimizer_state(opt) -> tuple[dict, dict]:
    """A fastai Optimizer's state: per-parameter tensors as `opt.<i>.<key>`, scalars and hypers as JSON."""
    sd = opt.state_dict()
    tensors, plain = {}, []
    for i, state in enumerate(sd["state"]):
        rest = {}
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                rest[k] = _plain(v)
        plain.append(rest)
    meta = {"state": plain, "hypers": [{k: _plain(v) for k, v in h.items()} for h in sd["hypers"]]}
    if "count" in sd:  # fastai's Lookahead (ranger): its step count and slow weights (None before the first step)
        meta["lookahead_count"] = int(sd["count"])
        for g, group in enumerate(sd["slow_weights"] or ()):
            tensors.update({f"slow.{g}.{i}": w.detach().cpu().contiguous() for i, w in enumerate(group)})
        meta["slow_groups"] = [len(group) for group in sd["slow_weights"] or ()]
    return tensors, meta


def load_optimizer_state(opt, tensors: dict, meta: dict):
    """Restore what `optimizer_state` captured, each tensor on its parameter's device."""
    params = [p for p, *_ in opt.all_params()]
    states = [dict(s) for s in meta["state"]]
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            states[int(i)][k] = v.to(params[int(i)].device)
    sd = {"state": states, "hypers": meta["hypers"]}
    if "lookahead_count" in meta:
        from fastcore.foundation import L
        dev = params[0].device if params else "cpu"
        slow = L(L(tensors[f"slow.{g}.{i}"].to(dev) for i in range(n)) for g, n in enumerate(meta["slow_groups"]))
        sd.update(count=meta["lookahead_count"], slow_weights=slow if meta["slow_groups"] else None)
    opt.load_state_dict(sd)


def _unshared(tensors: dict) -> dict:
    """Copies of tensors that share memory with an earlier one (tied weights): safetensors refuses shared storage."""
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


# -- the file ----------------------------------------------------------------------------------------------------------
def read_checkpoint(path) -> Optional[dict]:
    """A checkpoint as {'tensors': {...}, 'meta': {...}}, or None when there is none (interrupted before epoch 1)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("fastcls", "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FastclsError(f"Checkpoint {path} cannot be read ({e}). Train the run again.") from None
    if not meta or meta.get("format") != FORMAT:
        raise FastclsError(f"{path} is not a fastcls checkpoint of format {FORMAT}. Train the run again.")
    return {"tensors": tensors, "meta": meta}


@ordered
class Checkpointer(Callback):
    """Save the full training state after every epoch; restore it at the first epoch a resumed fit really runs.

    `train` tells it the stage (0 frozen, 1 unfrozen) and hands it the KeepBest, EpochLine and early-stopping
    callbacks, whose own `state_dict` / `load_state_dict` it saves and restores. It runs after KeepBest and EpochLine
    (so the best weights and the history are current) and before early stopping (which may end the fit in its own
    `after_epoch`).
    """

    run_after, run_before = (KeepBest, EpochLine), EarlyStop

    def __init__(self, path, resume: Optional[dict] = None):
        self.path, self.resume = Path(path), resume
        self.stage, self.keep, self.lines, self.es, self.ema, self.plateau = 0, None, None, None, None, None
        self.pending = resume is not None
        self.epochs_done = resume["meta"]["epochs_done"] if resume else 0

    def attach(self, keep: KeepBest, lines: EpochLine, es: Optional[EarlyStop] = None, ema=None, plateau=None):
        """The callbacks whose state the checkpoint holds (`ema`: the run's `fastcls.train.ema.Ema`; `plateau`: its
        `fastcls.train.schedules.Plateau`; if any)."""
        self.keep, self.lines, self.es, self.ema, self.plateau = keep, lines, es, ema, plateau

    def start_epoch(self, stage: int, n_epoch: int) -> int:
        """The first epoch of `stage` still to train (`n_epoch`: the stage is already done)."""
        if self.resume is None:
            return 0
        m = self.resume["meta"]
        if stage < m["stage"]:
            return n_epoch
        if stage > m["stage"]:
            return 0
        return n_epoch if m["stopped"] else min(m["epoch"] + 1, n_epoch)

    # -- fastai events
    def before_epoch(self):
        if skipped_epoch(self.learn):
            return
        if self.pending:
            self.restore(self.learn)

    def before_batch(self):
        if self.training:
            fault(f"batch-{self.epochs_done}-{self.iter}")

    def after_epoch(self):
        if skipped_epoch(self.learn):
            return
        self.epochs_done += 1
        self.save()
        fault(f"after-epoch-{self.epochs_done - 1}")

    # -- state
    def save(self):
        learn = self.learn
        model = bare_model(learn.model)  # DDP (several processes) prefixes every key with 'module.'
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        keep = self.keep.state_dict()
        best = keep.pop("weights")
        if best is not None:
            tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best.items()})
        opt_t, opt_m = optimizer_state(learn.opt)
        rng_t, rng_m = rng_state(learn.dls)
        tensors.update(opt_t)
        tensors.update(rng_t)
        ema = self.ema.state_dict() if self.ema is not None else {"weights": None, "updates": 0}
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in (ema["weights"] or {}).items()})
        smooth = learn.recorder.smooth_loss
        tensors["recorder.smooth_val"] = torch.as_tensor(smooth.val).detach().cpu().reshape(1).float()
        es = self.es.state_dict() if self.es is not None else {"wait": None, "stopped": False}
        rows = self.lines.state_dict()["rows"]
        meta = {"format": FORMAT, "stage": self.stage, "epoch": int(learn.epoch), "n_epoch": int(learn.n_epoch),
                "epochs_done": self.epochs_done, "stopped": es["stopped"], "es_wait": es["wait"],
                "keep": {k: _plain(v) for k, v in keep.items()}, "history": rows,
                "smooth_count": int(smooth.count), "opt": opt_m, "rng": rng_m, "ema_updates": ema["updates"],
                "plateau": self.plateau.state_dict() if self.plateau is not None else None}
        from safetensors.torch import save_file
        tensors = _unshared(tensors)
        write_atomic(self.path, lambda p: save_file(tensors, str(p), metadata={"fastcls": json.dumps(meta)}))
        import pandas as pd
        write_atomic(self.path.with_name("history.csv"), lambda p: pd.DataFrame(rows).to_csv(p, index=False))

    def restore(self, learn):
        """Put the checkpoint's state into `learn` and the attached callbacks (once)."""
        self.pending = False
        t, m = self.resume["tensors"], self.resume["meta"]
        dev = next(learn.model.parameters()).device
        bare_model(learn.model).load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        best = {k[5:]: v.to(dev) for k, v in t.items() if k.startswith("best.")}
        self.keep.load_state_dict({**m["keep"], "weights": best})
        self.lines.load_state_dict({"rows": m["history"]})
        if self.ema is not None:  # after the model: without a saved average (frozen stage) it starts from the model
            ema = {k[4:]: v.to(dev) for k, v in t.items() if k.startswith("ema.")}
            self.ema.load_state_dict({"weights": ema or None, "updates": m.get("ema_updates", 0)}, learn.model)
        later_stage = self.stage != m["stage"]
        if self.es is not None:  # fastai resets `wait` when a new fit starts
            self.es.load_state_dict({"best": self.keep.best, "wait": 0 if later_stage else m["es_wait"]})
        if self.plateau is not None and m.get("plateau") and not later_stage:  # a new stage's fit starts it afresh
            self.plateau.load_state_dict(m["plateau"])
        if learn.opt is not None:
            load_optimizer_state(learn.opt, t, m["opt"])
            if later_stage:
                learn.opt.clear_state()  # as `unfreeze` did between the stages
        if not later_stage:  # a new fit starts its smoothed training loss afresh
            smooth = learn.recorder.smooth_loss
            smooth.count, smooth.val = m["smooth_count"], t["recorder.smooth_val"][0].to(dev)
        set_rng_state(t, m["rng"], learn.dls)
