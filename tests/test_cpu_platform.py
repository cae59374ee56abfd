"""The cpu platform and the CPU adaptation of trainer configs."""

import pytest
import torch
from omegaconf import OmegaConf

from verl.distill.cpu_defaults import CPUConfigError, adapt_config_for_cpu, explicit_override_keys


def test_verl_resolves_the_cpu_platform_on_a_machine_without_accelerator():
    from verl.utils.device import get_device_name, get_nccl_backend, get_resource_name

    assert not torch.cuda.is_available()
    assert get_device_name() == "cpu"
    assert get_nccl_backend() == "gloo"
    assert get_resource_name() == "GPU"  # logical GPUs schedule verl's resource pools


def test_rng_state_round_trip():
    from verl.utils.device import get_torch_device

    device = get_torch_device()
    state = device.get_rng_state()
    first = torch.rand(4)
    device.set_rng_state(state)
    assert torch.equal(torch.rand(4), first)


def test_memory_stats_report_host_memory():
    from verl.utils.device import get_torch_device

    device = get_torch_device()
    free, total = device.mem_get_info()
    assert 0 < free <= total
    assert device.memory_allocated() > 10 * 2**20  # this process holds torch: far more than 10 MiB
    assert device.max_memory_allocated() >= device.memory_allocated() // 2


def test_gloo_process_group_initialises_through_verl_worker_code(monkeypatch, tmp_path):
    import torch.distributed as dist

    import verl.workers.engine_workers as engine_workers

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    engine_workers.initialize_global_process_group_ray(timeout_second=30)
    try:
        assert dist.get_backend() == "gloo"
        tensor = torch.ones(3)
        dist.all_reduce(tensor)
        assert torch.equal(tensor, torch.ones(3))
    finally:
        dist.destroy_process_group()


def _trainer_config():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer")


def test_cpu_adaptation_changes_what_cannot_run_and_lists_it():
    config = _trainer_config()
    changes = adapt_config_for_cpu(config, explicit_keys=set())
    assert config.actor_rollout_ref.rollout.name == "hf"
    assert config.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    assert config.actor_rollout_ref.actor.strategy == "fsdp2"
    assert config.actor_rollout_ref.ref.strategy == "fsdp2"  # interpolated from the actor
    assert config.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert config.trainer.device == "cpu"
    assert config.ray_kwargs.ray_init.num_gpus == config.trainer.n_gpus_per_node == 1
    assert config.reward.num_workers == 1
    for expected in ("actor_rollout_ref.rollout.name=hf", "trainer.device=cpu", "reward.num_workers=1"):
        assert expected in changes
    # a second pass finds nothing left to change
    assert adapt_config_for_cpu(config, explicit_keys=set()) == []


def test_explicit_overrides_win_where_they_can_work():
    config = _trainer_config()
    OmegaConf.update(config, "reward.num_workers", 2)
    OmegaConf.update(config, "trainer.n_gpus_per_node", 2)
    keys = explicit_override_keys(["reward.num_workers=2", "trainer.n_gpus_per_node=2", "+ray_kwargs.x=1"])
    assert keys == {"reward.num_workers", "trainer.n_gpus_per_node", "ray_kwargs.x"}
    changes = adapt_config_for_cpu(config, keys)
    assert config.reward.num_workers == 2
    assert config.ray_kwargs.ray_init.num_gpus == 2
    assert not any(change.startswith("reward.num_workers") for change in changes)


def test_explicit_gpu_rollout_on_a_cpu_is_refused_with_the_key_and_the_fix():
    config = _trainer_config()
    OmegaConf.update(config, "actor_rollout_ref.rollout.name", "vllm")
    with pytest.raises(CPUConfigError) as error:
        adapt_config_for_cpu(config, {"actor_rollout_ref.rollout.name"})
    message = str(error.value)
    assert "actor_rollout_ref.rollout.name=vllm" in message and "rollout.name=hf" in message
    assert "\n" not in message


def test_device_id_moves_tensors_to_the_host():
    from verl.utils.device import get_device_id

    assert torch.ones(1).to(get_device_id()).device.type == "cpu"
    assert torch.device(get_device_id()).type == "cpu"
