"""Evaluate checkpoints of a distillation run: accuracy, KL to the teacher, response length.

A checkpoint is a Hugging Face folder (``config.json`` + weights + tokenizer), a verl FSDP actor
checkpoint (``…/global_step_N/actor``: ``model_world_size_W_rank_R.pt``, ``fsdp_config.json``,
``huggingface/``), its parent ``…/global_step_N``, or a run folder holding several ``global_step_N``
(all of them, in step order). FSDP checkpoints are merged to Hugging Face format with verl's own
:mod:`verl.model_merger` before they are loaded.

Each row of a parquet file in verl's RLHF layout (``data_source``, ``prompt`` = chat messages,
``reward_model.ground_truth``, ``extra_info``) is rendered with the tokenizer's chat template exactly
as verl's RLHFDataset does (``apply_chat_template(messages, add_generation_prompt=True)``), answered by
the checkpoint (greedy unless ``temperature > 0``) and scored:

* ``toy_addition`` rows by :func:`verl.distill.toy.reward.compute_score`,
* other data sources by verl's :func:`verl.utils.reward_score.default_compute_score`,
* every row by a user's ``compute_score`` when one is given (as verl's ``custom_reward_function``).

All inputs are checked before any model is loaded; a bad one raises :class:`EvaluationInputError`,
one line naming the file and the fix.

Modules: :mod:`~verl.distill.evaluation.checkpoints` (what to evaluate), :mod:`~.rows` (the data and
its scorers), :mod:`~.metrics` (generation, accuracy, KL), :mod:`~.reports` (JSON, markdown, plot),
:mod:`~.cli` (the run and its command line: ``python -m verl.distill.evaluation``).
"""

from verl.distill.evaluation.checkpoints import Checkpoint, infer_step, merge_fsdp_checkpoint, resolve_checkpoints
from verl.distill.evaluation.cli import EvaluationConfig, build_parser, main, plan_evaluation, run_evaluation
from verl.distill.evaluation.errors import EvaluationInputError
from verl.distill.evaluation.metrics import (
    ACCURACY_DEFINITION,
    KL_DEFINITION,
    GenerationSettings,
    LoadedModel,
    evaluate_checkpoint,
    load_model,
    token_divergences,
)
from verl.distill.evaluation.reports import plot_results, render_markdown, write_reports
from verl.distill.evaluation.rows import PROJECT_SCORERS, EvalRow, Scorer, load_rows

__all__ = [
    "ACCURACY_DEFINITION",
    "KL_DEFINITION",
    "PROJECT_SCORERS",
    "Checkpoint",
    "EvalRow",
    "EvaluationConfig",
    "EvaluationInputError",
    "GenerationSettings",
    "LoadedModel",
    "Scorer",
    "build_parser",
    "evaluate_checkpoint",
    "infer_step",
    "load_model",
    "load_rows",
    "main",
    "merge_fsdp_checkpoint",
    "plan_evaluation",
    "plot_results",
    "render_markdown",
    "resolve_checkpoints",
    "run_evaluation",
    "token_divergences",
    "write_reports",
]
