"""Runs the engine's step loop in its own thread and streams outputs to asyncio.

The event loop never runs a forward pass: requests and aborts go through an inbox that the engine
thread drains between steps, and outputs come back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from peftserve.adapters.handle import AdapterInfo
from peftserve.adapters.registry import validate_name
from peftserve.engine.engine import Engine
from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.stats import EngineInfo, EngineStats
from peftserve.errors import EngineStopped

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or one exception

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


LOADING_POLL_S = 0.005  # the longest the loop waits while only adapter loads are in flight


class AsyncEngine:
    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine  # None until start(build) has built it on the engine thread
        self._lock = threading.Lock()
        self._inbox: list[Callable[[], None]] = []
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._admitting = True
        self._running = False
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, build: Callable[[], Engine] | None = None) -> None:
        """Starts the step loop. With `build`, the engine is built on the engine thread itself
        (returns once it is ready; its errors are raised here): torch's OpenMP team belongs to
        the thread that first runs a parallel op, and a model loaded on another thread leaves a
        second team competing with the step loop (measured: steps 20-35% slower on 2 cores)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            if build is not None:
                try:
                    self.engine = build()
                except BaseException as e:  # handed to the starting thread
                    failure.append(e)
                    ready.set()
                    return
            self.engine.bind_thread()  # before any adapter load can change torch's count
            self.engine.registry.on_loaded = self._wake.set  # a load's end: step at once
            ready.set()
            self._loop()

        self._running = True
        self._thread = threading.Thread(target=main, name="peftserve-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._running = False
            raise failure[0]

    def stop_admitting(self) -> None:
        self._admitting = False

    def shutdown(self) -> None:
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def call(self, fn: Callable[[], object]) -> asyncio.Future:
        """Runs `fn` on the engine thread between steps; awaitable from asyncio."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as e:  # handed to the caller, who decides
                loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._post(run)
        return fut

    # --- adapters ---------------------------------------------------------------------------

    async def register_adapter(self, name: str, path: Path, replace: bool = False) -> AdapterInfo:
        """Reads and checks the files on a loader thread (the step loop keeps running), then
        registers on the engine thread between two steps."""
        validate_name(name)
        adapters = self.engine.adapters
        loaded = await asyncio.wrap_future(self.engine.registry.submit_load(Path(path)))
        return await self.call(lambda: adapters.add_loaded(name, loaded, Path(path), replace))

    async def unregister_adapter(self, name: str) -> None:
        await self.call(lambda: self.engine.adapters.unregister(name))

    async def list_adapters(self) -> list[AdapterInfo]:
        return await self.call(self.engine.adapters.infos)

    async def get_adapter(self, name: str) -> AdapterInfo:
        return await self.call(lambda: self.engine.adapters.info(name))

    async def stats(self) -> EngineStats:
        return await self.call(self.engine.stats)

    async def info(self) -> EngineInfo:
        return await self.call(self.engine.info)

    # --- requests ---------------------------------------------------------------------------

    async def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs. Errors from validation are raised here; leaving the
        iterator early (client cancelled, deadline) aborts the request and frees its blocks."""
        if not self._admitting:
            raise EngineStopped("the server is shutting down")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._post(lambda: self._add(req, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._post(lambda: self._abort(req.request_id))

    def _add(self, req: Request, stream: _Stream) -> None:
        try:
            self.engine.add_request(req)
        except Exception as e:
            stream.put(e)
            return
        self._streams[req.request_id] = stream

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    # --- the engine thread ------------------------------------------------------------------

    def _post(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._inbox.append(fn)
        self._wake.set()

    def _drain_inbox(self) -> None:
        with self._lock:
            todo, self._inbox = self._inbox, []
        for fn in todo:
            fn()

    def _loop(self) -> None:
        while self._running:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step(emit=self._deliver)
            except Exception as e:
                log.exception("engine step failed; failing the running requests")
                self._fail_all(e)
                continue
            if not outputs and not self.engine.last_batch_size:
                # only adapters loading: do not spin (a load's end wakes the loop earlier)
                self._wake.wait(timeout=LOADING_POLL_S)
                self._wake.clear()
            self._deliver(outputs)
        self._fail_all(EngineStopped("the engine stopped"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One wake-up of each event loop per step, not one per output: every wake-up takes
        the GIL from the engine thread between two of its torch ops."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            batches.setdefault(stream.loop, []).append((stream.queue, out))
            if out.finished:
                del self._streams[out.request_id]
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(error)
        self._streams.clear()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _set_result(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
