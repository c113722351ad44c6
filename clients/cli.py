"""The client side of the `peftserve` command: generate, adapters, info. No torch import.

The admin token for `adapters register|unregister` comes from `--admin-token-file` or the
PEFTSERVE_ADMIN_TOKEN environment variable (read here, once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from peftserve.client.channel import DEFAULT_TARGET
from peftserve.client.errors import ApiError
from peftserve.client.sync import Client
from peftserve.client.types import AdapterInfo, Sampling, ServerInfo

ADMIN_TOKEN_ENV = "PEFTSERVE_ADMIN_TOKEN"


def add_commands(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="stream a completion from a running server")
    _connection(gen)
    gen.add_argument("prompt", nargs="+", help="the user message (joined with spaces)")
    gen.add_argument("--adapter", default=None, help="registered adapter name (default: base)")
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as plain text, without the chat template")
    gen.add_argument("--system", default=None, help="a system message before the user's")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="server default: 128")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_generate)

    adapters = sub.add_parser("adapters", help="register, unregister, list and show adapters")
    asub = adapters.add_subparsers(dest="adapters_command", required=True)
    reg = asub.add_parser("register", help="register an adapter (admin)")
    _connection(reg, admin=True)
    reg.add_argument("name")
    src = reg.add_mutually_exclusive_group(required=True)
    src.add_argument("--path", help="a directory on the server, under its --adapter-root")
    src.add_argument("--upload", type=Path, metavar="DIR",
                     help="a local adapter directory; its .json/.safetensors files are sent")
    reg.add_argument("--replace", action="store_true", help="swap an adapter of the same name")
    reg.set_defaults(func=_register)
    unreg = asub.add_parser("unregister", help="unregister an adapter (admin)")
    _connection(unreg, admin=True)
    unreg.add_argument("name")
    unreg.set_defaults(func=_unregister)
    lst = asub.add_parser("list", help="list registered adapters")
    _connection(lst)
    lst.set_defaults(func=_list)
    show = asub.add_parser("show", help="one adapter's details as JSON")
    _connection(show)
    show.add_argument("name")
    show.set_defaults(func=_show)

    info = sub.add_parser("info", help="the server's model, limits and load as JSON")
    _connection(info)
    info.set_defaults(func=_info)

    _add_bench(sub)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench", help="load-test a running server: throughput and latency by adapter kind",
        description="Open-loop (Poisson --rate) or closed-loop (--concurrency) load over gRPC; "
                    "reports req/s, tokens/s, TTFT / inter-token / e2e p50/p90/p99 overall, "
                    "per adapter kind and per adapter, and errors by status code. With "
                    "--metrics-url it cross-checks its latencies against the server's own "
                    "Prometheus histograms.",
        epilog="example: peftserve bench --rate 2 --duration 60 --popularity zipf "
               "--metrics-url http://127.0.0.1:9464/metrics --out bench.json")
    _connection(b)
    b.add_argument("--adapters", default=None,
                   help="comma-separated names, 'base' for the base model (default: every "
                        "registered adapter, and base)")
    b.add_argument("--kinds", default=None,
                   help="only registered adapters of these kinds (comma-separated: lora, "
                        "bottleneck, prefix_tuning, prompt_tuning, prompt_template)")
    b.add_argument("--no-base", action="store_true", help="leave the base model out")
    load = b.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None,
                      help="requests/s, Poisson arrivals (open loop)")
    load.add_argument("--concurrency", type=int, default=None,
                      help="requests kept in flight (closed loop; default 8 without --rate)")
    b.add_argument("--duration", type=float, default=60.0, help="seconds of sending (default 60)")
    b.add_argument("--num-requests", type=int, default=None, help="stop after this many")
    b.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform",
                   help="how often each adapter is named (zipf: in the order given)")
    b.add_argument("--zipf-alpha", type=float, default=1.0)
    b.add_argument("--prompt-len", default="32-128",
                   help="prompt words: N, LO-HI or exp:MEAN (default 32-128)")
    b.add_argument("--output-len", default="16-128",
                   help="tokens to generate, EOS ignored: N, LO-HI or exp:MEAN (default 16-128)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--metrics-url", default=None,
                   help="the server's /metrics (e.g. http://127.0.0.1:9464/metrics)")
    b.add_argument("--out", type=Path, default=None, help="write the full report as JSON")
    b.set_defaults(func=_bench)


def _connection(p: argparse.ArgumentParser, admin: bool = False) -> None:
    p.add_argument("--server", default=DEFAULT_TARGET, help=f"host:port (default {DEFAULT_TARGET})")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    p.add_argument("--tls-ca", type=Path, default=None,
                   help="PEM file of the CA or self-signed certificate to trust (implies --tls)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per call")
    if admin:
        p.add_argument("--admin-token-file", type=Path, default=None,
                       help=f"file holding the admin token (else ${ADMIN_TOKEN_ENV})")


def _client(args: argparse.Namespace) -> Client:
    token = None
    token_file = getattr(args, "admin_token_file", None)
    if token_file is not None:
        token = token_file.read_text().strip()
    elif os.environ.get(ADMIN_TOKEN_ENV):
        token = os.environ[ADMIN_TOKEN_ENV]
    return Client(args.server, tls=args.tls, tls_ca=args.tls_ca, admin_token=token,
                  timeout=args.timeout)


def run(args: argparse.Namespace) -> int:
    """Runs a client subcommand. An API error or a bad local input (a missing directory or
    token file, an adapter directory the server would refuse) prints one line and exits 1."""
    try:
        return int(args.func(args))
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `peftserve adapters list | head`: the reader left
        # Python flushes stdout again at exit: point it at /dev/null so that it stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = f": {e.filename}" if isinstance(e, OSError) and e.filename else ""
        print(f"error: {reason}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _generate(args: argparse.Namespace) -> int:
    text = " ".join(args.prompt)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed,
                        stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    messages = None
    if not args.raw:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": text})
    with _client(args) as client, client.generate_stream(
            text if args.raw else None, messages=messages, adapter=args.adapter,
            sampling=sampling) as stream:
        last = None
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
    sys.stdout.write("\n")
    if last is not None:
        ttft = last.timings.ttft_s if last.timings else None
        print(f"[{last.prompt_tokens} prompt + {last.completion_tokens} generated tokens, "
              f"finish: {last.finish_reason}, adapter kind: {last.adapter_kind}"
              + (f", ttft {ttft * 1e3:.0f} ms" if ttft is not None else "") + "]",
              file=sys.stderr)
    return 0


def _register(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.register_adapter(args.name, args.path, directory=args.upload,
                                       replace=args.replace)
    print(f"registered {info.name}: {info.kind}, {info.num_params} parameters, "
          f"ranks {info.ranks}")
    return 0


def _unregister(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unregister_adapter(args.name)
    print(f"unregistered {args.name}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        adapters = client.list_adapters()
    print(f"{'NAME':<24} {'KIND':<16} {'RESIDENCY':<10} {'PARAMS':>10} {'SERVED':>8}")
    for a in adapters:
        print(f"{a.name:<24} {a.kind:<16} {a.residency:<10} {a.num_params:>10} "
              f"{a.requests_served:>8}")
    return 0


def _show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(_json(client.get_adapter(args.name)))
    return 0


def _info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(_json(client.server_info()))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import asyncio

    from peftserve.client import loadgen

    with _client(args) as client:
        registered = client.list_adapters()
    if args.adapters:
        adapters = tuple(a.strip() for a in args.adapters.split(",") if a.strip())
    else:
        kinds = set(args.kinds.split(",")) if args.kinds else None
        adapters = tuple(a.name for a in registered if kinds is None or a.kind in kinds)
        if not args.no_base:
            adapters = (loadgen.BASE, *adapters)
    try:
        spec = loadgen.LoadSpec(
            adapters=adapters, rate=args.rate,
            concurrency=args.concurrency if args.rate is None and args.concurrency else
            (None if args.rate is not None else 8),
            duration_s=args.duration, max_requests=args.num_requests,
            popularity=args.popularity, zipf_alpha=args.zipf_alpha,
            prompt_len=loadgen.Lengths.parse(args.prompt_len),
            output_len=loadgen.Lengths.parse(args.output_len), seed=args.seed,
            timeout_s=args.timeout)
        result = asyncio.run(loadgen.bench(args.server, spec, args.metrics_url, progress=True,
                                           tls=args.tls, tls_ca=args.tls_ca))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(loadgen.render(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if result["overall"]["ok"] else 1  # type: ignore[index]


def _json(obj: AdapterInfo | ServerInfo) -> str:
    return json.dumps(asdict(obj), indent=2, sort_keys=True)
