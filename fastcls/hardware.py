"""Training paths that use the hardware: mixed precision, channels-last memory format, `torch.compile`.

Each is a fastai callback or an in-place model change added to a Learner, with one switch each. `None` means auto:
mixed precision and channels-last are on with a CUDA GPU and off on CPU; compile is off unless asked for.

Decisions, measured on the 2-core development CPU (Xeon with AVX-512 but neither AMX nor AVX512-BF16):
- `amp=True` on CPU is allowed and runs bfloat16 autocast (the only autocast dtype torch supports well on CPU;
  fastai's `MixedPrecision` only knows CUDA, hence `CpuBF16`). A resnet18 step at 64 px took 2.4x the CPU time of
  float32 on that CPU, so it is never on by default there; on CPUs with AMX it can pay off.
- On a GPU, `amp` uses bfloat16 where the GPU supports it (no loss scaling needed), float16 with fastai's gradient
  scaler otherwise.
- `compile` uses `nn.Module.compile` (in place, so parameter names, the splitter and saved weights are unchanged).
  On CPU it needs a C++ compiler and takes minutes to compile on 2 cores; a string picks another backend
  (e.g. "eager" to check the wiring without compiling).
"""

__all__ = ["CpuBF16", "accelerate", "resolve_accel", "reuse_freed_memory"]

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache
from typing import Optional, Union

import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastcore.foundation import L
from torch.amp import GradScaler, autocast

from .errors import FastclsError


class CpuBF16(MixedPrecision):
    """bfloat16 autocast on CPU; fastai's `MixedPrecision` always enters a CUDA autocast context."""

    def __init__(self):
        super().__init__(amp_mode=AMPMode.BF16)

    def before_fit(self):
        # bfloat16 has float32's range: no loss scaling, so the scaler is a disabled pass-through
        self.autocast, self.learn.scaler, self.scales = autocast("cpu", dtype=torch.bfloat16), \
            GradScaler("cpu", enabled=False), L()


def resolve_accel(cuda: bool, amp: Optional[bool] = None, channels_last: Optional[bool] = None,
                  compile: Union[bool, str] = False) -> dict:
    """The settings a run will use: auto (None) resolved for the device, as a JSON-able dict.

    Returns:
        `{"device": "cuda"|"cpu", "amp": None|"bf16"|"fp16", "channels_last": bool, "compile": None|backend}`.
    """
    amp = cuda if amp is None else amp
    if amp:
        amp = "bf16" if not cuda or torch.cuda.is_bf16_supported() else "fp16"
    backend = None
    if compile:
        backend = "inductor" if compile is True else str(compile)
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise FastclsError(f"Unknown torch.compile backend {backend!r}; available: "
                               f"{', '.join(torch._dynamo.list_backends())}.")
    return {"device": "cuda" if cuda else "cpu", "amp": amp or None,
            "channels_last": bool(cuda if channels_last is None else channels_last), "compile": backend}


def accelerate(learn, amp: Optional[bool] = None, channels_last: Optional[bool] = None,
               compile: Union[bool, str] = False) -> dict:
    """Add mixed precision, channels-last and `torch.compile` to `learn` as asked (None: auto for its device).

    Args:
        learn: a fastai Learner (its DataLoaders' device decides what auto means).
        amp: mixed precision: bf16 (or fp16 on GPUs without bf16) on CUDA, bf16 autocast on CPU.
        channels_last: NHWC memory format for the model (convolutions pick it up from the weights).
        compile: False, True (inductor), or a torch.compile backend name.

    Returns:
        The resolved settings (see `resolve_accel`), also kept as `learn.accel`.
    """
    device = getattr(learn.dls, "device", None)
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    acc = resolve_accel(cuda, amp, channels_last, compile)
    if acc["amp"]:
        learn.add_cb(MixedPrecision(amp_mode=acc["amp"]) if cuda else CpuBF16())
    if acc["channels_last"]:
        learn.add_cb(ChannelsLast())
    if acc["compile"]:
        learn.model.compile(backend=acc["compile"])
    learn.accel = acc
    return acc


@lru_cache(maxsize=None)
def reuse_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 1 GiB in the heap instead of returning them to the OS (once per process).

    By default glibc hands every block above 32 MiB (e.g. a 64x3x224x224 float batch, 38 MiB) straight back to the
    kernel, so the next batch pays a page fault per 4 KiB to get it again: measured on the 2-core VM, normalising
    such a batch took 210 ms instead of 70 ms, and a warm-cache data epoch on the simpsons photos 1.5 s instead of
    1.1 s. The cost: the process keeps its peak heap. Linux with glibc only; `FASTCLS_MALLOC=default` leaves the
    allocator alone. Returns whether the setting was applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("FASTCLS_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt is a no-op or missing
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False
