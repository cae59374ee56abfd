"""The actor config of the distillation trainer configs: verl's, plus the distillation loss options.

``actor_rollout_ref.actor._target_`` in ``distillation_trainer.yaml`` (FSDP) and
``distillation_megatron_trainer.yaml`` (Megatron) names these classes, and their ``distill`` node
(``actor_rollout_ref.actor.distill``) holds :class:`DistillLossConfig`. verl's own actor configs
refuse unknown keys, so the options need a field of their own.
"""

from dataclasses import dataclass, field

from verl.distill.compat import require_distillation_run
from verl.distill.loss_config import DistillLossConfig
from verl.workers.config import FSDPActorConfig, McoreActorConfig


@dataclass
class FSDPDistillActorConfig(FSDPActorConfig):
    """verl's FSDP actor config with the distillation loss options in ``distill``."""

    distill: DistillLossConfig = field(default_factory=DistillLossConfig)

    def __post_init__(self):
        super().__post_init__()
        require_distillation_run()


@dataclass
class McoreDistillActorConfig(McoreActorConfig):
    """verl's Megatron actor config with the distillation loss options in ``distill``."""

    distill: DistillLossConfig = field(default_factory=DistillLossConfig)

    def __post_init__(self):
        super().__post_init__()
        require_distillation_run()
