"""``python -m verl.distill.toy build [--cache-dir D] [--seed S] [--force]``."""

from __future__ import annotations

import argparse
import sys

from verl.distill.toy.build import build_toy_assets
from verl.distill.toy.cache import CACHE_ENV_VAR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl.distill.toy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="build (or reuse) the toy tokenizer, teacher, student and parquet files",
        description="Prints one line per build phase, then the asset paths as key=value lines.",
    )
    build.add_argument(
        "--cache-dir",
        default=None,
        help=f"directory holding toy-<hash>/ builds (default: ${CACHE_ENV_VAR} or ~/.cache/verl-distill)",
    )
    build.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and batches")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args(argv)

    assets = build_toy_assets(
        cache_dir=args.cache_dir, seed=args.seed, force=args.force, progress=lambda line: print(line, flush=True)
    )
    for key, value in assets.key_values().items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
