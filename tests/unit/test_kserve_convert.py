"""KServe v2 requests -> engine requests: the BYTES tensor encodings tritonclient uses, and the
Triton-named sampling parameters, each refusal with a reason."""

from __future__ import annotations

import struct

import pytest

from peftserve.errors import InvalidRequest
from peftserve.grpc import kserve_convert as convert
from peftserve.kserve_v2 import grpc_predict_v2_pb2 as pb


def raw(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def request(shape: list[int], raw_contents: bytes | None = None,
            contents: list[bytes] | None = None, name: str = "text_input",
            datatype: str = "BYTES") -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if contents is not None:
        tensor.contents.bytes_contents.extend(contents)
    req = pb.ModelInferRequest(model_name="m", inputs=[tensor])
    if raw_contents is not None:
        req.raw_input_contents.append(raw_contents)
    return req


def params(**values: object) -> dict[str, pb.InferParameter]:
    out = {}
    for key, value in values.items():
        p = pb.InferParameter()
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)
        out[key] = p
    return out


def test_raw_and_typed_contents_give_the_same_prompts():
    texts = ["héllo", "", "a\x00b"]
    from_raw = convert.text_input(request([1, 3], raw(*(t.encode() for t in texts))))
    typed = convert.text_input(request([3], contents=[t.encode() for t in texts]))
    assert from_raw == (texts, [1, 3])
    assert typed == (texts, [3])


@pytest.mark.parametrize("req, reason", [
    (request([1], raw(b"abc")[:-1]), "inside an element"),
    (request([1], raw(b"abc") + b"\x01\x00"), "inside a length prefix"),
    (request([2], raw(b"one")), "shape \\[2\\] but 1 elements"),
    (request([1], raw(b"\xff\xfe")), "not UTF-8"),
    (request([0], raw()), "1 to 64 prompts"),
    (request([65], raw(*[b"x"] * 65)), "1 to 64 prompts"),
    (request([1], raw(b"x"), name="prompt"), "named 'text_input'"),
    (request([1], raw(b"x"), datatype="FP32"), "must be BYTES"),
])
def test_bad_text_input_is_refused_with_its_reason(req, reason):
    with pytest.raises(InvalidRequest, match=reason):
        convert.text_input(req)


def test_unknown_requested_output_is_refused():
    req = request([1], raw(b"x"))
    req.outputs.add(name="logits")
    with pytest.raises(InvalidRequest, match="logits"):
        convert.text_input(req)


def test_sampling_parameters_by_triton_names():
    sp = convert.sampling(params(max_tokens=7, temperature=1, top_p=0.5, top_k=3, random_seed=9,
                                 repetition_penalty=1.2, ignore_eos=True, stop='["a", "bc"]',
                                 priority=1), default_max_tokens=128)
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (7, 1.0, 0.5, 3, 9)
    assert (sp.repetition_penalty, sp.ignore_eos, sp.stop) == (1.2, True, ("a", "bc"))
    assert convert.sampling(params(stop="###"), 5).stop == ("###",)


@pytest.mark.parametrize("values, reason", [
    ({"max_tokens": "7"}, "max_tokens must be an integer"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"ignore_eos": 1}, "ignore_eos must be a boolean"),
    ({"stop": '["a", 1]'}, "JSON list of strings"),
    ({"stop": "[not json"}, "JSON list of strings"),
    ({"beam_width": 2}, "unknown parameter 'beam_width'"),
    ({"max_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_sampling_parameters_are_refused(values, reason):
    with pytest.raises(InvalidRequest, match=reason):
        convert.sampling(params(**values), default_max_tokens=16)
