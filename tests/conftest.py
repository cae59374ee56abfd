"""Shared fixtures: tiny models and data built on the spot (no hub, no GPU).

Tests import verl-distill from the installed package (it installs next to verl's own files, which an
editable install cannot do), so a checkout edited since the last install would be tested stale: the
installed copy is compared with the checkout first and reinstalled when they differ.

This test process is a CPU job and a distillation run, as the trainer's driver would mark the
processes of such a run (``VERL_PLATFORM=cpu``, ``VERL_DISTILL_RUN=1``); trainer runs started by the
tests get neither, so that their driver decides (:func:`tests.trainer_runs.run_trainer`).
"""

import importlib.metadata
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ["VERL_PLATFORM"] = "cpu"
os.environ["VERL_DISTILL_RUN"] = "1"

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PACKAGED_SUFFIXES = (".py", ".yaml", ".jinja")
REINSTALL_COMMAND = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "--no-build-isolation"]


def _installed_distribution():
    """verl-distill as installed next to verl (not the build's egg-info a checkout on sys.path holds)."""
    import importlib.util

    verl = importlib.util.find_spec("verl")  # finds the package without importing it (and us with it)
    site_packages = Path(verl.origin).parents[1]
    return next(iter(importlib.metadata.distributions(name="verl-distill", path=[str(site_packages)])), None)


def stale_installed_files(repo: Path = REPO) -> list[str]:
    """Files under ``verl/`` where the installed verl-distill differs from the checkout."""
    distribution = _installed_distribution()
    if distribution is None:
        return ["verl-distill is not installed"]
    installed = {
        str(file): file
        for file in distribution.files or []
        if str(file).startswith("verl/") and str(file).endswith(PACKAGED_SUFFIXES)
    }
    checkout = {
        path.relative_to(repo).as_posix(): path
        for path in (repo / "verl").rglob("*")
        if path.is_file() and path.suffix in PACKAGED_SUFFIXES and "__pycache__" not in path.parts
    }
    stale = []
    for name in sorted(checkout.keys() | installed.keys()):
        if name not in installed:
            stale.append(f"{name} (not installed)")
        elif name not in checkout:
            stale.append(f"{name} (deleted in the checkout)")
        elif Path(installed[name].locate()).read_bytes() != checkout[name].read_bytes():
            stale.append(f"{name} (edited)")
    return stale


def pytest_configure(config):
    stale = stale_installed_files()
    if not stale:
        return
    command = [*REINSTALL_COMMAND, str(REPO)]
    print(f"verl-distill: the installed copy differs from the checkout ({', '.join(stale[:5])}"
          f"{', ...' if len(stale) > 5 else ''}); reinstalling", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or stale_installed_files():
        pytest.exit(
            f"the installed verl-distill is stale and reinstalling failed; run: {' '.join(command)}\n{result.stderr[-2000:]}",
            returncode=4,
        )


@dataclass(frozen=True)
class TinyAssets:
    student: Path
    teacher: Path
    train_files: Path
    val_files: Path


def _save_tiny_qwen2(folder: Path, tokenizer, hidden_size: int, seed: int, init_std: float = 0.02) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=init_std,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _addition_rows(count: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append(
            {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"split": split, "index": index},
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    """A random tiny student, a different (larger) random tiny teacher, gsm8k-layout parquet files.

    The teacher is initialised with a large weight scale so that its next-token distributions are
    peaked: far from the near-uniform student, which gives distillation something to learn.
    """
    from verl.distill.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    student = _save_tiny_qwen2(root / "student", tokenizer, hidden_size=32, seed=0)
    teacher = _save_tiny_qwen2(root / "teacher", tokenizer, hidden_size=48, seed=1, init_std=0.3)
    pd.DataFrame(_addition_rows(32, seed=0, split="train")).to_parquet(root / "train.parquet")
    pd.DataFrame(_addition_rows(8, seed=1, split="test")).to_parquet(root / "val.parquet")
    return TinyAssets(student, teacher, root / "train.parquet", root / "val.parquet")
