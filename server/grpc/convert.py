"""Protobuf <-> engine dataclasses. Protobuf goes no further down than this module's callers."""

from __future__ import annotations

from peftserve import __version__
from peftserve.adapters.handle import AdapterInfo, AdapterKind
from peftserve.engine.request import Request, RequestOutput, Timings
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.sequence import FinishReason
from peftserve.engine.stats import EngineInfo
from peftserve.errors import InvalidRequest
from peftserve.serve_config import ServeConfig
from peftserve.v1 import adapters_pb2, generate_pb2, server_info_pb2

_FINISH = {
    None: generate_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: generate_pb2.FINISH_REASON_ABORT,
}
_KIND = {
    AdapterKind.LORA: adapters_pb2.ADAPTER_KIND_LORA,
    AdapterKind.BOTTLENECK: adapters_pb2.ADAPTER_KIND_BOTTLENECK,
    AdapterKind.PREFIX_TUNING: adapters_pb2.ADAPTER_KIND_PREFIX_TUNING,
    AdapterKind.PROMPT_TUNING: adapters_pb2.ADAPTER_KIND_PROMPT_TUNING,
    AdapterKind.PROMPT_TEMPLATE: adapters_pb2.ADAPTER_KIND_PROMPT_TEMPLATE,
}
_RESIDENCY = {
    "device": adapters_pb2.RESIDENCY_DEVICE,
    "host": adapters_pb2.RESIDENCY_HOST,
    "disk": adapters_pb2.RESIDENCY_DISK,
}


def request_from_pb(pb: generate_pb2.GenerateRequest, request_id: str,
                    default_max_new_tokens: int, arrival_time: float | None = None) -> Request:
    """Raises InvalidRequest (also for bad sampling values, via SamplingParams)."""
    which = pb.WhichOneof("input")
    if which is None:
        raise InvalidRequest("give one of prompt, messages or token_ids")
    prompt = pb.prompt if which == "prompt" else None
    messages = None
    if which == "messages":
        messages = tuple({"role": m.role, "content": m.content} for m in pb.messages.messages)
    token_ids = tuple(pb.token_ids.ids) if which == "token_ids" else None
    return Request(request_id=request_id, prompt=prompt, messages=messages,
                   prompt_token_ids=token_ids, params=sampling_from_pb(pb.sampling,
                                                                       default_max_new_tokens),
                   adapter=pb.adapter or None, arrival_time=arrival_time)


def sampling_from_pb(pb: generate_pb2.SamplingParameters, default_max_new_tokens: int
                     ) -> SamplingParams:
    d = SamplingParams()
    has = pb.HasField
    return SamplingParams(
        max_new_tokens=pb.max_new_tokens if has("max_new_tokens") else default_max_new_tokens,
        temperature=pb.temperature if has("temperature") else d.temperature,
        top_k=pb.top_k if has("top_k") else d.top_k,
        top_p=pb.top_p if has("top_p") else d.top_p,
        repetition_penalty=(pb.repetition_penalty if has("repetition_penalty")
                            else d.repetition_penalty),
        seed=pb.seed if has("seed") else None,
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        logprobs=pb.logprobs,
        skip_special_tokens=(pb.skip_special_tokens if has("skip_special_tokens")
                             else d.skip_special_tokens),
    )


def timings_to_pb(t: Timings | None) -> generate_pb2.Timings | None:
    if t is None:
        return None
    pb = generate_pb2.Timings(queue_seconds=t.queue_s)
    if t.ttft_s is not None:
        pb.ttft_seconds = t.ttft_s
    if t.e2e_s is not None:
        pb.total_seconds = t.e2e_s
    return pb


def stream_chunk(out: RequestOutput) -> generate_pb2.GenerateStreamResponse:
    pb = generate_pb2.GenerateStreamResponse(
        request_id=out.request_id, text=out.text, token_ids=out.token_ids,
        logprobs=out.logprobs or (), finish_reason=_FINISH[out.finish_reason if out.finished
                                                           else None],
        adapter_kind=out.adapter_kind)
    if out.finished:
        pb.usage.CopyFrom(generate_pb2.Usage(prompt_tokens=out.prompt_tokens,
                                             completion_tokens=out.completion_tokens))
    timings = timings_to_pb(out.timings)
    if timings is not None:
        pb.timings.CopyFrom(timings)
    return pb


def generate_response(outs: list[RequestOutput]) -> generate_pb2.GenerateResponse:
    """Joins a finished request's outputs into one response."""
    last = outs[-1]
    first_timed = next((o.timings for o in outs if o.timings is not None), None)
    timings = last.timings or first_timed
    pb = generate_pb2.GenerateResponse(
        request_id=last.request_id, text="".join(o.text for o in outs),
        token_ids=[t for o in outs for t in o.token_ids],
        logprobs=[p for o in outs for p in (o.logprobs or ())],
        finish_reason=_FINISH[last.finish_reason],
        usage=generate_pb2.Usage(prompt_tokens=last.prompt_tokens,
                                 completion_tokens=last.completion_tokens),
        adapter_kind=last.adapter_kind)
    timings_pb = timings_to_pb(timings)
    if timings_pb is not None:
        pb.timings.CopyFrom(timings_pb)
    return pb


def adapter_to_pb(info: AdapterInfo) -> adapters_pb2.Adapter:
    pb = adapters_pb2.Adapter(
        name=info.name, kind=_KIND.get(info.kind, adapters_pb2.ADAPTER_KIND_UNSPECIFIED),
        source=info.source, ranks=info.ranks, num_params=info.num_params,
        num_bytes=info.num_bytes,
        residency=_RESIDENCY.get(info.residency, adapters_pb2.RESIDENCY_UNSPECIFIED),
        requests_served=info.requests_served, registered_at_unix=info.registered_at)
    if info.load_time_s is not None:
        pb.load_seconds = info.load_time_s
    return pb


def server_info_to_pb(info: EngineInfo, model_name: str, config: ServeConfig,
                      active_streams: int) -> server_info_pb2.ServerInfoResponse:
    """ServerInfo of one engine (one server, or one Ray Serve replica) under `config`."""
    s = info.stats
    return server_info_pb2.ServerInfoResponse(
        version=__version__, model=model_name, dtype=info.dtype, device=info.device,
        kernel_backend=info.kernel_backend,
        limits=server_info_pb2.Limits(
            max_prompt_tokens=info.max_prompt_tokens, max_new_tokens=info.max_new_tokens,
            max_model_len=info.max_model_len,
            max_concurrent_streams=config.max_concurrent_streams,
            max_waiting_requests=info.max_waiting,
            max_inline_adapter_bytes=config.max_inline_adapter_bytes,
            max_num_seqs=info.max_num_seqs, max_loras=s.max_loras),
        load=server_info_pb2.Load(
            num_running=s.num_running, num_waiting=s.num_waiting,
            kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
            active_streams=active_streams),
        admin_token_required=config.admin_token is not None,
        adapter_root_configured=config.adapter_root is not None)
