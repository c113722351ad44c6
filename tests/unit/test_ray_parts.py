"""The Ray application's parts that need no cluster: its [ray] configuration, the shared
adapter registry's bookkeeping, the replica-labelled /metrics, and that the single-process
server never imports Ray."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftserve import serve_config
from peftserve.adapters.errors import AdapterExists, AdapterNotFound
from peftserve.adapters.handle import AdapterInfo, AdapterKind
from peftserve.ray import config as ray_config
from peftserve.ray.directory import AdapterDirectory, AdapterRecord, ReplicaReport
from peftserve.ray.metrics import ReplicaMetrics


def test_one_toml_file_configures_the_server_and_the_replicas(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text('port = 6000\n[engine]\nmax_loras = 4\n'
                    '[ray]\nreplicas = 3\ngpus_per_replica = 1\nadapters_per_replica = 32\n')
    config = serve_config.build({}, toml)
    assert config.port == 6000 and config.engine.max_loras == 4
    rc = ray_config.read(toml)
    assert (rc.replicas, rc.gpus_per_replica, rc.adapters_per_replica) == (3, 1, 32)
    assert not rc.autoscaling
    assert ray_config.read(None) == ray_config.RayConfig()


@pytest.mark.parametrize("table, message", [
    ("replicas = 0", "ray.replicas must be >= 1"),
    ("min_replicas = 2", "give both ray.min_replicas and ray.max_replicas"),
    ("min_replicas = 3\nmax_replicas = 2", "1 <= ray.min_replicas <= ray.max_replicas"),
    ("grpc_port = 0", "ray.grpc_port must be in"),
    ("cpus_per_replica = -1", "ray.cpus_per_replica must be >= 0"),
    ("affinity_wait_s = 0", "ray.affinity_wait_s must be > 0"),
    ("replica = 2", "unknown [ray] keys: replica"),
])
def test_bad_ray_tables_are_refused_with_the_reason(tmp_path: Path, table: str,
                                                     message: str) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text(f"[ray]\n{table}\n")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ray_config.read(toml)


def test_autoscaling_bounds() -> None:
    rc = ray_config.from_mapping({"min_replicas": 1, "max_replicas": 4})
    assert rc.autoscaling


def _info(name: str, residency: str = "disk", served: int = 0,
          source: str = "/root/a") -> AdapterInfo:
    return AdapterInfo(name, AdapterKind.LORA, source, 10, 40, {"q": 4}, residency, 0.01,
                       served, 1.0)


def test_directory_versions_generations_and_merged_infos() -> None:
    async def run() -> None:
        d = AdapterDirectory()
        v1 = await d.new_version()
        g1 = await d.put(AdapterRecord("a", "/root/a", v1, _info("a")), replace=False)
        with pytest.raises(AdapterExists):
            await d.put(AdapterRecord("a", "/root/a", v1, _info("a")), replace=False)
        v2 = await d.new_version()
        g2 = await d.put(AdapterRecord("a", "/root/a", v2, _info("a")), replace=True)
        assert v2 > v1 and g2 > g1
        gen, versions = await d.sync(ReplicaReport(
            "r1", (_info("a", "device", 3),), "", time.time()))
        assert (gen, versions) == (g2, {"a": v2})
        await d.sync(ReplicaReport("r2", (_info("a", "host", 2),), "", time.time()))
        (info,) = await d.infos("a")
        assert (info.residency, info.requests_served) == ("device", 5)
        # Unregister: waits for both replicas to acknowledge; a silent one is named.
        g3 = await d.remove("a")
        await d.ack("r1", g3)
        assert await d.wait_applied(g3, timeout_s=0.05) == ["r2"]
        await d.ack("r2", g3)
        assert await d.wait_applied(g3, timeout_s=0.05) == []
        with pytest.raises(AdapterNotFound):
            await d.get("a")
        assert await d.infos() == []

    asyncio.run(run())


def test_metrics_carry_a_replica_label_and_the_affinity() -> None:
    text = ("# HELP peftserve_routed_requests_total x\n"
            "# TYPE peftserve_routed_requests_total counter\n"
            'peftserve_routed_requests_total{adapter_resident="%s"} %d\n'
            "# HELP peftserve_kv_blocks_used y\n# TYPE peftserve_kv_blocks_used gauge\n"
            "peftserve_kv_blocks_used %d\n")
    reports = [ReplicaReport("r1", (), text % ("true", 9, 5), time.time()),
               ReplicaReport("r2", (), text % ("false", 3, 0), time.time())]
    families = {f.name: f for f in ReplicaMetrics(lambda: reports).collect()}
    kv = {s.labels["replica"]: s.value for s in families["peftserve_kv_blocks_used"].samples}
    assert kv == {"r1": 5, "r2": 0}
    routed = families["peftserve_routed_requests"].samples
    assert {(s.labels["replica"], s.labels["adapter_resident"]) for s in routed} == {
        ("r1", "true"), ("r2", "false")}
    assert families["peftserve_routing_affinity_ratio"].samples[0].value == 9 / 12
    assert families["peftserve_replicas"].samples[0].value == 2


def test_the_single_process_server_does_not_import_ray() -> None:
    code = ("import sys, peftserve.cli, peftserve.grpc.server, peftserve.ray.config; "
            "peftserve.cli.build_parser(); "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_remote_errors_come_back_as_the_typed_error_raised() -> None:
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from peftserve.errors import EngineStopped, Overloaded
    from peftserve.ray.remote import cause

    raised = AdapterNotFound("adapter 'x' is not registered")
    error = cause(RayTaskError("get", "Traceback ...", raised))
    assert error is raised and "Traceback" not in str(error)
    assert isinstance(cause(BackPressureError(num_queued_requests=9, max_queued_requests=8)),
                      Overloaded)
    assert isinstance(cause(DeploymentUnavailableError("PeftServeEngine")), EngineStopped)
