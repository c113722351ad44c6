"""The PeftServe service: protobuf in, an engine call, protobuf out.

Errors are raised as typed exceptions and become status codes in `interceptors` / `errors`.
Every await here is on the event loop; the engine thread does the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.request import RequestOutput
from peftserve.errors import InvalidRequest
from peftserve.gateway import Gateway
from peftserve.grpc import convert
from peftserve.grpc.adapter_files import AdapterFiles, discard
from peftserve.grpc.errors import code_of, outcome
from peftserve.grpc.interceptors import current_request_id
from peftserve.metrics import Metrics
from peftserve.serve_config import ServeConfig
from peftserve.v1 import adapters_pb2, generate_pb2, server_info_pb2, service_pb2_grpc

log = logging.getLogger(__name__)


class PeftServeServicer(service_pb2_grpc.PeftServeServicer):
    def __init__(self, engine: AsyncEngine, config: ServeConfig, metrics: Metrics,
                 files: AdapterFiles, gateway: Gateway | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.files = files
        self.gateway = gateway or Gateway(engine, config, metrics)
        self._admin_lock = self.gateway.admin_lock

    @property
    def active_streams(self) -> int:
        return self.gateway.active_streams

    # --- generation -------------------------------------------------------------------------

    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.GenerateResponse:
        outs = [out async for out in self._generate(request, context)]
        return convert.generate_response(outs)

    async def GenerateStream(self, request: generate_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        async for out in self._generate(request, context):
            yield convert.stream_chunk(out)

    async def _generate(self, pb: generate_pb2.GenerateRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[RequestOutput]:
        arrived = time.monotonic()  # queue time and TTFT count from here

        def cancelled() -> str:
            remaining = context.time_remaining()
            return "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"

        try:
            req = convert.request_from_pb(pb, pb.request_id or current_request_id(),
                                          self.config.default_max_new_tokens, arrived)
        except InvalidRequest as e:
            self.gateway.count_refused(pb.adapter or None, outcome(code_of(e)))
            raise
        async for out in self.gateway.generate(req, cancelled, lambda e: outcome(code_of(e))):
            yield out

    # --- adapters ---------------------------------------------------------------------------

    async def RegisterAdapter(self, request: adapters_pb2.RegisterAdapterRequest,
                              context: grpc.aio.ServicerContext
                              ) -> adapters_pb2.RegisterAdapterResponse:
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidRequest("give the adapter's path or its files inline")
        async with self._admin_lock:
            if source == "path":
                directory, staged = self.files.resolve(request.path), False
            else:
                directory = await asyncio.to_thread(self.files.stage, dict(request.inline.files))
                staged = True
            try:
                info = await self.engine.register_adapter(request.name, directory,
                                                          replace=request.replace)
            except BaseException:
                if staged:
                    discard(directory)
                raise
            if staged:
                self.files.keep(request.name, directory)
            else:
                self.files.release(request.name)  # a path registration replaced a staged copy
        log.info("registered adapter %s (%s) from %s", info.name, info.kind.value,
                 "inline files" if staged else directory)
        return adapters_pb2.RegisterAdapterResponse(adapter=convert.adapter_to_pb(info))

    async def UnregisterAdapter(self, request: adapters_pb2.UnregisterAdapterRequest,
                                context: grpc.aio.ServicerContext
                                ) -> adapters_pb2.UnregisterAdapterResponse:
        async with self._admin_lock:
            await self.engine.unregister_adapter(request.name)
            self.files.release(request.name)
        log.info("unregistered adapter %s", request.name)
        return adapters_pb2.UnregisterAdapterResponse()

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> adapters_pb2.ListAdaptersResponse:
        infos = await self.engine.list_adapters()
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_to_pb(i) for i in sorted(infos, key=lambda i: i.name)])

    async def GetAdapter(self, request: adapters_pb2.GetAdapterRequest,
                         context: grpc.aio.ServicerContext) -> adapters_pb2.Adapter:
        return convert.adapter_to_pb(await self.engine.get_adapter(request.name))

    # --- the server -------------------------------------------------------------------------

    async def ServerInfo(self, request: server_info_pb2.ServerInfoRequest,
                         context: grpc.aio.ServicerContext) -> server_info_pb2.ServerInfoResponse:
        return convert.server_info_to_pb(await self.engine.info(), self.gateway.model_name,
                                         self.config, self.active_streams)
