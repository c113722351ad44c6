"""Backends for tests to pick (server/layers/backend.py): the CPU backend with its C++ ops
counted, so a test sees which ops a step ran without patching any module."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from peftserve.kernels import cpu_ext
from peftserve.layers.backend import CpuBackend


class CountedOps:
    """Stands in for torch.ops.peftserve_cpu on a backend the test owns: each op's calls
    counted in `calls`."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        op = getattr(torch.ops.peftserve_cpu, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return op(*args, **kwargs)

        return call


def counted_cpu_backend(**options: Any) -> tuple[CpuBackend, Counter[str]]:
    """A CPU backend with the C++ ops (CpuBackend's options) and the counter of their calls."""
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    backend = CpuBackend(native=True, **options)
    ops = CountedOps()
    backend.ops = ops
    return backend, ops.calls
