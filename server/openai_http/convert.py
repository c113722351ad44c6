"""OpenAI request bodies -> `engine.Request`; engine outputs -> OpenAI response objects
(plain dicts: FastAPI writes them as JSON)."""

from __future__ import annotations

import time
from collections.abc import Callable

from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.sampling_params import SamplingParams
from peftserve.errors import InvalidRequest
from peftserve.openai_http.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)

TokenText = Callable[[int], str]


def _params(body: SamplingFields, max_tokens: int, logprobs: bool) -> SamplingParams:
    problem = body.unsupported()
    if problem is not None:
        raise InvalidRequest(problem)
    d = SamplingParams()
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=d.top_k if body.top_k is None else body.top_k,
        repetition_penalty=(d.repetition_penalty if body.repetition_penalty is None
                            else body.repetition_penalty),
        seed=body.seed, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, logprobs=logprobs)


def completion_request(body: CompletionRequest, request_id: str, adapter: str | None,
                       default_max_tokens: int, arrival: float) -> Request:
    prompt, token_ids = _single_prompt(body.prompt)
    params = _params(body, body.max_tokens or default_max_tokens, body.logprobs is not None)
    return Request(request_id, prompt=prompt, prompt_token_ids=token_ids, params=params,
                   adapter=adapter, arrival_time=arrival)


def _single_prompt(prompt: str | list) -> tuple[str | None, tuple[int, ...] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if prompt and all(isinstance(p, int) for p in prompt):
        return None, tuple(prompt)
    if len(prompt) == 1:
        return _single_prompt(prompt[0])
    raise InvalidRequest("give one prompt (a string or a list of token ids): "
                         "each request returns one choice")


def chat_request(body: ChatCompletionRequest, request_id: str, adapter: str | None,
                 default_max_tokens: int, arrival: float) -> Request:
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
    messages = tuple({"role": "system" if m.role == "developer" else m.role,
                      "content": _text(m)} for m in body.messages)
    return Request(request_id, messages=messages, params=_params(body, max_tokens, body.logprobs),
                   adapter=adapter, arrival_time=arrival)


def _text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest("message content parts must be text: this model reads text only")
        parts.append(part["text"])
    return "".join(parts)


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finished and out.finish_reason else None


class Response:
    """The id, time and model every object of one response carries."""

    def __init__(self, prefix: str, request_id: str, model: str) -> None:
        self.id = f"{prefix}-{request_id}"
        self.created = int(time.time())
        self.model = model

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def completion_logprobs(outs: list[RequestOutput], token_text: TokenText) -> dict:
    tokens = [token_text(t) for o in outs for t in o.token_ids]
    return {"tokens": tokens, "token_logprobs": [p for o in outs for p in (o.logprobs or ())],
            "top_logprobs": None, "text_offset": _offsets(tokens)}


def _offsets(tokens: list[str]) -> list[int]:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return offsets


def chat_logprobs(outs: list[RequestOutput], token_text: TokenText) -> dict:
    content = []
    for o in outs:
        for t, p in zip(o.token_ids, o.logprobs or (), strict=False):
            text = token_text(t)
            content.append({"token": text, "logprob": p, "bytes": list(text.encode()),
                            "top_logprobs": []})
    return {"content": content}


def completion(r: Response, outs: list[RequestOutput], logprobs: bool,
               token_text: TokenText) -> dict:
    last = outs[-1]
    choice = {"index": 0, "text": "".join(o.text for o in outs), "finish_reason":
              finish_reason(last),
              "logprobs": completion_logprobs(outs, token_text) if logprobs else None}
    return {**r.head("text_completion"), "choices": [choice], "usage": usage(last)}


def completion_chunk(r: Response, out: RequestOutput, logprobs: bool,
                     token_text: TokenText) -> dict:
    choice = {"index": 0, "text": out.text, "finish_reason": finish_reason(out),
              "logprobs": completion_logprobs([out], token_text) if logprobs else None}
    return {**r.head("text_completion"), "choices": [choice]}


def chat_completion(r: Response, outs: list[RequestOutput], logprobs: bool,
                    token_text: TokenText) -> dict:
    last = outs[-1]
    choice = {"index": 0, "message": {"role": "assistant",
                                      "content": "".join(o.text for o in outs)},
              "finish_reason": finish_reason(last),
              "logprobs": chat_logprobs(outs, token_text) if logprobs else None}
    return {**r.head("chat.completion"), "choices": [choice], "usage": usage(last)}


def chat_chunk(r: Response, out: RequestOutput, first: bool, logprobs: bool,
               token_text: TokenText) -> dict:
    delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason(out),
              "logprobs": chat_logprobs([out], token_text) if logprobs else None}
    return {**r.head("chat.completion.chunk"), "choices": [choice]}


def usage_chunk(r: Response, obj: str, last: RequestOutput) -> dict:
    """The final chunk `stream_options.include_usage` asks for: no choices, the usage."""
    return {**r.head(obj), "choices": [], "usage": usage(last)}
