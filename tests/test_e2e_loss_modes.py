"""Every loss mode runs 5 training steps on a CPU through ``python -m verl.trainer.main_ppo``, teacher in the ref slot.

One run per mode (start-up dominates a run's cost), each checked on what it logged at every step.
Covered by other runs: `distillation` and reverse_kl_topk over the whole vocabulary (the toy learning test,
tests/test_e2e_distillation.py), forward_kl_topk with a tail bucket (the kill-and-resume test,
tests/test_e2e_reliability.py), jsd_topk with a tail bucket (GKD's on/off-policy mixing,
tests/test_e2e_policy_mixing.py) and hybrid GRPO (with a selection strategy, tests/test_e2e_selection.py).
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


def train_hybrid(tiny_assets, workdir, *overrides) -> TrainerRun:
    """A `distillation_hybrid_trainer` run whose task reward is DIGIT_FRACTION_SCORER."""
    scorer = workdir / "digit_fraction.py"
    scorer.write_text(DIGIT_FRACTION_SCORER)
    return train(
        tiny_assets, workdir, "distillation_hybrid_trainer", f"reward.custom_reward_function.path={scorer}", *overrides
    )


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


def test_hybrid_ppo_with_a_critic_logs_both_terms_and_the_value_loss(tiny_assets, tmp_path):
    run = train_hybrid(
        tiny_assets,
        tmp_path,
        "algorithm.adv_estimator=gae",
        "actor_rollout_ref.rollout.n=1",
        "critic.enable=true",
        f"critic.model.path={tiny_assets.student}",
        "critic.ppo_micro_batch_size_per_gpu=4",
    )
    assert all(value > 0 for value in every_step(run, "actor/kl_loss"))
    every_step(run, "actor/pg_loss")
    every_step(run, "critic/vf_loss")
