#!/usr/bin/env bash
# Evaluate distillation checkpoints: accuracy, KL(student || teacher), response length, samples.
# A thin wrapper of evaluate_model.py; see EVALUATION_README.md. Settings come from the environment,
# any extra arguments go to evaluate_model.py unchanged:
#
#   TEACHER=/models/Qwen2.5-7B-Instruct bash examples/distillation/run_evaluation.sh --num_samples 200
#
#   CHECKPOINTS    space-separated checkpoints: HF folders, …/global_step_N[/actor], or a run folder
#                  (trainer.default_local_dir) holding global_step_N folders (default: the GSM8K
#                  run of run_distillation.sh, outputs/qwen2.5-0.5b-from-7b-gsm8k/checkpoints)
#   DATA           parquet file in verl's RLHF layout (default: ~/data/gsm8k/test.parquet)
#   TEACHER        teacher model folder; empty skips the KL columns (default: empty)
#   OUTPUT_DIR     where results.json, results.md and results.png go (default: eval_results)
#   PYTHON         interpreter (default: python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKPOINTS="${CHECKPOINTS:-outputs/qwen2.5-0.5b-from-7b-gsm8k/checkpoints}"
DATA="${DATA:-$HOME/data/gsm8k/test.parquet}"
TEACHER="${TEACHER:-}"
OUTPUT_DIR="${OUTPUT_DIR:-eval_results}"
PYTHON="${PYTHON:-python3}"

read -r -a checkpoints <<< "$CHECKPOINTS"
teacher_args=()
if [[ -n "$TEACHER" ]]; then
    teacher_args=(--teacher_path "$TEACHER")
fi

exec "$PYTHON" "$here/evaluate_model.py" \
    --model_path "${checkpoints[@]}" \
    --data "$DATA" \
    --output_dir "$OUTPUT_DIR" \
    "${teacher_args[@]}" \
    "$@"
