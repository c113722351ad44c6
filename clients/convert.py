"""Client-side protobuf <-> dataclasses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from peftserve.client.types import (
    AdapterInfo,
    Chunk,
    Completion,
    Limits,
    Load,
    Sampling,
    ServerInfo,
    Timings,
)
from peftserve.v1 import adapters_pb2, generate_pb2, server_info_pb2

_FINISH = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_ABORT: "abort",
}
_KIND = {
    adapters_pb2.ADAPTER_KIND_LORA: "lora",
    adapters_pb2.ADAPTER_KIND_BOTTLENECK: "bottleneck",
    adapters_pb2.ADAPTER_KIND_PREFIX_TUNING: "prefix_tuning",
    adapters_pb2.ADAPTER_KIND_PROMPT_TUNING: "prompt_tuning",
    adapters_pb2.ADAPTER_KIND_PROMPT_TEMPLATE: "prompt_template",
}
_RESIDENCY = {
    adapters_pb2.RESIDENCY_DEVICE: "device",
    adapters_pb2.RESIDENCY_HOST: "host",
    adapters_pb2.RESIDENCY_DISK: "disk",
}
ADAPTER_SUFFIXES = (".json", ".safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def generate_request(prompt: str | None, messages: Sequence[Mapping[str, str]] | None,
                     token_ids: Sequence[int] | None, adapter: str | None,
                     sampling: Sampling | None, request_id: str | None
                     ) -> generate_pb2.GenerateRequest:
    given = sum(x is not None for x in (prompt, messages, token_ids))
    if given != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    pb = generate_pb2.GenerateRequest(adapter=adapter or "", request_id=request_id or "")
    if prompt is not None:
        pb.prompt = prompt
    elif messages is not None:
        pb.messages.messages.extend(generate_pb2.ChatMessage(role=m["role"], content=m["content"])
                                    for m in messages)
    else:
        pb.token_ids.ids.extend(token_ids or ())
    if sampling is not None:
        pb.sampling.CopyFrom(sampling_to_pb(sampling))
    return pb


def sampling_to_pb(s: Sampling) -> generate_pb2.SamplingParameters:
    pb = generate_pb2.SamplingParameters(stop=s.stop, stop_token_ids=s.stop_token_ids,
                                         ignore_eos=s.ignore_eos, logprobs=s.logprobs)
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                 "skip_special_tokens"):
        value = getattr(s, name)
        if value is not None:
            setattr(pb, name, value)
    return pb


def timings(pb: generate_pb2.Timings) -> Timings:
    def opt(name: str) -> float | None:
        return getattr(pb, name) if pb.HasField(name) else None

    return Timings(opt("queue_seconds"), opt("ttft_seconds"), opt("total_seconds"))


def completion(pb: generate_pb2.GenerateResponse) -> Completion:
    return Completion(
        request_id=pb.request_id, text=pb.text, token_ids=list(pb.token_ids),
        logprobs=list(pb.logprobs), finish_reason=_FINISH.get(pb.finish_reason, "unknown"),
        prompt_tokens=pb.usage.prompt_tokens, completion_tokens=pb.usage.completion_tokens,
        timings=timings(pb.timings), adapter_kind=pb.adapter_kind)


def chunk(pb: generate_pb2.GenerateStreamResponse) -> Chunk:
    final = pb.HasField("usage")
    return Chunk(
        request_id=pb.request_id, text=pb.text, token_ids=list(pb.token_ids),
        logprobs=list(pb.logprobs), finish_reason=_FINISH.get(pb.finish_reason),
        prompt_tokens=pb.usage.prompt_tokens if final else None,
        completion_tokens=pb.usage.completion_tokens if final else None,
        timings=timings(pb.timings) if pb.HasField("timings") else None,
        adapter_kind=pb.adapter_kind)


def register_request(name: str, path: str | None, directory: str | Path | None,
                     files: Mapping[str, bytes] | None, replace: bool
                     ) -> adapters_pb2.RegisterAdapterRequest:
    """`path`: on the server, under its adapter root. `directory`: a local adapter directory
    whose .json / .safetensors files are sent inline. `files`: name -> bytes, sent inline."""
    if sum(x is not None for x in (path, directory, files)) != 1:
        raise ValueError("give exactly one of path (on the server), directory (local, uploaded) "
                         "or files")
    pb = adapters_pb2.RegisterAdapterRequest(name=name, replace=replace)
    if path is not None:
        pb.path = path
        return pb
    if directory is not None:
        files = upload_files(Path(directory))
    pb.inline.files.update(files or {})
    return pb


def upload_files(local: Path) -> dict[str, bytes]:
    """The .json / .safetensors files of a local adapter directory, name -> bytes. Raises
    ValueError for what the server would refuse anyway, and for a link that leads out of the
    directory: an upload never sends a file from elsewhere."""
    if not local.is_dir():
        raise ValueError(f"{local} is not a directory")
    inside = local.resolve()
    files: dict[str, bytes] = {}
    pickles = []
    for p in sorted(local.iterdir()):
        if p.suffix in PICKLE_SUFFIXES:
            pickles.append(p.name)
        if p.suffix not in ADAPTER_SUFFIXES:
            continue
        if not p.resolve().is_relative_to(inside):
            raise ValueError(f"{p.name} in {local} is a link to a file outside the directory; "
                             "it is not uploaded (copy the file in instead)")
        if p.is_file():
            files[p.name] = p.read_bytes()
    if "adapter_config.json" not in files:
        raise ValueError(f"{local} holds no adapter_config.json: not an adapter directory")
    if pickles and not any(name.endswith(".safetensors") for name in files):
        raise ValueError(f"{local} holds pickle weights ({', '.join(pickles)}), which peftserve "
                         "never loads: re-save with safe_serialization=True")
    return files


def adapter(pb: adapters_pb2.Adapter) -> AdapterInfo:
    return AdapterInfo(
        name=pb.name, kind=_KIND.get(pb.kind, "unknown"), source=pb.source, ranks=dict(pb.ranks),
        num_params=pb.num_params, num_bytes=pb.num_bytes,
        residency=_RESIDENCY.get(pb.residency, "unknown"),
        load_seconds=pb.load_seconds if pb.HasField("load_seconds") else None,
        requests_served=pb.requests_served, registered_at=pb.registered_at_unix)


def server_info(pb: server_info_pb2.ServerInfoResponse) -> ServerInfo:
    lim, load = pb.limits, pb.load
    return ServerInfo(
        version=pb.version, model=pb.model, dtype=pb.dtype, device=pb.device,
        kernel_backend=pb.kernel_backend,
        limits=Limits(lim.max_prompt_tokens, lim.max_new_tokens, lim.max_model_len,
                      lim.max_concurrent_streams, lim.max_waiting_requests,
                      lim.max_inline_adapter_bytes, lim.max_num_seqs, lim.max_loras),
        load=Load(load.num_running, load.num_waiting, load.kv_blocks_used, load.kv_blocks_total,
                  load.active_streams),
        admin_token_required=pb.admin_token_required,
        adapter_root_configured=pb.adapter_root_configured)
