"""`peftserve serve --ray`: the PeftServe API on Ray Serve.

One ingress deployment (the gRPC service, no model) in front of an engine deployment (one
engine per replica), one shared adapter registry actor, Ray Serve's gRPC proxy as the endpoint
and this process's /metrics for all replicas. Prints the same ready line as `peftserve serve`;
SIGTERM deletes the application (in-flight requests finish) and leaves Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading

import ray
from prometheus_client import CollectorRegistry, start_http_server
from ray import serve
from ray.serve.config import gRPCOptions

from peftserve.ray.config import RayConfig
from peftserve.ray.directory import AdapterDirectory
from peftserve.ray.ingress import Ingress
from peftserve.ray.metrics import ReplicaMetrics
from peftserve.ray.replica import EngineReplica, ResidentAdapter
from peftserve.serve_config import ServeConfig

log = logging.getLogger(__name__)

SERVICER_FUNCTIONS = [
    "peftserve.v1.service_pb2_grpc.add_PeftServeServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
ENGINE_DEPLOYMENT = "PeftServeEngine"
INGRESS_DEPLOYMENT = "PeftServeIngress"
SCRAPE_TIMEOUT_S = 5.0


def build(config: ServeConfig, ray_config: RayConfig, directory: object) -> serve.Application:
    """The application: the ingress bound to the engine deployment and the registry."""
    engine = config.engine
    if engine.num_threads is None:  # torch's default would take every core of the node
        engine = dataclasses.replace(engine,
                                     num_threads=max(1, int(ray_config.cpus_per_replica)))
    config = dataclasses.replace(config, engine=engine)
    # The multiplexed LRU size is fixed when the method is wrapped: wrap it per application.
    # (Ray Serve finds `self` by looking the wrapped function's name up on it.)
    async def get_adapter(self: EngineReplica, name: str) -> ResidentAdapter:
        return await self.load_adapter(name)

    multiplexed = serve.multiplexed(max_num_models_per_replica=ray_config.adapters_per_replica)
    replica_cls = type(ENGINE_DEPLOYMENT, (EngineReplica,),
                       {"get_adapter": multiplexed(get_adapter)})
    if ray_config.autoscaling:
        scaling: dict[str, object] = {"autoscaling_config": {
            "min_replicas": ray_config.min_replicas, "max_replicas": ray_config.max_replicas,
            "target_ongoing_requests": ray_config.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": ray_config.replicas}
    engines = serve.deployment(
        replica_cls, name=ENGINE_DEPLOYMENT,
        ray_actor_options={"num_cpus": ray_config.cpus_per_replica,
                           "num_gpus": ray_config.gpus_per_replica},
        max_ongoing_requests=ray_config.max_ongoing_requests,
        graceful_shutdown_timeout_s=config.grace_period_s, **scaling,
    ).bind(config, ray_config, directory)
    ingress = serve.deployment(
        Ingress, name=INGRESS_DEPLOYMENT,
        # The ingress routes to the engines: its handle's router reads this when it starts.
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {
            "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": str(ray_config.affinity_wait_s)}}},
        max_ongoing_requests=config.max_concurrent_streams + 1,
        graceful_shutdown_timeout_s=config.grace_period_s,
    )
    return ingress.bind(config, ray_config, engines, directory)


def serve_ray(config: ServeConfig, ray_config: RayConfig) -> int:
    """Starts (or joins) Ray, runs the application until SIGTERM/SIGINT, returns 0."""
    local = ray_config.address is None
    # "local": a fresh Ray instance of our own, never one `ray start` left on this machine.
    ray.init(address="local" if local else ray_config.address, namespace="peftserve",
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    http = None
    try:
        serve.start(
            http_options={"host": config.host, "port": ray_config.http_port},
            grpc_options=gRPCOptions(port=ray_config.grpc_port,
                                     grpc_servicer_functions=SERVICER_FUNCTIONS))
        directory = ray.remote(AdapterDirectory).options(
            name=f"{ray_config.app_name}-adapters", num_cpus=0).remote()
        serve.run(build(config, ray_config, directory), name=ray_config.app_name,
                  route_prefix=f"/{ray_config.app_name}")  # gRPC needs an endpoint
        metrics_address = "off"
        if config.metrics_port is not None:
            registry = CollectorRegistry()
            registry.register(ReplicaMetrics(
                lambda: ray.get(directory.reports.remote(), timeout=SCRAPE_TIMEOUT_S)))
            http, _ = start_http_server(config.metrics_port, config.metrics_host, registry)
            metrics_address = f"{config.metrics_host}:{http.server_port}"
        print(f"peftserve listening on {config.host}:{ray_config.grpc_port} "
              f"metrics {metrics_address}", flush=True)
        while not stop.wait(0.5):  # signal handlers run between the waits
            pass
        print("peftserve draining", flush=True)
        serve.delete(ray_config.app_name)  # replicas finish their in-flight requests
    finally:
        if http is not None:
            http.shutdown()
        if local:
            serve.shutdown()
        ray.shutdown()
    print("peftserve stopped", flush=True)
    return 0
