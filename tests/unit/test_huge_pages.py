"""kernels/huge_pages.py: tensors gathered into one buffer keep their values, shapes and
dtypes, each 64-byte aligned, and the buffer is backed by huge pages where the OS offers them."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from peftserve.kernels import huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_gathered_tensors_keep_values_shapes_and_dtypes_in_one_buffer():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(33, 17, 2, generator=g).bfloat16(),
        torch.randint(-128, 127, (5, 7), generator=g, dtype=torch.int8),
        torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
        torch.randn(4, 9, generator=g),
        torch.randn(0, 3, generator=g).bfloat16(),
        torch.randn(11, generator=g).half(),
    ]
    given = list(tensors)
    held = huge_pages.gather(given)
    assert given == []  # taken out as copied: each original freed where nothing else holds it
    assert len(held) == len(tensors)
    for t, h in zip(tensors, held, strict=True):
        assert h.dtype == t.dtype and h.shape == t.shape and h.is_contiguous()
        assert torch.equal(h, t)
    full = [h for h in held if h.numel()]
    assert all(h.data_ptr() % huge_pages.ALIGN == 0 for h in full)
    assert len({h.untyped_storage().data_ptr() for h in full}) == 1
    # copies, in order, none overlapping
    assert not {h.data_ptr() for h in full} & {t.data_ptr() for t in tensors}
    spans = [(h.data_ptr(), h.data_ptr() + h.numel() * h.element_size()) for h in full]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    # writes to one view stay in it
    held[3].zero_()
    assert torch.equal(held[0], tensors[0]) and torch.equal(held[5], tensors[5])


def test_gather_refuses_tensors_off_the_cpu():
    with pytest.raises(ValueError, match="CPU tensors"):
        huge_pages.gather([torch.zeros(2, device="meta")])


def test_the_buffer_outlives_every_other_reference():
    held = huge_pages.gather([torch.arange(1 << 20, dtype=torch.float32)])[0]
    import gc

    gc.collect()
    held.add_(1)
    assert held[-1].item() == float(1 << 20)


def test_the_buffer_is_in_huge_pages_where_the_os_offers_them():
    """Where THP is on ("madvise" or "always") a 16 MB buffer holds at least six whole 2 MB
    pages however it is aligned; where it is off or missing, none, and the buffer still holds
    the values."""
    mode = THP.read_text() if THP.is_file() else ""
    held = huge_pages.gather([torch.ones(16 << 20, dtype=torch.uint8)])[0]
    assert bool(held.all())
    if not huge_pages.supported() or "[never]" in mode or not mode:
        assert huge_pages.huge_bytes(held) == 0
        return
    assert huge_pages.huge_bytes(held) >= 6 * (2 << 20)
    # the same mapping without the advice: no huge pages under it ("madvise" mode; "always"
    # gives them to every large mapping). A fresh mapping, not malloc's memory: a library
    # (numpy advises its large arrays) may have advised a stretch of the heap malloc reuses.
    if "[madvise]" in mode:
        plain = torch.frombuffer(
            mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=torch.uint8
        )
        plain.fill_(1)
        assert huge_pages.huge_bytes(plain) == 0
