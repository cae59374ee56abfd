"""Evaluate distillation checkpoints: accuracy, KL to the teacher, response length, sample generations.

    python examples/distillation/evaluate_model.py --model_path CKPT [CKPT ...] --data test.parquet \
        [--teacher_path TEACHER] [--output_dir eval_results]

See EVALUATION_README.md and ``--help``; the logic lives in :mod:`verl.distill.evaluation`.
"""

import sys

from verl.distill.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
