"""Checkpoint folders laid out by hand as verl's FSDP trainer writes them, and damaged on purpose."""

import json
from pathlib import Path

import torch

from verl.distill.checkpoints import TRACKER_NAME


def write_step(root: Path, step: int, world_size: int = 1, data: bool = True) -> Path:
    """A ``global_step_<step>`` folder: actor shards of every rank, the FSDP config, ``data.pt``."""
    folder = root / f"global_step_{step}"
    actor = folder / "actor"
    actor.mkdir(parents=True)
    for rank in range(world_size):
        for kind in ("model", "optim", "extra_state"):
            torch.save({"step": step, "rank": rank}, actor / f"{kind}_world_size_{world_size}_rank_{rank}.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}))
    if data:
        torch.save({"step": step}, folder / "data.pt")
    return folder


def cut_short(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def track(root: Path, text: str) -> None:
    (root / TRACKER_NAME).write_text(text)
