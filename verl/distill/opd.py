"""Policy-gradient on-policy distillation (the Thinking Machines recipe) as a verl advantage estimator.

With ``algorithm.use_kl_in_reward=true``, ``algorithm.kl_penalty=kl`` and a fixed coefficient of 1,
verl writes, for every response token t sampled from the student π, the reward

    r_t = score_t - (log π(y_t) - log ν(y_t))

where ν is the teacher in the reference slot and score_t the reward manager's score (zero with the
``distillation`` reward manager; the task reward at the last token in a hybrid run). ``opd`` takes
that per-token reward as the token's advantage, with no discount and no baseline:

    A_t = r_t = -(log π(y_t) - log ν(y_t))   (+ score at the last token)

so verl's policy loss (vanilla or clipped, with its importance ratio against the rollout
log-probs) raises the log-probability of tokens the teacher likes more than the student does, and
lowers the others. The advantage carries no gradient: it is computed from the old (rollout-time)
log-probs. One sample per prompt is enough; no KL loss term is needed.
"""

import torch

from verl.trainer.ppo.core_algos import register_adv_est

OPD_ESTIMATOR = "opd"


@register_adv_est(OPD_ESTIMATOR)
def compute_opd_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, **kwargs):
    """Per-token advantage = per-token reward (reverse-KL sample plus any task score); returns = advantages."""
    advantages = (token_level_rewards * response_mask).detach()
    return advantages, advantages
