"""Divergences between the student pi and the teacher nu.

Two families, computed in float32 (float64 over the k+1 categories) whatever the input dtype:

* Sampled-token estimators of KL(pi || nu) (verl's ``kl_penalty`` family): at each response
  position they see only log pi(y) and log nu(y) of the token y the student sampled. The
  ``distillation`` loss uses them with ``actor.kl_loss_type``.
* Distribution-level divergences over the teacher's top-k tokens plus ONE tail bucket holding all
  remaining mass, so that each is an exact divergence between two (k+1)-category distributions
  (never negative; a student cannot lower it by shrinking its mass on the top-k set).
"""

import functools
import math
from typing import NamedTuple

import torch

from verl.distill.chunked_topk import logsumexp_in_place, student_topk_log_probs
from verl.distill.loss_config import CONFIG_KEY, DistillLossConfig

_DEFAULTS = DistillLossConfig()
KL_LOSS_TYPE_KEY = "actor_rollout_ref.actor.kl_loss_type"

# verl's low_var_kl clamps the log-ratio to +-20 and the value to [-10, 10]; ours reports the same value.
VERL_LOG_RATIO_BOUND = 20.0
VERL_K3_VALUE_BOUND = 10.0

# ---------------------------------------------------------------------------------------------
# Sampled-token estimators. Notation: r = log pi(y) - log nu(y) on the sampled token y ~ pi.
# ---------------------------------------------------------------------------------------------


def log_ratio_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = r. Unbiased for KL(pi || nu) but negative on many tokens; dr/d log pi = 1 ignores the teacher."""
    return log_ratio


def squared_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = r^2 / 2 >= 0. Gradient r * grad log pi(y): its expectation under pi is grad KL(pi || nu)."""
    return 0.5 * log_ratio.square()


def abs_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """|r| >= 0. Gradient sign(r) * grad log pi(y): a unit step toward the teacher's log-prob."""
    return log_ratio.abs()


def low_var_kl(log_ratio: torch.Tensor, log_ratio_clamp: float = _DEFAULTS.log_ratio_clamp) -> torch.Tensor:
    """k3 (``low_var_kl``) with verl's value and a gradient that survives verl's clamp.

    k3(r) = e^{-r} + r - 1 >= 0, with E_{y~pi}[k3] = KL(pi || nu).

    Value: exactly verl's, min(k3(clamp(r, -20, 20)), 10), so ``actor/kl_loss`` reads like verl's.

    Gradient: dk3/dr = 1 - e^{-r} = 1 - nu(y)/pi(y). Behind verl's value clamp it is 0 as soon as
    k3 > 10, i.e. when the teacher gives y more than ~13.6x the student's probability (r < -2.61)
    or less than e^{-11} of it (r > 11): exactly the tokens the student most needs to learn from.
    Here instead, with c = ``log_ratio_clamp``::

        dL/dr = 1 - min(nu(y)/pi(y), e^c)          (straight-through: k3's gradient at max(r, -c))

    * r >= -c: k3's exact gradient (with c = 2.5: wherever verl's gradient is non-zero, up to the
      last 0.11 before its clamp at r = -2.61).
    * r < -c: the importance weight nu/pi is truncated at e^c, so |dL/dr| <= e^c - 1 (11.2 for
      c = 2.5, just under the steepest gradient verl's own clamped k3 gives, 12.6): a teacher that is sure
      of y still pulls log pi(y) up, with a bounded, finite step.
    * r > 0 (student over-confident in y): 1 - e^{-r} lies in (0, 1), exact, never clamped, also
      beyond r = 11 where verl's gradient is 0.

    In expectation over y ~ pi the untruncated gradient is sum_y (pi - nu) grad log pi = grad KL(nu || pi):
    as a loss, k3 follows the forward KL through importance weights nu/pi. Truncating the weights
    trades that unbiasedness for bounded variance, as truncated importance sampling does.
    """
    detached = log_ratio.detach()
    bounded = detached.clamp(-VERL_LOG_RATIO_BOUND, VERL_LOG_RATIO_BOUND)
    value = (torch.exp(-bounded) + bounded - 1).clamp(-VERL_K3_VALUE_BOUND, VERL_K3_VALUE_BOUND)
    truncated_weight = torch.exp(torch.clamp(-detached, max=log_ratio_clamp))
    surrogate = (1 - truncated_weight) * log_ratio
    return value + (surrogate - surrogate.detach())


def with_k2_gradient(value: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """The ``+`` suffix (verl's ``k3+``): the value of ``value``, the gradient r * grad log pi(y) of k2."""
    squared = squared_log_ratio(log_ratio)
    return value.detach() + (squared - squared.detach())


_ESTIMATORS = {
    "low_var_kl": low_var_kl,
    "k3": low_var_kl,
    "k2": squared_log_ratio,
    "mse": squared_log_ratio,
    "abs": abs_log_ratio,
    "k1": log_ratio_k1,
    "kl": log_ratio_k1,
}
# Their gradient as a loss is grad log pi(y) whatever the teacher says: it only lowers the student's
# own log-prob. With '+' (k2's gradient) they are fine: k1+ reports the unbiased k1 value.
_BLIND_TO_TEACHER = ("k1", "kl")


def sampled_kl_estimator_names() -> list[str]:
    """Every estimator accepted as a loss: the base names but k1/kl, and every base name with ``+``."""
    bases = [name for name in _ESTIMATORS if name not in _BLIND_TO_TEACHER]
    return bases + [f"{name}+" for name in _ESTIMATORS]


def check_sampled_kl_estimator(estimator: str) -> None:
    """Raise ``ValueError`` (naming ``actor.kl_loss_type`` and the fix) unless ``estimator`` can train a student."""
    if estimator in _BLIND_TO_TEACHER:
        raise ValueError(
            f"{KL_LOSS_TYPE_KEY}={estimator!r} cannot train a student: as a loss, k1 = log pi(y) - log nu(y) has "
            f"the gradient of log pi(y) alone, which does not involve the teacher; use low_var_kl (default), "
            f"k3+, k2 or k1+ (k1's value with k2's gradient)"
        )
    if estimator not in sampled_kl_estimator_names():
        raise ValueError(
            f"Unknown {KL_LOSS_TYPE_KEY}={estimator!r}; valid: {', '.join(sampled_kl_estimator_names())}"
        )


def sampled_token_kl(
    student_log_prob: torch.Tensor,
    teacher_log_prob: torch.Tensor,
    estimator: str = "low_var_kl",
    *,
    log_ratio_clamp: float = _DEFAULTS.log_ratio_clamp,
    teacher_log_prob_floor: float = _DEFAULTS.teacher_log_prob_floor,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || nu) on sampled tokens, differentiable in ``student_log_prob`` only.

    r = log pi(y) - max(log nu(y), floor) in float32; the teacher is a fixed target (detached), and
    the floor keeps -inf teacher log-probs finite. Estimators: low_var_kl/k3 (see ``low_var_kl``),
    k2/mse, abs, and any of them or k1/kl with ``+`` (value of the base, gradient of k2).
    """
    check_sampled_kl_estimator(estimator)
    base = estimator.removesuffix("+")
    teacher = teacher_log_prob.detach().float().clamp(min=teacher_log_prob_floor)
    log_ratio = student_log_prob.float() - teacher
    estimate = _ESTIMATORS[base]
    if estimate is low_var_kl:
        estimate = functools.partial(low_var_kl, log_ratio_clamp=log_ratio_clamp)
    value = estimate(log_ratio)
    if estimator.endswith("+"):
        value = with_k2_gradient(value, log_ratio)
    return value


# ---------------------------------------------------------------------------------------------
# Distribution-level divergences over the teacher's top-k tokens plus one tail bucket.
# p = teacher, q = student, both over the categories (top-k token 1, ..., top-k token k, tail).
# ---------------------------------------------------------------------------------------------

# 1 / beta stays finite in float64 above this; a smaller (subnormal) beta is the beta = 0 endpoint.
_SMALLEST_NORMAL_BETA = torch.finfo(torch.float64).tiny
# Below this log-ratio p << q and p * e^{-d} would overflow; see _kl_terms.
_FAR_LOG_RATIO = -30.0


class TeacherTopK(NamedTuple):
    """The teacher's top-k tokens at each position; ship these three tensors, never full rows."""

    ids: torch.Tensor  # [..., k] int64, by decreasing probability
    log_probs: torch.Tensor  # [..., k] float32, normalized over the whole valid vocabulary
    tail_log_prob: torch.Tensor  # [...] float32, log of the mass outside the top-k (-inf when k = V)


@torch.no_grad()
def teacher_topk(
    teacher_logits: torch.Tensor,
    k: int = _DEFAULTS.topk,
    temperature: float = _DEFAULTS.temperature,
    valid_vocab_size: int | None = None,
) -> TeacherTopK:
    """The teacher's k most likely tokens per position, their log-probs and the tail's log-mass.

    log nu = log_softmax(z[..., :valid_vocab_size] / T) over the tokenizer's vocabulary only: embedding
    rows beyond it (vocabularies padded to a multiple of 64 or 128) are neither candidates nor mass.
    The tail is logsumexp of log nu over the other tokens, exact even when it is 1e-20, where
    1 - sum(top-k probs) would be float32 rounding noise.
    """
    vocab_rows = teacher_logits.shape[-1]
    vocab_size = vocab_rows if valid_vocab_size is None else valid_vocab_size
    if not 1 <= vocab_size <= vocab_rows:
        raise ValueError(
            f"teacher_topk: valid_vocab_size={valid_vocab_size} must lie in [1, {vocab_rows}] (the teacher's "
            f"logit rows); pass the tokenizer's length"
        )
    if not 1 <= k <= vocab_size:
        raise ValueError(f"{CONFIG_KEY}.topk={k} must lie in [1, {vocab_size}] (the valid vocabulary); lower it")
    if not temperature > 0:
        raise ValueError(f"{CONFIG_KEY}.temperature={temperature} must be > 0; set it to e.g. 1.0")
    scaled = teacher_logits[..., :vocab_size].float()
    if temperature != 1.0:  # x / 1 is x: no vocabulary-sized copy for nothing
        scaled = scaled / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    top_log_probs, top_ids = log_probs.topk(k, dim=-1)
    # log_probs is ours from here on: the tail is reduced in its memory, no vocabulary-sized copy
    tail = logsumexp_in_place(log_probs.scatter_(-1, top_ids, -math.inf))
    return TeacherTopK(top_ids, top_log_probs, tail)


def _topk_with_tail(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    teacher_tail_log_prob: torch.Tensor | None,
    temperature: float,
    teacher_log_prob_floor: float,
    rows: torch.Tensor | None,
    valid_vocab_size: int | None,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log q and log p over the k+1 categories, shape [..., k+1], float64.

    Student: log q = log_softmax(z / T) (float32 over the vocabulary) gathered at the teacher's ids;
    its tail is the logsumexp over every other row of its vocabulary (exact). Feeding log-probs
    instead of logits is the same: log_softmax ignores a shift. Computed ``chunk_tokens`` rows at a
    time, without keeping vocabulary-sized tensors for the backward (:mod:`verl.distill.chunked_topk`);
    with ``rows``, ``student_logits`` is [N, V] and only those rows are scored (no copy of the rest).
    Teacher: the given top-k log-probs and tail; without a tail (e.g. top-k log-probs from an
    inference server), log(1 - sum exp(top-k)), which is only as precise as float32 rounding of a
    near-certain top-1 allows. When the ids cover every student row the tail is empty on both sides.
    Every teacher log-prob is then raised to ``teacher_log_prob_floor`` (-inf included).
    The k+1 categories are few, so they are handled in float64: the mixture terms of ``jsd_topk``
    are O(beta^2) and must not drown in rounding before being divided by beta.
    """
    if not temperature > 0:
        raise ValueError(f"{CONFIG_KEY}.temperature={temperature} must be > 0; set it to e.g. 1.0")
    k = teacher_topk_ids.shape[-1]
    student_flat, covered = student_topk_log_probs(
        student_logits if rows is not None else student_logits.reshape(-1, student_logits.shape[-1]),
        teacher_topk_ids.reshape(-1, k),
        rows=rows,
        vocab_size=valid_vocab_size,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    positions = teacher_topk_ids.shape[:-1]
    student = student_flat.reshape(*positions, k + 1).double()

    teacher_topk_lp = teacher_topk_log_probs.detach().double()
    if teacher_tail_log_prob is None:
        remainder = 1 - teacher_topk_lp.exp().sum(dim=-1, keepdim=True)
        teacher_tail = remainder.clamp(min=0).log()
    else:
        teacher_tail = teacher_tail_log_prob.detach().double().unsqueeze(-1)
    teacher_tail = teacher_tail.masked_fill(covered.reshape(*positions, 1), -math.inf)
    teacher = torch.cat([teacher_topk_lp, teacher_tail], dim=-1).clamp(min=teacher_log_prob_floor)
    return student, teacher


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-category terms p log(p/q) - p + q of KL(p || q), each >= 0 even in floating point.

    They sum to KL(p || q) when p and q are normalized (the -p + q parts cancel). With
    d = log p - log q the term is p * phi(d), phi(d) = d + e^{-d} - 1 >= 0 (computed with expm1, whose
    rounding cannot push it below 0); for d < -30 (p << q), where e^{-d} overflows, the same term is
    p (d - 1) + q. Both branches are kept finite so autograd through ``where`` stays finite.
    """
    log_ratio = log_p - log_q
    near = log_ratio > _FAR_LOG_RATIO
    near_ratio = torch.where(near, log_ratio, torch.zeros_like(log_ratio))
    p = log_p.exp()
    near_term = p * (near_ratio + torch.expm1(-near_ratio))
    far_term = p * (log_ratio - 1) + log_q.exp()
    return torch.where(near, near_term, far_term)


def forward_kl_topk(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    *,
    teacher_tail_log_prob: torch.Tensor | None = None,
    temperature: float = _DEFAULTS.temperature,
    teacher_log_prob_floor: float = _DEFAULTS.teacher_log_prob_floor,
    rows: torch.Tensor | None = None,
    valid_vocab_size: int | None = None,
    chunk_tokens: int = _DEFAULTS.logits_chunk_tokens,
) -> torch.Tensor:
    """Per-position KL(p_teacher || q_student) over the top-k tokens plus the tail bucket, shape [...], float32.

    sum_{c in top-k + tail} p_c log(p_c / q_c) (mass-covering). ``student_logits`` [..., V] (or
    log-probs); the teacher's tensors as returned by :func:`teacher_topk` (pass its
    ``tail_log_prob``). With k = V it is the exact full-vocabulary KL. ``valid_vocab_size`` leaves
    padded embedding rows out of the student's tail; ``rows`` scores only those rows of a [N, V]
    ``student_logits``; ``chunk_tokens`` bounds how many rows' vocabulary-sized tensors exist at once
    (same values and gradients for any chunk size).
    """
    student, teacher = _topk_with_tail(
        student_logits,
        teacher_topk_ids,
        teacher_topk_log_probs,
        teacher_tail_log_prob,
        temperature,
        teacher_log_prob_floor,
        rows,
        valid_vocab_size,
        chunk_tokens,
    )
    return _kl_terms(teacher, student).sum(dim=-1).float()


def reverse_kl_topk(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    *,
    teacher_tail_log_prob: torch.Tensor | None = None,
    temperature: float = _DEFAULTS.temperature,
    teacher_log_prob_floor: float = _DEFAULTS.teacher_log_prob_floor,
    rows: torch.Tensor | None = None,
    valid_vocab_size: int | None = None,
    chunk_tokens: int = _DEFAULTS.logits_chunk_tokens,
) -> torch.Tensor:
    """Per-position KL(q_student || p_teacher) over the top-k tokens plus the tail bucket, shape [...], float32.

    sum_c q_c log(q_c / p_c) (mode-seeking). Thanks to the tail bucket the student cannot lower it by
    moving mass off the top-k set: that mass is charged against the teacher's tail. A category the
    teacher rules out costs at most about |teacher_log_prob_floor| nats per unit of student mass.
    """
    student, teacher = _topk_with_tail(
        student_logits,
        teacher_topk_ids,
        teacher_topk_log_probs,
        teacher_tail_log_prob,
        temperature,
        teacher_log_prob_floor,
        rows,
        valid_vocab_size,
        chunk_tokens,
    )
    return _kl_terms(student, teacher).sum(dim=-1).float()


def jsd_topk(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    *,
    teacher_tail_log_prob: torch.Tensor | None = None,
    beta: float = _DEFAULTS.jsd_beta,
    temperature: float = _DEFAULTS.temperature,
    teacher_log_prob_floor: float = _DEFAULTS.teacher_log_prob_floor,
    rows: torch.Tensor | None = None,
    valid_vocab_size: int | None = None,
    chunk_tokens: int = _DEFAULTS.logits_chunk_tokens,
) -> torch.Tensor:
    """Per-position generalized Jensen-Shannon divergence, continuous in ``beta``, shape [...], float32.

    With m = beta p + (1 - beta) q over the top-k tokens plus the tail bucket (GKD, Agarwal et al.)::

        JSD_beta(p, q) = [beta KL(p || m) + (1 - beta) KL(q || m)] / (beta (1 - beta)),   0 < beta < 1
        JSD_0 = KL(p || q)  (forward),   JSD_1 = KL(q || p)  (reverse)

    The endpoints are the limits of the bracket: as beta -> 0, KL(p || m) -> KL(p || q) and
    KL(q || m) = O(beta^2), so bracket / beta -> KL(p || q); symmetrically at 1. GKD/TRL report the
    bracket unscaled (which vanishes at both ends); dividing by beta (1 - beta) keeps the loss scale,
    and the learning rate, comparable across beta. At beta = 1/2 it is 4x the usual JSD (<= 4 log 2).
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"{CONFIG_KEY}.jsd_beta={beta} must lie in [0, 1]; 0 = forward KL, 1 = reverse KL")
    student, teacher = _topk_with_tail(
        student_logits,
        teacher_topk_ids,
        teacher_topk_log_probs,
        teacher_tail_log_prob,
        temperature,
        teacher_log_prob_floor,
        rows,
        valid_vocab_size,
        chunk_tokens,
    )
    if beta < _SMALLEST_NORMAL_BETA:
        return _kl_terms(teacher, student).sum(dim=-1).float()
    if beta == 1:
        return _kl_terms(student, teacher).sum(dim=-1).float()
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))
    # The bracket divided by beta (1 - beta) term by term: no product beta (1 - beta) to underflow.
    teacher_to_mixture = _kl_terms(teacher, mixture).sum(dim=-1)
    student_to_mixture = _kl_terms(student, mixture).sum(dim=-1)
    return (teacher_to_mixture / (1 - beta) + student_to_mixture / beta).float()
