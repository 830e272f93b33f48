"""The two resources a large competition runs out of first: memory and disk.

Memory: `memory_budget()` is how many bytes fastcls may hold in one in-memory cache (the pre-resized images a run keeps
in memory, the TTA means an ensemble keeps per member); `FASTCLS_MEMORY_BUDGET` sets it (`4G`, `512M`, `1.5GiB`, plain
bytes), default 1 GiB. Over the budget the data streams instead (item by item from the disk cache, member blocks read
from memory-mapped files), which is slower but bounded.

Batch sizes: where fastcls picks a batch size itself (feature extraction's `FEATURE_BS`, `predict` without `--bs`),
`budget_batch_size` caps it so that one batch's forward pass fits the budget, counting per image `ACTIVATION_FACTOR`
times its float32 input (3 x size x size x 4 bytes). A batch size the user gives (`--bs`) is used as given.

Disk: `check_disk(folder, need, ...)` refuses, before anything is written, a cache that will not fit in the free space
of `folder`'s file system (with `DISK_MARGIN` left over), and says by how much and what to do.
"""

__all__ = ["MEMORY_BUDGET_ENV", "DEFAULT_MEMORY_BUDGET", "DISK_MARGIN", "memory_budget", "parse_bytes", "human_bytes",
           "free_bytes", "check_disk", "ACTIVATION_FACTOR", "budget_batch_size"]

import os
import re
import shutil
from pathlib import Path

from .errors import FastclsError

MEMORY_BUDGET_ENV = "FASTCLS_MEMORY_BUDGET"
DEFAULT_MEMORY_BUDGET = 1 << 30
ACTIVATION_FACTOR = 16  # a forward pass without gradients, per image, in multiples of its float32 input (a rough
# bound: a CNN's stem keeps 64 channels at half the side, ~5x the 3-channel input, plus the next block's, at once)
DISK_MARGIN = 256 << 20  # free space a cache must leave on its file system (logs, checkpoints, the index)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text, what: str = "size") -> int:
    """'512M', '4G', '1.5GiB', '2 TB', '1000' -> bytes (binary units: 1K = 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise FastclsError(f"{what} {text!r} is not a size: give bytes or a number with K, M, G or T (e.g. 512M, "
                           "4G).")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def memory_budget() -> int:
    """Bytes one in-memory cache may hold: `$FASTCLS_MEMORY_BUDGET`, else 1 GiB."""
    text = os.environ.get(MEMORY_BUDGET_ENV)
    if not text:
        return DEFAULT_MEMORY_BUDGET
    return parse_bytes(text, f"${MEMORY_BUDGET_ENV}")


def budget_batch_size(bs: int, size: int, channels: int = 3) -> int:
    """`bs`, lowered (to at least 1) so that a batch of `size` px images fits the memory budget: per image
    `ACTIVATION_FACTOR` x `channels` x size² x 4 bytes. E.g. the default 1 GiB allows 111 images at 224 px, 21 at
    512 px."""
    if not size:  # not known yet (inferred from the images later): nothing to cap by
        return int(bs)
    per_image = ACTIVATION_FACTOR * channels * int(size) ** 2 * 4
    return max(1, min(int(bs), memory_budget() // per_image))


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(folder, need: int, what: str, todo: str = ""):
    """Refuse (FastclsError) when writing `need` more bytes under `folder` would leave less than `DISK_MARGIN` free.

    Args:
        folder: where the bytes go (need not exist yet).
        need: the estimated bytes still to write.
        what: what would be written, for the message ("the image cache of 70,000 images at 320 px").
        todo: what the user can do instead, appended to the message.
    """
    if need <= 0:
        return
    free = free_bytes(folder)
    if need + DISK_MARGIN > free:
        raise FastclsError(f"Not enough disk space for {what}: it needs about {human_bytes(need)} in {folder}, "
                           f"which has {human_bytes(free)} free (fastcls keeps {human_bytes(DISK_MARGIN)} spare). "
                           f"Nothing was written. Free some space{', ' + todo if todo else ''}.")
