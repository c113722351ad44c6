"""Counts the device kernels a piece of the engine launches, by op, on any device: the torch
ops that write memory (in place, or into an output of their own; views and bare allocations
launch nothing) and the Triton launches, by kernel, compiled or under the interpreter.

    census = KernelCensus()
    with census:
        step.forward(rows, width, hook)
    census.counts  # Counter({"aten.linear": 9, "triton:_rms_norm_kernel": 5, ...})

A CUDA graph replays what was launched while it was captured, one node a launch, so a
census of a captured body is the graph's kernel count (a cuBLAS matmul counted as one, as
"aten.linear" however the dispatcher spells it).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

ALLOCATIONS = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
               "aten.new_empty_strided"}  # fmt: skip


# Spellings of one op that differ with where the dispatcher decomposes it.
ALIASES = {"aten.mm": "aten.linear", "aten.addmm": "aten.linear", "aten.matmul": "aten.linear",
           "aten._log_softmax": "aten.log_softmax", "aten._to_copy": "aten.to"}  # fmt: skip


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(tree)
            if isinstance(t, torch.Tensor)}  # fmt: skip


class KernelCensus(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._in_triton = False  # the interpreter's own copies of a kernel's arguments
        self._saved: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if self._in_triton or name in ALLOCATIONS:
            return out
        if func._schema.is_mutable or not _storages(out) <= _storages((args, kwargs)):
            self.counts[ALIASES.get(name, name)] += 1
        return out

    def _counted(self, run):
        census = self

        def counted_run(fn, *args, **kwargs):
            if census._in_triton:  # a launcher that launches another kernel
                return run(fn, *args, **kwargs)
            census.counts[f"triton:{fn.fn.__name__}"] += 1
            census._in_triton = True
            try:
                return run(fn, *args, **kwargs)
            finally:
                census._in_triton = False

        return counted_run

    def __enter__(self):
        for cls in (JITFunction, InterpretedFunction):
            self._saved.append((cls, cls.run))
            cls.run = self._counted(cls.run)
        return super().__enter__()

    def __exit__(self, *exc):
        while self._saved:
            cls, run = self._saved.pop()
            cls.run = run
        return super().__exit__(*exc)
