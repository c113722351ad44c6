"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions (SSE when `stream`),
/v1/models; vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, behind the admin token
(`Authorization: Bearer <token>`) when the server has one. Each route converts its body to an
`engine.Request`, runs it through the gateway and converts the outputs back.
"""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from peftserve import __version__
from peftserve.engine.request import Request as EngineRequest
from peftserve.engine.request import RequestOutput
from peftserve.gateway import Gateway
from peftserve.grpc.adapter_files import AdapterFiles
from peftserve.grpc.errors import PermissionDenied, Unauthenticated, code_of, outcome
from peftserve.openai_http import convert
from peftserve.openai_http.errors import error_body, error_response, status_of
from peftserve.openai_http.schemas import (
    COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    StreamOptions,
    UnloadAdapterRequest,
)

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def build_app(gateway: Gateway, files: AdapterFiles, admin_token: str | None) -> FastAPI:
    app = FastAPI(title="peftserve", version=__version__, docs_url=None, redoc_url=None)
    token = admin_token.encode() if admin_token else None
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request body')}"
        return JSONResponse(error_body(400, message, "invalid_argument", where or None), 400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        cards = [_card(gateway.model_name, "base", None, started)]
        cards += [_card(i.name, i.kind.value, gateway.model_name, int(i.registered_at))
                  for i in await gateway.adapters()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> JSONResponse:
        rid = _request_id(request)
        try:
            kind = await gateway.model_kind(model)
        except Exception as e:
            return error_response(e, rid)
        parent = None if kind == "base" else gateway.model_name
        return JSONResponse(_card(model, kind, parent, started))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest,
                          request: Request) -> JSONResponse | StreamingResponse:
        rid = _request_id(request)
        try:
            req = convert.completion_request(body, rid, gateway.adapter_of(body.model),
                                             COMPLETION_MAX_TOKENS, time.monotonic())
        except Exception as e:
            gateway.count_refused(gateway.adapter_of(body.model), outcome(code_of(e)))
            return error_response(e, rid)
        r = convert.Response("cmpl", rid, body.model)
        logprobs = req.params.logprobs
        tt = gateway.token_text
        return await _respond(
            gateway, req, body.stream, body.stream_options,
            whole=lambda outs: convert.completion(r, outs, logprobs, tt),
            chunk=lambda out, first: convert.completion_chunk(r, out, logprobs, tt),
            usage=lambda last: convert.usage_chunk(r, "text_completion", last))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest,
                               request: Request) -> JSONResponse | StreamingResponse:
        rid = _request_id(request)
        try:
            req = convert.chat_request(body, rid, gateway.adapter_of(body.model),
                                       gateway.config.default_max_new_tokens, time.monotonic())
        except Exception as e:
            gateway.count_refused(gateway.adapter_of(body.model), outcome(code_of(e)))
            return error_response(e, rid)
        r = convert.Response("chatcmpl", rid, body.model)
        tt = gateway.token_text
        return await _respond(
            gateway, req, body.stream, body.stream_options,
            whole=lambda outs: convert.chat_completion(r, outs, body.logprobs, tt),
            chunk=lambda out, first: convert.chat_chunk(r, out, first, body.logprobs, tt),
            usage=lambda last: convert.usage_chunk(r, "chat.completion.chunk", last))

    def check_admin(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthenticated("this endpoint needs 'Authorization: Bearer <admin token>'")
        if not hmac.compare_digest(given.strip().encode(), token):
            raise PermissionDenied("the admin token is wrong")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest, request: Request) -> JSONResponse:
        rid = _request_id(request)
        try:
            check_admin(request)
            async with gateway.admin_lock:
                info = await gateway.engine.register_adapter(body.lora_name,
                                                             files.resolve(body.lora_path))
                files.release(body.lora_name)  # replaced nothing staged: a new registration
        except Exception as e:
            return error_response(e, rid)
        return JSONResponse(_card(info.name, info.kind.value, gateway.model_name,
                                  int(info.registered_at)))

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest, request: Request) -> JSONResponse:
        rid = _request_id(request)
        try:
            check_admin(request)
            async with gateway.admin_lock:
                await gateway.engine.unregister_adapter(body.lora_name)
                files.release(body.lora_name)
        except Exception as e:
            return error_response(e, rid)
        return JSONResponse({"id": body.lora_name, "object": "model", "deleted": True})

    return app


class EventStream(StreamingResponse):
    """A StreamingResponse that closes its event generator however the response ends. When the
    client hangs up, Starlette stops iterating and leaves the generator to be finalized whenever
    the garbage collector gets to it; closing it here aborts the engine request at once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def _card(name: str, kind: str, parent: str | None, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "peftserve",
            "root": name if parent is None else parent, "parent": parent, "kind": kind}


async def _respond(gateway: Gateway, req: EngineRequest, stream: bool,
                   stream_options: StreamOptions | None,
                   whole: Callable[[list[RequestOutput]], dict],
                   chunk: Callable[[RequestOutput, bool], dict],
                   usage: Callable[[RequestOutput], dict]) -> JSONResponse | StreamingResponse:
    """Runs the request; errors before its first output get their HTTP status, later ones
    (streaming) an error event before the stream ends."""
    rid = req.request_id
    outs = gateway.generate(req, outcome_of=lambda e: outcome(code_of(e)))
    headers = {"x-request-id": rid}
    try:
        first = await anext(outs)
        if not stream:
            collected = [first] + [o async for o in outs]
            return JSONResponse(whole(collected), headers=headers)
    except Exception as e:
        await outs.aclose()
        return error_response(e, rid)
    include_usage = stream_options is not None and stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        out, is_first = first, True
        try:
            while True:
                yield _sse(chunk(out, is_first))
                if out.finished:
                    break
                out, is_first = await anext(outs), False
            if include_usage:
                yield _sse(usage(out))
        except Exception as e:
            yield _sse(status_of(e, rid)[1])
        finally:
            await outs.aclose()
        yield _sse("[DONE]")

    return EventStream(events(), media_type="text/event-stream", headers=headers)
