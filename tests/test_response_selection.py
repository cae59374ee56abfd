"""Which responses the teacher scores: select_responses (all / random / best / worst, k, ties,
reproducibility), the per-group seeds, the trajectory order and the KL weights."""

import random
from collections import Counter

import pytest

from verl.distill.response_selection import (
    SELECT_STRATEGIES,
    group_seed,
    select_responses,
    teacher_token_weights,
    trajectory_order,
)

N = 4


def groups_of(count: int, n: int = N) -> tuple[list[str], list[tuple], dict[str, int]]:
    """``count`` prompt groups of ``n`` rows, rows in trajectory order, one seed per group."""
    groups = [f"uid{g}" for g in range(count) for _ in range(n)]
    order = [(0, i, 0) for _ in range(count) for i in range(n)]
    seeds = {f"uid{g}": group_seed(7, 3, [g, 10 + g]) for g in range(count)}
    return groups, order, seeds


def chosen_positions(selected, n: int = N) -> list[list[int]]:
    return [[i for i in range(n) if selected[start + i]] for start in range(0, len(selected), n)]


def test_all_selects_every_response():
    groups, order, seeds = groups_of(3)
    assert select_responses(groups, order, "all", 1, seeds) == [True] * len(groups)


@pytest.mark.parametrize("strategy", ["random", "best", "worst"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_k_responses_of_every_group(strategy, k):
    groups, order, seeds = groups_of(6)
    scores = [random.Random(row).random() for row in range(len(groups))]
    selected = select_responses(groups, order, strategy, k, seeds, scores)
    assert [len(positions) for positions in chosen_positions(selected)] == [k] * 6


def test_a_group_smaller_than_k_is_scored_whole():
    groups = ["a", "a", "b", "b", "b", "b"]
    order = [(0, i, 0) for i in (0, 1, 0, 1, 2, 3)]
    seeds = {"a": 1, "b": 2}
    selected = select_responses(groups, order, "random", 3, seeds)
    assert selected[:2] == [True, True] and sum(selected[2:]) == 3


def test_best_and_worst_pick_the_highest_and_lowest_rewards():
    groups, order, seeds = groups_of(2)
    scores = [0.3, 0.8, 0.5, 0.2, 1.0, -1.0, 0.0, 2.0]
    assert chosen_positions(select_responses(groups, order, "best", 2, seeds, scores)) == [[1, 2], [0, 3]]
    assert chosen_positions(select_responses(groups, order, "worst", 2, seeds, scores)) == [[0, 3], [1, 2]]
    assert chosen_positions(select_responses(groups, order, "best", 1, seeds, scores)) == [[1], [3]]


@pytest.mark.parametrize("strategy", ["best", "worst"])
def test_ties_are_broken_by_the_seeded_draw_not_by_position(strategy):
    # rows 0 and 1 tie for the best reward, rows 2 and 3 for the worst
    scores = [1.0, 1.0, 0.0, 0.0]
    tied = [0, 1] if strategy == "best" else [2, 3]
    picks = Counter()
    for seed in range(200):
        selected = select_responses(["g"] * 4, [(0, i, 0) for i in range(4)], strategy, 1, {"g": seed}, scores)
        (position,) = [i for i in range(4) if selected[i]]
        assert position in tied
        picks[position] += 1
    assert min(picks.values()) > 60  # both tied rows win a fair share of the draws


def test_random_is_uniform_over_positions():
    groups, order, seeds = groups_of(2000)
    selected = select_responses(groups, order, "random", 1, seeds)
    counts = Counter(position for positions in chosen_positions(selected) for position in positions)
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(abs(count / 2000 - 0.25) < 0.04 for count in counts.values())


@pytest.mark.parametrize("strategy", ["random", "best"])
def test_the_selection_does_not_depend_on_the_order_of_the_batch(strategy):
    """verl reorders the rows to balance data-parallel ranks: the same rows must be chosen."""
    groups, order, seeds = groups_of(5)
    keys = [f"{group}_{position[1]}_0" for group, position in zip(groups, order, strict=True)]
    scores = [float(row % 3) for row in range(len(groups))]  # ties inside every group
    selected = select_responses(groups, order, strategy, 2, seeds, scores)
    permutation = list(range(len(groups)))
    random.Random(0).shuffle(permutation)
    shuffled = select_responses(
        [groups[i] for i in permutation],
        [order[i] for i in permutation],
        strategy,
        2,
        seeds,
        [scores[i] for i in permutation],
    )
    assert {keys[i] for i, keep in zip(permutation, shuffled, strict=True) if keep} == {
        keys[i] for i, keep in enumerate(selected) if keep
    }


def test_random_is_reproducible_and_changes_with_its_seed():
    groups, order, _ = groups_of(50)

    def draw(base_seed, step):
        seeds = {f"uid{g}": group_seed(base_seed, step, [g, 10 + g]) for g in range(50)}
        return select_responses(groups, order, "random", 1, seeds)

    assert draw(0, 1) == draw(0, 1)
    assert draw(0, 1) != draw(0, 2)
    assert draw(0, 1) != draw(1, 1)


def test_group_seed_depends_on_seed_step_and_prompt_only():
    assert group_seed(0, 5, [1, 2, 3]) == group_seed(0, 5, (1, 2, 3))
    assert len({group_seed(0, 5, [1, 2, 3]), group_seed(1, 5, [1, 2, 3]), group_seed(0, 6, [1, 2, 3]),
                group_seed(0, 5, [1, 2, 4])}) == 4


def test_trajectory_order_sorts_sessions_numerically():
    uid = "3f2a-77"
    keys = [f"{uid}_10_0", f"{uid}_2_1", f"{uid}_2_0", f"{uid}_0_0"]
    assert sorted(keys, key=lambda key: trajectory_order(key, uid)) == [
        f"{uid}_0_0", f"{uid}_2_0", f"{uid}_2_1", f"{uid}_10_0"
    ]


def test_reward_strategies_need_scores_and_unknown_strategies_are_refused():
    groups, order, seeds = groups_of(1)
    with pytest.raises(ValueError, match="ranks responses by reward"):
        select_responses(groups, order, "best", 1, seeds)
    with pytest.raises(ValueError, match="valid: " + ", ".join(SELECT_STRATEGIES)):
        select_responses(groups, order, "top", 1, seeds)


def test_weights_turn_the_token_mean_over_all_tokens_into_one_over_the_scored_tokens():
    selected = [True, False, False, True, False]
    tokens = [3, 5, 0, 7, 2]  # a padding row has no response token
    weights = teacher_token_weights(selected, tokens)
    assert weights == pytest.approx([17 / 10, 0, 0, 17 / 10, 0])
    values = [0.5, 9.0, 9.0, 2.0, 9.0]  # one per-token value per row, for simplicity
    token_mean_over_all = sum(w * v * t for w, v, t in zip(weights, values, tokens, strict=True)) / sum(tokens)
    assert token_mean_over_all == pytest.approx((0.5 * 3 + 2.0 * 7) / 10)
    assert teacher_token_weights([False, False], [3, 4]) == [0.0, 0.0]
