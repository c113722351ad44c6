"""A kernel's result at several thread counts (each thread takes its own range of the tiles),
more threads than a small CI machine has cores among them."""

from __future__ import annotations

from collections.abc import Callable

import torch


def results_at_thread_counts(fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    """fn() at 1, 2, 3 and 8 threads."""
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            outs.append(fn())
        return outs
    finally:
        torch.set_num_threads(before)
