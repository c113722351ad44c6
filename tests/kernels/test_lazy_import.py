"""Importing peftserve.kernels, and running it on CPU tensors, never imports the Triton kernels:
on a machine without a GPU they can only run under TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import sys
import torch
import peftserve.kernels as k
assert "peftserve.kernels.triton_shrink" not in sys.modules
meta = k.build_segment_meta(torch.tensor([0, -1, 1]))
A, B = torch.randn(1, 2, 4, 8), torch.randn(2, 6, 4)
rank, scale = torch.tensor([[4, 2]], dtype=torch.int32), torch.ones(1, 2)
y = torch.zeros(3, 6)
k.add_lowrank_delta(y, torch.randn(3, 8), A, B, rank, scale, meta, (6,))
assert y[0].abs().sum() > 0 and y[1].abs().sum() == 0
loaded = [m for m in sys.modules if m.startswith("peftserve.kernels.triton")]
assert not loaded, loaded
print("ok")
"""


def test_import_and_cpu_dispatch_do_not_load_triton_kernels():
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
