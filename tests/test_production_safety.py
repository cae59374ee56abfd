"""Installing verl-distill in a GPU verl environment changes nothing that is not a CPU job or a
distillation run: the CPU backend switches on only for a CPU job, every run-time adaptation of verl
applies only to the runs it is for, and an unknown verl stops only the runs that need verl-distill."""

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, stale_installed_files
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from verl.distill import compat, cpu_job, driver

GPU_OVERRIDES = ["actor_rollout_ref.rollout.name=vllm", "trainer.n_gpus_per_node=8"]


def _trainer_config(overrides=(), config_name="ppo_trainer"):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def undecided_driver(monkeypatch):
    """A driver process before the CPU-job decision (the test process itself is marked a CPU job)."""
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    monkeypatch.setattr(cpu_job, "_ray_cluster_to_join", lambda config: None)

    def command_line(*overrides):
        monkeypatch.setattr(driver, "_command_line_overrides", lambda: list(overrides))

    command_line()
    return command_line


# --- 1. the CPU backend switches on only for a CPU job ----------------------------------------


def test_a_gpu_config_on_a_machine_without_gpu_is_not_rewritten(undecided_driver, monkeypatch, caplog):
    # the driver of a GPU job on a CPU head node (KubeRay, ray job submit): it joins the cluster
    monkeypatch.setattr(cpu_job, "_ray_cluster_to_join", lambda config: "10.0.0.1:6379")
    undecided_driver(*GPU_OVERRIDES)
    config = _trainer_config(GPU_OVERRIDES)
    before = OmegaConf.to_container(config)
    with caplog.at_level("WARNING", logger="verl.distill.driver"):
        driver.choose_platform(config)
        driver.prepare_trainer_config(config)
    assert OmegaConf.to_container(config) == before
    assert "VERL_PLATFORM" not in os.environ
    assert "actor_rollout_ref.rollout.name=vllm" in caplog.text and "trainer.device=cpu" in caplog.text


def test_a_gpu_config_that_cannot_run_here_is_refused_in_one_line_not_rewritten(undecided_driver, capsys):
    undecided_driver(*GPU_OVERRIDES)
    config = _trainer_config(GPU_OVERRIDES)
    before = OmegaConf.to_container(config)
    with pytest.raises(SystemExit) as exit_code:
        driver.choose_platform(config)
    assert exit_code.value.code == driver.CONFIG_ERROR_EXIT_CODE
    assert OmegaConf.to_container(config) == before
    assert capsys.readouterr().err.splitlines() == [
        "verl-distill: error: actor_rollout_ref.rollout.name=vllm needs a GPU, and this machine has none and joins "
        "no Ray cluster; fix: add trainer.device=cpu to train on the CPU (hf rollout), or run on a GPU machine or a "
        "Ray cluster with GPUs (RAY_ADDRESS)"
    ]


def test_a_gpu_config_joining_a_ray_cluster_with_gpus_is_not_rewritten(undecided_driver, monkeypatch):
    monkeypatch.setattr(cpu_job, "_ray_cluster_to_join", lambda config: "10.0.0.1:6379")
    monkeypatch.setattr(cpu_job, "ray_cluster_gpus", lambda address: 16.0)
    config = _trainer_config()
    before = OmegaConf.to_container(config)
    driver.choose_platform(config)
    driver.prepare_trainer_config(config)
    assert OmegaConf.to_container(config) == before
    decision = cpu_job.decide_cpu_job(config, set())
    assert not decision.is_cpu_job and decision.reason == "the Ray cluster at 10.0.0.1:6379 has 16 GPUs"


CLUSTER = "10.0.0.1:6379"


@pytest.mark.parametrize(
    "environment, cluster_gpus, overrides, is_cpu_job, reason",
    [
        ({}, None, [], True, "no accelerator here, no Ray cluster to join, no GPU asked for"),
        ({}, 0, [], True, f"no accelerator here and none in the Ray cluster at {CLUSTER}"),
        ({}, None, ["trainer.device=cpu", "actor_rollout_ref.rollout.name=vllm"], True, "trainer.device=cpu"),
        ({"VERL_PLATFORM": "cpu"}, None, GPU_OVERRIDES, True, "VERL_PLATFORM=cpu"),
        ({"VERL_PLATFORM": "nvidia"}, None, [], False, "VERL_PLATFORM=nvidia"),
        ({}, 0, ["actor_rollout_ref.rollout.name=sglang"], False, "the command line asks for GPUs"),
        ({}, 0, ["trainer.device=npu"], False, "the command line asks for GPUs (trainer.device=npu)"),
    ],
)
def test_what_makes_a_cpu_job(undecided_driver, monkeypatch, environment, cluster_gpus, overrides, is_cpu_job, reason):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    if cluster_gpus is not None:
        monkeypatch.setattr(cpu_job, "_ray_cluster_to_join", lambda config: CLUSTER)
        monkeypatch.setattr(cpu_job, "ray_cluster_gpus", lambda address: float(cluster_gpus))
    decision = cpu_job.decide_cpu_job(_trainer_config(overrides), cpu_job_keys(overrides))
    assert decision.is_cpu_job == is_cpu_job
    assert decision.reason.startswith(reason)


def cpu_job_keys(overrides):
    return {override.split("=", 1)[0] for override in overrides}


def test_a_cpu_job_hands_the_platform_to_every_ray_process(undecided_driver, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "")  # restored after the test; the decision sets it
    config = _trainer_config()
    driver.choose_platform(config)
    driver.prepare_trainer_config(config)
    assert os.environ["VERL_PLATFORM"] == "cpu"
    assert config.ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM == "cpu"
    assert config.actor_rollout_ref.rollout.name == "hf" and config.trainer.device == "cpu"
    assert "VERL_DISTILL_RUN" not in config.ray_kwargs.ray_init.runtime_env.env_vars  # a GRPO run


RUN_MARKS = ("VERL_DISTILL_RUN", "VERL_DISTILL_LORA_TEACHER", "VERL_DISTILL_SELECT")


@pytest.mark.parametrize(
    ("config_name", "overrides", "marks"),
    [
        pytest.param("distillation_trainer", [], {"VERL_DISTILL_RUN": "1"}, id="full student"),
        pytest.param(
            "distillation_trainer",
            ["actor_rollout_ref.model.lora_rank=8"],
            {"VERL_DISTILL_RUN": "1", "VERL_DISTILL_LORA_TEACHER": "1"},
            id="LoRA student with a separate teacher",
        ),
        pytest.param(
            "distillation_hybrid_trainer",
            ["actor_rollout_ref.actor.distill.select_strategy=best", "actor_rollout_ref.actor.distill.select_k=2"],
            {"VERL_DISTILL_RUN": "1", "VERL_DISTILL_SELECT": "best"},
            id="teacher on the best response",
        ),
        pytest.param("distillation_hybrid_trainer", [], {"VERL_DISTILL_RUN": "1"}, id="teacher on every response"),
    ],
)
def test_a_distillation_run_marks_every_ray_process_with_what_it_needs(
    undecided_driver, monkeypatch, tiny_assets, config_name, overrides, marks
):
    for name in ("VERL_PLATFORM", *RUN_MARKS):
        monkeypatch.setenv(name, "")  # restored after the test; the driver sets them
    config = _trainer_config(
        [
            f"actor_rollout_ref.model.path={tiny_assets.student}",
            f"actor_rollout_ref.ref.model.path={tiny_assets.teacher}",
            f"data.train_files={tiny_assets.train_files}",
            f"data.val_files={tiny_assets.val_files}",
            *overrides,
        ],
        config_name=config_name,
    )
    driver.choose_platform(config)
    driver.prepare_trainer_config(config)
    job_env = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert {name: job_env[name] for name in RUN_MARKS if name in job_env} == marks
    assert {name: os.environ[name] for name in RUN_MARKS if os.environ[name]} == marks


def test_no_process_picks_the_cpu_platform_by_itself():
    result = _python(
        "from verl.plugin.platform import get_platform; print(get_platform().device_name)",
        {"VERL_PLATFORM": None},
    )
    assert result.stdout.split()[-1] == "cuda", result.stderr[-2000:]


def test_the_ray_cluster_lookup_follows_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6390")
    assert cpu_job._ray_cluster_to_join(_trainer_config()) == "10.1.2.3:6390"
    config = _trainer_config(["+ray_kwargs.ray_init.address=local"])
    monkeypatch.delenv("RAY_ADDRESS")
    assert cpu_job._ray_cluster_to_join(config) is None


# --- 2. every run-time adaptation applies only to the runs it is for ---------------------------

_ADAPTED_SYMBOLS = textwrap.dedent(
    """
    import importlib, inspect, json, sys
    if len(sys.argv) > 1:
        sys.orig_argv = [sys.executable, "-m", "verl.trainer.main_ppo"]  # this process plays the driver
    from verl.distill.compat import ADAPTATIONS
    owners = {}
    for adaptation in ADAPTATIONS:
        module = importlib.import_module(adaptation.module)
        for name in adaptation.replaces:
            symbol = module
            for part in name.split("."):
                symbol = getattr(symbol, part)
            owners[f"{adaptation.module}.{name}"] = inspect.getfile(symbol)
    print(json.dumps(owners))
    """
)


def _python(code, environment, *arguments):
    env = dict(os.environ)
    for name, value in environment.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run(
        [sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=300, env=env
    )


def _symbol_files(environment, *arguments) -> dict[str, str]:
    result = _python(_ADAPTED_SYMBOLS, environment, *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _ours(file: str) -> bool:
    return f"{os.sep}verl{os.sep}distill{os.sep}" in file


@pytest.mark.parametrize("stale_lora_mark", [None, "1"], ids=["clean environment", "stale LoRA-teacher mark"])
def test_a_stock_gpu_run_keeps_every_verl_symbol_that_verl_distill_can_adapt(stale_lora_mark):
    files = _symbol_files(
        {
            "VERL_PLATFORM": "nvidia",
            "VERL_DISTILL_RUN": None,
            "VERL_DISTILL_SELECT": None,
            "VERL_DISTILL_LORA_TEACHER": stale_lora_mark,
        }
    )
    expected = {f"{a.module}.{name}" for a in compat.ADAPTATIONS for name in a.replaces}
    assert set(files) == expected and len(files) >= 16
    assert [symbol for symbol, file in files.items() if _ours(file)] == []


def test_a_cpu_distillation_driver_has_every_adaptation():
    files = _symbol_files({"VERL_PLATFORM": "cpu", "VERL_DISTILL_RUN": "1"}, "as the trainer's driver")
    assert [symbol for symbol, file in files.items() if not _ours(file)] == []


ADAPTED_IN_A_GPU_DISTILLATION_RUN = {
    "verl.workers.engine_workers.ppo_loss",
    "verl.workers.engine_workers.ActorRolloutRefWorker.init_model",
    "verl.utils.checkpoint.checkpoint_manager.find_latest_ckpt_path",
    "verl.utils.tracking.FileLogger",
    "verl.trainer.ppo.v1.trainer_base.PPOTrainer._validate",
}


def test_a_gpu_distillation_run_adapts_only_what_distillation_needs():
    files = _symbol_files(
        {"VERL_PLATFORM": "nvidia", "VERL_DISTILL_RUN": "1", "VERL_DISTILL_SELECT": None, "VERL_DISTILL_LORA_TEACHER": None}
    )
    adapted = {symbol for symbol, file in files.items() if _ours(file)}
    assert adapted == ADAPTED_IN_A_GPU_DISTILLATION_RUN


def test_a_gpu_selection_run_also_adapts_the_reference_pass():
    files = _symbol_files({"VERL_PLATFORM": "nvidia", "VERL_DISTILL_RUN": "1", "VERL_DISTILL_SELECT": "random"})
    adapted = {symbol for symbol, file in files.items() if _ours(file)}
    assert adapted == ADAPTED_IN_A_GPU_DISTILLATION_RUN | {"verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_ref_log_prob"}
    assert files["verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_ref_log_prob"].endswith("selective_teacher.py")


def test_a_selection_strategy_outside_a_distillation_run_adapts_nothing():
    files = _symbol_files({"VERL_PLATFORM": "nvidia", "VERL_DISTILL_RUN": None, "VERL_DISTILL_SELECT": "random"})
    assert [symbol for symbol, file in files.items() if _ours(file)] == []


@pytest.mark.parametrize(
    ("distillation_run", "lora_teacher_run", "applies"),
    [("1", "1", True), ("1", None, False), (None, "1", False)],
)
def test_the_lora_teacher_adaptation_applies_only_to_a_marked_lora_distillation_run(
    monkeypatch, distillation_run, lora_teacher_run, applies
):
    for name, value in (("VERL_DISTILL_RUN", distillation_run), ("VERL_DISTILL_LORA_TEACHER", lora_teacher_run)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    (adaptation,) = [a for a in compat.ADAPTATIONS if a.adapt is compat._teacher_beside_lora_actor]
    assert adaptation.applies() is applies


def test_a_distillation_config_outside_a_marked_run_is_refused(monkeypatch):
    from verl.distill.actor_config import FSDPDistillActorConfig

    monkeypatch.delenv("VERL_DISTILL_RUN")
    with pytest.raises(compat.DistillationRunNotMarkedError, match="VERL_DISTILL_RUN=1"):
        FSDPDistillActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=1)


# --- 4. forks of verl's private code are pinned; an unknown verl stops only our runs ----------


def test_the_batched_agent_loop_is_pinned_to_the_verl_code_it_forks():
    from verl.distill import batched_agent_loop

    names = {function.__qualname__ for function, _ in batched_agent_loop.VERL_CODE_RELIED_ON}
    assert {"AgentLoopWorkerTQ._run_prompt", "AgentLoopWorkerTQ._agent_loop_postprocess"} <= names
    assert {"LLMServerClient._acquire_server", "LLMServerClient._release_server"} <= names
    for function, fingerprint in batched_agent_loop.VERL_CODE_RELIED_ON:
        assert compat.source_fingerprint(function) == fingerprint


def test_changed_verl_code_under_a_fork_fails_loudly():
    def changed(self, prompt):
        return prompt

    with pytest.raises(compat.UnsupportedVerlError, match="agent_loop_manager_class") as error:
        compat.require_unchanged(changed, "2adabe2def267da2", "use verl's own agent loop (agent_loop_manager_class=...)")
    assert "\n" not in str(error.value) and "source fingerprint" in str(error.value)


def test_the_selective_reference_pass_is_pinned_to_the_verl_code_it_relies_on():
    from types import SimpleNamespace

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    class ChangedTrainer(PPOTrainer):
        def _compute_ref_log_prob(self, batch, metrics):
            return batch

    with pytest.raises(compat.UnsupportedVerlError, match="select_strategy=all") as error:
        compat._reference_pass_on_selected_responses(SimpleNamespace(PPOTrainer=ChangedTrainer))
    assert "\n" not in str(error.value) and "_compute_ref_log_prob" in str(error.value)
    assert ChangedTrainer.__dict__["_compute_ref_log_prob"].__module__ == __name__  # left unchanged


_UNKNOWN_VERL = textwrap.dedent(
    """
    import sys
    import verl
    verl.__version__ = "0.10.0"
    sys.orig_argv = [sys.executable, "-m", "verl.trainer.main_ppo", *sys.argv[1:]]
    import verl.distill.plugin
    from verl.plugin.platform import PlatformRegistry
    from verl.distill.import_hooks import _pending
    print("registered:", PlatformRegistry.get("cpu"), sorted(_pending))
    """
)


def test_an_unknown_verl_leaves_a_stock_run_alone():
    result = _python(_UNKNOWN_VERL, {"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_PLATFORM": None}, *GPU_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("registered: None []")
    assert "verl-distill" not in result.stderr


@pytest.mark.parametrize(
    "arguments, asked_by",
    [
        (["--config-name=distillation_trainer"], "--config-name=distillation_trainer"),
        (["actor_rollout_ref.ref.model.path=/models/teacher"], "actor_rollout_ref.ref.model.path=/models/teacher"),
        (["trainer.device=cpu"], "trainer.device=cpu"),
    ],
)
def test_an_unknown_verl_stops_a_run_that_needs_verl_distill_in_one_line(arguments, asked_by):
    result = _python(_UNKNOWN_VERL, {"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_PLATFORM": None}, *arguments)
    assert result.returncode == driver.CONFIG_ERROR_EXIT_CODE
    assert result.stderr.strip().splitlines() == [
        f"verl-distill: error: {asked_by} needs verl-distill, but verl-distill supports verl==0.9.1 only, "
        "found verl 0.10.0; fix: install verl==0.9.1 or a verl-distill release made for verl 0.10.0"
    ]


# --- 6. the tests test the checkout ------------------------------------------------------------


def test_the_installed_copy_is_the_checkout():
    assert stale_installed_files() == []


def test_a_stale_install_is_noticed(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "verl", checkout / "verl", ignore=shutil.ignore_patterns("__pycache__"))
    edited = checkout / "verl" / "distill" / "driver.py"
    edited.write_text(edited.read_text() + "\n# edited\n")
    (checkout / "verl" / "distill" / "new_module.py").write_text("")
    (checkout / "verl" / "distill" / "opd.py").unlink()
    assert stale_installed_files(checkout) == [
        "verl/distill/driver.py (edited)",
        "verl/distill/new_module.py (not installed)",
        "verl/distill/opd.py (deleted in the checkout)",
    ]


def test_every_source_file_of_the_checkout_is_compared():
    compared = {
        path.relative_to(REPO).as_posix() for path in (REPO / "verl").rglob("*.py") if "__pycache__" not in path.parts
    }
    assert "verl/distill/compat.py" in compared
    assert inspect.getsourcefile(compat) != str(REPO / "verl" / "distill" / "compat.py")  # installed, not the checkout
    assert Path(inspect.getsourcefile(compat)).read_bytes() == (REPO / "verl" / "distill" / "compat.py").read_bytes()


_RAY_CLUSTER_WITH_GPUS = textwrap.dedent(
    """
    import sys
    import ray
    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False)
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # until the test closes stdin; then the cluster shuts down with its driver
    """
)


_DECIDE = textwrap.dedent(
    """
    from hydra import compose, initialize_config_module
    from verl.distill.cpu_job import decide_cpu_job
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer")
    print(decide_cpu_job(config, set()).reason)
    """
)


@pytest.mark.slow
def test_the_gpus_of_a_real_ray_cluster_are_read():
    cluster = subprocess.Popen(
        [sys.executable, "-c", _RAY_CLUSTER_WITH_GPUS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        address = cluster.stdout.readline().strip()
        assert address, "the cluster did not start"
        # Ray's token auth (on by default) is read when ray is imported: a joining driver sets it first
        environment = {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "VERL_PLATFORM": None}
        result = _python(_DECIDE, environment)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines()[-1] == f"the Ray cluster at {address} has 2 GPUs"
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)
