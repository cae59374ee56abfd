"""GKD inside PPO with a selection strategy: hybrid GRPO (rollout.n = 4) whose teacher scores only the
best response of each prompt, 5 training steps on a CPU through ``python -m verl.trainer.main_ppo``.

One run checks, at every step, the share of responses selected, that the reference (teacher) pass
scored exactly those rows and tokens, and that both loss terms train, weighted and logged apart (the
hybrid loss's end-to-end test: selecting all responses differs only in the rows the teacher scores).
"""

import math

import pytest
from test_e2e_loss_modes import STEPS, every_step, train_hybrid
from trainer_runs import TINY_RUN

pytestmark = pytest.mark.slow

N, K = 4, 1
PROMPTS = int(next(o for o in TINY_RUN if o.startswith("data.train_batch_size=")).split("=")[1])


def test_hybrid_grpo_with_the_teacher_on_the_best_response_of_each_prompt(tiny_assets, tmp_path):
    run = train_hybrid(
        tiny_assets,
        tmp_path,
        f"actor_rollout_ref.rollout.n={N}",
        "actor_rollout_ref.actor.distill.select_strategy=best",
        f"actor_rollout_ref.actor.distill.select_k={K}",
        "actor_rollout_ref.actor.distill.rl_coef=0.5",
        "actor_rollout_ref.actor.distill.distillation_coef=2.0",
        f"trainer.test_freq={STEPS}",
        # sized for the whole batch of PROMPTS * N rows, as for a stock reference pass: the teacher's
        # PROMPTS * K rows need smaller micro-batches, which the selective pass picks
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={PROMPTS * N}",
    )
    assert every_step(run, "distill/select_ratio") == [K / N] * STEPS
    # the reference worker scored (and returned) one row per prompt, not N
    assert every_step(run, "distill/teacher_rows") == [PROMPTS * K] * STEPS

    teacher_tokens, share = every_step(run, "distill/teacher_tokens"), every_step(run, "distill/teacher_token_share")
    prompt_mean, response_mean = every_step(run, "prompt_length/mean"), every_step(run, "response_length/mean")
    shortest = [p + r for p, r in zip(every_step(run, "prompt_length/min"), every_step(run, "response_length/min"))]
    longest = [p + r for p, r in zip(every_step(run, "prompt_length/max"), every_step(run, "response_length/max"))]
    for step in range(STEPS):
        # a stock reference pass scores every prompt + response token of the batch: the share is of those
        stock_tokens = PROMPTS * N * (prompt_mean[step] + response_mean[step])
        assert teacher_tokens[step] / share[step] == pytest.approx(stock_tokens, rel=1e-6)
        assert shortest[step] * PROMPTS * K <= teacher_tokens[step] <= longest[step] * PROMPTS * K
        assert share[step] < 1

    # both terms train, the KL on the selected responses, the policy gradient on all of them, and the
    # optimised loss is the weighted sum of the two separately logged terms
    assert every_step(run, "actor/rl_coef") == [0.5] * STEPS
    assert every_step(run, "actor/distillation_coef") == [2.0] * STEPS
    kl_loss, pg_loss = every_step(run, "actor/kl_loss"), every_step(run, "actor/pg_loss")
    assert all(value > 0 for value in kl_loss)
    assert every_step(run, "actor/loss") == pytest.approx(
        [0.5 * pg + 2.0 * kl for pg, kl in zip(pg_loss, kl_loss, strict=True)], rel=1e-4, abs=1e-5
    )
    every_step(run, "actor/pg_clipfrac")
    every_step(run, "actor/teacher_log_prob_mean")
    every_step(run, "timing_s/ref")
    # the naive reward manager scored the samples and GRPO turned the scores into non-zero advantages
    assert any(value > 0 for value in every_step(run, "critic/score/max"))
    assert any(value > 0 for value in every_step(run, "critic/advantages/max"))
    # the teacher also scored every validation response after the last step (n = 1 in validation)
    teacher_kl = run.series("val-core/openai/gsm8k/teacher_kl/mean@1")
    assert len(teacher_kl) == 1 and math.isfinite(teacher_kl[0]) and teacher_kl[0] > 0
