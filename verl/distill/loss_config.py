"""Options of verl-distill's losses, mounted on the actor config as ``actor_rollout_ref.actor.distill``,
and the switch of the divergence to the teacher measured at validation (verl-distill's one node of options).

The loss code reads ``getattr(actor_config, "distill", None)`` and falls back to
``DistillLossConfig()``, so the losses also run with verl's plain ``ActorConfig``.
"""

import math
from dataclasses import dataclass, field

from verl.base_config import BaseConfig
from verl.distill.response_selection import SELECT_STRATEGIES

CONFIG_KEY = "actor_rollout_ref.actor.distill"


@dataclass
class DistillLossConfig(BaseConfig):
    """Options of the distillation losses; see each field's ``help`` for its default and effect."""

    log_ratio_clamp: float = field(
        default=2.5,
        metadata={
            "help": (
                "Default 2.5. Upper bound c on the log-ratio log teacher(y) - log student(y) used for the "
                "*gradient* of low_var_kl (k3) on the sampled token y: the gradient with respect to the "
                "student's log-prob is 1 - min(teacher/student, e^c), so a token the teacher likes far more "
                "than the student still pulls the student up, with a bounded weight. The loss *value* stays "
                "verl's (clamped to [-10, 10]), so actor/kl_loss is comparable with verl's. 2.5 is about where "
                "verl's value clamp starts (k3 = 10 at a log-ratio of 2.61): up to there the gradient is "
                "exactly k3's, and beyond it stays below the steepest gradient verl's own low_var_kl "
                "produces (12.6; here e^2.5 - 1 = 11.2), where verl's drops to zero. Larger values weight rare "
                "teacher-preferred tokens more (faster with plain SGD, noisier); must lie in (0, 20]."
            )
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": (
                "Default 1.0. Divides the teacher's and the student's logits alike before the "
                "distribution-level losses (forward_kl_topk, reverse_kl_topk, jsd_topk) compare them. "
                "The sampled-token losses (distillation with kl_loss_type) do not use it: they compare the "
                "log-probs verl's engine computed, at actor_rollout_ref.rollout.temperature for both models. "
                "Must be > 0."
            )
        },
    )
    topk: int = field(
        default=32,
        metadata={
            "help": (
                "Default 32. Number k of the teacher's most likely tokens kept per position for the "
                "distribution-level losses; the rest of the vocabulary is one tail bucket, so each loss is "
                "an exact divergence between (k+1)-category distributions. Larger k: closer to the "
                "full-vocabulary divergence, more bytes carried with the batch (8k + 4 per response token). "
                "Between 1 and the tokenizer's length N; k = N is the exact full-vocabulary divergence."
            )
        },
    )
    logits_chunk_tokens: int = field(
        default=64,
        metadata={
            "help": (
                "Default 64. The distribution-level losses (forward_kl_topk, reverse_kl_topk, jsd_topk) and the "
                "teacher's top-k in the reference pass handle the vocabulary-sized logits of at most this many "
                "response tokens at a time, and the losses keep no vocabulary-sized tensor for the backward "
                "(they recompute each chunk's log-softmax there). Their working memory is then about two "
                "float32 blocks of this many tokens x the vocabulary (39 MB each at 64 tokens and a 152k "
                "vocabulary) whatever the micro-batch size; the update adds the logits' gradient, which any "
                "loss on the logits needs. Values and gradients do not depend on it; larger means fewer, "
                "bigger operations. Must be >= 1."
            )
        },
    )

    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": (
                "Default 0.5. Interpolation beta of jsd_topk: 0 gives the forward KL(teacher||student), 1 the "
                "reverse KL(student||teacher), values in between the generalized Jensen-Shannon divergence "
                "of GKD (Agarwal et al.) with mixture beta*teacher + (1-beta)*student, scaled by "
                "1/(beta*(1-beta)) so that it is continuous in beta. Must lie in [0, 1]."
            )
        },
    )
    teacher_log_prob_floor: float = field(
        default=-50.0,
        metadata={
            "help": (
                "Default -50.0. Teacher log-probs below this value (including -inf from masked logits and an "
                "empty tail bucket) are raised to it before any loss. A token the teacher rules out then "
                "costs a large but finite amount (about |floor| nats) instead of infinity, and loss and "
                "gradient stay finite. e^-50 is about 2e-22, far below any probability that matters. "
                "Must be finite and < 0."
            )
        },
    )

    rl_coef: float = field(
        default=1.0,
        metadata={
            "help": (
                "Default 1.0. Used by loss_mode=hybrid only: weight of the policy-gradient term, verl's policy "
                "loss (distill.rl_policy_loss) on the task advantages the trainer computed from the reward "
                "manager's scores (GRPO, or GAE with a critic). loss = rl_coef * pg_loss + distillation_coef * "
                "kl_loss. 0 leaves pure distillation. Must be finite and >= 0, and not 0 together with "
                "distillation_coef."
            )
        },
    )
    distillation_coef: float = field(
        default=1.0,
        metadata={
            "help": (
                "Default 1.0. Used by loss_mode=hybrid only: weight of the distillation term, the sampled-token "
                "KL(student || teacher) with the actor.kl_loss_type estimator. It replaces actor.kl_loss_coef, "
                "which hybrid does not read (so the teacher term is never weighted twice): "
                "hybrid with rl_coef=0 and distillation_coef=c is the distillation loss with kl_loss_coef=c. "
                "0 leaves verl's policy loss alone. Must be finite and >= 0, and not 0 together with rl_coef."
            )
        },
    )
    rl_policy_loss: str = field(
        default="vanilla",
        metadata={
            "help": (
                "Default vanilla. The PPO-clip loss. Used by loss_mode=hybrid only: the name, in verl's policy-loss "
                "registry (vanilla, gspo, sapo, gpg, clip_cov, kl_cov, geo_mean, cispo, ...), of the "
                "policy-gradient term. It plays the part of actor.policy_loss.loss_mode in a plain RL run, "
                "which holds 'hybrid' here; the chosen loss still reads its own options from "
                "actor.policy_loss (e.g. clip_cov_ratio) and the actor's clip ratios."
            )
        },
    )

    validation_teacher_kl: bool = field(
        default=True,
        metadata={
            "help": (
                "Default True. At every validation (trainer.test_freq, and before training with "
                "trainer.val_before_train), the student and the teacher each run one forward pass over the "
                "student's validation responses, and the per-token KL(student || teacher) estimate k3 is logged "
                "as val-core/<data_source>/teacher_kl/mean@<n> (verl.distill.validation_teacher_kl). false skips "
                "both passes. Costs no generation; measured in trainer.v1.trainer_mode=sync."
            )
        },
    )

    select_strategy: str = field(
        default="all",
        metadata={
            "help": (
                "Default all. Which of each prompt's rollout.n responses the teacher scores (loss_mode "
                "distillation or hybrid, GKD inside PPO): all; random (select_k drawn reproducibly from "
                "data.seed, the step and the prompt); best / worst (the select_k with the highest / lowest "
                "task reward, ties broken by the same draw; needs a reward manager other than distillation). "
                "The teacher's forward pass runs on the selected responses only, so its cost falls to about "
                "select_k / rollout.n; the KL to the teacher is the token mean over their tokens, while the "
                "hybrid loss's policy-gradient term still uses every response."
            )
        },
    )
    select_k: int = field(
        default=1,
        metadata={
            "help": (
                "Default 1. Responses per prompt the teacher scores when select_strategy is not all "
                "(ignored with all). 1 <= select_k < rollout.n; a prompt group with fewer rows than select_k "
                "is scored whole."
            )
        },
    )

    def __post_init__(self):
        self._require(0 < self.log_ratio_clamp <= 20, "log_ratio_clamp", "must lie in (0, 20]", "2.5")
        self._require(self.temperature > 0, "temperature", "must be > 0", "1.0")
        self._require(self.topk >= 1, "topk", "must be >= 1", "32")
        self._require(self.logits_chunk_tokens >= 1, "logits_chunk_tokens", "must be >= 1", "64")
        self._require(0 <= self.jsd_beta <= 1, "jsd_beta", "must lie in [0, 1]", "0.5")
        self._require(
            math.isfinite(self.teacher_log_prob_floor) and self.teacher_log_prob_floor < 0,
            "teacher_log_prob_floor",
            "must be finite and < 0",
            "-50.0",
        )
        for name in ("rl_coef", "distillation_coef"):
            value = getattr(self, name)
            self._require(math.isfinite(value) and value >= 0, name, "must be finite and >= 0", "1.0")
        self._require(
            self.rl_coef > 0 or self.distillation_coef > 0,
            "distillation_coef",
            f"and rl_coef={self.rl_coef!r} are both 0, so the hybrid loss would train nothing",
            "1.0",
        )
        self._require(
            self.select_strategy in SELECT_STRATEGIES,
            "select_strategy",
            f"is not a selection strategy (valid: {', '.join(SELECT_STRATEGIES)})",
            "all",
        )
        self._require(
            isinstance(self.select_k, int) and not isinstance(self.select_k, bool) and self.select_k >= 1,
            "select_k",
            "must be a whole number >= 1",
            "1",
        )
        self._require(
            isinstance(self.rl_policy_loss, str) and self.rl_policy_loss != "",
            "rl_policy_loss",
            "must name one of verl's policy losses",
            "vanilla",
        )

        self._require(
            isinstance(self.validation_teacher_kl, bool), "validation_teacher_kl", "must be true or false", "true"
        )

    def _require(self, condition: bool, name: str, rule: str, default: str) -> None:
        if not condition:
            raise ValueError(
                f"{CONFIG_KEY}.{name}={getattr(self, name)!r} {rule}; set it to a valid value (default {default})"
            )
