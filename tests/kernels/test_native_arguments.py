"""Every C++ CPU op refuses malformed arguments with a RuntimeError naming the problem, before
it touches memory, and the process goes on serving: after each refusal the same op runs on
valid arguments and gives what it gave before. (The ops' numbers against torch are tested in
test_lowrank_rows.py, tests/unit/test_cpu_fused_ops.py, test_cpu_paged_attention.py and
test_argmax_rows.py; here only the refusals that guard memory.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from peftserve.kernels import cpu_ext

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ops():
    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    return torch.ops.peftserve_cpu


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def lora_args() -> dict:
    g = _g()
    A = torch.randn(5, 16, generator=g).to(BF16)
    return {"y": torch.randn(4, 24, generator=g).to(BF16),
            "x": torch.randn(4, 16, generator=g).to(BF16), "rows": None, "bounds": [0, 4],
            "A": [A], "B_blocks": [torch.randn(60, generator=g).to(BF16)], "ranks": [3, 2],
            "offsets": [0, 12, 24]}  # fmt: skip


def bottleneck_args() -> dict:
    g = _g()
    r = lambda *s: torch.randn(*s, generator=g).to(BF16)  # noqa: E731
    return {"y": r(4, 16), "rows": None, "bounds": [0, 4], "A": [r(5, 16)], "b_down": [r(5)],
            "B_t": [r(5, 16)], "b_up": [r(16)], "scales": [1.0], "act": 2}  # fmt: skip


def rotary_args() -> dict:
    g = _g()
    return {"qkv": torch.randn(3, 8 * 16, generator=g).to(BF16),
            "cos": torch.ones(3, 16, dtype=BF16), "sin": torch.zeros(3, 16, dtype=BF16),
            "cache": torch.zeros(2, 2, 8, 16, dtype=BF16), "slot_mapping": torch.tensor([0, 3, 7]),
            "heads": 4, "kv_heads": 2}  # fmt: skip


def attention_args() -> dict:
    g = _g()
    r = lambda *s: torch.randn(*s, generator=g).to(BF16)  # noqa: E731
    return {"out": torch.empty(2, 4, 16, dtype=BF16), "q": r(2, 4, 16), "cache": r(2, 2, 8, 16),
            "block_tables": torch.tensor([[0, 1], [1, 0]]), "context_lens": torch.tensor([5, 3]),
            "block_size": 4, "scale": 0.25}  # fmt: skip


def decode_args() -> list:
    g = _g()
    w = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(BF16)  # noqa: E731
    one = [torch.ones(32, dtype=BF16)]
    return [w(2, 32), one, [w(8 * 8, 32)], [], [w(32, 32)], [], one, [w(96, 32)], [w(32, 48)],
            torch.ones(32, dtype=BF16), torch.zeros(1, 2, 2, 8, 8, dtype=BF16),
            torch.ones(2, 8, dtype=BF16), torch.zeros(2, 8, dtype=BF16), torch.tensor([0, 5]),
            torch.tensor([[0], [1]]), torch.tensor([1, 2]), 4, 4, 2, 0.35, 1e-5, [], [], [], None,
            True]  # fmt: skip


def _with(args: dict, **changes) -> dict:
    return {**args, **changes}


def _decode_with(i: int, value) -> list:
    args = decode_args()
    args[i] = value
    return args


T = torch.tensor


def Z(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=BF16)


LORA, BOTTLENECK, ROTARY, ATTENTION = lora_args, bottleneck_args, rotary_args, attention_args

# (op, valid arguments, malformed arguments, the message)
CASES: list[tuple[str, Callable[[], dict | list], Callable[[], dict | list], str]] = [
    ("lora_rows", LORA, lambda: _with(LORA(), offsets=[0, 20, 12, 24], ranks=[3, 2, 0]),
     "must not decrease"),
    ("lora_rows", LORA, lambda: _with(LORA(), y=Z(1, 24).expand(4, 24)), "rows overlap"),
    ("lora_rows", LORA, lambda: _with(LORA(), B_blocks=[Z(6, 10)]), "must be flat"),
    ("lora_rows", LORA, lambda: _with(LORA(), A=[Z(16, 5).t()]), "A must be"),
    ("lora_rows", LORA, lambda: _with(LORA(), rows=T([0, 1, 2, -1])), "outside"),
    ("lora_rows", LORA, lambda: _with(LORA(), bounds=[2, 1]), "outside"),
    ("lora_rows", LORA, lambda: _with(LORA(), ranks=[-1, 6]), "negative rank"),
    ("lora_rows", LORA, lambda: _with(LORA(), x=Z(3, 16)), "x must be"),
    ("bottleneck_rows", BOTTLENECK, lambda: _with(BOTTLENECK(), A=[Z(80)]), "A must be"),
    ("bottleneck_rows", BOTTLENECK, lambda: _with(BOTTLENECK(), b_down=[Z(1, 5)]), "must be flat"),
    ("bottleneck_rows", BOTTLENECK, lambda: _with(BOTTLENECK(), B_t=[Z(4, 16)]), "B_t must be"),
    ("bottleneck_rows", BOTTLENECK, lambda: _with(BOTTLENECK(), rows=T([0, 1, 2, 4])), "outside"),
    ("rotary_and_cache", ROTARY, lambda: _with(ROTARY(), heads=-2), "must be\\s+positive"),
    ("rotary_and_cache", ROTARY, lambda: _with(ROTARY(), slot_mapping=T([0, 3, 8])),
     "outside the cache"),
    ("rotary_and_cache", ROTARY, lambda: _with(ROTARY(), cos=Z(2, 16)), "cos and sin"),
    ("paged_decode_attention", ATTENTION, lambda: _with(ATTENTION(), context_lens=T([5, 9])),
     "does not fit"),
    ("paged_decode_attention", ATTENTION,
     lambda: _with(ATTENTION(), block_tables=T([[0, 2], [1, 0]])), "outside the cache"),
    ("paged_decode_attention", ATTENTION, lambda: _with(ATTENTION(), block_tables=T([[0, 1]])),
     "block_tables must be"),
    ("decode_forward", decode_args, lambda: _decode_with(1, []), "no layers"),
    ("decode_forward", decode_args, lambda: _decode_with(17, 0), "must be positive"),
    ("decode_forward", decode_args, lambda: _decode_with(0, decode_args()[0].to_mkldnn()),
     "dense CPU tensor"),
    ("decode_forward", decode_args, lambda: _decode_with(2, []), "one weight per layer"),
    ("decode_forward", decode_args, lambda: _decode_with(22, [2]), "delta plan needs"),
]


@pytest.mark.parametrize(("op_name", "valid", "malformed", "message"), CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CASES])  # fmt: skip
def test_each_op_refuses_malformed_arguments_and_keeps_working(ops, op_name, valid, malformed,
                                                                message):
    op = getattr(ops, op_name)

    def call(args):
        return op(**args) if isinstance(args, dict) else op(*args)

    before = valid()
    first = call(before)
    with pytest.raises(RuntimeError, match=message):
        call(malformed())
    after = valid()
    second = call(after)
    written = first if first is not None else next(iter(before.values()))
    again = second if second is not None else next(iter(after.values()))
    assert torch.equal(written, again)  # the refusal changed nothing for the next call
