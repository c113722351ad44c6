"""KServe v2 protobuf <-> engine dataclasses for `kserve.KServeServicer`."""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Mapping

from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.sampling_params import SamplingParams
from peftserve.errors import InvalidRequest
from peftserve.kserve_v2 import grpc_predict_v2_pb2 as pb

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
MAX_PROMPTS = 64  # elements of one text_input tensor
# Parameters tritonclient sets on its own (request priority, timeout): accepted, not used.
_IGNORED = frozenset({"priority", "timeout"})
_INT = {"max_tokens": "max_new_tokens", "top_k": "top_k", "seed": "seed",
        "random_seed": "seed"}
_FLOAT = {"temperature": "temperature", "top_p": "top_p",
          "repetition_penalty": "repetition_penalty"}


def model_metadata(name: str, kind: str) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=name, versions=["1"], platform=f"peftserve_{kind}",
        inputs=[tensor(name=TEXT_INPUT, datatype="BYTES", shape=[-1])],
        outputs=[tensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[-1])])


def text_input(request: pb.ModelInferRequest) -> tuple[list[str], list[int]]:
    """The prompts of the `text_input` tensor, row-major, and its shape."""
    if [t.name for t in request.inputs] != [TEXT_INPUT]:
        raise InvalidRequest(f"give exactly one input, a BYTES tensor named {TEXT_INPUT!r}; got "
                             f"{[t.name for t in request.inputs]}")
    unknown = [o.name for o in request.outputs if o.name != TEXT_OUTPUT]
    if unknown:
        raise InvalidRequest(f"the only output is {TEXT_OUTPUT!r}; asked for {unknown}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"{TEXT_INPUT} must be BYTES, got {tensor.datatype}")
    shape = list(tensor.shape)
    count = math.prod(shape) if shape else 0
    if any(d < 0 for d in shape) or not 1 <= count <= MAX_PROMPTS:
        raise InvalidRequest(f"{TEXT_INPUT} must hold 1 to {MAX_PROMPTS} prompts, shape {shape}")
    if request.raw_input_contents:
        elements = _split_bytes(request.raw_input_contents[0])
    else:
        elements = list(tensor.contents.bytes_contents)
    if len(elements) != count:
        raise InvalidRequest(f"{TEXT_INPUT} has shape {shape} but {len(elements)} elements")
    try:
        return [e.decode("utf-8") for e in elements], shape
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"{TEXT_INPUT} is not UTF-8: {e.reason}") from None


def _split_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialization: each element a 4-byte little-endian length, then bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidRequest("raw BYTES contents end inside a length prefix")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise InvalidRequest("raw BYTES contents end inside an element")
        out.append(raw[at:at + n])
        at += n
    return out


def _join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _value(p: pb.InferParameter) -> bool | int | float | str:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidRequest("a parameter without a value")
    return getattr(p, which)


def sampling(params: Mapping[str, pb.InferParameter], default_max_tokens: int) -> SamplingParams:
    kw: dict[str, object] = {"max_new_tokens": default_max_tokens}
    for key, p in params.items():
        value = _value(p)
        if key in _IGNORED:
            continue
        if key in _INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"parameter {key} must be an integer")
            kw[_INT[key]] = value
        elif key in _FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"parameter {key} must be a number")
            kw[_FLOAT[key]] = float(value)
        elif key == "ignore_eos":
            if not isinstance(value, bool):
                raise InvalidRequest("parameter ignore_eos must be a boolean")
            kw["ignore_eos"] = value
        elif key == "stop":
            kw["stop"] = _stop(value)
        else:
            raise InvalidRequest(f"unknown parameter {key!r}; sampling takes max_tokens, "
                                 f"temperature, top_p, top_k, seed, repetition_penalty, stop, "
                                 f"ignore_eos")
    return SamplingParams(**kw)  # type: ignore[arg-type]


def _stop(value: object) -> tuple[str, ...]:
    """A stop string, or a JSON list of them."""
    if not isinstance(value, str):
        raise InvalidRequest("parameter stop must be a string or a JSON list of strings")
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise InvalidRequest("parameter stop must be a string or a JSON list of strings")
        return tuple(items)
    return (value,)


def engine_request(request_id: str, prompt: str, params: SamplingParams,
                   adapter: str | None) -> Request:
    return Request(request_id, prompt=prompt, params=params, adapter=adapter,
                   arrival_time=time.monotonic())


def infer_response(request: pb.ModelInferRequest, shape: list[int],
                   results: list[list[RequestOutput]]) -> pb.ModelInferResponse:
    texts = ["".join(o.text for o in outs).encode() for outs in results]
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version="1", id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=TEXT_OUTPUT, datatype="BYTES",
                                                         shape=shape)],
        raw_output_contents=[_join_bytes(texts)])
    if len(results) == 1:
        last = results[0][-1]
        params = response.parameters
        params["finish_reason"].string_param = last.finish_reason.value if last.finish_reason \
            else "stop"
        params["prompt_tokens"].int64_param = last.prompt_tokens
        params["completion_tokens"].int64_param = last.completion_tokens
    return response
