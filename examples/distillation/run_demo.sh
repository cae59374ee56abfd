#!/usr/bin/env bash
# The demo behind `make demo`, on a CPU in minutes: build the toy task (cached per TOY_SEED), distil
# the toy student from the toy teacher with run_distillation.sh (one progress line while it trains),
# then evaluate the initial student, every saved checkpoint and the teacher, draw the training curve
# and print the before/after table. The last line is
#   demo: teacher_acc=<x> student_acc_before=<y> student_acc_last=<z> (step N) student_acc_best=<w> (step M)
# where "best" is the checkpoint with the highest validation accuracy logged during training.
#
# TOY_SEED (0) seeds the toy build, TOY_DATA_SEED (TOY_SEED) the prompt order; TOY_STEPS (200) and the
# other TOY_* variables of run_distillation.sh pass through.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/toy-distillation}
export OUTPUT_DIR
export TOY_SEED=${TOY_SEED:-0}
export TOY_STEPS=${TOY_STEPS:-200}
mkdir -p "$OUTPUT_DIR"
# where run_distillation.sh's toy branch makes verl's file logger write (<root>/<project>/<experiment>.jsonl)
METRICS="$OUTPUT_DIR/verl-distill/toy.jsonl"

echo "== 1/3 toy task (seed $TOY_SEED): tokenizer, teacher, student, data (cached after the first build)"
toy_assets=$("$PYTHON" -m verl.distill.toy build --seed "$TOY_SEED")
asset() { grep "^$1=" <<<"$toy_assets" | cut -d= -f2-; }

echo "== 2/3 on-policy distillation of the student from the teacher (verl, CPU, $TOY_STEPS steps)"
# verl's file logger appends to an existing file: start this run's curve from nothing
rm -rf "$OUTPUT_DIR/checkpoints" "$METRICS"
started=$(date +%s)
PYTHON="$PYTHON" bash "$HERE/run_distillation.sh" > "$OUTPUT_DIR/train.log" 2>&1 &
training=$!
# Ctrl-C or a failing follower must not leave the trainer running
trap 'kill "$training" 2>/dev/null || true' EXIT
"$PYTHON" -m verl.distill.training_log follow "$METRICS" --total_steps "$TOY_STEPS" --while_pid "$training"
wait "$training" || {
    echo "training failed; the end of $OUTPUT_DIR/train.log:" >&2
    tail -n 30 "$OUTPUT_DIR/train.log" >&2
    exit 1
}
trap - EXIT
echo "   trained in $(( $(date +%s) - started )) s; log: $OUTPUT_DIR/train.log"

echo "== 3/3 evaluation: initial student, checkpoints, teacher"
"$PYTHON" "$HERE/evaluate_model.py" \
    --checkpoints "$(asset student)" "$OUTPUT_DIR/checkpoints" "$(asset teacher)" \
    --data "$(asset val_files)" \
    --teacher_path "$(asset teacher)" \
    --max_new_tokens 8 --batch_size 64 \
    --output_dir "$OUTPUT_DIR/eval"
"$PYTHON" -m verl.distill.training_log plot "$METRICS" "$OUTPUT_DIR/eval/training_curve.png" \
    --title "toy seed $TOY_SEED: student <- teacher"
cat "$OUTPUT_DIR/eval/results.md"
echo "training curve: $OUTPUT_DIR/eval/training_curve.png"

"$PYTHON" - "$OUTPUT_DIR/eval/results.json" "$METRICS" "$(asset student)" "$(asset teacher)" <<'EOF'
import json
import os
import sys

from verl.distill.training_log import read_metrics, training_curve

results_file, metrics_file = sys.argv[1:3]
student, teacher = (os.path.realpath(arg) for arg in sys.argv[3:])
rows = json.load(open(results_file))["checkpoints"]
by_path = {os.path.realpath(row["path"]): row for row in rows}
by_step = {row["step"]: row for row in rows if row.get("step") is not None}
validated = dict(training_curve(read_metrics(metrics_file)).validation_accuracy)
saved_and_validated = [step for step in by_step if step in validated]
if not saved_and_validated:
    sys.exit("demo: no saved checkpoint was validated; fix: give TOY_EVAL_FREQ a divisor of TOY_STEPS")
last = max(by_step)
# ties go to the later checkpoint: it has trained longer for the same validation score
best = max(saved_and_validated, key=lambda step: (validated[step], step))
print(
    f"demo: teacher_acc={by_path[teacher]['accuracy']:.4f} "
    f"student_acc_before={by_path[student]['accuracy']:.4f} "
    f"student_acc_last={by_step[last]['accuracy']:.4f} (step {last}) "
    f"student_acc_best={by_step[best]['accuracy']:.4f} (step {best})"
)
EOF
