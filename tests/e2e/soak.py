"""Fuzz and soak a real `peftserve serve`: seeded random and malformed requests, hostile admin
calls, hot swaps, and concurrent streams cancelled or cut by deadlines at random; then the
checks every run ends with (`check_end_state`).

The short run is tests/e2e/test_fuzz_soak.py; the long one is `make soak`:

    python -m tests.e2e.soak --requests 10000 --streams 256 --seed 0

Every answer must be OK or a status a client can act on: INTERNAL or UNKNOWN is a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from peftserve.v1 import adapters_pb2, generate_pb2, server_info_pb2, service_pb2_grpc

SERVICE = "/peftserve.v1.PeftServe/"
ADMIN_TOKEN = "soak-admin-token-0123456789"
BLOCK_SIZE = 16
FORBIDDEN = {"INTERNAL", "UNKNOWN", "UNIMPLEMENTED", "DATA_LOSS"}
# name -> adapter kind, all under the adapter root (see make_adapters)
ADAPTERS = ("lora", "houlsby", "prefix", "prompt", "template")
UNICODE = "héllo ñ 日本語 עברית 🙂 \u200b\u0301 \t\n\x00\x7f"


@dataclass
class Report:
    codes: Counter = field(default_factory=Counter)  # "kind:CODE" -> count
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    streams: int = 0
    seconds: float = 0.0
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    kv_blocks_used: int = 0
    kv_blocks_prefixes: int = 0

    def record(self, kind: str, code: grpc.StatusCode | str, details: str = "") -> None:
        name = code if isinstance(code, str) else code.name
        self.codes[f"{kind}:{name}"] += 1
        if name in FORBIDDEN or "Traceback" in details:
            self.failures.append(f"{kind}: {name}: {details[:300]}")

    def summary(self) -> dict:
        by_code = Counter()
        for key, n in self.codes.items():
            by_code[key.split(":")[1]] += n
        return {"requests": self.requests, "streams": self.streams,
                "seconds": round(self.seconds, 1), "codes": dict(sorted(by_code.items())),
                "by_kind": dict(sorted(self.codes.items())),
                "rss_start_mib": round(self.rss_start_mib), "rss_end_mib": round(self.rss_end_mib),
                "kv_blocks_used": self.kv_blocks_used,
                "kv_blocks_prefixes": self.kv_blocks_prefixes, "failures": self.failures[:20]}


def make_adapters(model_dir: Path, root: Path) -> Path:
    from tests import adapters as A

    A.make_lora(model_dir, root / "lora", r=4, seed=1)
    A.make_bottleneck(model_dir, root / "houlsby", "houlsby", seed=2)
    A.make_prefix_tuning(model_dir, root / "prefix", virtual=5, seed=3)
    A.make_prompt_tuning(model_dir, root / "prompt", virtual=3, seed=4)
    A.make_template(root / "template", system="Be brief.")
    return root


def server_args(root: Path, token_file: Path) -> list[str]:
    return ["--adapter-root", str(root), "--admin-token-file", str(token_file),
            "--block-size", str(BLOCK_SIZE), "--max-concurrent-streams", "512",
            "--max-prompt-tokens", "256", "--max-new-tokens-limit", "64",
            "--default-max-new-tokens", "16",
            "--max-cpu-adapters", "3", "--max-loras", "2"]


# --- the generator ------------------------------------------------------------------------------

class Fuzz:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self, longest: int = 40) -> str:
        r = self.rng
        n = r.choice([0, 1, 3, longest, r.randint(0, longest)])
        return "".join(r.choice(UNICODE) if r.random() < 0.2 else r.choice("abc xyz.,!?")
                       for _ in range(n))

    def name(self) -> str:
        r = self.rng
        return r.choice([*ADAPTERS, *ADAPTERS, "", "nope", "../etc", "other", "x" * r.choice(
            [129, 9000, 20000]), self.text(12)])

    def value(self, lo: float, hi: float) -> float:
        r = self.rng
        return r.choice([r.uniform(lo, hi), r.uniform(lo, hi), 0.0, -1.0, float("nan"),
                         float("inf"), 1e38, 1e-45])

    def sampling(self) -> generate_pb2.SamplingParameters:
        r, pb = self.rng, generate_pb2.SamplingParameters()
        pb.max_new_tokens = r.choice([1, 2, 4, 8, 0, 65, 2**32 - 1])
        if r.random() < 0.5:
            pb.temperature = self.value(0, 2)
        if r.random() < 0.3:
            pb.top_p = self.value(0, 1)
        if r.random() < 0.3:
            pb.top_k = r.choice([0, 1, 50, 2**32 - 1])
        if r.random() < 0.3:
            pb.repetition_penalty = self.value(0.5, 2)
        if r.random() < 0.3:
            pb.seed = r.randrange(2**64)
        if r.random() < 0.2:
            pb.stop.extend([self.text(5) for _ in range(r.randint(0, 3))])
        if r.random() < 0.2:
            pb.stop_token_ids.extend([r.randrange(2**32) for _ in range(r.randint(0, 3))])
        pb.ignore_eos, pb.logprobs = r.random() < 0.5, r.random() < 0.5
        return pb

    def generate(self) -> generate_pb2.GenerateRequest:
        r = self.rng
        pb = generate_pb2.GenerateRequest(adapter=self.name() if r.random() < 0.7 else "")
        which = r.choice(["prompt", "prompt", "messages", "token_ids", "none", "huge"])
        if which == "prompt":
            pb.prompt = self.text()
        elif which == "huge":
            pb.prompt = "word " * r.choice([300, 20_000, 400_000])
        elif which == "messages":
            roles = ["system", "user", "assistant", "user", "tool", "", "USER"]
            pb.messages.messages.extend(
                generate_pb2.ChatMessage(role=r.choice(roles), content=self.text(20))
                for _ in range(r.randint(0, 4)))
        elif which == "token_ids":
            pb.token_ids.ids.extend(r.choice([r.randrange(400), r.randrange(2**32)])
                                    for _ in range(r.randint(0, 300)))
        if r.random() < 0.8:
            pb.sampling.CopyFrom(self.sampling())
        if r.random() < 0.1:
            pb.request_id = r.choice(["dup", "x" * 5000, self.text(10)])
        return pb

    def malformed(self) -> bytes:
        r = self.rng
        valid = self.generate().SerializeToString()
        kind = r.choice(["random", "truncated", "flipped", "utf8"])
        if kind == "random":
            return r.randbytes(r.randint(1, 2000))
        if kind == "truncated" and len(valid) > 1:
            return valid[: r.randrange(1, len(valid))]
        if kind == "utf8":
            return generate_pb2.GenerateRequest(prompt="PLACEHOLDER").SerializeToString(
            ).replace(b"PLACEHOLDER", bytes([0xFF, 0xC0, 0x80, 0xED, 0xA0, 0x80, 0x41] * 2)[:11])
        data = bytearray(valid or b"\x00")
        for _ in range(r.randint(1, 8)):
            data[r.randrange(len(data))] ^= 1 << r.randrange(8)
        return bytes(data)

    def admin(self) -> tuple[str, object, bool]:
        """(method, request, with the token)."""
        r = self.rng
        token = r.random() < 0.7
        if r.random() < 0.4:
            return "GetAdapter", adapters_pb2.GetAdapterRequest(name=self.name()), False
        if r.random() < 0.3:
            return "UnregisterAdapter", adapters_pb2.UnregisterAdapterRequest(
                name=r.choice(["nope", "x" * 20000, "scratch"])), token
        path = r.choice([*ADAPTERS, "../../etc", "/etc", "missing", "x" * 300, "a/" * 3000,
                         "lora/../houlsby", "", "\x00"])
        name = r.choice(["scratch", "scratch", *ADAPTERS, "other", "x" * 200])
        pb = adapters_pb2.RegisterAdapterRequest(name=name, path=path, replace=r.random() < 0.5)
        if r.random() < 0.2:  # inline files: broken ones
            pb.inline.files.update({"adapter_config.json": self.text(30).encode(),
                                    r.choice(["a.bin", "w.safetensors", "../x.json"]): r.randbytes(
                                        r.randint(0, 300))})
        return "RegisterAdapter", pb, token


# --- the run -------------------------------------------------------------------------------------

async def one_request(channel: grpc.aio.Channel, fuzz: Fuzz, report: Report) -> None:
    r = fuzz.rng
    roll = r.random()
    timeout = r.choice([10.0, 10.0, 10.0, 0.05, 0.5])
    metadata: tuple = ()
    if roll < 0.25:
        kind, method, data = "malformed", r.choice(["Generate", "GetAdapter", "RegisterAdapter",
                                                    "ListAdapters", "ServerInfo"]), fuzz.malformed()
        call = channel.unary_unary(SERVICE + method)
    elif roll < 0.4:
        kind = "admin"
        method, pb, token = fuzz.admin()
        data = pb.SerializeToString()
        metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),) if token else ()
        call = channel.unary_unary(SERVICE + method)
    else:
        kind, data = "generate", fuzz.generate().SerializeToString()
        if r.random() < 0.5:
            call = channel.unary_unary(SERVICE + "Generate")
        else:
            stream = channel.unary_stream(SERVICE + "GenerateStream")
            await drain(stream(data, timeout=timeout), "generate", report, r.random() < 0.1)
            return
    try:
        await call(data, timeout=timeout, metadata=metadata)
        report.record(kind, "OK")
    except grpc.aio.AioRpcError as e:
        report.record(kind, e.code(), e.details() or "")


async def drain(call, kind: str, report: Report, cancel_early: bool, cancel_after: int = 1
                ) -> None:
    seen = 0
    try:
        async for _ in call:
            seen += 1
            if cancel_early and seen >= cancel_after:
                call.cancel()
                report.record(kind, "CANCELLED_BY_CLIENT")
                return
        report.record(kind, "OK")
    except grpc.aio.AioRpcError as e:
        report.record(kind, e.code(), e.details() or "")
    except asyncio.CancelledError:
        report.record(kind, "CANCELLED_BY_CLIENT")


async def one_stream(channel: grpc.aio.Channel, rng: random.Random, report: Report) -> None:
    adapter = rng.choice(["", *ADAPTERS])
    pb = generate_pb2.GenerateRequest(
        adapter=adapter, prompt=" ".join(rng.choice(["sea", "fox", "rank", "low"])
                                         for _ in range(rng.randint(1, 40))),
        sampling=generate_pb2.SamplingParameters(max_new_tokens=rng.randint(8, 64),
                                                 ignore_eos=True,
                                                 temperature=rng.choice([0.0, 0.7])))
    timeout = rng.choice([None, None, rng.uniform(0.05, 3.0)])
    call = channel.unary_stream(SERVICE + "GenerateStream")(pb.SerializeToString(),
                                                             timeout=timeout)
    await drain(call, "stream", report, rng.random() < 0.4, rng.randint(1, 20))


async def hot_swaps(channel: grpc.aio.Channel, rng: random.Random, stop: asyncio.Event,
                    report: Report) -> None:
    """Replaces a serving adapter with itself now and then, while streams use it."""
    register = channel.unary_unary(SERVICE + "RegisterAdapter")
    while not stop.is_set():
        name = rng.choice(["lora", "houlsby", "prefix"])
        pb = adapters_pb2.RegisterAdapterRequest(name=name, path=name, replace=True)
        try:
            await register(pb.SerializeToString(), timeout=30,
                           metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),))
            report.record("swap", "OK")
        except grpc.aio.AioRpcError as e:
            report.record("swap", e.code(), e.details() or "")
        await asyncio.sleep(rng.uniform(0.05, 0.5))


async def fuzz_and_soak(target: str, report: Report, seed: int, concurrency: int = 32
                        ) -> Report:
    requests, streams = report.requests, report.streams
    fuzz, rng = Fuzz(seed), random.Random(seed + 1)
    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(target) as channel:
        stop = asyncio.Event()
        swapper = asyncio.create_task(hot_swaps(channel, random.Random(seed + 2), stop, report))
        stream_tasks = [asyncio.create_task(one_stream(channel, rng, report))
                        for _ in range(streams)]
        sem = asyncio.Semaphore(concurrency)

        async def limited() -> None:
            async with sem:
                await one_request(channel, fuzz, report)

        await asyncio.gather(*(limited() for _ in range(requests)))
        await asyncio.gather(*stream_tasks)
        stop.set()
        await swapper
    report.seconds = time.monotonic() - t0
    return report


# --- the end state -------------------------------------------------------------------------------

def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def check_end_state(target: str, report: Report, log_path: Path, pid: int,
                    rss_growth_mib: float) -> list[str]:
    """Health SERVING, a normal request answers, the KV blocks in use are exactly those held
    by registered shared prefixes, no ERROR or traceback in the log, RSS grew at most
    `rss_growth_mib`. Returns what failed (with the run's own failures)."""
    problems = list(report.failures)
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            problems.append(f"health is {health.status}")
        stub = service_pb2_grpc.PeftServeStub(channel)
        deadline = time.monotonic() + 120
        while True:
            load = stub.ServerInfo(server_info_pb2.ServerInfoRequest(), timeout=10).load
            if (load.num_running, load.num_waiting, load.active_streams) == (0, 0, 0):
                break
            if time.monotonic() > deadline:
                problems.append(f"never idle: {load}")
                break
            time.sleep(0.2)
        out = stub.Generate(generate_pb2.GenerateRequest(
            prompt="still there?", sampling=generate_pb2.SamplingParameters(
                max_new_tokens=4, ignore_eos=True)), timeout=60)
        if out.usage.completion_tokens != 4:
            problems.append(f"a normal request got {out.usage.completion_tokens} tokens")
        held = prefix_blocks(stub)
        load = stub.ServerInfo(server_info_pb2.ServerInfoRequest(), timeout=10).load
        report.kv_blocks_used, report.kv_blocks_prefixes = load.kv_blocks_used, held
        if load.kv_blocks_used != held:
            problems.append(f"{load.kv_blocks_used} KV blocks in use; shared prefixes hold {held}")
    log = log_path.read_text()
    for bad in ("Traceback", " ERROR "):
        if bad in log:
            problems.append(f"the server log has {bad.strip()!r} lines")
    report.rss_end_mib = rss_mib(pid)
    if report.rss_end_mib > report.rss_start_mib + rss_growth_mib:
        problems.append(f"RSS grew {report.rss_end_mib - report.rss_start_mib:.0f} MiB "
                        f"(bound {rss_growth_mib:.0f})")
    return problems


def prefix_blocks(stub: service_pb2_grpc.PeftServeStub) -> int:
    """KV blocks the device-resident shared prefixes hold. A template's prefix length is not
    reported, so templates are unregistered first (their blocks go once idle)."""
    admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    adapters = stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=10).adapters
    for a in adapters:
        if a.kind == adapters_pb2.ADAPTER_KIND_PROMPT_TEMPLATE:
            stub.UnregisterAdapter(adapters_pb2.UnregisterAdapterRequest(name=a.name),
                                   timeout=10, metadata=admin)
    adapters = stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=10).adapters
    return sum(math.ceil(a.ranks["virtual_tokens"] / BLOCK_SIZE) for a in adapters
               if a.residency == adapters_pb2.RESIDENCY_DEVICE and "virtual_tokens" in a.ranks)


def register_all(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.PeftServeStub(channel)
        for name in ADAPTERS:
            stub.RegisterAdapter(adapters_pb2.RegisterAdapterRequest(name=name, path=name),
                                 timeout=60, metadata=(("authorization",
                                                        f"Bearer {ADMIN_TOKEN}"),))


def run(work: Path, requests: int, streams: int, seed: int, rss_growth_mib: float,
        model_dir: Path | None = None) -> tuple[Report, list[str]]:
    """Builds the tiny model (unless given) and the adapters under `work`, starts a server,
    fuzzes and soaks it, checks the end state, stops it."""
    from tests.e2e.conftest import TINY_SERVER_ARGS
    from tests.e2e.server_process import ServerProcess
    from tests.tiny import make_model_dir

    model_dir = model_dir or make_model_dir(work / "model")
    root = make_adapters(model_dir, work / "adapters")
    token_file = work / "token"
    token_file.write_text(ADMIN_TOKEN)
    server = ServerProcess(["--model", str(model_dir), *TINY_SERVER_ARGS,
                            *server_args(root, token_file)], work / "server.log").start()
    try:
        register_all(server.target)
        assert server.proc is not None
        report = Report(requests=requests, streams=streams,
                        rss_start_mib=rss_mib(server.proc.pid))
        asyncio.run(fuzz_and_soak(server.target, report, seed))
        problems = check_end_state(server.target, report, server.log_path, server.proc.pid,
                                   rss_growth_mib)
    finally:
        server.terminate()
    return report, problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-growth-mib", type=float, default=256.0)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peftserve-soak-"))
    report, problems = run(work, args.requests, args.streams, args.seed, args.rss_growth_mib)
    if problems:
        print(f"kept {work} (server.log)", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    summary = {**report.summary(), "problems": problems, "seed": args.seed,
               "rss_growth_bound_mib": args.rss_growth_mib}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
