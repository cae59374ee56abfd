"""A build-once cache directory: locked, staged in a temporary sibling, published by rename.

Readers never see a half-written directory: the builder writes into ``.<name>.tmp-*`` next to
the final directory and renames it into place only when it is complete; completeness is judged
by the caller (the toy assets write their manifest last). A file lock serialises concurrent
builders of the same directory; leftovers of crashed builders are removed under that lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV_VAR = "VERL_DISTILL_CACHE"


def default_cache_root() -> Path:
    """``$VERL_DISTILL_CACHE`` when set, else ``~/.cache/verl-distill``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "verl-distill"


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if missing), blocking until free."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_once(
    final_dir: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool], force: bool = False
) -> bool:
    """Make ``final_dir`` complete, building it with ``build(staging_dir)`` unless it already is
    (or ``force``). Returns True when this call built it."""
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging_prefix = f".{final_dir.name}.tmp-"
    with exclusive_lock(parent / f"{final_dir.name}.lock"):
        if not force and is_complete(final_dir):
            return False
        for leftover in parent.glob(staging_prefix + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix, dir=parent))
        try:
            build(staging)
            if final_dir.exists():
                replaced = staging.with_name(staging.name + "-replaced")
                os.rename(final_dir, replaced)
                os.rename(staging, final_dir)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.rename(staging, final_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return True
