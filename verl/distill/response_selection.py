"""Which of a prompt's responses the teacher scores (``actor_rollout_ref.actor.distill.select_strategy``).

With ``rollout.n`` samples per prompt (GKD inside PPO: ``loss_mode=hybrid`` with GRPO) the teacher's KL
can be limited to ``select_k`` of each prompt's responses; the teacher's forward pass (verl's
reference pass) then runs on those alone (:mod:`verl.distill.selective_teacher`), which is the point:
the teacher's cost falls to about ``select_k / rollout.n``.

* ``all``: every response (stock behaviour, no selection);
* ``random``: ``select_k`` responses drawn uniformly, reproducibly (see :func:`group_seed`);
* ``best`` / ``worst``: the ``select_k`` responses with the highest / lowest task reward (the sum of
  the reward manager's token scores), ties broken by the same seeded draw, never by position.

The selection is decided per prompt group (verl's ``uid``), independently of the order of the rows in
the batch (verl reorders them to balance data-parallel ranks): a group's rows are first put in their
trajectory order (``{uid}_{session}_{index}``), then drawn from.

The KL to the teacher is then a token mean over the selected responses' tokens (the weights of
:func:`teacher_token_weights`), so ``distillation_coef`` keeps its meaning whatever ``select_k`` is.
"""

import hashlib
from collections.abc import Sequence
from typing import Optional

import numpy as np

SELECT_STRATEGIES = ("all", "random", "best", "worst")
# the strategies that rank a prompt's responses by their task reward
REWARD_RANKED_STRATEGIES = ("best", "worst")

# Per response token, in the batch the actor update reads: 0 on tokens the teacher did not score,
# else (response tokens of the batch) / (response tokens the teacher scored).
KL_WEIGHT_KEY = "distill_kl_weight"


def group_seed(base_seed: int, step: int, prompt_ids: Sequence[int]) -> int:
    """The seed of one prompt group's draw at one training step.

    Derived from ``data.seed``, the global step and the prompt's token ids: verl's ``uid`` is a fresh
    uuid4 per prompt and run, so it would make the draw differ between two runs of the same config.
    """
    digest = hashlib.sha256(
        f"{int(base_seed)}:{int(step)}:".encode() + np.asarray(prompt_ids, dtype=np.int64).tobytes()
    ).digest()
    return int.from_bytes(digest[:8], "little")


def trajectory_order(key: str, group: str) -> tuple:
    """Sort key of a row within its group: ``(session, index)`` of the key ``{uid}_{session}_{index}``."""
    suffix = key[len(group) + 1 :] if key.startswith(f"{group}_") else key
    parts = suffix.split("_")
    if all(part.isdigit() for part in parts):
        return (0, *map(int, parts))
    return (1, suffix)


def select_responses(
    groups: Sequence[str],
    order: Sequence[tuple],
    strategy: str,
    k: int,
    seeds: dict[str, int],
    scores: Optional[Sequence[float]] = None,
) -> list[bool]:
    """Whether the teacher scores each row: ``k`` rows of every group (all of a smaller group).

    ``groups[i]`` is row i's prompt group, ``order[i]`` its place in the group (:func:`trajectory_order`),
    ``seeds[group]`` the group's :func:`group_seed`, ``scores[i]`` its task reward (``best``/``worst``).
    """
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"unknown select_strategy {strategy!r}; valid: {', '.join(SELECT_STRATEGIES)}")
    if strategy == "all":
        return [True] * len(groups)
    if strategy in REWARD_RANKED_STRATEGIES and scores is None:
        raise ValueError(f"select_strategy={strategy} ranks responses by reward, but no scores were given")

    rows_of: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        rows_of.setdefault(group, []).append(row)

    selected = [False] * len(groups)
    for group, rows in rows_of.items():
        rows = sorted(rows, key=lambda row: order[row])
        drawn = [rows[i] for i in np.random.default_rng(seeds[group]).permutation(len(rows))]
        if strategy in REWARD_RANKED_STRATEGIES:
            sign = -1.0 if strategy == "best" else 1.0
            # a stable sort of the random draw: equal rewards keep the draw's (random) order
            drawn = sorted(drawn, key=lambda row: sign * float(scores[row]))
        for row in drawn[:k]:
            selected[row] = True
    return selected


def teacher_token_weights(selected: Sequence[bool], response_tokens: Sequence[int]) -> list[float]:
    """Per row, the weight of its tokens in the KL to the teacher: 0 when not selected, else
    (response tokens of all rows) / (response tokens of the selected rows).

    verl's ``token-mean`` divides a micro-batch's summed loss by the response tokens of the whole
    (mini-)batch; with these weights the KL term becomes the mean over the selected tokens instead.
    """
    all_tokens = sum(response_tokens)
    scored_tokens = sum(tokens for keep, tokens in zip(selected, response_tokens, strict=True) if keep)
    if scored_tokens == 0:
        return [0.0] * len(selected)
    scale = all_tokens / scored_tokens
    return [scale if keep else 0.0 for keep in selected]
