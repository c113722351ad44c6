"""The PeftServe gRPC service behind Ray Serve's gRPC proxy: protobuf in, a call to an engine
replica, protobuf out.

Ray Serve's proxy calls the method named like the RPC with the request message and a
`RayServegRPCContext`. Requests go to the engine deployment with the adapter as the
multiplexed model id, so they reach a replica that already holds it. Typed errors become
status codes here through `grpc.errors`, as on one server: the proxy has no interceptors.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.grpc_util import RayServegRPCContext

from peftserve.adapters.errors import AdapterExists
from peftserve.adapters.registry import validate_name
from peftserve.engine.request import RequestOutput
from peftserve.engine.stats import EngineInfo
from peftserve.errors import InvalidRequest, Overloaded
from peftserve.gateway import served_model_name
from peftserve.grpc import convert
from peftserve.grpc.adapter_files import AdapterFiles, discard
from peftserve.grpc.errors import PermissionDenied, Unauthenticated, to_status
from peftserve.grpc.interceptors import REQUEST_ID_KEY
from peftserve.ray.config import RayConfig
from peftserve.ray.directory import AdapterRecord
from peftserve.ray.remote import RAY_ERRORS, call, cause
from peftserve.serve_config import ServeConfig
from peftserve.v1 import adapters_pb2, generate_pb2, server_info_pb2, service_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["PeftServe"].full_name
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class CallFailed(Exception):
    """Ends a streaming call whose status code is already set on the context."""


class Ingress:
    def __init__(self, config: ServeConfig, ray_config: RayConfig, engines: Any,
                 directory: Any) -> None:
        self.config, self.ray_config = config, ray_config
        self.engines, self.directory = engines, directory  # DeploymentHandle, ActorHandle
        self.files = AdapterFiles(config.adapter_root, config.staging_dir,
                                  config.max_inline_adapter_bytes)
        self.active_streams = 0
        self._admin_lock = asyncio.Lock()  # one registration change at a time
        self._token = config.admin_token.encode() if config.admin_token else None

    # --- generation -------------------------------------------------------------------------

    async def Generate(self, request: generate_pb2.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> generate_pb2.GenerateResponse:
        rid = _request_id(grpc_context)
        try:
            async with aclosing(self._generate(request, rid)) as stream:
                outs = [out async for out in stream]
            return convert.generate_response(outs)
        except Exception as e:
            _fail(grpc_context, e, rid)
            return generate_pb2.GenerateResponse()

    async def GenerateStream(self, request: generate_pb2.GenerateRequest,
                             grpc_context: RayServegRPCContext
                             ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        rid = _request_id(grpc_context)
        try:
            # Closed at once when the call is cancelled, so that the replica hears of it now,
            # not when the garbage collector finds the generator.
            async with aclosing(self._generate(request, rid)) as stream:
                async for out in stream:
                    yield convert.stream_chunk(out)
        except Exception as e:
            _fail(grpc_context, e, rid)
            raise CallFailed(grpc_context.details()) from None

    async def _generate(self, pb: generate_pb2.GenerateRequest, rid: str
                        ) -> AsyncIterator[RequestOutput]:
        self.active_streams += 1
        try:
            if self.active_streams > self.config.max_concurrent_streams:
                raise Overloaded(f"too many requests in flight "
                                 f"({self.config.max_concurrent_streams})")
            req = convert.request_from_pb(pb, pb.request_id or rid,
                                          self.config.default_max_new_tokens)
            version = None
            if req.adapter:
                version = (await call(self.directory.get.remote(req.adapter))).version
            handle = self.engines.options(multiplexed_model_id=req.adapter or "", stream=True)
            stream = handle.generate.remote(req, version)
            finished = False
            try:
                async for out in stream:
                    finished = out.finished
                    yield out
            except RAY_ERRORS as e:
                finished = True
                raise cause(e) from None
            finally:
                if not finished:  # the client went away or its deadline passed
                    stream.cancel()
        finally:
            self.active_streams -= 1

    # --- adapters ---------------------------------------------------------------------------

    async def RegisterAdapter(self, request: adapters_pb2.RegisterAdapterRequest,
                              grpc_context: RayServegRPCContext
                              ) -> adapters_pb2.RegisterAdapterResponse:
        rid = _request_id(grpc_context)
        try:
            self._check_admin(grpc_context)
            return await self._register(request)
        except Exception as e:
            _fail(grpc_context, e, rid)
            return adapters_pb2.RegisterAdapterResponse()

    async def _register(self, request: adapters_pb2.RegisterAdapterRequest
                        ) -> adapters_pb2.RegisterAdapterResponse:
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidRequest("give the adapter's path or its files inline")
        name = validate_name(request.name)
        async with self._admin_lock:
            if not request.replace and await call(self.directory.has.remote(name)):
                raise AdapterExists(f"adapter {name!r} is already registered (use replace)")
            if source == "path":
                directory, staged = self.files.resolve(request.path), False
            else:
                directory = await asyncio.to_thread(self.files.stage, dict(request.inline.files))
                staged = True
            try:
                version = await call(self.directory.new_version.remote())
                record = AdapterRecord(name, str(directory), version)
                # One replica reads and checks the files (and keeps the adapter); the record
                # is stored only if that succeeds, so nothing half-registered stays behind.
                engines = self.engines.options(multiplexed_model_id=name)
                info = await call(engines.register.remote(record))
                await call(self.directory.put.remote(replace(record, info=info),
                                                     request.replace))
            except BaseException:
                if staged:
                    discard(directory)
                raise
            if staged:
                self.files.keep(name, directory)
            else:
                self.files.release(name)
        log.info("registered adapter %s v%d from %s", name, version, directory)
        return adapters_pb2.RegisterAdapterResponse(adapter=convert.adapter_to_pb(info))

    async def UnregisterAdapter(self, request: adapters_pb2.UnregisterAdapterRequest,
                                grpc_context: RayServegRPCContext
                                ) -> adapters_pb2.UnregisterAdapterResponse:
        rid = _request_id(grpc_context)
        try:
            self._check_admin(grpc_context)
            async with self._admin_lock:
                generation = await call(self.directory.remove.remote(request.name))
                self.files.release(request.name)
            behind = await call(self.directory.wait_applied.remote(
                generation, self.ray_config.registry_wait_s))
            if behind:
                log.warning("unregistered %s; replicas %s had not dropped it after %.0f s",
                            request.name, ", ".join(behind), self.ray_config.registry_wait_s)
            log.info("unregistered adapter %s", request.name)
        except Exception as e:
            _fail(grpc_context, e, rid)
        return adapters_pb2.UnregisterAdapterResponse()

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest,
                           grpc_context: RayServegRPCContext
                           ) -> adapters_pb2.ListAdaptersResponse:
        rid = _request_id(grpc_context)
        try:
            infos = await call(self.directory.infos.remote())
            return adapters_pb2.ListAdaptersResponse(
                adapters=[convert.adapter_to_pb(i) for i in sorted(infos, key=lambda i: i.name)])
        except Exception as e:
            _fail(grpc_context, e, rid)
            return adapters_pb2.ListAdaptersResponse()

    async def GetAdapter(self, request: adapters_pb2.GetAdapterRequest,
                         grpc_context: RayServegRPCContext) -> adapters_pb2.Adapter:
        rid = _request_id(grpc_context)
        try:
            (info,) = await call(self.directory.infos.remote(request.name))
            return convert.adapter_to_pb(info)
        except Exception as e:
            _fail(grpc_context, e, rid)
            return adapters_pb2.Adapter()

    # --- the server -------------------------------------------------------------------------

    async def ServerInfo(self, request: server_info_pb2.ServerInfoRequest,
                         grpc_context: RayServegRPCContext
                         ) -> server_info_pb2.ServerInfoResponse:
        """The engine's limits from one replica; the load is that replica's."""
        rid = _request_id(grpc_context)
        try:
            info: EngineInfo = await call(self.engines.info.remote())
        except Exception as e:
            _fail(grpc_context, e, rid)
            return server_info_pb2.ServerInfoResponse()
        return convert.server_info_to_pb(info, served_model_name(info.model), self.config,
                                         self.active_streams)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1 Check: the application answers once Ray Serve routes to it."""
        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def _check_admin(self, grpc_context: RayServegRPCContext) -> None:
        if self._token is None:
            return
        metadata = dict(grpc_context.invocation_metadata())
        scheme, _, given = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthenticated("this RPC needs 'authorization: Bearer <admin token>' metadata")
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise PermissionDenied("the admin token is wrong")

    def __del__(self) -> None:
        self.files.close()


def _request_id(grpc_context: RayServegRPCContext) -> str:
    rid = str(dict(grpc_context.invocation_metadata()).get(REQUEST_ID_KEY, ""))
    if not _REQUEST_ID_RE.match(rid):
        rid = uuid.uuid4().hex
    grpc_context.set_trailing_metadata([(REQUEST_ID_KEY, rid)])
    return rid


def _fail(grpc_context: RayServegRPCContext, error: BaseException, rid: str) -> None:
    """Sets the status code and message an error maps to (grpc.errors), as on one server."""
    code, message = to_status(cause(error), rid)
    grpc_context.set_code(code)
    grpc_context.set_details(message)
