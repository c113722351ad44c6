"""server/adapters/files.py's read_safetensors against the safetensors library's own reader
(safetensors.torch.load, the oracle): the same tensors from every valid file, as views of the
file's bytes; and from damaged files, never a tensor the library would not give."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from peftserve.adapters.errors import InvalidAdapter
from peftserve.adapters.files import SAFETENSORS_FLOATS, SourceDir, read_safetensors


def as_data(raw: bytes) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if raw
        else torch.empty(0, dtype=torch.uint8)
    )


def ours(raw: bytes) -> dict[str, torch.Tensor] | None:
    try:
        return read_safetensors(as_data(raw))[0]
    except InvalidAdapter:
        return None


def library(raw: bytes) -> dict[str, torch.Tensor] | None:
    try:
        return load(raw)
    except (SafetensorError, ValueError, KeyError, RuntimeError):
        return None


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


def mixed(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (), (0, 4), (2, 3, 2), (1,), (64, 9)]
    dtypes = list(SAFETENSORS_FLOATS.values())
    return {
        f"t{i}": torch.randn(shapes[i % len(shapes)], generator=g).to(dtypes[(i * 7 + seed) % 4])
        for i in range(12)
    }


def by_hand(header: dict, payload: bytes, pad: int = 0) -> bytes:
    text = json.dumps(header).encode() + b" " * pad
    return len(text).to_bytes(8, "little") + text + payload


@pytest.mark.parametrize("seed", range(6))
def test_valid_files_give_the_librarys_tensors_as_views(seed):
    tensors = mixed(seed)
    raw = save(tensors, metadata={"format": "pt"} if seed % 2 else None)
    data = as_data(raw)
    got, runs = read_safetensors(data)
    assert same(got, load(raw)) and same(got, tensors)
    lo, hi = data.data_ptr(), data.data_ptr() + data.numel()
    for t in [*got.values(), *runs]:  # views of the file's bytes, no copy
        if t.numel():
            assert lo <= t.data_ptr() < hi
    assert sum(r.numel() * r.element_size() for r in runs) == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert len(runs) <= len({t.dtype for t in tensors.values()})  # save groups by dtype


def test_what_the_library_lets_pass_passes():
    """Duplicate names (the last one counts), whitespace before the header, unknown fields."""
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    payload = torch.tensor([1.5, -2.0]).numpy().tobytes()
    texts = [
        b'{"a": %s, "a": %s}' % (json.dumps(dict(a, shape=[8])).encode(), json.dumps(a).encode()),
        b' {"a": %s}' % json.dumps(a).encode(),
        b'{"a": %s}' % json.dumps(dict(a, note=1)).encode(),
    ]
    for text in texts:
        raw = len(text).to_bytes(8, "little") + text + payload
        theirs = library(raw)
        assert theirs is not None and same(ours(raw), theirs), text


def test_an_unaligned_tensor_is_copied_aligned():
    """A header whose length is not a multiple of 8 (safetensors pads, hand-made files may
    not): the fp32 data starts at an odd byte; the run is copied out, the values are kept."""
    a = torch.arange(6, dtype=torch.float32)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    starts = set()
    for pad in range(4):  # one of these four starts the data off its alignment
        raw = by_hand(header, a.numpy().tobytes(), pad)
        data = as_data(raw)
        got = read_safetensors(data)[0]
        assert same(got, library(raw)) and torch.equal(got["a"], a.view(2, 3))
        aligned = (len(raw) - 24) % 4 == 0
        starts.add(aligned)
        view = got["a"].data_ptr() == data.data_ptr() + len(raw) - 24
        assert view == aligned  # a view where it can be, a copy where it cannot
    assert starts == {True, False}


def test_refusals_name_the_problem():
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    payload = bytes(8)
    cases = [
        (b"garbage", "not a readable safetensors"),
        ((10**9).to_bytes(8, "little") + b"{}", "header length"),
        (
            by_hand({"a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, payload),
            "dtype 'I32'",
        ),
        (
            by_hand({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}, payload),
            "dtype 'F8_E4M3'",
        ),
        (
            by_hand({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, payload),
            "do not hold",
        ),
        (
            by_hand(
                {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, payload + bytes(4)
            ),
            "gap",
        ),
        (by_hand(good, payload + bytes(4)), "end at byte"),
        (
            by_hand({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, payload),
            "lacks",
        ),
        (by_hand({**good, "__metadata__": {"k": 1}}, payload), "__metadata__"),
        (by_hand([1], b""), "not a JSON object"),
        (b"\x04" + bytes(7) + b"\xff\xfe{}", "UTF-8 JSON"),
    ]
    for raw, match in cases:
        with pytest.raises(InvalidAdapter, match=match):
            read_safetensors(as_data(raw))
        assert library(raw) is None or match.startswith("dtype")


def mutate(raw: bytes, rng: random.Random) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    header, payload = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    key = rng.choice(names)
    info = header[key]
    how = rng.randrange(14)
    if how == 0:  # an offset moved
        i = rng.randrange(2)
        info["data_offsets"][i] = max(
            0, info["data_offsets"][i] + rng.choice([-8, -2, -1, 1, 2, 4, 8])
        )
    elif how == 1:  # offsets swapped with another tensor's
        other = header[rng.choice(names)]
        info["data_offsets"], other["data_offsets"] = other["data_offsets"], info["data_offsets"]
    elif how == 2:  # a dimension changed
        info["shape"] = [d + rng.choice([-1, 1, 2]) for d in info["shape"]] or [
            rng.choice([0, 1, 2])
        ]
    elif how == 3:  # another float dtype
        info["dtype"] = rng.choice(list(SAFETENSORS_FLOATS))
    elif how == 4:  # a tensor dropped from the header (its bytes stay)
        del header[key]
    elif how == 5:  # the payload cut or grown
        payload = (
            payload[: rng.randrange(len(payload) + 1)]
            if rng.random() < 0.5
            else payload + bytes(rng.randrange(1, 9))
        )
    elif how == 6:  # a field of the wrong type or missing
        field = rng.choice(["dtype", "shape", "data_offsets"])
        info[field] = rng.choice([None, "x", 3, 1.5, [], [1, 2, 3], {"a": 1}, [-1, 4]])
        if rng.random() < 0.3:
            del info[field]
    elif how == 7:  # metadata of another type
        header["__metadata__"] = rng.choice([{"a": "b"}, {"a": 1}, [], "x", None])
    elif how == 8:  # an entry that is not an object
        header[key] = rng.choice([[], 1, "x", None])
    elif how == 9:  # a tensor split in two overlapping ones
        b, e = info["data_offsets"]
        header[key + "_2"] = dict(info, data_offsets=[b, e])
    elif how == 10:  # a huge dimension (overflow in the library)
        info["shape"] = [2**62, 2**3] if rng.random() < 0.5 else [2**64 + 1]
    elif how == 11:  # a non-float dtype
        info["dtype"] = rng.choice(["I32", "U8", "BOOL", "I64", "F8_E5M2", "Q4", ""])
    text = json.dumps(header).encode()
    out = len(text).to_bytes(8, "little") + text + payload
    if how == 12:  # the length prefix wrong
        out = (len(text) + rng.choice([-3, -1, 1, 5, 2**40])).to_bytes(8, "little") + out[8:]
    elif how == 13:  # a byte of the header flipped
        i = rng.randrange(8, 8 + len(text))
        out = out[:i] + bytes([out[i] ^ (1 << rng.randrange(8))]) + out[i + 1 :]
    return out


def test_damaged_files_never_give_what_the_library_refuses():
    rng = random.Random(20261203)
    both_read = both_refused = 0
    for case in range(3000):
        raw = save(mixed(case % 8))
        for _ in range(rng.choice([1, 1, 2, 3])):
            try:  # another mutation while the header still parses as one
                raw = mutate(raw, rng)
            except (ValueError, TypeError, IndexError, KeyError, AttributeError):
                break
        mine, theirs = ours(raw), library(raw)
        if mine is not None:  # what we read, the library reads the same
            assert theirs is not None and same(mine, theirs), f"case {case}"
            both_read += 1
        elif theirs is None:
            both_refused += 1
        else:  # the library reads it: only a dtype an adapter may not have is ours to refuse
            assert any(t.dtype not in SAFETENSORS_FLOATS.values() for t in theirs.values()), (
                f"case {case}"
            )
    assert both_read > 100 and both_refused > 1000, (both_read, both_refused)


def test_a_source_dir_reads_views_of_the_bytes_it_hashed(tmp_path):
    tensors = mixed(3)
    (tmp_path / "w.safetensors").write_bytes(save(tensors))
    source = SourceDir(tmp_path)
    assert same(source.safetensors("w.safetensors"), tensors)
    bad = dict(tensors, t1=torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))
    (tmp_path / "w.safetensors").write_bytes(save(bad))
    with pytest.raises(InvalidAdapter, match="tensor t1 contains NaN"):
        SourceDir(tmp_path).safetensors("w.safetensors")
