"""Checks on what an engine's requests ended with, shared by the failure-isolation tests, and
the server's engine loop (AsyncEngine) driven from a test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.sequence import FinishReason

T = TypeVar("T")


def assert_failed_alone(outs: dict[str, list[RequestOutput]], reqs: list[Request], bad: str,
                        new_tokens: int) -> None:
    """Requests for adapter `bad` ended with an error naming it; every other one ran to its
    length limit, `new_tokens` tokens, with no error."""
    for req in reqs:
        last = outs[req.request_id][-1]
        if req.adapter == bad:
            assert last.finish_reason is FinishReason.ABORT
            assert "could not be prepared" in last.error and bad in last.error
        else:
            assert last.error is None, last.error
            assert last.finish_reason is FinishReason.LENGTH
            assert sum(len(o.token_ids) for o in outs[req.request_id]) == new_tokens


async def leave_after(aeng: AsyncEngine, req: Request, n: int) -> int:
    """Streams `req` from the server's engine loop and leaves after `n` outputs (leaving the
    iterator aborts the request); -> the outputs read."""
    read = 0
    async for _ in aeng.generate(req):
        read += 1
        if read == n:
            break
    return read


def served(engine: Engine, main: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Runs `main` against `engine` behind a started AsyncEngine, then stops it."""
    aeng = AsyncEngine(engine)
    aeng.start()
    try:
        return asyncio.run(main(aeng))
    finally:
        aeng.shutdown()


async def settled(aeng: AsyncEngine) -> tuple[int, bool]:
    """The engine's KV blocks in use and whether it has unfinished requests, read on its
    thread."""
    engine = aeng.engine
    return await aeng.call(lambda: (engine.block_manager.num_used, engine.has_unfinished()))
