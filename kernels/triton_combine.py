"""Combine functions for `tl.reduce`, shared by the Triton kernels.

`tl.sum` and `tl.max` are `@triton.jit` helpers of `triton.language.standard`, fixed as compiled
or interpreted when `triton.language` is first imported (see triton_shrink.py); `tl.reduce`
is a builtin, and the kernels pass it these combine functions instead.

They are `triton.language.standard`'s own combine functions (the ones `tl.sum` and `tl.max`
pass), taken as objects and never called through the standard helpers: the interpreter
recognizes them and reduces with numpy, where any other function is called once per element
in Python (hundreds of times slower: under the interpreter the per-token LoRA kernels took
minutes). Compiled, they are the same add and maximum. A Triton without them gets ours,
defined when this module is imported, lazily like every Triton module of the package.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


add = getattr(tl.standard, "_sum_combine", _add)
maximum = getattr(tl.standard, "_elementwise_max", _maximum)
