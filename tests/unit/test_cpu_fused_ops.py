"""The C++ CPU ops for a layer's small work (kernels/csrc/fused_cpu.cpp) against the torch
spelling they replace: bit-equal in bf16 where both round the same way, close in fp32/fp16; and
the model layer takes them on the CPU.

CI machines have a C++ compiler, so the kernels must build there: a failed build fails these
tests instead of skipping them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.nn import functional as F
from torch.utils import cpp_extension

from peftserve.kernels import cpu_ext
from peftserve.layers.backend import CpuBackend
from peftserve.layers.norm import RMSNorm
from peftserve.layers.rotary import apply_rotary
from tests.backends import counted_cpu_backend

# bf16: equal up to 1e-30 (an exp clamped at -87 leaves silu(-100) at -1e-36 where torch has a
# denormal); any difference at a normal magnitude fails.
DTYPES = [(torch.bfloat16, 1e-30), (torch.float16, 1e-3), (torch.float32, 1e-5)]


def rtol(dtype: torch.dtype, atol: float) -> float:
    return 0.0 if dtype == torch.bfloat16 else atol


@pytest.fixture(scope="module")
def ops():
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    return torch.ops.peftserve_cpu


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_rms_norm_matches_the_torch_spelling(ops, dtype, atol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 96, generator=g) * 3).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    ref = w * F.rms_norm(x.float(), (96,), eps=1e-5).to(dtype)  # layers/norm.py's torch path
    out = torch.empty_like(x)
    ops.rms_norm(out, x, w, 1e-5)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol(dtype, atol))


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_add_rms_norm_adds_the_residual_in_place_then_normalizes(ops, dtype, atol):
    g = torch.Generator().manual_seed(4)
    h = (torch.randn(33, 96, generator=g) * 3).to(dtype)
    y = (torch.randn(33, 96, generator=g) * 3).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    ref_h = h + y  # the decoder layer's residual add, then its norm (layers/norm.py)
    ref = w * F.rms_norm(ref_h.float(), (96,), eps=1e-5).to(dtype)
    out, residual = torch.empty_like(h), h.clone()
    ops.add_rms_norm(out, residual, y, w, 1e-5)
    assert torch.equal(residual, ref_h)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol(dtype, atol))
    alone = torch.empty_like(h)
    ops.rms_norm(alone, ref_h, w, 1e-5)
    assert torch.equal(out, alone)  # the same norm as the op the Python layers call


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_silu_and_mul_matches_the_torch_spelling(ops, dtype, atol):
    g = torch.Generator().manual_seed(1)
    gu = (torch.randn(29, 2 * 80, generator=g) * 4).to(dtype)
    gu[0, :6] = torch.tensor([0.0, -0.0, 30.0, -30.0, 100.0, -100.0])  # saturated sigmoid
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = torch.empty(29, 80, dtype=dtype)
    ops.silu_and_mul(out, gu)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol(dtype, atol))


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_rotary_and_cache_rotates_q_and_k_and_writes_k_and_v_to_their_slots(ops, dtype, atol):
    g = torch.Generator().manual_seed(2)
    T, heads, kvh, D, slots = 11, 6, 2, 16, 40
    qkv = torch.randn(T, (heads + 2 * kvh) * D, generator=g).to(dtype)
    pos = torch.randint(0, 500, (T,), generator=g).float()
    freqs = pos[:, None] / 10000 ** (torch.arange(0, D, 2) / D)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slot_mapping = torch.randperm(slots, generator=g)[:T]
    cache = torch.full((2, kvh, slots, D), 7.0, dtype=dtype)

    qk = apply_rotary(qkv[:, : (heads + kvh) * D].view(T, -1, D), cos[:, None], sin[:, None])
    v = qkv[:, (heads + kvh) * D :].view(T, kvh, D)
    ours = qkv.clone()
    ops.rotary_and_cache(ours, cos, sin, cache, slot_mapping, heads, kvh)

    ours3 = ours.view(T, heads + 2 * kvh, D)
    torch.testing.assert_close(
        ours3[:, : heads + kvh].float(), qk.float(), atol=atol, rtol=rtol(dtype, atol)
    )
    if dtype == torch.float32:  # the parity dtype takes this op too: bit for bit the spelling
        assert torch.equal(ours3[:, : heads + kvh], qk)
    assert torch.equal(ours3[:, heads + kvh :], v)  # v untouched
    assert torch.equal(cache[0][:, slot_mapping], ours3[:, heads : heads + kvh].transpose(0, 1))
    assert torch.equal(cache[1][:, slot_mapping], v.transpose(0, 1))
    others = torch.ones(slots, dtype=torch.bool)
    others[slot_mapping] = False
    assert (cache[:, :, others] == 7.0).all()  # no other slot written


FMA = re.compile(r"\bv?f(n)?m(add|sub)\w*", re.IGNORECASE)


def test_rotary_has_no_fused_multiply_add_under_cxx17(tmp_path):
    """The fp32 bit-equality above holds only without FMA, which g++ emits by default
    (-ffp-contract=fast) wherever the rotary arithmetic is inlined into a function without the
    kernel's fp-contract=off. torch 2.11's extension builder compiles with -std=c++17, under
    which at::parallel_for's OpenMP region absorbed the kernel's lambda, FMAs and all; 2.13
    passes -std=c++20, so a build under this torch alone would not show it."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump is missing: binutils comes with the compiler the kernels need"
    cflags, _ = cpu_ext.build_flags()
    src = cpu_ext.CSRC / "fused_cpu.cpp"
    obj = tmp_path / "fused_cpu.o"
    include = [f"-I{p}" for p in cpp_extension.include_paths()]
    compiler = os.environ.get("CXX", "c++")
    subprocess.run([compiler, *include, "-fPIC", "-std=c++17", *cflags, "-c", str(src), "-o",
                    str(obj)], check=True)  # fmt: skip
    dump = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(obj)], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    fused, seen, name = [], set(), ""
    for line in dump.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
        elif "rotary_kernelIf" in name or "rotate_headIf" in name:  # the float instances
            seen.add(name)
            parts = line.split("\t")
            if len(parts) > 1 and FMA.match(parts[1].strip()):
                fused.append(f"{name}: {parts[1].strip()}")
    assert seen, "no float instance of the rotary kernel in the object"
    assert not fused, "fused multiply-adds in the rotary arithmetic:\n" + "\n".join(fused[:5])


def test_bad_arguments_raise_a_clear_error(ops):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(torch.empty_like(x), x, torch.ones(9), 1e-5)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.rms_norm(torch.empty_like(x), x, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="out must be"):
        ops.silu_and_mul(torch.empty(4, 3), x)
    qkv, cache = torch.randn(2, (2 + 2) * 4), torch.zeros(2, 1, 8, 4)
    cs = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rotary_and_cache(qkv, cs, cs, cache, torch.tensor([0, 8]), 2, 1)
    with pytest.raises(RuntimeError, match="qkv must be"):
        ops.rotary_and_cache(torch.randn(2, 20), cs, cs, cache, torch.tensor([0, 1]), 2, 1)


def test_rms_norm_module_takes_the_op_on_the_cpu(ops):
    """In bf16 the op rounds where torch's spelling rounds, but its fp32 sum of squares is
    ordered by the compiler's vector lanes, not as torch's reduction orders it: where the two
    sums differ in their last place, a normalized value can round to the neighbouring bf16 (3
    and 7 of 20,000 random draws of these shapes, built for x86-64-v3 and for AVX-512). This
    draw holds such a value under every -march the tests build: one bf16 ulp apart, no more."""
    g = torch.Generator().manual_seed(2483)
    backend, calls = counted_cpu_backend()
    weight = torch.randn(32, generator=g).bfloat16()
    x = torch.randn(5, 32, generator=g).bfloat16()
    norm = RMSNorm(32, 1e-6, backend)
    norm.weight.data = weight
    fused = norm(x)
    assert calls["rms_norm"] == 1
    plain = RMSNorm(32, 1e-6, CpuBackend(native=False))  # as without a compiler: torch's
    plain.weight.data = weight
    want = plain(x)
    assert calls["rms_norm"] == 1
    # one bf16 ulp: 2^-7 of a value at most (bf16 keeps 8 significant bits)
    torch.testing.assert_close(fused.float(), want.float(), atol=0.0, rtol=2.0**-7)
    assert (fused != want).sum() <= 1
