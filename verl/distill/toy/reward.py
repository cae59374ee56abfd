"""Answer format and rule-based scorer of the toy addition task.

The assistant writes the sum's decimal digits in reverse order (least significant first), so
each digit depends only on two operand digits and the carry from the digit written just before
it; a two-layer model learns that in seconds. ``ground_truth`` is the plain sum ("46").

This module is self-contained (standard library only) so verl can load it by file path as a
custom reward function (``reward.custom_reward_function.path=<this file>``,
``reward.custom_reward_function.name=compute_score``) as well as by import.
"""

from __future__ import annotations

import re

DATA_SOURCE = "toy_addition"

_DIGITS_ONLY = re.compile(r"[0-9]+")


def format_answer(total: int) -> str:
    """The response text the assistant is trained to write for ``total``: digits reversed."""
    if total < 0:
        raise ValueError(f"the toy task only has non-negative sums, got {total}")
    return str(total)[::-1]


def parse_answer(solution_str: str) -> str | None:
    """The sum a response states, in ordinary digit order, or None when it is not a bare number.

    Surrounding whitespace is ignored; anything else (letters, a second number, an empty reply)
    makes the response unparseable rather than partially right.
    """
    text = solution_str.strip()
    if not _DIGITS_ONLY.fullmatch(text):
        return None
    return text[::-1]


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the response states exactly ``ground_truth`` (string equality, so no leading
    zeros are forgiven), else 0.0.

    Signature of a verl custom reward function; ``extra_info`` and other keyword arguments that
    verl passes are accepted and ignored.
    """
    if data_source != DATA_SOURCE:
        raise ValueError(
            f"data_source {data_source!r} is not scored by verl.distill.toy.reward (only {DATA_SOURCE!r}); "
            "point reward.custom_reward_function.path at a scorer for that data set"
        )
    return 1.0 if parse_answer(solution_str) == str(ground_truth) else 0.0
