"""Which checkpoint ``trainer.resume_mode=auto`` resumes from, when a run died while saving.

verl 0.9.1's trainer saves step N into ``<default_local_dir>/global_step_N/`` in this order: each
role's shards (``actor/``, then ``critic/``), then the dataloader state ``data.pt``, and last it
rewrites the tracker ``latest_checkpointed_iteration.txt`` in place with ``N``. The tracker is the
commit mark: a folder newer than it was still being written when the run died, and verl ignores it.
But the tracker is rewritten by truncate-then-write: a kill in between leaves it empty, and verl's
``find_latest_ckpt_path`` fails on ``int("")``, so the run can never resume.

:func:`find_latest_complete_checkpoint` keeps verl's contract and closes that hole:

* a tracker that parses, naming a folder that exists, is trusted as verl trusts it (the folder's
  other ranks may live on other nodes' disks; a folder that really is broken fails loudly when verl
  loads it), with a warning when this node sees it incomplete;
* a tracker that parses but names a missing folder is an error: this node does not see the
  checkpoints (no shared filesystem), and training from scratch would overwrite the run's progress;
* only an unreadable (empty, garbled) or missing tracker makes it look for the newest complete
  folder, warning about each folder it skips; if folders exist and none is complete it is an
  error, never a silent restart from step 0.

The errors name ``trainer.resume_mode`` and the folder, and the driver checks the same before Ray
starts when it sees the folder (:func:`resume_problem`).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

TRACKER_NAME = "latest_checkpointed_iteration.txt"
DATALOADER_STATE_NAME = "data.pt"
ACTOR_FOLDER_NAME = "actor"
_NO_TRACKER = "missing"
# verl's FSDP checkpoint manager writes one file per kind and rank: model / optim / extra_state.
_FSDP_SHARD = re.compile(r"^(?P<kind>\w+?)_world_size_(?P<world>\d+)_rank_(?P<rank>\d+)\.pt$")


def _is_intact_archive(path: Path) -> bool:
    """``torch.save`` writes a zip archive whose central directory comes last: a file cut short by a
    kill has none."""
    return path.is_file() and zipfile.is_zipfile(path)


def _actor_problem(actor: Path) -> str | None:
    if not actor.is_dir() or not any(actor.iterdir()):
        return f"no {ACTOR_FOLDER_NAME}/ weights"
    shards: dict[str, set[tuple[int, int]]] = {}
    for file in actor.iterdir():
        match = _FSDP_SHARD.match(file.name)
        if match is None:
            continue
        if not _is_intact_archive(file):
            return f"{ACTOR_FOLDER_NAME}/{file.name} is cut short"
        shards.setdefault(match["kind"], set()).add((int(match["world"]), int(match["rank"])))
    if not shards:
        return None  # not an FSDP checkpoint (e.g. Megatron's dist_ckpt/): judged by data.pt alone
    if "model" not in shards:
        return f"{ACTOR_FOLDER_NAME}/ has no model shards"
    for kind, written in shards.items():
        world_size = max(world for world, _ in written)
        missing = {(world_size, rank) for rank in range(world_size)} - written
        if missing:
            return f"{ACTOR_FOLDER_NAME}/ lacks {kind} shards of ranks {sorted(rank for _, rank in missing)}"
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` (a ``global_step_N``) cannot be resumed from, or None when it is complete.

    Complete: ``data.pt``, which verl writes only after every role's shards, is an intact archive,
    and ``actor/`` holds weights (for verl's FSDP layout: intact model shards of every rank, and of
    every rank for each other shard kind present).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    if not _is_intact_archive(folder / DATALOADER_STATE_NAME):
        return f"{DATALOADER_STATE_NAME} missing or cut short"
    return _actor_problem(folder / ACTOR_FOLDER_NAME)


def _read_tracker(tracker: Path) -> tuple[int | None, str | None]:
    """The tracker's step, or why it cannot be used."""
    try:
        text = tracker.read_text()
    except FileNotFoundError:
        return None, _NO_TRACKER
    except OSError as error:
        return None, f"unreadable ({error})"
    try:
        return int(text), None
    except ValueError:
        return None, f"holds {text!r}, not a step number"


def _step_folders(root: Path, directory_format: str) -> list[tuple[int, Path]]:
    prefix, _, suffix = directory_format.partition("{}")
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
    found = []
    for entry in root.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match[1]), entry))
    return sorted(found, reverse=True)


class ResumeError(RuntimeError):
    """Checkpoints exist but ``resume_mode=auto`` cannot tell which one to resume from."""


_RESUME_FIXES = (
    "set trainer.resume_mode=resume_path with trainer.resume_from_path=<a complete global_step_N folder>, "
    "or trainer.resume_mode=disable to train from scratch"
)


def find_latest_complete_checkpoint(path, directory_format: str = "global_step_{}") -> str | None:
    """The folder ``resume_mode=auto`` resumes from, or None for a fresh run (see the module
    docstring); raises :class:`ResumeError` instead of training from scratch when checkpoints exist.
    Same signature and result type as verl's ``find_latest_ckpt_path``."""
    if path is None or not os.path.isdir(path):
        return None
    root = Path(path)
    tracker = root / TRACKER_NAME
    tracked_step, tracker_problem = _read_tracker(tracker)
    if tracked_step is not None:
        tracked_folder = root / directory_format.format(tracked_step)
        if not tracked_folder.is_dir():
            raise ResumeError(
                f"trainer.resume_mode=auto: the tracker {tracker} names {tracked_folder.name}, which this node "
                f"does not see in {root} (checkpoints on another node's disk?); fix: run where every node sees "
                f"the checkpoints (a shared filesystem), or {_RESUME_FIXES}"
            )
        problem = checkpoint_problem(tracked_folder)
        if problem is not None:
            logger.warning("verl-distill: resuming from %s, which looks incomplete from this node: %s", tracked_folder, problem)
        return str(tracked_folder)

    candidates = _step_folders(root, directory_format)
    if not candidates:
        if tracker_problem != _NO_TRACKER:
            logger.warning("verl-distill: checkpoint tracker %s %s and no checkpoint folder: training from scratch", tracker, tracker_problem)
        return None  # a fresh run
    logger.warning(
        "verl-distill: checkpoint tracker %s %s; looking for the newest complete checkpoint", tracker, tracker_problem
    )
    skipped = []
    for _step, folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            logger.warning("verl-distill: resuming from %s", folder)
            return str(folder)
        logger.warning("verl-distill: skipping %s: %s", folder, problem)
        skipped.append(f"{folder.name}: {problem}")
    raise ResumeError(
        f"trainer.resume_mode=auto: {root} holds checkpoints but none is complete ({'; '.join(skipped)}) and its "
        f"tracker {tracker_problem}; fix: {_RESUME_FIXES}"
    )


def resume_problem(config) -> str | None:
    """Why ``resume_mode=auto`` could not resume this run, as seen from this process (the driver),
    or None; checked before Ray starts so that the error is one line."""
    from omegaconf import OmegaConf

    if OmegaConf.select(config, "trainer.resume_mode") != "auto":
        return None
    folder = os.path.abspath(str(OmegaConf.select(config, "trainer.default_local_dir")))
    try:
        find_latest_complete_checkpoint(folder)
    except ResumeError as error:
        return str(error)
    return None
