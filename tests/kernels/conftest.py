"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before the module defining a `@triton.jit` function is imported.
`peftserve.kernels` imports its Triton modules lazily, so a test directory collected earlier that
imported the package is harmless; should one have imported a Triton module itself, it is reloaded
here so its kernels pick up the interpreter.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in (
        "peftserve.kernels.triton_combine",  # first: the kernels below import its functions
        "peftserve.kernels.triton_shrink",
        "peftserve.kernels.triton_expand",
        "peftserve.kernels.triton_lowrank_rows",
        "peftserve.kernels.triton_paged_attention",
        "peftserve.kernels.triton_fused",
    ):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
