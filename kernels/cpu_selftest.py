"""The C++ CPU kernels' self-test: every op on small valid arguments, against plain torch.

    python -m peftserve.kernels.cpu_selftest     # exit 0: every op ran and matched torch

cpu_ext.load() runs this once per build in a child process before it loads the library into
the server: a kernel that crashes on this CPU (a signal), hangs, or computes wrong numbers then
costs the child, not the server, and the plain torch paths serve. Each check prints
`start <op>` before it calls the op and `ok <op>` after, so the last `start` line names the op
that took the child down. The shapes include the small ones the kernel tests use (a 16-wide
row, four tokens) and larger ones that run on several threads and take the AVX-512 code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_ext

OPS = torch.ops.peftserve_cpu
HALF = (torch.bfloat16, torch.float16)
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(dtype)


def _close(op: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    if not torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol):
        err = (got.float() - want.float()).abs().max().item()
        raise AssertionError(f"{op} ({dtype}): max error {err:.3g} against torch")


def check_lora_rows(g: torch.Generator) -> None:
    for dtype in HALF:
        for T, d_in, widths, ranks, gather in [
            (4, 16, (12, 12), (3, 2), False),
            (96, 576, (576, 192, 192), (8, 16, 0), True),
        ]:
            x, y = _randn(g, T, d_in, dtype=dtype), _randn(g, T, sum(widths), dtype=dtype)
            A = _randn(g, sum(ranks), d_in, dtype=dtype, std=0.1)
            pairs = zip(ranks, widths, strict=True)
            blocks = [_randn(g, r, w, dtype=dtype, std=0.1) for r, w in pairs]
            offsets = [0]
            for w in widths:
                offsets.append(offsets[-1] + w)
            want, v, c = y.float(), x.float() @ A.float().T, 0
            for i, (r, w) in enumerate(zip(ranks, widths, strict=True)):
                want[:, offsets[i] : offsets[i] + w] += v[:, c : c + r] @ blocks[i].float()
                c += r
            rows = torch.randperm(T, generator=g) if gather else None
            got = y.clone()
            OPS.lora_rows(y=got, x=x, rows=rows, bounds=[0, T], A=[A],
                          B_blocks=[torch.cat([b.reshape(-1) for b in blocks])],
                          ranks=list(ranks), offsets=offsets)  # fmt: skip
            _close("lora_rows", got, want, dtype)


def check_bottleneck_rows(g: torch.Generator) -> None:
    for dtype in HALF:
        for T, H, R in [(4, 16, 5), (90, 576, 36)]:
            y = _randn(g, T, H, dtype=dtype)
            A, B_t = _randn(g, R, H, dtype=dtype, std=0.1), _randn(g, R, H, dtype=dtype, std=0.1)
            b_down, b_up = _randn(g, R, dtype=dtype), _randn(g, H, dtype=dtype)
            h = F.silu(y.float() @ A.float().T + b_down.float())
            want = y.float() + 0.5 * (h @ B_t.float() + b_up.float())
            got = y.clone()
            OPS.bottleneck_rows(y=got, rows=None, bounds=[0, T], A=[A], b_down=[b_down],
                                B_t=[B_t], b_up=[b_up], scales=[0.5], act=2)  # fmt: skip
            _close("bottleneck_rows", got, want, dtype)


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()


def check_norms_and_mlp(g: torch.Generator) -> None:
    for dtype in (torch.float32, *HALF):
        for T, H in [(3, 16), (40, 576)]:
            x, r = _randn(g, T, H, dtype=dtype), _randn(g, T, H, dtype=dtype)
            w = _randn(g, H, dtype=dtype)
            out = torch.empty_like(x)
            OPS.rms_norm(out, x, w, 1e-5)
            _close("rms_norm", out, _rms(x, w), dtype)
            res = r.clone()
            OPS.add_rms_norm(out, res, x, w, 1e-5)
            _close("add_rms_norm", out, _rms(r.float() + x.float(), w), dtype)
            gu = _randn(g, T, 2 * H, dtype=dtype)
            act = torch.empty_like(x)
            OPS.silu_and_mul(act, gu)
            _close("silu_and_mul", act, F.silu(gu[:, :H].float()) * gu[:, H:].float(), dtype)
            logits = _randn(g, T, 3 * H, dtype=dtype)
            if not torch.equal(OPS.argmax_rows(logits), logits.argmax(-1)):
                raise AssertionError(f"argmax_rows ({dtype}) differs from torch.argmax")


def check_rotary_and_cache(g: torch.Generator) -> None:
    for dtype in (torch.float32, *HALF):
        T, heads, kv, D, slots = 5, 6, 2, 64, 32
        qkv = _randn(g, T, (heads + 2 * kv) * D, dtype=dtype)
        cos, sin = _randn(g, T, D, dtype=dtype), _randn(g, T, D, dtype=dtype)
        cache = torch.zeros(2, kv, slots, D, dtype=dtype)
        slot = torch.randperm(slots, generator=g)[:T]
        x = qkv.float().view(T, heads + 2 * kv, D)
        rot = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
        want = x * cos.float()[:, None] + rot * sin.float()[:, None]
        got = qkv.clone()
        OPS.rotary_and_cache(got, cos, sin, cache, slot, heads, kv)
        got = got.view(T, heads + 2 * kv, D)
        _close("rotary_and_cache", got[:, : heads + kv], want[:, : heads + kv], dtype)
        _close("rotary_and_cache", cache[0][:, slot].transpose(0, 1), got[:, heads : heads + kv],
               dtype)  # fmt: skip
        _close("rotary_and_cache", cache[1][:, slot].transpose(0, 1), x[:, heads + kv :], dtype)


def check_paged_decode_attention(g: torch.Generator) -> None:
    for dtype in (torch.float32, *HALF):
        for D, heads, kv in [(64, 9, 3), (128, 8, 1), (48, 4, 2)]:  # AVX-512 code; plain loops
            B, bs, blocks = 5, 4, 24
            cache = _randn(g, 2, kv, blocks * bs, D, dtype=dtype)
            q = _randn(g, B, heads, D, dtype=dtype)
            lens = torch.randint(1, 6 * bs + 1, (B,), generator=g)
            tables = torch.stack([torch.randperm(blocks, generator=g)[:6] for _ in range(B)])
            out = torch.empty_like(q)
            OPS.paged_decode_attention(out, q, cache, tables, lens, bs, D**-0.5)
            for b in range(B):
                pos = torch.arange(int(lens[b]))
                slot = tables[b][pos // bs] * bs + pos % bs
                k = cache[0][:, slot].float().repeat_interleave(heads // kv, 0)
                v = cache[1][:, slot].float().repeat_interleave(heads // kv, 0)
                p = torch.softmax(q[b].float()[:, None] @ k.transpose(1, 2) * D**-0.5, -1)
                _close("paged_decode_attention", out[b], (p @ v)[:, 0], dtype)


def check_decode_forward(g: torch.Generator) -> None:
    """Two layers of a tiny model with no adapters: runs, right shape, finite."""
    for dtype in (torch.float32, torch.bfloat16):
        T, H, heads, kv, D, inter, L, bs = 3, 64, 4, 2, 16, 96, 2, 4
        w = lambda *s, dt=dtype: _randn(g, *s, dtype=dt, std=0.05)  # noqa: E731
        ones = [torch.ones(H, dtype=dtype) for _ in range(L)]
        cache = torch.zeros(L, 2, kv, 8 * bs, D, dtype=dtype)
        cos, sin = torch.ones(T, D, dtype=dtype), torch.zeros(T, D, dtype=dtype)
        h = OPS.decode_forward(
            _randn(g, T, H, dtype=dtype), ones, [w((heads + 2 * kv) * D, H) for _ in range(L)],
            [], [w(H, heads * D) for _ in range(L)], [], ones, [w(2 * inter, H) for _ in range(L)],
            [w(H, inter) for _ in range(L)], torch.ones(H, dtype=dtype), cache, cos, sin,
            torch.tensor([1, 5, 9]), torch.tensor([[0, 1], [1, 2], [2, 3]]),
            torch.tensor([2, 6, 2]), bs, heads, kv, D**-0.5, 1e-5, [], [], [], None, True,
        )  # fmt: skip
        if h.shape != (T, H) or not torch.isfinite(h.float()).all():
            raise AssertionError(f"decode_forward ({dtype}): shape {tuple(h.shape)} or not finite")


def check_gemv_bf16(g: torch.Generator) -> None:
    """Odd sizes (a narrow last tile, an odd K) and SmolLM2's, 1..9 and 17 rows: within bf16's
    rounding of the float64 sum (AMX too, where it serves), the vector code equal to the plain
    loops bit for bit, each row's result the same alone."""
    from .gemv import linear_reference, pack

    for N, K in [(77, 33), (960, 576), (40, 1)]:
        w = _randn(g, N, K, dtype=torch.bfloat16, std=0.1)
        b = _randn(g, N, dtype=torch.bfloat16)
        wp = pack(w)
        for M in (1, 3, 8, 9, 17):
            x = _randn(g, M, K, dtype=torch.bfloat16)
            out, vector, plain = (torch.empty(M, N, dtype=torch.bfloat16) for _ in range(3))
            OPS.gemv_bf16(out, x, wp, b)
            OPS.gemv_bf16(vector, x, wp, b, False, False)
            OPS.gemv_bf16(plain, x, wp, b, True)
            _close("gemv_bf16", out, linear_reference(x, w, b), torch.bfloat16)
            _close("gemv_bf16", vector, linear_reference(x, w, b), torch.bfloat16)
            if not torch.equal(vector, plain):
                raise AssertionError("gemv_bf16: the vector code differs from the plain loops")
            last = torch.empty(1, N, dtype=torch.bfloat16)
            OPS.gemv_bf16(last, x[-1:], wp, b)
            if not torch.equal(last, out[-1:]):
                raise AssertionError("gemv_bf16: a row's result depends on the batch")


def check_gemv_quant(g: torch.Generator) -> None:
    """int8 and int4 weights at odd sizes and SmolLM2's, 1..9 rows: within bf16's rounding of
    the float64 sum over the dequantized weights, the plain loops too."""
    from .quant import linear_reference, pack

    for N, K in [(77, 33), (960, 576), (40, 1)]:
        w = _randn(g, N, K, dtype=torch.bfloat16, std=0.1)
        b = _randn(g, N, dtype=torch.bfloat16)
        for kind, op in (("int8", OPS.gemv_int8), ("int4", OPS.gemv_int4)):
            wq = pack(w, kind)
            for M in (1, 3, 8, 9):
                x = _randn(g, M, K, dtype=torch.bfloat16)
                ref = linear_reference(x, wq, b)
                for generic in (False, True):
                    out = torch.empty(M, N, dtype=torch.bfloat16)
                    op(out, x, wq, b, generic)
                    _close(f"gemv_{kind}", out, ref, torch.bfloat16)


def check_screened_argmax(g: torch.Generator) -> None:
    """A narrow last tile and SmolLM2's hidden size, 1, 3 and 8 rows: the token of each row
    is argmax_rows of the full head's logits."""
    from .gemv import linear, pack
    from .screened_head import ScreenedHead

    for V, K in [(77, 33), (1000, 576)]:
        w = _randn(g, V, K, dtype=torch.bfloat16, std=0.1)
        head = ScreenedHead(pack(w), w)
        for M in (1, 3, 8):  # the screen serves up to 8 rows (MAX_ROWS)
            x = _randn(g, M, K, dtype=torch.bfloat16)
            got = head.argmax(x)
            want = OPS.argmax_rows(linear(x, head.packed, None).float())
            if got is None or not torch.equal(got, want):
                raise AssertionError(f"screened_argmax: {got} where the full head gives {want}")


def check_refusal(g: torch.Generator) -> None:
    """A failed argument check reaches Python as a RuntimeError with its whole message. The
    C++ exception crosses from this library into torch's, its message printed by the library's
    std::ostream: a library carrying a private copy of the C++ runtime (a compiler that links
    libstdc++ statically; cpu_ext.build_flags) garbles the message or takes the process down
    here, before any request can. One message with a dtype, one with a tensor's sizes (the
    H200 image's crash was in printing sizes)."""
    y, x = torch.zeros(4, 24), torch.zeros(4, 16)
    A, B = torch.zeros(5, 16, dtype=torch.bfloat16), torch.zeros(5 * 24, dtype=torch.bfloat16)
    args = {"rows": None, "bounds": [0, 4], "B_blocks": [B], "ranks": [3, 2],
            "offsets": [0, 12, 24]}  # fmt: skip
    refused = {
        "lora_rows: half precision only (fp32 keeps the torch forms), got Float":
            {**args, "y": y, "x": x, "A": [A]},
        "lora_rows: A must be a contiguous [5, 16] of y's dtype, got [4, 16] BFloat16":
            {**args, "y": y.bfloat16(), "x": x.bfloat16(), "A": [A[:4]]},
    }  # fmt: skip
    for want, call in refused.items():
        try:
            OPS.lora_rows(**call)
        except RuntimeError as e:
            if str(e).splitlines()[0] != want:
                raise AssertionError(f"a refused call's message arrived as {str(e)[:200]!r}") from e
            continue
        raise AssertionError(f"lora_rows accepted what it must refuse: {want}")


CHECKS: dict[str, Callable[[torch.Generator], None]] = {
    "a refused call (C++ exception into torch)": check_refusal,
    "lora_rows": check_lora_rows,
    "bottleneck_rows": check_bottleneck_rows,
    "rms_norm, add_rms_norm, silu_and_mul, argmax_rows": check_norms_and_mlp,
    "rotary_and_cache": check_rotary_and_cache,
    "paged_decode_attention": check_paged_decode_attention,
    "decode_forward": check_decode_forward,
    "gemv_bf16": check_gemv_bf16,
    "gemv_int8, gemv_int4": check_gemv_quant,
    "screened_argmax": check_screened_argmax,
}


def main() -> int:
    try:
        cpu_ext.compile_and_register(cpu_ext.build_dir())
    except Exception as e:  # no compiler, a failed build: not a kernel fault
        print(f"build failed: {e}", flush=True)
        return 2
    g = torch.Generator().manual_seed(0)
    for name, check in CHECKS.items():
        print(f"start {name}", flush=True)
        try:
            check(g)
        except Exception as e:
            print(f"wrong {name}: {e}", flush=True)
            return 1
        print(f"ok {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
