"""Every loss mode runs 5 training steps on a CPU through ``python -m verl.trainer.main_ppo``, teacher in the ref slot.

One run per mode (start-up dominates a run's cost), each checked on what it logged at every step.
Covered by other runs: reverse_kl_topk (the toy learning test, tests/test_e2e_distillation.py) and
hybrid GRPO (with a selection strategy, tests/test_e2e_selection.py).
"""

import math

import pytest
from trainer_runs import TINY_RUN, TrainerRun, run_trainer

pytestmark = pytest.mark.slow

STEPS = 5

# Partial credit for digits: a random tiny student never states a gsm8k answer, so verl's exact-match
# scorer would give every sample 0 and GRPO every token a zero advantage (no policy gradient to check).
DIGIT_FRACTION_SCORER = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return sum(character.isdigit() for character in solution_str) / max(len(solution_str), 1)
'''


def train(tiny_assets, workdir, config_name, *overrides) -> TrainerRun:
    run = run_trainer(
        workdir,
        [
            f"data.train_files={tiny_assets.train_files}",
            f"data.val_files={tiny_assets.val_files}",
            f"actor_rollout_ref.model.path={tiny_assets.student}",
            f"actor_rollout_ref.ref.model.path={tiny_assets.teacher}",
            *TINY_RUN,
            f"trainer.total_training_steps={STEPS}",
            *overrides,
        ],
        config_name=config_name,
    )
    assert run.returncode == 0, run.explain()
    assert run.steps() == list(range(1, STEPS + 1))
    return run


def every_step(run: TrainerRun, key: str) -> list[float]:
    values = run.series(key)
    assert len(values) == STEPS, f"{key} logged at {len(values)} of {STEPS} steps"
    assert all(math.isfinite(value) for value in values), f"{key}: {values}"
    return values


def test_policy_gradient_opd_logs_pg_loss_and_the_reward_kl_penalty_only(tiny_assets, tmp_path):
    run = train(tiny_assets, tmp_path, "distillation_opd_trainer")
    every_step(run, "actor/pg_loss")
    # student and teacher differ, so the in-reward KL (the advantage's source) is not zero
    assert all(value != 0 for value in every_step(run, "actor/reward_kl_penalty"))
    assert not run.series("actor/kl_loss")


def _tokenizer_length() -> int:
    from verl.distill.toy.tokenizer import build_tokenizer

    return len(build_tokenizer())


# k = 32 of the tiny tokenizer's tokens leaves a tail bucket; k = the tokenizer's length is the whole
# vocabulary, an empty tail and the exact divergence.
WHOLE_VOCABULARY = _tokenizer_length()


@pytest.mark.parametrize(
    # a top-k with a tail bucket, and the whole vocabulary
    "loss_mode, topk", [("forward_kl_topk", 32), ("jsd_topk", WHOLE_VOCABULARY)]
)
def test_distribution_loss_logs_a_positive_divergence_and_no_policy_gradient(tiny_assets, tmp_path, loss_mode, topk):
    run = train(
        tiny_assets,
        tmp_path,
        "distillation_trainer",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
        f"actor_rollout_ref.actor.distill.topk={topk}",
    )
    assert all(value > 0 for value in every_step(run, "actor/kl_loss"))  # two different random models
    assert every_step(run, "actor/distillation_mode") == [1.0] * STEPS
    assert every_step(run, "actor/pg_loss") == [0.0] * STEPS
    # the teacher's top-k came from the reference pass with the batch: the share of sampled tokens it
    # holds is a fraction, and all of them when it is the whole vocabulary
    coverage = every_step(run, "actor/teacher_topk_coverage")
    if topk == WHOLE_VOCABULARY:
        assert coverage == [1.0] * STEPS
    else:
        assert all(0 < value <= 1 for value in coverage)


def test_hybrid_ppo_with_a_critic_logs_both_terms_and_the_value_loss(tiny_assets, tmp_path):
    scorer = tmp_path / "digit_fraction.py"
    scorer.write_text(DIGIT_FRACTION_SCORER)
    run = train(
        tiny_assets,
        tmp_path,
        "distillation_hybrid_trainer",
        f"reward.custom_reward_function.path={scorer}",
        "algorithm.adv_estimator=gae",
        "actor_rollout_ref.rollout.n=1",
        "critic.enable=true",
        f"critic.model.path={tiny_assets.student}",
        "critic.ppo_micro_batch_size_per_gpu=4",
    )
    assert all(value > 0 for value in every_step(run, "actor/kl_loss"))
    every_step(run, "actor/pg_loss")
    every_step(run, "critic/vf_loss")
