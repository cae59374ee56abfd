"""Registry of the actor's losses: ``actor_rollout_ref.actor.policy_loss.loss_mode`` -> loss function.

A loss function has the engine's calling convention, that of verl's ``ppo_loss``::

    fn(config, model_output, data, dp_group=None) -> (loss, metrics)

Resolution: a name registered here first (``distillation``, ``ppo``); then any name in verl's
``POLICY_LOSS_REGISTRY`` (vanilla, gspo, ...) resolves to verl's ``ppo_loss``, which looks that name
up itself, so the stock ``policy_loss.loss_mode`` keeps working. ``ppo`` names ``ppo_loss`` for code
that asks for it by name; as a ``loss_mode`` value use a verl policy-loss name, because ``ppo_loss``
resolves its policy loss from that same key.
"""

from typing import Any, Callable

import torch

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, compute_policy_loss_vanilla, register_policy_loss
from verl.workers.roles.utils.distribution_losses import forward_kl_topk_loss, jsd_topk_loss, reverse_kl_topk_loss
from verl.workers.roles.utils.hybrid_loss import hybrid_loss
from verl.workers.roles.utils.losses import distillation_loss
from verl.workers.utils.losses import ppo_loss

LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"

LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]

LOSS_REGISTRY: dict[str, LossFn] = {}
DISTILLATION_LOSS_MODES: set[str] = set()
TEACHER_LOGITS_LOSS_MODES: set[str] = set()


def register_loss(
    name: str, *, distillation: bool = False, teacher_logits: bool = False
) -> Callable[[LossFn], LossFn]:
    """Register a loss under ``name``; ``distillation=True`` marks it as training toward the teacher,
    ``teacher_logits=True`` as needing the teacher's whole distribution in the actor update.

    Registering a different function under a taken name raises instead of silently replacing it.
    """

    def decorator(fn: LossFn) -> LossFn:
        registered = LOSS_REGISTRY.get(name)
        if registered is not None and registered is not fn:
            raise ValueError(
                f"loss mode {name!r} is already registered to {registered.__module__}.{registered.__qualname__}; "
                f"register {fn.__qualname__} under another name"
            )
        LOSS_REGISTRY[name] = fn
        if distillation:
            DISTILLATION_LOSS_MODES.add(name)
        if teacher_logits:
            TEACHER_LOGITS_LOSS_MODES.add(name)
        return fn

    return decorator


def valid_loss_modes() -> list[str]:
    """Every accepted ``loss_mode``: ours, then verl's policy losses (read now: late registrations count)."""
    return [*LOSS_REGISTRY, *(name for name in POLICY_LOSS_REGISTRY if name not in LOSS_REGISTRY)]


def get_loss_fn(loss_mode: str) -> LossFn:
    """The loss function for ``loss_mode``; ``ValueError`` listing every valid name when unknown."""
    if loss_mode in LOSS_REGISTRY:
        return LOSS_REGISTRY[loss_mode]
    if loss_mode in POLICY_LOSS_REGISTRY:
        return ppo_loss
    raise ValueError(f"Unknown {LOSS_MODE_KEY}={loss_mode!r}; valid loss modes: {', '.join(valid_loss_modes())}")


def is_distillation_mode(loss_mode: str) -> bool:
    """Whether ``loss_mode`` is a distillation loss (False for verl's policy losses and unknown names)."""
    return loss_mode in DISTILLATION_LOSS_MODES


def needs_teacher_logits(loss_mode: str) -> bool:
    """Whether ``loss_mode`` compares whole distributions, so the actor update needs the teacher's logits."""
    return loss_mode in TEACHER_LOGITS_LOSS_MODES


# `ppo` is also a valid policy_loss.loss_mode value: verl's ppo_loss then looks the same name up in
# verl's policy-loss registry, where it means the vanilla PPO-clip loss.
register_policy_loss("ppo")(compute_policy_loss_vanilla)
register_loss("ppo")(ppo_loss)
register_loss("distillation", distillation=True)(distillation_loss)
register_loss("forward_kl_topk", distillation=True, teacher_logits=True)(forward_kl_topk_loss)
register_loss("reverse_kl_topk", distillation=True, teacher_logits=True)(reverse_kl_topk_loss)
register_loss("jsd_topk", distillation=True, teacher_logits=True)(jsd_topk_loss)
register_loss("hybrid", distillation=True)(hybrid_loss)
