"""`peftserve` command line: serve, generate, adapters, info, demo."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftserve.serve_config import ServeConfig

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain LoRA in one sentence.",
)


def _demo(args: argparse.Namespace) -> int:
    from peftserve.config import EngineConfig
    from peftserve.engine.engine import Engine
    from peftserve.engine.request import Request
    from peftserve.engine.sampling_params import SamplingParams

    engine = Engine.from_config(EngineConfig(model=args.model, dtype=args.dtype))
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    requests = [Request(str(i), messages=({"role": "user", "content": p},), params=params)
                for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - t0
    tokens = 0
    for req in requests:
        outs = results[req.request_id]
        tokens += outs[-1].completion_tokens
        text = "".join(o.text for o in outs)
        print(f"### {req.messages[0]['content']}\n{text}\n")
    print(f"{len(requests)} requests, {tokens} tokens in {elapsed:.2f}s "
          f"({tokens / elapsed:.1f} tok/s, {engine.model.dtype}, {engine.model.device})")
    return 0


# `peftserve serve` flags: (flag, type, help). Each sets the ServeConfig / EngineConfig field of
# the same name (dashes -> underscores); an omitted flag keeps the TOML file's value or the
# default shown.
_SERVE_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--model", str, "'default' (SmolLM2-135M-Instruct) or a local Hugging Face model directory"),
    ("--dtype", str, "auto | float32 | bfloat16 | float16 (auto: bf16 where native)"),
    ("--device", str, "auto | cpu | cuda[:N]"),
    ("--weights", str, "bf16 | int8 | int4: the base model's matmul weights as loaded, or "
                       "weight-only int8 (per-channel scales) / int4 (group-wise, 32); "
                       "bf16 activations, adapters unchanged"),
    ("--backend", str, "auto | cpp | torch | triton | reference: who computes the step (auto: "
                       "triton on CUDA, the C++ kernels on a CPU with a compiler, else torch)"),
    ("--decode-step", str, "auto | static | classic: decode from persistent buffers with "
                           "sampling on the device (static), or build each step anew (auto: "
                           "static where CUDA graphs are captured)"),
    ("--prefill-rows", str, "graphs | always | off: with the static step, run a step of short "
                            "prefill chunks as a decode step's rows (graphs: only where that "
                            "replays a CUDA graph, in half precision)"),
    ("--lora-overlap", str, "off | shrink | delta: on CUDA, start each LoRA's shrink (or its "
                            "whole delta, added after) on a second stream beside its base "
                            "matmul, in the same CUDA graphs (the same sums; default: off)"),
    ("--max-cuda-graph-batch", int, "the largest decode batch captured as a CUDA graph"),
    ("--max-cuda-graph-len", int, "the longest context a captured decode step serves (longer "
                                  "ones run eagerly)"),
    ("--host", str, "gRPC bind address"),
    ("--port", int, "gRPC port (0: any free port; the bound one is printed)"),
    ("--http-port", int, "OpenAI-compatible HTTP API port on --host (unset: off; 0: any free "
                         "port)"),
    ("--metrics-host", str, "Prometheus /metrics bind address"),
    ("--metrics-port", int, "Prometheus /metrics port (0: any free port, -1: no endpoint)"),
    ("--adapter-root", str, "RegisterAdapter by path reads only below this directory "
                            "(unset: by-path registration refused)"),
    ("--staging-dir", str, "where inline adapter uploads are written (unset: a private temp dir)"),
    ("--max-inline-adapter-bytes", int, "size cap of one inline adapter upload"),
    ("--max-prompt-tokens", int, "longest prompt accepted (unset: the context length - 1)"),
    ("--max-new-tokens-limit", int, "the most new tokens a request may ask for"),
    ("--default-max-new-tokens", int, "new tokens when a request does not say"),
    ("--max-concurrent-streams", int, "Generate/GenerateStream calls in flight; beyond: "
                                      "RESOURCE_EXHAUSTED"),
    ("--max-waiting", int, "the engine's waiting queue; beyond: RESOURCE_EXHAUSTED"),
    ("--max-num-seqs", int, "sequences running in one batch"),
    ("--max-num-batched-tokens", int, "tokens in one forward pass"),
    ("--max-model-len", int, "context length (unset: the model's)"),
    ("--block-size", int, "tokens per KV cache block"),
    ("--num-kv-blocks", int, "KV cache blocks (unset: sized from --kv-cache-bytes)"),
    ("--kv-cache-bytes", int, "KV cache memory budget"),
    ("--max-loras", int, "device slots for LoRA / bottleneck adapters in one batch"),
    ("--max-lora-rank", int, "the largest adapter rank accepted"),
    ("--max-cpu-adapters", int, "adapters kept in host memory (LRU)"),
    ("--max-virtual-tokens", int, "the most prefix / prompt tuning virtual tokens"),
    ("--num-threads", int, "torch intra-op threads (unset: torch's default)"),
    ("--cache-dir", str, "converted default-model weights (unset: ~/.cache/peftserve)"),
    ("--seed", int, "engine seed"),
    ("--metrics-max-adapter-labels", int, "adapters with their own `adapter` metric label; "
                                          "the rest are 'other'"),
    ("--tls-cert", str, "PEM certificate; with --tls-key the server speaks TLS only"),
    ("--tls-key", str, "PEM private key"),
    ("--grace-period-s", float, "on SIGTERM, seconds in-flight requests get to finish"),
)


def _serve(args: argparse.Namespace) -> int:
    from peftserve import serve_config
    from peftserve.grpc.server import serve

    values = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
              for flag, _, _ in _SERVE_FLAGS}
    values["admin_token_file"] = args.admin_token_file
    values["cuda_graphs"] = args.cuda_graphs
    values["overlap_outputs"] = args.overlap_outputs
    values["schedule_ahead"] = args.schedule_ahead
    values["screened_head"] = args.screened_head
    try:
        config = serve_config.build(values, args.config)
    except (ValueError, OSError) as e:
        print(f"peftserve serve: {e}", file=sys.stderr)
        return 2
    if args.ray:
        return _serve_ray(config, args.config)
    return serve(config)


def _serve_ray(config: ServeConfig, toml_path: Path | None) -> int:
    from peftserve.ray import config as ray_config

    try:
        settings = ray_config.read(toml_path)
        problem = ray_config.unsupported(config)
        if problem is not None:
            raise ValueError(problem)
        from peftserve.ray.app import serve_ray
    except ModuleNotFoundError as e:
        print(f"peftserve serve --ray needs Ray Serve ({e}): pip install 'peftserve[ray]'",
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"peftserve serve: {e}", file=sys.stderr)
        return 2
    return serve_ray(config, settings)


def _serve_defaults() -> dict[str, object]:
    from dataclasses import fields

    from peftserve.config import EngineConfig
    from peftserve.serve_config import ServeConfig

    out: dict[str, object] = {f.name: f.default for f in fields(EngineConfig)}
    out.update({f.name: f.default for f in fields(ServeConfig) if f.name != "engine"})
    return out


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="serve the gRPC API and Prometheus metrics",
        description="Serve the peftserve gRPC API (with grpc.health.v1 and reflection) and "
                    "Prometheus metrics. Flags override the --config TOML file, which "
                    "overrides the defaults. SIGTERM drains: no new requests, in-flight ones "
                    "finish within --grace-period-s, exit 0.")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML file with the same keys (underscores), engine keys at the "
                            "top level or under [engine]")
    defaults = _serve_defaults()
    for flag, kind, text in _SERVE_FLAGS:
        default = defaults.get(flag[2:].replace("-", "_"))
        shown = f" (default: {default})" if default is not None else ""
        serve.add_argument(flag, type=kind, default=None, help=text + shown)
    serve.add_argument("--admin-token-file", type=Path, default=None,
                       help="file holding the bearer token admin RPCs need (else "
                            "$PEFTSERVE_ADMIN_TOKEN; neither: admin RPCs are open)")
    serve.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const",
                       const=False, default=None,
                       help="run static decode steps eagerly (no CUDA graphs captured)")
    serve.add_argument("--no-overlap-outputs", dest="overlap_outputs", action="store_const",
                       const=False, default=None,
                       help="make each decode step's outputs in that step (by default, where "
                            "CUDA graphs replay, they are made while the next step runs on the "
                            "GPU; the same outputs)")
    serve.add_argument("--no-schedule-ahead", dest="schedule_ahead", action="store_const",
                       const=False, default=None,
                       help="schedule each decode step once the last one's tokens are back (by "
                            "default, where CUDA graphs replay, the next step is queued on the "
                            "GPU before them when it is known without them; the same outputs)")
    serve.add_argument("--no-screened-head", dest="screened_head", action="store_const",
                       const=False, default=None,
                       help="greedy tokens from the whole bf16 LM head (the same tokens; by "
                            "default an int8 screen of it picks the rows to compute)")
    serve.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve: replicas per the [ray] table of --config "
                            "(needs pip install 'peftserve[ray]')")
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate offline with the engine and print the text")
    demo.add_argument("prompt", nargs="*", help="user messages (chat template applied)")
    demo.add_argument("--model", default="default",
                      help="'default' (SmolLM2-135M-Instruct) or a local HF model directory")
    demo.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.set_defaults(func=_demo)
    _add_serve(sub)
    from peftserve.client import cli as client_cli

    client_cli.add_commands(sub)
    from peftserve.train.cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("generate", "adapters", "info", "bench"):
        from peftserve.client import cli as client_cli

        return client_cli.run(args)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
