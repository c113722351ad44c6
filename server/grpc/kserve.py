"""The KServe v2 / Open Inference Protocol service (`inference.GRPCInferenceService`) on the
peftserve gRPC port, so KServe and Triton clients (tritonclient.grpc) work unchanged.

A model is the base model (by its served name) or a registered adapter. ModelInfer takes a BYTES
tensor `text_input` and answers `text_output` of the same shape, each element one completion of
its prompt; sampling comes in the request's parameters under the names Triton's LLM backends use
(`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `repetition_penalty`, `stop`,
`ignore_eos`). Errors are typed and become status codes in `interceptors` / `errors`.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from peftserve import __version__
from peftserve.adapters.errors import AdapterNotFound
from peftserve.engine.request import Request, RequestOutput
from peftserve.gateway import Gateway
from peftserve.grpc import kserve_convert as convert
from peftserve.grpc.errors import code_of, outcome
from peftserve.grpc.interceptors import current_request_id
from peftserve.kserve_v2 import grpc_predict_v2_pb2 as pb
from peftserve.kserve_v2 import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="peftserve", version=__version__)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            await self.gateway.model_kind(request.name)
        except AdapterNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        kind = await self.gateway.model_kind(request.name)
        return convert.model_metadata(request.name, kind)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        adapter = self.gateway.adapter_of(request.model_name)
        rid = current_request_id()
        try:
            prompts, shape = convert.text_input(request)
            params = convert.sampling(request.parameters,
                                      self.gateway.config.default_max_new_tokens)
        except Exception as e:
            self.gateway.count_refused(adapter, outcome(code_of(e)))
            raise
        reqs = [convert.engine_request(f"{rid}-{i}" if len(prompts) > 1 else rid, p, params,
                                       adapter) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*(self._run(r) for r in reqs))
        return convert.infer_response(request, shape, results)

    async def _run(self, req: Request) -> list[RequestOutput]:
        return [out async for out in self.gateway.generate(
            req, outcome_of=lambda e: outcome(code_of(e)))]
