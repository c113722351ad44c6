"""`peftserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
