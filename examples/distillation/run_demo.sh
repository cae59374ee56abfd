#!/usr/bin/env bash
# The demo behind `make demo`, on a CPU in minutes: build the toy task (cached), distil the toy
# student from the toy teacher with run_distillation.sh, then evaluate the initial student, every
# saved checkpoint and the teacher, and print the before/after table. The last line is
#   demo: teacher_acc=<x> student_acc_before=<y> student_acc_after=<z>
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/toy-distillation}
export OUTPUT_DIR
mkdir -p "$OUTPUT_DIR"

echo "== 1/3 toy task: tokenizer, teacher, student, data (cached after the first build)"
toy_assets=$("$PYTHON" -m verl.distill.toy build)
asset() { grep "^$1=" <<<"$toy_assets" | cut -d= -f2-; }

echo "== 2/3 on-policy distillation of the student from the teacher (verl, CPU)"
rm -rf "$OUTPUT_DIR/checkpoints"
started=$(date +%s)
PYTHON="$PYTHON" bash "$HERE/run_distillation.sh" > "$OUTPUT_DIR/train.log" 2>&1 || {
    echo "training failed; the end of $OUTPUT_DIR/train.log:" >&2
    tail -n 30 "$OUTPUT_DIR/train.log" >&2
    exit 1
}
echo "   trained in $(( $(date +%s) - started )) s; log: $OUTPUT_DIR/train.log"

echo "== 3/3 evaluation: initial student, checkpoints, teacher"
"$PYTHON" "$HERE/evaluate_model.py" \
    --checkpoints "$(asset student)" "$OUTPUT_DIR/checkpoints" "$(asset teacher)" \
    --data "$(asset val_files)" \
    --teacher_path "$(asset teacher)" \
    --max_new_tokens 8 --batch_size 64 \
    --output_dir "$OUTPUT_DIR/eval"
cat "$OUTPUT_DIR/eval/results.md"

"$PYTHON" - "$OUTPUT_DIR/eval/results.json" "$(asset student)" "$(asset teacher)" <<'EOF'
import json
import os
import sys

results_file, student, teacher = (os.path.realpath(arg) for arg in sys.argv[1:])
rows = json.load(open(results_file))["checkpoints"]
by_path = {os.path.realpath(row["path"]): row for row in rows}
trained = sorted((row for row in rows if row.get("step") is not None), key=lambda row: row["step"])
print(
    f"demo: teacher_acc={by_path[teacher]['accuracy']:.4f} "
    f"student_acc_before={by_path[student]['accuracy']:.4f} "
    f"student_acc_after={trained[-1]['accuracy']:.4f}"
)
EOF
