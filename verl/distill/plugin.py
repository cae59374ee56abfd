"""verl-distill's entry point in verl's ``verl.plugins`` group: loaded by ``import verl`` in every process.

It registers, into verl's own registries: the ``cpu`` platform, the ``hf`` rollout backend, the
``distillation`` reward manager, the ``opd`` advantage estimator, the ``distill_dataset_response``
agent loop, the FSDP engines for device ``cpu``; and installs the few
run-time adaptations of :mod:`verl.distill.compat`. Registrations that live in expensive verl
modules happen when verl imports those modules, so a Ray process pays only for what it uses.

verl logs a failing plugin at DEBUG level and carries on, which would surface much later as
"Unknown reward manager" or "Rollout hf not found"; a failure here is logged as an error and
re-raised.

On a verl other than the one verl-distill was written for, nothing is registered or adapted, so
every verl run of that environment is stock verl; only the trainer's driver of a run that asks for
distillation or the CPU backend stops, with one line (:func:`verl.distill.driver.refuse_unsupported_verl`).
"""

import logging

from verl.distill.import_hooks import when_imported

logger = logging.getLogger(__name__)

HF_ROLLOUT_REPLICA = "verl.distill.hf_rollout.HFReplica"
HF_ROLLOUT_ADAPTER = "verl.distill.hf_rollout.HFServerAdapter"


def _load_hf_replica():
    from verl.distill.hf_rollout import HFReplica

    return HFReplica


def _register_hf_replica(replica_module) -> None:
    replica_module.RolloutReplicaRegistry.register("hf", _load_hf_replica)


def _register_hf_adapter(rollout_base_module) -> None:
    rollout_base_module._ROLLOUT_REGISTRY[("hf", "async")] = HF_ROLLOUT_ADAPTER


def _register_cpu_engines(fsdp_engine_module) -> None:
    # verl's FSDP engines are device-agnostic but registered for cuda/npu only.
    register = fsdp_engine_module.EngineRegistry.register
    register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(
        fsdp_engine_module.FSDPEngineWithLMHead
    )
    register(model_type="value_model", backend=["fsdp", "fsdp2"], device="cpu")(
        fsdp_engine_module.FSDPEngineWithValueHead
    )


def _register_dataset_response_agent_loop(agent_loop_module) -> None:
    from verl.distill.policy_mixing import DATASET_RESPONSE_AGENT_LOOP, DATASET_RESPONSE_AGENT_LOOP_CLASS

    # the entry verl's @register writes, without importing the agent loop before a worker builds one
    agent_loop_module._agent_loop_registry[DATASET_RESPONSE_AGENT_LOOP] = {"_target_": DATASET_RESPONSE_AGENT_LOOP_CLASS}


def _register_reward_manager(_reward_manager_package) -> None:
    import verl.workers.reward_manager.distillation  # noqa: F401  (registers "distillation")


def _register_opd_estimator(_core_algos) -> None:
    import verl.distill.opd  # noqa: F401  (registers the "opd" advantage estimator)


def register_all() -> None:
    from verl.distill import SUPPORTED_VERL_VERSION, compat

    version = compat.installed_verl_version()
    if version != SUPPORTED_VERL_VERSION:
        from verl.distill.driver import refuse_unsupported_verl

        refuse_unsupported_verl(version)
        return

    from verl.distill import cpu_platform  # noqa: F401  (registers the "cpu" platform)

    compat.install()
    when_imported("verl.workers.rollout.replica", _register_hf_replica)
    when_imported("verl.workers.rollout.base", _register_hf_adapter)
    when_imported("verl.workers.engine.fsdp.transformer_impl", _register_cpu_engines)
    when_imported("verl.experimental.reward_loop.reward_manager", _register_reward_manager)
    when_imported("verl.experimental.agent_loop.agent_loop", _register_dataset_response_agent_loop)
    when_imported("verl.trainer.ppo.core_algos", _register_opd_estimator)


try:
    register_all()
except Exception:
    logger.error("verl-distill: registration in verl failed; distillation and the CPU backend are unavailable", exc_info=True)
    raise
