"""What every protocol front shares: peftserve.v1 and KServe v2 over gRPC, the OpenAI-compatible
HTTP API. Each front converts its own request type to an `engine.Request` and hands it here; the
cap on requests in flight and the per-request metrics are the same whichever protocol a request
came by (the engine's input processing checks the prompt's length, once, as it tokenizes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from peftserve.adapters.handle import BASE_KIND, AdapterInfo
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.request import Request, RequestOutput
from peftserve.errors import Overloaded, PeftServeError
from peftserve.metrics import Metrics
from peftserve.models.loader import DEFAULT_MODEL_NAME
from peftserve.serve_config import ServeConfig


class RequestFailed(PeftServeError):
    """The engine ended the request because of a server-side state it could name, such as an
    adapter whose files changed on disk since registration: retrying will not help until an
    operator fixes it."""


def served_model_name(model: str) -> str:
    """The base model's public name: SmolLM2's for the default, else the directory's name."""
    if model == "default":
        return DEFAULT_MODEL_NAME
    return Path(model).expanduser().resolve().name or model


class Gateway:
    def __init__(self, engine: AsyncEngine, config: ServeConfig, metrics: Metrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.model_name = served_model_name(config.engine.model)
        self.active_streams = 0
        self.admin_lock = asyncio.Lock()  # one registration change at a time, whatever the front

    def count_refused(self, adapter: str | None, outcome: str) -> None:
        """A request refused before it became an engine request (a front's own validation)."""
        self.metrics.track(adapter).finish(outcome)

    def adapter_of(self, model: str) -> str | None:
        """A front's model name -> the engine's adapter: None for the base model."""
        return None if model in ("", self.model_name) else model

    async def model_kind(self, model: str) -> str:
        """"base" or the adapter's kind; AdapterNotFound for a name that is neither."""
        adapter = self.adapter_of(model)
        if adapter is None:
            return BASE_KIND
        return (await self.engine.get_adapter(adapter)).kind.value

    async def adapters(self) -> list[AdapterInfo]:
        return sorted(await self.engine.list_adapters(), key=lambda i: i.name)

    async def generate(self, req: Request, outcome_if_cancelled: Callable[[], str] | None = None,
                       outcome_of: Callable[[BaseException], str] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs, counting it in the metrics with the outcome it had:
        the finish reason, `outcome_of(error)` for an error (the front's status name), or
        `outcome_if_cancelled()` (default "cancelled") when the caller stopped reading."""
        arrived = req.arrival_time if req.arrival_time is not None else time.monotonic()
        tracker = self.metrics.track(req.adapter)
        result = "cancelled"
        finished = False
        self.active_streams += 1
        self.metrics.active_streams.inc()
        try:
            if self.active_streams > self.config.max_concurrent_streams:
                raise Overloaded(f"too many requests in flight "
                                 f"({self.config.max_concurrent_streams})")
            if req.arrival_time is None:
                req = _with_arrival(req, arrived)
            async for out in self.engine.generate(req):
                tracker.on_output(out)
                if out.error is not None:
                    raise RequestFailed(f"the request failed: {out.error}")
                if out.finished:  # before the yield: the caller may close us at it
                    finished = True
                    result = out.finish_reason.value if out.finish_reason else "stop"
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                result = outcome_if_cancelled() if outcome_if_cancelled else "cancelled"
            raise
        except Exception as e:
            result = outcome_of(e) if outcome_of else type(e).__name__.lower()
            raise
        finally:
            self.active_streams -= 1
            self.metrics.active_streams.dec()
            tracker.finish(result)

    def token_text(self, token_id: int) -> str:
        """One token's text, as the OpenAI API reports it beside its log-probability."""
        return self.engine.engine.tokenizer.decode([token_id])


def _with_arrival(req: Request, arrived: float) -> Request:
    from dataclasses import replace

    return replace(req, arrival_time=arrived)

