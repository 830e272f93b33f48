"""Executors: who runs the independent trials of a sweep (or the folds of a k-fold run).

Every executor offers one method, `map(fn, trials, store=None, on_start=None)`, yielding `(trial, result, error)` as
trials finish, in any order; an exception fails that trial only, Ctrl-C stops them all. Callers that train runs pass
their run store and a `fn(trial, store)` that trains into the store it is given and returns a `RunResult`:

- `LocalExecutor` runs the trials one after another in this process, into the real store.
- `RayExecutor` runs each trial as a Ray task (on a local Ray instance, or an existing cluster). The task trains into
  a private temporary store on its worker and sends the finished run's files back; the driver (this process) imports
  them into the real store (`RunStore.import_run`: atomic, indexed), so the store is written by one process only and
  needs no shared file system. A failed trial is retried once, then reported; Ctrl-C cancels the trials not finished
  (finished ones are already stored). Ray is an optional extra (`pip install fastcls[ray]`), imported only here.
"""

__all__ = ["Trial", "LocalExecutor", "RayExecutor", "EXECUTORS", "get_executor", "run_one"]

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..config import RunConfig
from ..errors import FastclsError, suggest


@dataclass(frozen=True)
class Trial:
    """One unit of work an executor runs (a sweep's grid point, a cv's fold): its position, a readable key, the
    values that set it apart, and the run's validated config."""

    index: int
    key: str
    params: dict
    cfg: RunConfig


class LocalExecutor:
    """Runs the trials one after another in this process."""

    name = "local"
    remote = False  # trials see this process's memory and the real run store

    def map(self, fn: Callable, trials: Iterable, store=None, on_start: Optional[Callable] = None):
        """Yield (trial, result, error) per trial; an exception fails that trial only, Ctrl-C stops the loop.

        Args:
            fn: `fn(trial)`, or `fn(trial, store)` when `store` is given.
            trials: the trials, run in this order.
            store: the run store `fn` trains into.
            on_start: called with each trial just before it starts.
        """
        for t in trials:
            if on_start is not None:
                on_start(t)
            try:
                yield t, fn(t) if store is None else fn(t, store), None
            except Exception as e:  # noqa: BLE001 - recorded on the trial and reported; the other trials go on
                yield t, None, e


@dataclass
class _Finished:
    """What a Ray task sends back for a run: the run folder's files and what `RunResult` holds besides the learner."""

    files: dict
    metrics: dict
    history: object
    seconds: float


def _private_store_trial(fn: Callable, trial, with_store: bool):
    """The body of one Ray task: train into a temporary store on the worker and return the finished run's files."""
    if not with_store:
        return fn(trial)
    from ..runs import RunStore
    with tempfile.TemporaryDirectory(prefix="fastcls-trial-") as tmp:
        res = fn(trial, RunStore(tmp))
        return _Finished(RunStore(tmp).run_files(res.run_id), res.metrics, res.history, res.seconds)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise FastclsError("--executor ray needs Ray, which is not installed. Install it with "
                           "`pip install fastcls[ray]` (or `pip install ray`), or use --executor local.") from None
    return ray


class RayExecutor:
    """Runs each trial as a Ray task with `cpus_per_trial` CPUs and `gpus_per_trial` GPUs.

    Args:
        address: the Ray cluster to use ('auto', 'ray://host:10001', 'host:6379'); default: the instance this process
            is already connected to, else $RAY_ADDRESS, else a new local instance (stopped again after `map`).
        gpus_per_trial: GPUs each trial reserves (fractions share a GPU, e.g. 0.5).
        cpus_per_trial: CPUs each trial reserves (Ray also limits the trial's torch threads to this).
        retries: how often a failed trial is tried again before it is reported as failed.
    """

    name = "ray"
    remote = True  # trials run in other processes (maybe machines): they see neither this memory nor the store

    def __init__(self, address: Optional[str] = None, gpus_per_trial: float = 0, cpus_per_trial: float = 1,
                 retries: int = 1):
        if cpus_per_trial <= 0:
            raise FastclsError(f"--cpus-per-trial must be more than 0, got {cpus_per_trial}.")
        if gpus_per_trial < 0:
            raise FastclsError(f"--gpus-per-trial must be 0 or more, got {gpus_per_trial}.")
        self.address, self.gpus, self.cpus, self.retries = address, gpus_per_trial, cpus_per_trial, retries
        self.cancelled: list = []  # (trial, Ray object ref) of the trials the last Ctrl-C cancelled

    def _connect(self, ray) -> bool:
        """Connect to Ray unless this process already is; True when this call started the connection."""
        if ray.is_initialized():
            return False
        try:
            ray.init(address=self.address, include_dashboard=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = self.address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            raise FastclsError(f"Could not connect to Ray at {where}: {e}. Start a cluster with `ray start --head` "
                               "and pass --address (or set RAY_ADDRESS), or leave both unset for a local "
                               "instance.") from None
        return True

    def map(self, fn: Callable, trials: Iterable, store=None, on_start: Optional[Callable] = None):
        """Submit every trial as a Ray task, then yield (trial, result, error) as they finish.

        Args:
            fn: `fn(trial)`, or `fn(trial, store)` when `store` is given; shipped to the workers (cloudpickle), so it
                must not rely on this process's state other than what it carries.
            trials: the trials; all are submitted at once and Ray schedules them on free resources.
            store: the real run store: each trial trains into a private store on its worker, and its finished run
                is imported here (the result's `run_id` is the id in `store`; its `learn` is None).
            on_start: called with each trial when it is submitted.
        """
        ray = _import_ray()
        started = self._connect(ray)
        pending = {}
        try:
            task = ray.remote(_private_store_trial).options(
                num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.retries, retry_exceptions=self.retries > 0)
            fn_ref = ray.put(fn)  # shipped once, shared by every task
            for t in trials:
                if on_start is not None:
                    on_start(t)
                pending[task.remote(fn_ref, t, store is not None)] = t
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout keeps Ctrl-C responsive
                for ref in done:
                    t = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                        res = out if store is None else _stored(store, out)
                    except Exception as e:  # noqa: BLE001 - reported on the trial; the other trials go on
                        yield t, None, _cause(ray, e)
                        continue
                    yield t, res, None
        finally:
            # Ctrl-C, or a caller that stops early: cancel what has not finished; finished runs are stored already
            self.cancelled = [(t, ref) for ref, t in pending.items()]
            for ref in pending:
                ray.cancel(ref)
            if started:
                ray.shutdown()


def _stored(store, out: _Finished):
    from ..train import RunResult
    return RunResult(store.import_run(out.files), out.metrics, out.history, None, out.seconds)


def _cause(ray, e: Exception) -> Exception:
    """The trial's own exception (a FastclsError keeps its message), not Ray's wrapper around it."""
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(getattr(e, "cause", None), Exception):
        return e.cause
    return e


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def run_one(executor, fn: Callable, trial, store):
    """Run one `fn(trial, store)` through `executor` (None: here) and return its result; its error is raised."""
    [(_, res, error)] = list((executor or LocalExecutor()).map(fn, [trial], store=store))
    if error is not None:
        raise error
    return res


def get_executor(name: str = "local", address: Optional[str] = None, gpus_per_trial: Optional[float] = None,
                 cpus_per_trial: Optional[float] = None):
    """The executor `name` ('local' or 'ray') with its options, checked (as the CLI's --executor and its options).

    Raises:
        FastclsError: an unknown executor, or a Ray option given with the local executor.
    """
    if name not in EXECUTORS:
        raise FastclsError(f"Unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}."
                           + suggest(name, EXECUTORS))
    if name == "local":
        given = [o for o, v in (("--address", address), ("--gpus-per-trial", gpus_per_trial),
                                ("--cpus-per-trial", cpus_per_trial)) if v is not None]
        if given:
            raise FastclsError(f"{', '.join(given)} only apply to --executor ray; add --executor ray, or leave them "
                               "out to run the trials here one after another.")
        return LocalExecutor()
    return RayExecutor(address, gpus_per_trial or 0, 1 if cpus_per_trial is None else cpus_per_trial)
