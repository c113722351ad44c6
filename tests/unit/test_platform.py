"""Device resolution (platform.py): an engine on cuda:N makes it its threads' current device."""

from __future__ import annotations

import torch

from peftserve import platform


def test_a_numbered_gpu_becomes_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("cpu", "cuda", "cuda:1"):
        platform.use_device(platform.resolve_device(name))
    # "cuda" is the current device already; cpu has none
    assert chosen == [torch.device("cuda:1")]
