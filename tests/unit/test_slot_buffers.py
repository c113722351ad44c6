"""DeviceSlots' stacked buffers on the CPU: zero storage that is never written to in full, a slot
rewritten with a smaller rank keeps nothing of the earlier adapter past that rank, and a write
staged as on a GPU (one upload) equals the direct one in a fixed number of data ops."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peftserve.adapters import slots as slots_module
from peftserve.adapters.bottleneck import BottleneckWeights
from peftserve.adapters.lora import PROJECTIONS, LoraModule, LoraWeights, module_dims
from peftserve.adapters.slots import GROUP_OF, DeviceSlots
from peftserve.adapters.upload import upload
from peftserve.kernels import cpu_ext
from peftserve.kernels.cpu_packed import pack_lora
from peftserve.layers.backend import Backend, CpuBackend
from peftserve.models.llama import ModelShape
from tests.device import DEVICE

CPU = torch.device("cpu")

SHAPE = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                   vocab=100, max_positions=128)  # fmt: skip


def lora(r: int, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)

    def mod(d_in: int, d_out: int, scale: float) -> LoraModule:
        a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        return LoraModule(a, b, scale)

    return LoraWeights({(1, "v"): mod(64, 32, 2.0), (1, "down"): mod(128, 64, 0.5)})


def test_new_buffers_are_zero_and_a_smaller_rank_leaves_zeros_past_it():
    slots = DeviceSlots(SHAPE, num_slots=4, max_rank=16, dtype=torch.bfloat16,
                        device=CPU, backend=CpuBackend(native=cpu_ext.load()))  # fmt: skip
    slots.write_lora(2, lora(12, seed=0))
    qkv, down = slots.lora[(1, "qkv")], slots.lora[(1, "down")]
    for buf in (qkv, down):  # fresh storage: only slot 2's written rows are non-zero
        others = [s for s in range(4) if s != 2]
        assert not buf.A[:, others].any() and not buf.B[others].any()
        assert not buf.A[:, 2, :, :].float().isnan().any()
    assert not qkv.A[0, 2].any() and not qkv.A[1, 2].any()  # q, k: not in the adapter
    assert qkv.A[2, 2, :12].any() and not qkv.A[2, 2, 12:].any()

    slots.write_lora(2, lora(5, seed=1))  # the same slot, a smaller rank
    new = lora(5, seed=1).modules
    assert torch.equal(qkv.A[2, 2, :5], new[(1, "v")].A.bfloat16())
    assert not qkv.A[2, 2, 5:].any()
    assert not qkv.B[2, 96:128, 5:].any()  # v's output rows, past rank 5
    assert torch.equal(qkv.B[2, 96:128, :5], new[(1, "v")].B.bfloat16())
    assert not down.A[0, 2, 5:].any() and not down.B[2, :, 5:].any()
    assert int(qkv.rank[2, 2]) == 5 and int(down.rank[0, 2]) == 5


def test_decode_plan_is_reused_only_until_a_slot_is_written():
    """The hook's DecodePlan (the one-call decode stack's adapter arguments) is cached across
    steps with the same segments; rewriting a slot the step uses, with the same segments,
    must give a plan of the new weights."""
    from peftserve.adapters.slots import AdapterHook
    from peftserve.kernels import build_segment_meta

    assert cpu_ext.load(), f"the C++ CPU kernels are not loaded: {cpu_ext.unavailable_reason()}"
    slots = DeviceSlots(SHAPE, num_slots=4, max_rank=16, dtype=torch.bfloat16,
                        device=CPU, backend=CpuBackend(native=cpu_ext.load()))  # fmt: skip
    slots.write_lora(1, lora(8, seed=0))
    meta = build_segment_meta(torch.tensor([1, -1, 1]))
    plan = AdapterHook(slots, meta, ()).decode_plan(SHAPE.layers)
    again = AdapterHook(slots, meta, ()).decode_plan(SHAPE.layers)  # the next step: reused
    assert again.tensors is plan.tensors and slots.plans_built == 1
    assert any(t is slots.packed[(1, "qkv")][1].A for t in plan.tensors)
    slots.write_lora(1, lora(8, seed=1))  # same slot, same rank, other weights
    new = AdapterHook(slots, meta, ()).decode_plan(SHAPE.layers)
    assert new.tensors is not plan.tensors and slots.plans_built == 2
    assert any(t is slots.packed[(1, "qkv")][1].A for t in new.tensors)
    assert not any(t is slots.packed[(1, "qkv")][1].A for t in plan.tensors)
    same_segments = AdapterHook(slots, build_segment_meta(torch.tensor([1, 1, -1])), ())
    reused = same_segments.decode_plan(SHAPE.layers)  # rows come apart from the plan
    assert reused.tensors is new.tensors and slots.plans_built == 2
    assert torch.equal(reused.sorted_tokens, torch.tensor([0, 1]))  # this step's rows
    other = AdapterHook(slots, build_segment_meta(torch.tensor([1, 1, 1])), ())
    assert other.decode_plan(SHAPE.layers).tensors is not new.tensors  # other segments
    assert slots.plans_built == 3


def bottleneck(r: int, seed: int) -> BottleneckWeights:
    g = torch.Generator().manual_seed(seed)
    h = SHAPE.hidden

    def placement() -> tuple[torch.Tensor, ...]:
        return (torch.randn(r, h, generator=g), torch.randn(r, generator=g),
                torch.randn(h, r, generator=g), torch.randn(h, generator=g))  # fmt: skip

    return BottleneckWeights("relu", 0.7, {(0, "output_adapter"): placement(),
                                            (1, "mh_adapter"): placement()})  # fmt: skip


def buffers(slots: DeviceSlots) -> dict[str, torch.Tensor]:
    out = {}
    for key, m in [*slots.lora.items(), *slots.bottleneck.items()]:
        for name in ("A", "B", "rank", "scale", "b_down", "b_up"):
            if getattr(m, name) is not None:
                out[f"{key}.{name}"] = getattr(m, name)
    return out


def test_upload_gives_each_tensor_cast_to_its_dtype():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 7, generator=g), torch.randn(5, 2, generator=g).t(),
               torch.arange(5, dtype=torch.int32), torch.randn(1, generator=g),
               torch.randn(13, generator=g)]  # fmt: skip
    dtypes = [torch.bfloat16, torch.float16, torch.int32, torch.float32, torch.bfloat16]
    out = upload(tensors, dtypes, CPU)
    for t, d, o in zip(tensors, dtypes, out, strict=True):
        assert o.dtype == d and o.shape == t.shape and torch.equal(o, t.to(d))


def test_upload_pads_a_tensor_to_its_width_with_zeros():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 3, generator=g), torch.randn(2, 3, generator=g),
               torch.randn(5, 8, generator=g), torch.randn(3, 5, generator=g)]  # fmt: skip
    out = upload(tensors, [torch.bfloat16] * 4, CPU, [8, 8, 8, None])
    for t, o in zip(tensors, out, strict=True):
        w = 8 if t.shape[1] != 5 else 5
        assert o.shape == (t.shape[0], w) and o.dtype == torch.bfloat16
        assert torch.equal(o[:, : t.shape[1]], t.bfloat16()) and not o[:, t.shape[1] :].any()


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_a_staged_write_copies_into_contiguous_slots_but_the_rank_tables(monkeypatch, kind):
    """On a GPU a foreach copy into strided tensors launches once per tensor; B's first r
    columns were such a destination in every module. Staged, B's rows go over whole."""
    slots = DeviceSlots(SHAPE, num_slots=4, max_rank=16, dtype=torch.bfloat16, device=CPU,
                        backend=Backend())  # fmt: skip
    monkeypatch.setattr(slots, "_staged", lambda: True)
    strided: list[int] = []
    copy = torch._foreach_copy_

    def recording(dst, src):
        strided.append(sum(not d.is_contiguous() for d in dst))
        return copy(dst, src)

    monkeypatch.setattr(torch, "_foreach_copy_", recording)
    for rank in (12, 5):  # a smaller rank over a larger one: B's columns past it are zeroed
        if kind == "lora":
            slots.write_lora(2, lora(rank, seed=rank))
        else:
            slots.write_bottleneck(2, bottleneck(rank, seed=rank))
        assert sum(strided) == 2, strided  # the ranks' and the scales' columns of the table
        strided.clear()
    # Past WHOLE_ROWS_MAX_EXTRA (a low rank under a high max rank at a large shape), B's
    # columns to the rank go over as they are: strided, one launch each on a GPU.
    monkeypatch.setattr(slots_module, "WHOLE_ROWS_MAX_EXTRA", -1)
    if kind == "lora":
        slots.write_lora(2, lora(5, seed=5))
    else:
        slots.write_bottleneck(2, bottleneck(5, seed=5))
    assert sum(strided) > 2, strided


@pytest.mark.parametrize("whole", [True, False], ids=["whole-B-rows", "B-rows-to-rank"])
def test_a_write_through_one_upload_equals_a_direct_one(monkeypatch, whole):
    """What a GPU does (the adapter's tensors staged in one buffer, copied over once, then into
    the slots) against the direct host copies, through rewrites at smaller ranks and clears.
    On the CPU the staged path is forced; with PEFTSERVE_TEST_DEVICE=cuda (bench/gpu.sh) it
    runs on the GPU, from page-locked memory."""
    direct = DeviceSlots(SHAPE, num_slots=4, max_rank=16, dtype=torch.bfloat16, device=CPU,
                         backend=Backend())  # fmt: skip
    staged = DeviceSlots(SHAPE, num_slots=4, max_rank=16, dtype=torch.bfloat16,
                         device=torch.device(DEVICE), backend=Backend())  # fmt: skip
    if DEVICE == "cpu":
        monkeypatch.setattr(staged, "_staged", lambda: True)
    if not whole:  # past WHOLE_ROWS_MAX_EXTRA: B's columns to the rank, strided
        monkeypatch.setattr(slots_module, "WHOLE_ROWS_MAX_EXTRA", -1)
    uploads = []
    monkeypatch.setattr(slots_module, "upload",
                        lambda *a: uploads.append(1) or upload(*a))  # fmt: skip
    for slots in (direct, staged):
        slots.write_lora(2, lora(12, seed=0))
        slots.write_bottleneck(1, bottleneck(8, seed=1))
        slots.write_lora(3, lora(3, seed=2))
        slots.write_lora(2, lora(5, seed=3))
        slots.write_bottleneck(1, bottleneck(4, seed=4))
        slots.clear(3)
    assert len(uploads) == 5
    a, b = buffers(direct), {k: t.cpu() for k, t in buffers(staged).items()}
    assert a.keys() == b.keys() and len(a) == 2 * 4 + 2 * 6
    for key in a:
        assert torch.equal(a[key], b[key]), key
    qkv, bn = staged.lora[(1, "qkv")], staged.bottleneck[(1, "o", "relu")]
    assert qkv.rank[:, 2].tolist() == [0, 0, 5] and not qkv.rank[:, 3].any()
    assert qkv.scale[2, 2] == 2.0 and staged.lora[(1, "down")].scale[0, 2] == 0.5
    assert bn.rank[0, 1] == 4 and float(bn.scale[0, 1]) == pytest.approx(0.7)
    assert not bn.A[0, 1, 4:].any() and not bn.B[1, :, 4:].any() and not bn.b_down[1, 4:].any()
    want = bottleneck(4, seed=4).modules[(1, "mh_adapter")][3].bfloat16()
    assert torch.equal(bn.b_up[1].cpu(), want)


class _DataOps(TorchDispatchMode):
    """Counts the ops that move data (a kernel launch each on a GPU); views are free."""

    VIEWS = {"select", "slice", "view", "alias", "detach", "split", "split_with_sizes",
             "t", "transpose", "lift_fresh", "empty"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_a_slot_write_moves_data_in_as_many_ops_for_any_number_of_layers(monkeypatch, kind):
    """A 30-layer all-linear LoRA took ~1,300 data ops a write (two copies, two casts and two
    scalar writes per module), each a launch on a GPU, the copies blocking; now a fixed few."""
    counts = []
    for layers in (2, 6):
        shape = replace(SHAPE, layers=layers)
        slots = DeviceSlots(shape, num_slots=4, max_rank=16, dtype=torch.bfloat16, device=CPU,
                            backend=Backend())  # fmt: skip
        monkeypatch.setattr(slots, "_staged", lambda: True)
        g = torch.Generator().manual_seed(0)
        if kind == "lora":
            weights = LoraWeights({(layer, p): LoraModule(
                torch.randn(8, module_dims(shape, p)[0], generator=g),
                torch.randn(module_dims(shape, p)[1], 8, generator=g), 1.0)
                for layer in range(layers) for p in PROJECTIONS})  # fmt: skip
            write = slots.write_lora
        else:
            h = shape.hidden
            weights = BottleneckWeights("relu", 1.0, {(layer, p): (
                torch.randn(8, h, generator=g), torch.randn(8, generator=g),
                torch.randn(h, 8, generator=g), torch.randn(h, generator=g))
                for layer in range(layers) for p in ("mh_adapter", "output_adapter")})  # fmt: skip
            write = slots.write_bottleneck
        write(1, weights)  # allocates the buffers
        ops = _DataOps()
        with ops:
            write(1, weights)
        counts.append(ops.count)
    assert counts[0] == counts[1] and counts[0] <= 12, counts


@pytest.mark.parametrize("scale", [1e308, float("inf"), float("nan")])
def test_a_scale_float32_cannot_hold_is_refused_naming_its_module(scale):
    slots = DeviceSlots(SHAPE, num_slots=4, max_rank=16, dtype=torch.bfloat16, device=CPU,
                        backend=Backend())  # fmt: skip
    bad = LoraWeights({k: LoraModule(m.A, m.B, scale if k == (1, "down") else m.scale)
                       for k, m in lora(4, seed=0).modules.items()})  # fmt: skip
    with pytest.raises(ValueError, match="layer 1's down.*not a finite float32"):
        slots.write_lora(1, bad)
    with pytest.raises(ValueError, match="the bottleneck.*not a finite float32"):
        slots.write_bottleneck(2, replace(bottleneck(4, seed=1), scaling=scale))
    slots.write_lora(1, lora(4, seed=0))  # and the slots still serve
    assert slots.lora[(1, "down")].scale[0, 1] == 0.5


def test_a_write_packs_each_module_as_pack_lora_does_with_ranks_varying_by_layer():
    """The CPU backend's packs are made a projection's layers at once, batched by their slices'
    ranks: each must equal pack_lora of that module's buffers alone."""
    shape = replace(SHAPE, layers=4)
    slots = DeviceSlots(shape, num_slots=3, max_rank=16, dtype=torch.bfloat16, device=CPU,
                        backend=CpuBackend(native=False))  # fmt: skip
    g = torch.Generator().manual_seed(3)

    def mod(layer: int, proj: str, r: int) -> LoraModule:
        d_in, d_out = module_dims(shape, proj)
        return LoraModule(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g),
                          0.5 + layer + len(proj) / 8)  # fmt: skip

    ranks = {(0, "q"): 4, (0, "v"): 4, (1, "q"): 4, (1, "v"): 4, (2, "v"): 8, (3, "q"): 2,
             (3, "k"): 6, (0, "down"): 3, (2, "down"): 3, (3, "gate"): 5}  # fmt: skip
    slots.write_lora(1, lora(12, seed=5))  # an earlier adapter in the slot: layer 1 only
    slots.write_lora(1, LoraWeights({k: mod(*k, r) for k, r in ranks.items()}))
    packed_modules = {key for key, per_slot in slots.packed.items() if per_slot[1] is not None}
    assert packed_modules == {(layer, GROUP_OF[p][0]) for layer, p in ranks}
    for key in packed_modules:
        buf, got = slots.lora[key], slots.packed[key][1]
        want = pack_lora(buf.A, buf.B, buf.rank, buf.scale, 1, buf.slice_sizes)
        assert got.ranks == want.ranks and got.offsets == want.offsets, key
        for name in ("A", "B", "B_blocks"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (key, name)
