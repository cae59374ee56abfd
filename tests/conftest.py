"""Shared fixtures: tiny models and data built on the spot (no hub, no GPU)."""

import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest


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
