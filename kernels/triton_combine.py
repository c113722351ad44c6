"""Combine functions for `tl.reduce`, shared by the Triton kernels.

`tl.sum` and `tl.max` are `@triton.jit` helpers of `triton.language.standard`, fixed as compiled
or interpreted when `triton.language` is first imported (see triton_shrink.py); `tl.reduce`
is a builtin, and these functions are defined when this module is imported, lazily like every
Triton module of the package.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add(a, b):
    return a + b


@triton.jit
def maximum(a, b):
    return tl.maximum(a, b)
