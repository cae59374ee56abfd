#!/usr/bin/env bash
# On-policy distillation with verl-distill: the student generates, the teacher in verl's reference
# slot scores the student's tokens, the distillation loss pulls the student toward the teacher.
#
#   bash examples/distillation/run_distillation.sh
#       No arguments: the embedded toy task (multi-digit addition). Its tokenizer, teacher and
#       student are built offline on first use (cached under ~/.cache/verl-distill, or
#       $VERL_DISTILL_CACHE, one build per TOY_SEED), then the student is distilled from the teacher
#       on the CPU. TOY_SEED (0) seeds the build, TOY_DATA_SEED (TOY_SEED) the order of the prompts.
#
#   bash examples/distillation/run_distillation.sh data.train_files=... actor_rollout_ref.model.path=... \
#       actor_rollout_ref.ref.model.path=... [any Hydra override]
#       Your models and data: FSDP, vLLM rollout when a GPU is present (on a CPU verl-distill adapts
#       the config itself). Defaults come from the environment variables below; every argument is
#       passed to verl as a Hydra override and wins over them.
set -euo pipefail

PYTHON=${PYTHON:-python3}

if [[ $# -eq 0 ]]; then
    # --- the toy task, on the CPU --------------------------------------------------------------
    TOY_SEED=${TOY_SEED:-0}
    toy_assets=$("$PYTHON" -m verl.distill.toy build --seed "$TOY_SEED")
    asset() { grep "^$1=" <<<"$toy_assets" | cut -d= -f2-; }
    OUTPUT_DIR=${OUTPUT_DIR:-outputs/toy-distillation}
    mkdir -p "$OUTPUT_DIR"
    # verl's file logger writes <root>/<project>/<experiment>.jsonl: keep each run's metrics in its folder
    export VERL_FILE_LOGGER_ROOT="$OUTPUT_DIR"
    # The toy teacher is confident (log-probs of -10 to -27 on wrong digits), where sampled-token
    # estimators barely move the student; the exact reverse KL over the whole (tiny) vocabulary
    # learns fast. See docs/algo/distillation.md. Activation checkpointing would recompute every
    # forward to save memory the toy models do not need. The learning rate warms up for 10 steps
    # and then follows a cosine to a tenth of its peak: at a constant 1e-3 the accuracy swung by
    # +-0.05 between checkpoints late in the run. Every checkpoint is also validated (same
    # frequency), so the best one by validation can be picked. The toy is a CPU job by definition.
    exec "$PYTHON" -m verl.trainer.main_ppo --config-name=distillation_trainer \
        actor_rollout_ref.model.path="$(asset student)" \
        actor_rollout_ref.ref.model.path="$(asset teacher)" \
        data.train_files="$(asset train_files)" \
        data.val_files="$(asset val_files)" \
        data.seed=${TOY_DATA_SEED:-$TOY_SEED} \
        data.train_batch_size=${TOY_BATCH_SIZE:-64} \
        data.max_prompt_length=16 \
        data.max_response_length=8 \
        actor_rollout_ref.actor.policy_loss.loss_mode=reverse_kl_topk \
        actor_rollout_ref.actor.distill.topk=47 \
        actor_rollout_ref.model.enable_gradient_checkpointing=false \
        actor_rollout_ref.actor.optim.lr=${TOY_LR:-1e-3} \
        actor_rollout_ref.actor.optim.lr_warmup_steps=10 \
        actor_rollout_ref.actor.optim.lr_scheduler_type=cosine \
        actor_rollout_ref.actor.optim.min_lr_ratio=0.1 \
        actor_rollout_ref.actor.ppo_mini_batch_size=${TOY_BATCH_SIZE:-64} \
        actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=${TOY_BATCH_SIZE:-64} \
        actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=${TOY_BATCH_SIZE:-64} \
        actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=${TOY_BATCH_SIZE:-64} \
        actor_rollout_ref.rollout.temperature=1.0 \
        trainer.total_training_steps=${TOY_STEPS:-200} \
        trainer.save_freq=${TOY_EVAL_FREQ:-25} \
        trainer.test_freq=${TOY_EVAL_FREQ:-25} \
        trainer.device=cpu \
        trainer.val_before_train=true \
        trainer.logger="[console,file]" \
        trainer.project_name=verl-distill \
        trainer.experiment_name=toy \
        trainer.default_local_dir="$OUTPUT_DIR/checkpoints" \
        hydra.run.dir="$OUTPUT_DIR/hydra"
fi

# --- your models and data (the seed's GPU recipe: Qwen2.5-0.5B-Instruct <- Qwen2.5-7B-Instruct, GSM8K)
STUDENT_MODEL=${STUDENT_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
TEACHER_MODEL=${TEACHER_MODEL:-Qwen/Qwen2.5-7B-Instruct}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/gsm8k/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/gsm8k/test.parquet}
DETECTED_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
N_GPUS=${N_GPUS:-$(( DETECTED_GPUS > 0 ? DETECTED_GPUS : 1 ))}
# vLLM needs a GPU; without one, verl-distill's transformers-based `hf` rollout runs on the CPU.
ROLLOUT=${ROLLOUT:-$([[ $DETECTED_GPUS -gt 0 ]] && echo vllm || echo hf)}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen2.5-0.5b-from-7b-gsm8k}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$EXPERIMENT_NAME}
mkdir -p "$OUTPUT_DIR"
export VERL_FILE_LOGGER_ROOT="$OUTPUT_DIR"

exec "$PYTHON" -m verl.trainer.main_ppo --config-name=distillation_trainer \
    actor_rollout_ref.model.path="$STUDENT_MODEL" \
    actor_rollout_ref.ref.model.path="$TEACHER_MODEL" \
    data.train_files="$TRAIN_FILE" \
    data.val_files="$VAL_FILE" \
    data.train_batch_size=${BATCH_SIZE:-256} \
    data.max_prompt_length=${MAX_PROMPT_LENGTH:-512} \
    data.max_response_length=${MAX_RESPONSE_LENGTH:-512} \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.actor.optim.lr=${LR:-1e-6} \
    actor_rollout_ref.actor.ppo_mini_batch_size=${MINI_BATCH_SIZE:-64} \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=${MICRO_BATCH_SIZE:-8} \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=${MICRO_BATCH_SIZE:-8} \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=${MICRO_BATCH_SIZE:-8} \
    actor_rollout_ref.rollout.name="$ROLLOUT" \
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
