#!/usr/bin/env bash
# On-policy distillation on verl's Megatron engine (distillation_megatron_trainer.yaml): for GPUs
# with megatron-core installed (pip install "verl-distill[megatron]"). The teacher in the reference
# slot shares the actor's model-parallel layout (Megatron's parallel state is global to a process),
# so TP/PP below apply to both. Every argument is passed to verl as a Hydra override.
#
#   bash examples/distillation/run_distillation_megatron.sh \
#       actor_rollout_ref.model.path=... actor_rollout_ref.ref.model.path=... data.train_files=... data.val_files=...
set -euo pipefail

PYTHON=${PYTHON:-python3}
STUDENT_MODEL=${STUDENT_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
TEACHER_MODEL=${TEACHER_MODEL:-Qwen/Qwen2.5-7B-Instruct}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/gsm8k/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/gsm8k/test.parquet}
N_GPUS=${N_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
if [[ ${N_GPUS:-0} -lt 1 ]]; then
    echo "run_distillation_megatron.sh: no GPU found (nvidia-smi -L); Megatron needs GPUs." \
         "On a CPU use examples/distillation/run_distillation.sh (FSDP)." >&2
    exit 2
fi
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen2.5-0.5b-from-7b-gsm8k-megatron}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$EXPERIMENT_NAME}
mkdir -p "$OUTPUT_DIR"
export VERL_FILE_LOGGER_ROOT="$OUTPUT_DIR"

exec "$PYTHON" -m verl.trainer.main_ppo --config-name=distillation_megatron_trainer \
    actor_rollout_ref.model.path="$STUDENT_MODEL" \
    actor_rollout_ref.ref.model.path="$TEACHER_MODEL" \
    data.train_files="$TRAIN_FILE" \
    data.val_files="$VAL_FILE" \
    data.train_batch_size=${BATCH_SIZE:-256} \
    data.max_prompt_length=${MAX_PROMPT_LENGTH:-512} \
    data.max_response_length=${MAX_RESPONSE_LENGTH:-512} \
    actor_rollout_ref.actor.optim.lr=${LR:-1e-6} \
    actor_rollout_ref.actor.ppo_mini_batch_size=${MINI_BATCH_SIZE:-64} \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=${MICRO_BATCH_SIZE:-8} \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=${MICRO_BATCH_SIZE:-8} \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=${MICRO_BATCH_SIZE:-8} \
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=${TP:-1} \
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=${PP:-1} \
    actor_rollout_ref.ref.megatron.param_offload=${TEACHER_OFFLOAD:-true} \
    actor_rollout_ref.rollout.name=${ROLLOUT:-vllm} \
    actor_rollout_ref.rollout.tensor_model_parallel_size=${ROLLOUT_TP:-1} \
    actor_rollout_ref.rollout.gpu_memory_utilization=${GPU_MEMORY_UTILIZATION:-0.5} \
    trainer.n_gpus_per_node="$N_GPUS" \
    trainer.nnodes=${NNODES:-1} \
    trainer.total_epochs=${EPOCHS:-3} \
    trainer.save_freq=${SAVE_FREQ:-100} \
    trainer.test_freq=${TEST_FREQ:-20} \
    trainer.logger="${LOGGER:-[console,wandb]}" \
    trainer.project_name=${PROJECT_NAME:-verl-distill} \
    trainer.experiment_name="$EXPERIMENT_NAME" \
    trainer.default_local_dir="$OUTPUT_DIR/checkpoints" \
    hydra.run.dir="$OUTPUT_DIR/hydra" \
    "$@"
