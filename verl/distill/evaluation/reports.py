"""results.json, results.md and results.png of an evaluation."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from verl.distill.evaluation.metrics import ACCURACY_DEFINITION, KL_DEFINITION

RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"


def render_markdown(results: Sequence[dict]) -> str:
    """A results table (one row per checkpoint) followed by each checkpoint's sample generations."""
    lines = [
        "| checkpoint | step | n | accuracy | mean score | KL(student‖teacher) | k3 (sampled) "
        "| mean response tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results:
        kl = entry["kl"] or {}
        lines.append(
            "| {label} | {step} | {n} | {accuracy:.4f} | {mean_score:.4f} | {kl} | {k3} | {length:.1f} |".format(
                label=entry["label"],
                step="" if entry["step"] is None else entry["step"],
                n=entry["n"],
                accuracy=entry["accuracy"],
                mean_score=entry["mean_score"],
                kl=_fmt(kl.get("kl_student_teacher")),
                k3=_fmt(kl.get("kl_k3_sampled")),
                length=entry["response_length_mean"],
            )
        )
    if results:
        first = results[0]
        lines += ["", f"Data: `{first['data_file']}`; settings: `{json.dumps(first['settings'], sort_keys=True)}`."]
        lines += ["", ACCURACY_DEFINITION, "", KL_DEFINITION]
    for entry in results:
        lines += ["", f"## Samples: {entry['label']}"]
        for number, sample in enumerate(entry["samples"], start=1):
            lines += [
                "",
                f"**{number}.** correct: {sample['correct']} (score {sample['score']:g}), "
                f"ground truth: `{sample['ground_truth']}`",
                "",
                "```text",
                sample["prompt"] + sample["response"],
                "```",
            ]
    return "\n".join(lines) + "\n"


def _fmt(value: Optional[float]) -> str:
    # KL values of near-identical models are far below 1e-4: keep significant digits, not decimals.
    return "" if value is None else f"{value:.4g}"


def plot_results(results: Sequence[dict], path: Path) -> None:
    """Accuracy and (with a teacher) KL against training step.

    Checkpoints without a step in their path (a base model, the teacher) are drawn as dashed reference
    lines; when no checkpoint has a step, all are drawn in the order given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_kl = any(entry["kl"] for entry in results)
    figure, axes = plt.subplots(1, 2 if with_kl else 1, figsize=(11 if with_kl else 6, 4), squeeze=False)
    panels = [("accuracy", lambda e: e["accuracy"])]
    if with_kl:
        panels.append(("KL(student‖teacher) per token", lambda e: e["kl"]["kl_student_teacher"] if e["kl"] else None))
    by_step = any(entry["step"] is not None for entry in results)
    stepped = sorted((e for e in results if e["step"] is not None), key=lambda e: e["step"])
    references = [e for e in results if e["step"] is None] if by_step else []
    for axis, (title, value) in zip(axes[0], panels, strict=True):
        if by_step:
            points = [(e["step"], value(e)) for e in stepped if value(e) is not None]
            if len(stepped) <= 12:
                axis.set_xticks([e["step"] for e in stepped])
            else:
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_xlabel("training step")
        else:
            points = [(index, value(e)) for index, e in enumerate(results) if value(e) is not None]
            axis.set_xticks(range(len(results)), [e["label"] for e in results], rotation=20, ha="right")
            axis.set_xlabel("checkpoint")
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label="checkpoints")
        for number, entry in enumerate(references):
            if value(entry) is not None:
                axis.axhline(value(entry), linestyle="--", color=f"C{number + 1}", label=entry["label"])
        if title == "accuracy":
            axis.set_ylim(-0.03, 1.03)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_reports(results: Sequence[dict], output_dir: Path, plot: bool) -> None:
    """Write results.json, results.md and, with several checkpoints and ``plot``, results.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"accuracy_definition": ACCURACY_DEFINITION, "kl_definition": KL_DEFINITION, "checkpoints": list(results)}
    (output_dir / RESULTS_JSON).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (output_dir / RESULTS_MD).write_text(render_markdown(results))
    if plot and len(results) > 1:
        plot_results(results, output_dir / RESULTS_PNG)
