"""verl-distill: on-policy distillation with zero rewards for verl 0.9.1.

The student generates, a teacher held in verl's reference slot scores the student's own tokens,
and ``distillation_loss`` pulls the student toward the teacher. Everything here is added next to
verl's own files; registration runs through verl's ``verl.plugins`` entry point
(:mod:`verl.distill.plugin`).
"""

SUPPORTED_VERL_VERSION = "0.9.1"
