"""``python -m verl.distill.toy build [--cache-dir D] [--seed S] [--force]``, and
``python -m verl.distill.toy off-policy --out FILE [--cache-dir D] [--seed S]``."""

from __future__ import annotations

import argparse
import sys

from verl.distill.toy.build import build_toy_assets
from verl.distill.toy.cache import CACHE_ENV_VAR
from verl.distill.toy.task import read_problems, write_off_policy_parquet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl.distill.toy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="build (or reuse) the toy tokenizer, teacher, student and parquet files",
        description="Prints one line per build phase, then the asset paths as key=value lines.",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    off_policy = commands.add_parser(
        "off-policy",
        help="write the build's training prompts with the teacher's answers, for data.off_policy_files",
        description="Builds (or reuses) the toy assets, then writes FILE: the training split's rows plus a "
        "'response' column holding each prompt's correct answer as the teacher writes it.",
    )
    off_policy.add_argument("--out", required=True, help="the parquet file to write")
    for command in (build, off_policy):
        command.add_argument(
            "--cache-dir",
            default=None,
            help=f"directory holding toy-<hash>/ builds (default: ${CACHE_ENV_VAR} or ~/.cache/verl-distill)",
        )
        command.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and batches")
    args = parser.parse_args(argv)

    assets = build_toy_assets(
        cache_dir=args.cache_dir,
        seed=args.seed,
        force=getattr(args, "force", False),
        progress=lambda line: print(line, flush=True),
    )
    if args.command == "off-policy":
        write_off_policy_parquet(read_problems(assets.train_files), args.out)
        print(f"off_policy_files={args.out}")
        return 0
    for key, value in assets.key_values().items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
