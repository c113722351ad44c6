"""`python -m peftserve.train ...` (what `accelerate launch -m` and `torchrun -m` run)."""

from __future__ import annotations

import argparse
import sys

from peftserve.train.cli import DESCRIPTION, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftserve.train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
