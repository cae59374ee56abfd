"""distillation_trainer.yaml and distillation_megatron_trainer.yaml: composition, dataclasses, overrides."""

import os
import subprocess
import sys
from copy import deepcopy
from dataclasses import fields

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import verl
from verl.distill.actor_config import FSDPDistillActorConfig, McoreDistillActorConfig
from verl.distill.loss_config import DistillLossConfig
from verl.distill.teacher import FSDPTeacherRefConfig, McoreTeacherRefConfig
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import FSDPCriticConfig, McoreCriticConfig, RolloutConfig

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
CONFIGS = {
    "distillation_trainer": (FSDPDistillActorConfig, FSDPTeacherRefConfig, FSDPCriticConfig),
    "distillation_megatron_trainer": (McoreDistillActorConfig, McoreTeacherRefConfig, McoreCriticConfig),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_teacher_slot import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model"))


def compose_trainer(config_name, overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name, overrides=list(overrides))


def runnable_overrides(model_dir):
    """What a run must set anyway: models, the rollout backend, micro-batch sizes."""
    return [
        f"actor_rollout_ref.model.path={model_dir}",
        f"actor_rollout_ref.ref.model.path={model_dir}",
        f"critic.model.path={model_dir}",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "critic.ppo_micro_batch_size_per_gpu=1",
    ]


def ref_node_for_init_model(config):
    """verl's init_model renames the ref's log-prob batch keys before building the ref dataclass."""
    ref_node = deepcopy(config.actor_rollout_ref.ref)
    with open_dict(ref_node):
        ref_node.ppo_mini_batch_size = config.actor_rollout_ref.actor.ppo_mini_batch_size
        ref_node.ppo_micro_batch_size = ref_node.pop("log_prob_micro_batch_size", None)
        ref_node.ppo_micro_batch_size_per_gpu = ref_node.pop("log_prob_micro_batch_size_per_gpu", None) or 1
        ref_node.use_dynamic_bsz = ref_node.pop("log_prob_use_dynamic_bsz", False)
        ref_node.ppo_max_token_len_per_gpu = ref_node.pop("log_prob_max_token_len_per_gpu", None)
    return ref_node


@pytest.mark.parametrize("config_name", CONFIGS)
def test_composes_with_the_distillation_settings(config_name):
    config = compose_trainer(config_name)
    arr = config.actor_rollout_ref
    assert arr.actor.policy_loss.loss_mode == "distillation"
    assert (arr.actor.use_kl_loss, arr.actor.kl_loss_type, arr.actor.kl_loss_coef) == (True, "low_var_kl", 1.0)
    assert arr.rollout.n == 1
    assert arr.ref.model.path is None
    assert config.reward.reward_manager.name == "distillation"
    assert config.algorithm.adv_estimator == "grpo"
    assert config.algorithm.use_kl_in_reward is False
    assert config.critic.enable is False


def test_megatron_config_selects_verls_megatron_engine():
    config = compose_trainer("distillation_megatron_trainer")
    assert config.model_engine == "megatron"
    assert config.actor_rollout_ref.actor.strategy == "megatron"
    assert config.actor_rollout_ref.ref.strategy == "megatron"
    assert config.critic.strategy == "megatron"


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_node_instantiates_verls_dataclasses(config_name, model_dir):
    actor_class, ref_class, critic_class = CONFIGS[config_name]
    config = compose_trainer(config_name, runnable_overrides(model_dir))

    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert type(actor) is actor_class
    assert isinstance(actor.distill, DistillLossConfig)
    assert type(omega_conf_to_dataclass(ref_node_for_init_model(config))) is ref_class
    assert type(omega_conf_to_dataclass(config.actor_rollout_ref.rollout)) is RolloutConfig
    assert type(omega_conf_to_dataclass(config.critic)) is critic_class
    assert type(omega_conf_to_dataclass(config.algorithm)) is AlgoConfig


def test_yaml_distill_node_lists_every_option_at_its_default(model_dir):
    config = compose_trainer("distillation_trainer", runnable_overrides(model_dir))
    listed = set(config.actor_rollout_ref.actor.distill) - {"_target_"}
    assert listed == {f.name for f in fields(DistillLossConfig)} - {"_target_"}
    assert omega_conf_to_dataclass(config.actor_rollout_ref.actor).distill == DistillLossConfig()


def test_distill_options_are_overridable(model_dir):
    config = compose_trainer(
        "distillation_megatron_trainer", runnable_overrides(model_dir) + ["actor_rollout_ref.actor.distill.topk=8"]
    )
    assert omega_conf_to_dataclass(config.actor_rollout_ref.actor).distill.topk == 8


def test_seed_usage_overrides_apply(model_dir, tmp_path):
    teacher = str(tmp_path / "teacher")
    config = compose_trainer(
        "distillation_trainer",
        runnable_overrides(model_dir)
        + [
            f"actor_rollout_ref.ref.model.path={teacher}",
            "data.train_files=/data/train.parquet",
            "data.val_files=/data/test.parquet",
            "actor_rollout_ref.actor.kl_loss_coef=0.5",
            "actor_rollout_ref.actor.kl_loss_type=mse",
            "actor_rollout_ref.actor.entropy_coeff=0.01",
            "reward.reward_manager.name=distillation",
        ],
    )
    assert config.actor_rollout_ref.ref.model.path == teacher
    assert (config.data.train_files, config.data.val_files) == ("/data/train.parquet", "/data/test.parquet")
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert (actor.kl_loss_coef, actor.kl_loss_type, actor.entropy_coeff) == (0.5, "mse", 0.01)


@pytest.mark.parametrize("samples_per_prompt", [1, 4])
def test_zero_rewards_give_zero_grpo_advantages(samples_per_prompt):
    estimator = get_adv_estimator_fn(compose_trainer("distillation_trainer").algorithm.adv_estimator)
    prompts = 3
    rewards = torch.zeros(prompts * samples_per_prompt, 5)
    advantages, returns = estimator(
        token_level_rewards=rewards,
        response_mask=torch.ones_like(rewards),
        index=np.repeat(np.arange(prompts), samples_per_prompt).astype(object),
        config=AlgoConfig(),
    )
    assert torch.equal(advantages, torch.zeros_like(rewards))  # exactly zero, and so not NaN


def yaml_lines_missing_a_comment(path):
    """verl's config format: every field has a comment line above it."""
    lines = open(path).read().splitlines()
    missing = []
    for number, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        previous = next((lines[i] for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        if not previous.lstrip().startswith("#"):
            missing.append(f"{os.path.basename(path)}:{number + 1}: {line.strip()}")
    return missing


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_field_is_commented(config_name):
    path = os.path.join(CONFIG_DIR, f"{config_name}.yaml")
    yaml.safe_load(open(path))
    assert yaml_lines_missing_a_comment(path) == []


def test_the_documented_command_composes_the_config():
    command = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-name=distillation_trainer", "--cfg", "job"]
    completed = subprocess.run(
        command + ["actor_rollout_ref.ref.model.path=/teacher"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    job = yaml.safe_load(completed.stdout[completed.stdout.index("actor_rollout_ref:") :])
    assert job["actor_rollout_ref"]["ref"]["model"]["path"] == "/teacher"
    assert job["reward"]["reward_manager"]["name"] == "distillation"
