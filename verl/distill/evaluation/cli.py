"""The evaluation run: check every input, evaluate each checkpoint, write the reports; its command line."""

import argparse
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from verl.distill.evaluation.checkpoints import Checkpoint, hf_model_folder, resolve_checkpoint, resolve_checkpoints
from verl.distill.evaluation.errors import EvaluationInputError
from verl.distill.evaluation.metrics import (
    ACCURACY_DEFINITION,
    KL_DEFINITION,
    GenerationSettings,
    evaluate_checkpoint,
    load_model,
    pick_device,
    pick_dtype,
)
from verl.distill.evaluation.reports import write_reports
from verl.distill.evaluation.rows import EvalRow, Scorer, load_custom_scorer, load_rows


@dataclass
class EvaluationConfig:
    """Everything one evaluation run needs; the command-line options map one to one."""

    checkpoints: list[str]
    data_file: str
    output_dir: str
    teacher_path: Optional[str] = None
    compute_score: Optional[str] = None
    prompt_key: str = "prompt"
    num_samples: int = -1
    num_examples: int = 3
    temperature: float = 0.0
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    merge_dir: Optional[str] = None
    plot: bool = True


@dataclass
class EvaluationPlan:
    """The checked inputs: nothing here has loaded model weights yet."""

    checkpoints: list[Checkpoint]
    teacher: Optional[Checkpoint]
    rows: list[EvalRow]
    scorer: Scorer


def plan_evaluation(config: EvaluationConfig) -> EvaluationPlan:
    """Check every input (cheap checks first) and raise :class:`EvaluationInputError` on the first bad one."""
    _check_settings(config)
    checkpoints = resolve_checkpoints(config.checkpoints)
    if not checkpoints:
        raise EvaluationInputError("--model_path", "no checkpoint given", "pass at least one checkpoint folder")
    teacher = resolve_checkpoint(config.teacher_path) if config.teacher_path else None
    rows = load_rows(config.data_file, config.prompt_key, config.num_samples)
    scorer = Scorer(load_custom_scorer(config.compute_score) if config.compute_score else None)
    scorer.check(rows)
    if config.plot and len(checkpoints) > 1:
        _require_matplotlib()
    for checkpoint in checkpoints:
        _check_tokenizer(checkpoint)
    if teacher is not None:
        _check_tokenizer(teacher)
        for checkpoint in checkpoints:
            _check_same_tokens(checkpoint, teacher)
    return EvaluationPlan(checkpoints, teacher, rows, scorer)


def _check_settings(config: EvaluationConfig) -> None:
    if config.temperature < 0:
        raise EvaluationInputError("--temperature", f"is {config.temperature}", "use 0 (greedy) or a positive value")
    for option in ("max_new_tokens", "batch_size"):
        if getattr(config, option) < 1:
            raise EvaluationInputError(f"--{option}", f"is {getattr(config, option)}", "use a positive integer")
    if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
        raise EvaluationInputError("--device", f"is {config.device!r}", "use auto, cpu, cuda or cuda:N")
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvaluationInputError("--device", f"{config.device} but no GPU is visible", "use --device cpu or auto")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EvaluationInputError(
            "results.png", "needs matplotlib, which is not installed", "pip install matplotlib, or pass --no_plot"
        ) from None


def _check_tokenizer(checkpoint: Checkpoint) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.tokenizer_dir)
    except Exception as error:
        raise EvaluationInputError(
            str(checkpoint.tokenizer_dir),
            f"the tokenizer does not load ({type(error).__name__})",
            "save the student's tokenizer into it with tokenizer.save_pretrained",
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise EvaluationInputError(
            str(checkpoint.tokenizer_dir),
            "the tokenizer has no chat template (verl renders prompts with apply_chat_template)",
            "save a tokenizer with a chat template (e.g. the instruct model's) into the folder",
        )


def _check_same_tokens(checkpoint: Checkpoint, teacher: Checkpoint) -> None:
    from verl.distill.teacher import TokenizerMismatchError, check_tokenizers_match

    try:
        check_tokenizers_match(str(checkpoint.tokenizer_dir), str(teacher.tokenizer_dir))
    except TokenizerMismatchError as error:
        raise EvaluationInputError(
            f"--teacher_path {teacher.path}",
            f"its tokenizer differs from {checkpoint.path}'s ({error})",
            "use a teacher with the student's tokenizer: the teacher scores the student's token ids",
        ) from None


def run_evaluation(config: EvaluationConfig, plan: Optional[EvaluationPlan] = None) -> list[dict]:
    """Evaluate every checkpoint, write the reports into ``config.output_dir`` and return the entries."""
    plan = plan or plan_evaluation(config)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    settings = GenerationSettings(config.temperature, config.max_new_tokens, config.batch_size, config.seed)
    recorded_settings = {
        **asdict(settings),
        "num_samples": config.num_samples,
        "prompt_key": config.prompt_key,
        "teacher_path": config.teacher_path,
        "compute_score": config.compute_score,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }
    merge_dir = Path(config.merge_dir).expanduser() if config.merge_dir else None
    teacher_context = hf_model_folder(plan.teacher, merge_dir) if plan.teacher else contextlib.nullcontext()
    results = []
    with teacher_context as teacher_folder:
        teacher = load_model(teacher_folder, device, dtype) if plan.teacher else None
        for checkpoint in plan.checkpoints:
            with hf_model_folder(checkpoint, merge_dir) as folder:
                student = load_model(folder, device, dtype)
                metrics = evaluate_checkpoint(
                    student, teacher, plan.rows, plan.scorer, settings, config.num_examples, checkpoint.label
                )
                del student  # before the next checkpoint loads: one student in memory at a time
            results.append(
                {
                    "path": checkpoint.path,
                    "label": checkpoint.label,
                    "kind": checkpoint.kind,
                    "step": checkpoint.step,
                    **metrics,
                    "data_file": str(Path(config.data_file).expanduser().resolve()),
                    "settings": recorded_settings,
                }
            )
    write_reports(results, Path(config.output_dir).expanduser(), config.plot)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate_model.py",
        description="Evaluate checkpoints (Hugging Face folders or verl FSDP checkpoints) on a parquet file in "
        "verl's RLHF layout: accuracy, KL to a teacher, response length, sample generations. "
        f"{ACCURACY_DEFINITION} {KL_DEFINITION}",
    )
    add = parser.add_argument
    add(
        "--model_path",
        "--checkpoints",
        dest="checkpoints",
        metavar="PATH",
        nargs="+",
        required=True,
        help="checkpoints to evaluate: Hugging Face folders, verl …/global_step_N/actor or …/global_step_N folders "
        "(FSDP, merged with verl.model_merger), or a run folder holding global_step_N folders (all, in step order); "
        "the step for the plot is read from global_step_N / step_N / checkpoint-N in the path (required)",
    )
    add(
        "--data",
        "--data_path",
        dest="data_file",
        metavar="FILE",
        required=True,
        help="parquet file in verl's RLHF layout (required)",
    )
    add("--output_dir", default="eval_results", help="folder for results.json/.md/.png (default: %(default)s)")
    add(
        "--teacher_path",
        default=None,
        help="teacher checkpoint (same forms as --model_path, same tokenizer as the student); adds kl_student_teacher "
        "and kl_k3_sampled, defined above (default: none, no KL)",
    )
    add(
        "--compute_score",
        default=None,
        help="path.py[:fn_name] scoring every row, called as fn(data_source=, solution_str=, ground_truth=, "
        "extra_info=); fn_name defaults to compute_score (default: none: toy_addition rows -> "
        "verl.distill.toy.reward.compute_score, others -> verl.utils.reward_score.default_compute_score)",
    )
    add("--prompt_key", default="prompt", help="column holding the chat messages (default: %(default)s)")
    add("--num_samples", type=int, default=-1, help="evaluate the first N rows only, -1: all (default: %(default)s)")
    add("--num_examples", type=int, default=3, help="sample generations kept per checkpoint (default: %(default)s)")
    add("--temperature", type=float, default=0.0, help="0 greedy, > 0 sampling (default: %(default)s)")
    add("--max_new_tokens", type=int, default=256, help="maximum response tokens (default: %(default)s)")
    add("--batch_size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    add("--seed", type=int, default=0, help="sampling seed, reset for every checkpoint (default: %(default)s)")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: %(default)s)")
    add(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations; auto: bfloat16 on GPU, float32 on CPU (default: %(default)s)",
    )
    add(
        "--merge_dir",
        default=None,
        help="keep merged FSDP checkpoints here and reuse them while the shards are unchanged "
        "(default: merge into a temporary folder, removed after use)",
    )
    add(
        "--no_plot",
        dest="plot",
        action="store_false",
        help="skip results.png (default: drawn when there are several checkpoints)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: returns 0, or 2 after a one-line error on bad input."""
    arguments = build_parser().parse_args(argv)
    config = EvaluationConfig(**vars(arguments))
    try:
        plan = plan_evaluation(config)
        results = run_evaluation(config, plan)
    except EvaluationInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for entry in results:
        kl = entry["kl"]
        kl_text = "" if kl is None else f" kl={kl['kl_student_teacher']:.4g} k3={kl['kl_k3_sampled']:.4g}"
        print(
            f"{entry['label']}: step={entry['step']} n={entry['n']} accuracy={entry['accuracy']:.4f}"
            f"{kl_text} response_tokens={entry['response_length_mean']:.1f}"
        )
    print(f"results in {Path(config.output_dir).expanduser()}")
    return 0
