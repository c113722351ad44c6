"""Tensors a CPU step reads whole, moved into one buffer of transparent huge pages.

    held = huge_pages.gather([w1, w2, ...])    # same shapes, dtypes and values, one buffer

A small-batch decode step on the CPU reads every base weight once (kernels/gemv.py): on
SmolLM2-135M, 121 matrices of 0.6-3.5 MB, each its own allocation on 4 KB pages, so the read
crosses a page -- a TLB miss and a restart of the hardware prefetcher's stream -- every 4 KB.
The same weights in one anonymous mapping advised MADV_HUGEPAGE (2 MB pages) read faster: a
whole gemv pass at 1 / 8 / 32 rows took 0.88 / 0.94 / 0.97x its time on separate allocations
(`bench/cpu_gemv.py`, its `gemv` and `gemv_4k_pages` kinds; bench/results/
cpu_gemv_huge_pages.json). Where the OS has no transparent huge pages (or they are off) the
buffer is an ordinary one: the same layout, no advice.
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path

import torch

ALIGN = 64  # bytes: each tensor starts on a cache line (and on its dtype's alignment)


def supported() -> bool:
    """Whether this OS lets a mapping ask for huge pages (Linux's MADV_HUGEPAGE)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def empty_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` untouched (zero) bytes in a private anonymous mapping advised
    for huge pages where supported(); the tensor keeps the mapping alive."""
    if not supported() or nbytes == 0:
        return torch.zeros(nbytes, dtype=torch.uint8)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP compiled out of this kernel: an ordinary mapping
        buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.uint8)


def gather(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (CPU, any dtypes and shapes) as contiguous views into one buffer
    from empty_bytes(), each at a 64-byte boundary, in order. The list is emptied as they are
    copied, so each original is freed once copied where nothing else holds it (the buffer's
    pages are mapped as they are written): loading SmolLM2 in bf16 peaked 145 MB above the
    load without huge pages for its 270 MB of weights, and 203 MB when every original was
    kept until all were copied (the allocator does not hand all freed memory back)."""
    offsets, end = [], 0
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"huge_pages.gather takes CPU tensors, got one on {t.device}")
        end += -end % ALIGN
        offsets.append(end)
        end += t.numel() * t.element_size()
    arena = empty_bytes(end)
    held = []
    for off in offsets:
        t = tensors.pop(0)
        view = arena[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        held.append(view)
    return held


def huge_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the mappings under `tensor`'s storage that the OS backs with huge pages
    (AnonHugePages in /proc/self/smaps); 0 where there is no such file."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        return 0
    lo = tensor.untyped_storage().data_ptr()
    hi = lo + tensor.untyped_storage().nbytes()
    total, inside = 0, False
    for line in smaps.read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):  # a mapping's range
            start, stop = (int(v, 16) for v in head.split("-"))
            inside = start < hi and stop > lo
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total
