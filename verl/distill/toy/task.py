"""The toy task: two-digit addition, answer written with its digits reversed.

A problem is a pair of operands in [10, 99], so every rendered prompt has the same length and
the whole space (8,100 pairs) splits into disjoint train and validation sets. Rows are written
in verl's RLHF parquet layout::

    data_source   "toy_addition"
    prompt        [{"role": "user", "content": "12+34="}]
    ability       "arithmetic"
    reward_model  {"style": "rule", "ground_truth": "46"}
    extra_info    {"split": "train"|"val", "index": i, "a": 12, "b": 34}

The ground truth is only read by the scorer (evaluation); distillation itself never sees it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from verl.distill.toy.reward import DATA_SOURCE, format_answer

OPERAND_RANGE = range(10, 100)
ABILITY = "arithmetic"
# Longest correct response: three digits and the end-of-sequence token.
MAX_RESPONSE_TOKENS = 4


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def ground_truth(self) -> str:
        return str(self.a + self.b)

    @property
    def answer(self) -> str:
        return format_answer(self.a + self.b)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]


def split_problems(seed: int, val_size: int) -> tuple[list[Problem], list[Problem]]:
    """All operand pairs, shuffled by ``seed``, cut into (train, val); disjoint by construction."""
    problems = [Problem(a, b) for a in OPERAND_RANGE for b in OPERAND_RANGE]
    if not 0 < val_size < len(problems):
        raise ValueError(f"val_size must be in [1, {len(problems) - 1}], got {val_size}")
    random.Random(seed).shuffle(problems)
    return problems[val_size:], problems[:val_size]


def write_parquet(problems: list[Problem], split: str, path: Path) -> None:
    """Write ``problems`` as verl RLHF rows; byte-identical output for identical input."""
    rows = [
        {
            "data_source": DATA_SOURCE,
            "prompt": problem.messages(),
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
            "extra_info": {"split": split, "index": index, "a": problem.a, "b": problem.b},
        }
        for index, problem in enumerate(problems)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def read_problems(path: Path) -> list[Problem]:
    """The problems of a parquet file written by :func:`write_parquet`, in file order."""
    extra_info = pq.read_table(path, columns=["extra_info"]).column("extra_info").to_pylist()
    return [Problem(info["a"], info["b"]) for info in extra_info]


# the column of the off-policy file holding the response (data.off_policy_response_key's default)
OFF_POLICY_RESPONSE_KEY = "response"


def write_off_policy_parquet(problems: list[Problem], path: Path) -> None:
    """``problems`` as :func:`write_parquet` writes them, each with the response the teacher was trained
    to write (the reversed sum) in the ``response`` column: off-policy samples for
    ``data.off_policy_files``. Byte-identical output for identical input."""
    rows = [
        {
            "data_source": DATA_SOURCE,
            "prompt": problem.messages(),
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
            "extra_info": {"split": "off_policy", "index": index, "a": problem.a, "b": problem.b},
            OFF_POLICY_RESPONSE_KEY: problem.answer,
        }
        for index, problem in enumerate(problems)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def prompt_ids(tokenizer, problems: list[Problem]) -> torch.Tensor:
    """Chat-rendered prompts as a [n, prompt_len] tensor (all prompts have the same length)."""
    rendered = [
        list(tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for p in problems
    ]
    return torch.tensor(rendered, dtype=torch.long)


def supervised_batch(tokenizer, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of prompt + answer + EOS, right-padded to MAX_RESPONSE_TOKENS; labels are
    -100 except on the response tokens, as transformers' causal-LM loss expects."""
    prompts = prompt_ids(tokenizer, problems)
    prompt_len = prompts.shape[1]
    input_ids = torch.full((len(problems), prompt_len + MAX_RESPONSE_TOKENS), tokenizer.pad_token_id)
    input_ids[:, :prompt_len] = prompts
    labels = torch.full_like(input_ids, -100)
    for row, problem in enumerate(problems):
        response = tokenizer.encode(problem.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        input_ids[row, prompt_len : prompt_len + len(response)] = torch.tensor(response)
        labels[row, prompt_len : prompt_len + len(response)] = torch.tensor(response)
    return input_ids, labels
