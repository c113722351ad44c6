"""The device the engine-level integration tests run on.

CPU by default (CI has no GPU). On a CUDA machine, `PEFTSERVE_TEST_DEVICE=cuda` runs the same
oracle tests (transformers / PEFT on the CPU in fp32) against the engine on the GPU, where LoRA
and bottleneck deltas go through the Triton kernels; TF32 stays off so fp32 means fp32.
"""

from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("PEFTSERVE_TEST_DEVICE", "cpu")

if DEVICE.startswith("cuda"):
    if not torch.cuda.is_available():
        raise RuntimeError("PEFTSERVE_TEST_DEVICE=cuda but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
