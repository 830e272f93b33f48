"""One run on several processes (GPUs, or CPU processes with the gloo backend) through fastai's `distrib_ctx`.

Launch the normal command under a launcher that starts one process per device and sets RANK / WORLD_SIZE:

    accelerate launch --num_processes 2 -m fastcls train RECIPE ARCH ...
    torchrun --nproc_per_node 2 -m fastcls train RECIPE ARCH ...

Every process builds the same data and model; during training fastai wraps the model in DistributedDataParallel and
each process reads its share of every batch (`DistributedDL`), metrics are gathered over all processes. Only rank 0
writes to the run store and prints; the other ranks write their checkpoints into a throwaway store of their own.
"""

__all__ = ["world_size", "rank", "is_main", "rank_store", "distrib", "bare_model", "check_launched", "check_single"]

import os
import tempfile
from contextlib import contextmanager

from ..errors import FastclsError

# torch is imported where it is used: the CLI asks world_size() before every command, also the ones without torch


def world_size() -> int:
    """Processes of this run (WORLD_SIZE, set by accelerate launch / torchrun); 1 when not launched so."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """Whether this process is the one that writes to the run store and prints (rank 0)."""
    return rank() == 0


def check_launched():
    """Refuse `--distributed` outside a launcher, which would silently train on one process."""
    if world_size() < 2:
        raise FastclsError("--distributed trains one run on several processes, but this process was not started by "
                           "a launcher (WORLD_SIZE is unset or 1). Run `accelerate launch --num_processes N -m fastcls "
                           "train ...` or `torchrun --nproc_per_node N -m fastcls train ...`.")


def check_single(what: str):
    """Refuse `what` under a multi-process launcher: only one plain `fastcls train` run is split across processes;
    anything else would run once per process (several copies written to the store, or ranks out of step)."""
    if world_size() > 1:
        raise FastclsError(f"`fastcls {what}` runs in one process, but this one was started by a launcher "
                           f"(WORLD_SIZE={world_size()}, rank {rank()}). Only `fastcls train RECIPE ARCH` without "
                           "--folds trains one run across processes; run this command without accelerate launch / "
                           "torchrun (folds and sweeps scale out with --executor ray instead).")


def rank_store(store):
    """`store` on rank 0; on the other ranks a private temporary store (removed when it is garbage collected), so
    the real store gets one run and each rank still checkpoints like a normal run."""
    if is_main():
        return store
    from ..runs import RunStore
    tmp = tempfile.TemporaryDirectory(prefix=f"fastcls-rank{rank()}-")
    scratch = RunStore(tmp.name)
    scratch.tmpdir = tmp  # keeps the folder alive as long as the store
    return scratch


@contextmanager
def distrib(learn):
    """fastai's `distrib_ctx` around training when this process is one of several; nothing otherwise.

    With a GPU this is fastai's own context (NCCL, SyncBatchNorm). Without one, accelerate is told to use the CPU
    (gloo), batch norm is not synchronised (SyncBatchNorm has no CPU kernel) and the loaders broadcast their batch
    order as CPU tensors (fastai's `DistributedDL` moves them to CUDA for NCCL).
    """
    if world_size() < 2:
        yield learn
        return
    try:
        import accelerate  # noqa: F401  (fastai's DistributedTrainer is built on it)
        import fastai.distributed  # noqa: F401  (adds Learner.distrib_ctx)
    except ImportError:
        raise FastclsError("Training on several processes needs accelerate, which is not installed. Install it with "
                           "`pip install fastcls[distributed]`.") from None
    import torch
    if torch.cuda.is_available():
        with learn.distrib_ctx():
            yield learn
        return
    learn.add_cb(_gloo_trainer()(sync_bn=False, cpu=True))
    try:
        yield learn
    finally:
        learn.detach_distributed()


def _gloo_trainer():
    """fastai's DistributedTrainer with loaders whose batch order is broadcast over gloo (CPU tensors)."""
    import torch
    from fastai.distributed import DistributedDL, DistributedTrainer

    class GlooDL(DistributedDL):
        def _broadcast(self, t, rank):
            t = torch.LongTensor(t)
            torch.distributed.broadcast(t, rank)
            return t.tolist()

    class GlooTrainer(DistributedTrainer):
        def _wrap_dl(self, dl):
            return dl if isinstance(dl, DistributedDL) else GlooDL(dl, device=self.learn.model.device)
    return GlooTrainer


def bare_model(model):
    """The model inside a DistributedDataParallel wrapper (whose state_dict keys carry a 'module.' prefix)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model
