"""The one module where verl-distill changes verl's behaviour at run time.

Everything else in verl-distill uses verl's extension points (platform, rollout, reward-manager and
engine registries, config ``_target_`` classes). Thirteen things have no extension point in verl 0.9.1:

1. the actor's loss is hard-wired to ``ppo_loss`` in ``ActorRolloutRefWorker.init_model``:
   the module-level name is routed through our loss registry (``policy_loss.loss_mode``), and for
   distribution-level losses ``init_model`` then has the actor's engine hand the student's logits
   to that loss (verl's ``distillation_use_topk`` logits-processor path);
2. the driver has no hook between composing the config and starting Ray: ``auto_set_device``
   (called first by ``main_ppo.main``) is wrapped to decide whether the run is a CPU job
   (:mod:`verl.distill.cpu_job`), adapt the config of a CPU job, mark a distillation run, and
   validate distillation settings while a mistake still costs nothing (overrides that Hydra itself
   would reject, such as FSDP keys given to the Megatron config, are checked on the command line
   when this hook is installed, before Hydra composes). For a stock run with an accelerator it
   calls verl's function and changes nothing;
3. in a CPU job, the worker process group is built as ``cpu:gloo,cpu:gloo`` (rejected by torch):
   the worker passes plain ``gloo``;
4. in a CPU job, the forward-only (reference / teacher) FSDP2 engine pins host memory, which needs an
   accelerator: the offload policy is built unpinned; and the engine computes the sampled tokens'
   log-probs with verl's portable fallback, one logits row at a time (a GPU's memory bound): it
   computes them in blocks of rows (:mod:`verl.distill.token_log_probs`);
5. the v1 trainer waits for finished rollouts in hard-coded 2-second sleeps, longer than a whole
   step of a small model: it polls every ``VERL_DISTILL_ROLLOUT_POLL_S`` seconds (default 0.05).
6. ``resume_mode=auto`` reads the checkpoint tracker file, which verl rewrites in place: a run
   killed mid-write leaves it empty and can never resume (``int("")``). ``find_latest_ckpt_path``
   is replaced by one that trusts a readable tracker, falls back to the newest complete checkpoint
   only when the tracker is unreadable, and never silently trains from scratch when checkpoints
   exist (:mod:`verl.distill.checkpoints`); it is bound before the trainers import the name;
7. in a CPU job, the critic's value model is loaded with flash-attention hard-coded (ignoring
   ``override_config``): it is loaded with sdpa;
8. the reference pass returns only the teacher's log-prob of each sampled token, but the
   distribution-level losses need its top-k distribution: for those losses ``init_model`` wraps
   the reference engine's ``prepare_model_outputs`` (on that instance) to add the teacher's top-k
   ids, log-probs and tail log-prob at every response position to its output, which verl's worker
   returns and TransferQueue carries to the actor update (:mod:`verl.distill.teacher_topk`);
9. verl's ``file`` tracking backend opens its metrics file with ``"wb"``, so a run resumed with the
   same project and experiment name erased the metrics of every step before the resume: the file
   is opened for appending, and a resumed run's lines follow the earlier ones (after a kill, the
   steps re-run since the last checkpoint appear twice; the later line is the one that counts).
10. the v1 trainer's model phases (old log-probs, reference pass, values, actor and critic
   updates) read every field of the batch from TransferQueue, the dataset's columns included, which
   no engine uses (on the toy step they cost 0.09 s of the reference pass and 0.06 s of the update):
   those phases read the tensor fields and the few per-sample objects an engine consumes
   (:mod:`verl.distill.phase_fields`);
11. validation runs no model but the rollout, so a distillation run had no distance to its teacher
   on held-out prompts. verl has no validation hook that sees the batch, and a trainer subclass
   registered under its own ``trainer.v1.trainer_mode`` name would change the trainer (verl compares
   that name with ``"sync"`` in its buffer, checkpoint and rollout code): in a distillation run,
   ``_validate`` has each validation batch scored by the student and the teacher before verl reads
   it, and adds their KL to its metrics (:mod:`verl.distill.validation_teacher_kl`).
12. the v1 trainer's reference pass scores every row, and verl has no hook to hand the reference
   worker fewer rows (a custom trainer class would have to take over ``trainer_mode=sync``, which
   ``register_trainer`` refuses to re-register): with ``actor.distill.select_strategy`` other than
   ``all`` its ``_compute_ref_log_prob`` runs verl's own phase on the selected responses only and
   marks the rest for the losses (:mod:`verl.distill.selective_teacher`). The run's driver names the
   strategy in ``VERL_DISTILL_SELECT``;
13. a LoRA actor is its own reference in verl: the trainer decides ``ref_in_actor`` inline from the
   model config (in ``_setup`` and ``_init_resource_pool_mgr``, no hook), builds no reference model and
   asks the actor for log-probs with the adapters off. For a LoRA student with a separate teacher,
   ``init_model`` also builds verl's reference model (the teacher) in the actor's worker, and the
   actor's adapters-off requests are answered by it (:mod:`verl.distill.lora_teacher`). Replacing the
   trainer's decision instead would mean re-implementing ``_setup``; the worker side changes one
   instance method and keeps verl's trainer and reference construction as they are.

Each change applies only to the runs it is for (:data:`ADAPTATIONS`: a CPU job, a distillation
run, the trainer's driver process), so installing verl-distill leaves every other verl run, a GPU
PPO run in particular, with verl's own code. It is applied right after verl imports the module
concerned (see :mod:`verl.distill.import_hooks`), only on the verl version it was written against,
and checks that the code it replaces is still what it expects; anything else fails loudly.
"""

import functools
import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from verl.distill import SUPPORTED_VERL_VERSION
from verl.distill.import_hooks import when_imported

logger = logging.getLogger(__name__)


class UnsupportedVerlError(RuntimeError):
    """verl's code differs from what a run-time adaptation of verl-distill was written against."""


def installed_verl_version() -> str:
    import verl

    return getattr(verl, "__version__", "unknown")


def unsupported_verl_message(version: str) -> str:
    return (
        f"verl-distill supports verl=={SUPPORTED_VERL_VERSION} only, found verl {version}; "
        f"fix: install verl=={SUPPORTED_VERL_VERSION} or a verl-distill release made for verl {version}"
    )


def require_supported_verl() -> None:
    version = installed_verl_version()
    if version != SUPPORTED_VERL_VERSION:
        raise UnsupportedVerlError(unsupported_verl_message(version))


def source_fingerprint(function: Callable) -> str:
    """A short hash of a function's source: equal only for the code a fork was written from."""
    import hashlib
    import textwrap

    return hashlib.sha256(textwrap.dedent(inspect.getsource(function)).encode()).hexdigest()[:16]


def require_unchanged(function: Callable, fingerprint: str, fix: str) -> None:
    """Fail loudly unless verl's ``function`` is the code verl-distill re-implements or relies on."""
    actual = source_fingerprint(function)
    _expect(
        actual == fingerprint,
        f"{function.__module__}.{function.__qualname__} is not the code verl-distill was written against "
        f"(source fingerprint {actual}, expected {fingerprint}); fix: {fix}",
    )


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedVerlError(f"verl-distill cannot adapt verl {SUPPORTED_VERL_VERSION}: {what}")


def route_actor_loss(config, model_output=None, data=None, dp_group=None, **distribution_inputs):
    """The actor's loss, chosen by ``actor.policy_loss.loss_mode`` through verl-distill's loss registry.

    verl's own policy losses (``vanilla``, ``gspo``, ...) resolve to verl's ``ppo_loss``, so a stock
    configuration trains exactly as before. Distribution-level losses are also called by the engine
    as its logits processor, with ``student_logits``.
    """
    from verl.workers.roles.utils.loss_registry import get_loss_fn

    loss_fn = get_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
    if "student_logits" in distribution_inputs:
        return loss_fn(config=config, data=data, **distribution_inputs)
    return loss_fn(config=config, model_output=model_output, data=data, dp_group=dp_group)


def _distribution_loss_options(worker):
    """The ``distill`` options when the actor trains with a distribution-level loss, else None."""
    from verl.distill.loss_config import DistillLossConfig
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.roles.utils.loss_registry import needs_teacher_logits

    actor = worker.config.actor
    if not needs_teacher_logits(actor.policy_loss.get("loss_mode", "vanilla")):
        return None
    return omega_conf_to_dataclass(actor.get("distill") or {}, dataclass_type=DistillLossConfig)


def _single_sequence_shard(engine, role: str) -> None:
    _expect(hasattr(engine, "use_ulysses_sp"), "the FSDP engine no longer has use_ulysses_sp")
    if engine.use_ulysses_sp:
        raise ValueError(
            f"actor_rollout_ref.{role}.ulysses_sequence_parallel_size > 1 is not supported by the "
            "distribution-level losses (each rank would hold part of a sequence's logits); set it to 1"
        )


def _ask_actor_for_student_logits(worker) -> None:
    """Have the actor's engine call the loss as its logits processor (verl's ``distillation_use_topk``
    path), where the student's logits meet the teacher's top-k carried in the micro-batch."""
    _single_sequence_shard(worker.actor.engine, "actor")
    train_mini_batch = worker.actor.train_mini_batch

    @functools.wraps(train_mini_batch)
    def train_with_student_logits(data):
        from verl.utils import tensordict_utils as tu

        tu.assign_non_tensor(data, distillation_use_topk=True)
        return train_mini_batch(data=data)

    worker.actor.train_mini_batch = train_with_student_logits


_REF_OUTPUT_PARAMETERS = ["output", "output_args", "micro_batch", "logits_processor_func"]


def _make_reference_pass_carry_teacher_topk(worker, options) -> None:
    """Wrap the reference engine's ``prepare_model_outputs`` so that the reference pass also returns
    the teacher's top-k at every response position (:mod:`verl.distill.teacher_topk`)."""
    from verl.distill.teacher_topk import carrying_teacher_topk
    from verl.workers.engine.utils import postprocess_batch_func

    engine = worker.ref.engine
    _single_sequence_shard(engine, "ref")
    _expect(
        list(inspect.signature(engine.prepare_model_outputs).parameters) == _REF_OUTPUT_PARAMETERS,
        "the FSDP engine's prepare_model_outputs no longer takes (output, output_args, micro_batch, "
        "logits_processor_func)",
    )
    forward_step_source = inspect.getsource(type(engine).forward_step)
    _expect(
        "self.prepare_model_outputs(" in forward_step_source
        and '"model_output": detach_tree(model_output)' in forward_step_source,
        "the FSDP engine's forward_step no longer returns what prepare_model_outputs built as its model_output",
    )
    _expect(
        'for key, val in o["model_output"].items()' in inspect.getsource(postprocess_batch_func),
        "postprocess_batch_func no longer returns every model_output field",
    )
    tokenizer_size = len(engine.model_config.tokenizer)
    engine.prepare_model_outputs = carrying_teacher_topk(engine.prepare_model_outputs, options, tokenizer_size)


def _prepare_distribution_losses(worker) -> None:
    options = _distribution_loss_options(worker)
    if options is None:
        return
    if getattr(worker, "ref", None) is not None:
        _make_reference_pass_carry_teacher_topk(worker, options)
    if getattr(worker, "actor", None) is not None:
        _ask_actor_for_student_logits(worker)


def _adapt_engine_workers(module: ModuleType) -> None:
    require_supported_verl()
    from verl.workers.utils.losses import ppo_loss

    _expect(module.ppo_loss is ppo_loss, "engine_workers.ppo_loss is no longer verl's ppo_loss")
    _expect(
        "partial(ppo_loss, config=actor_config)" in inspect.getsource(module.ActorRolloutRefWorker.init_model),
        "ActorRolloutRefWorker.init_model no longer builds the actor loss from ppo_loss",
    )
    module.ppo_loss = route_actor_loss

    from verl.distill.teacher import verify_init_model_routes_ref_model_config

    verify_init_model_routes_ref_model_config(inspect.getsource(module.ActorRolloutRefWorker.init_model))

    original_init_model = module.ActorRolloutRefWorker.init_model

    from verl.distill.lora_teacher import check_lora_student_has_its_teacher
    from verl.distill.teacher import check_ref_holds_teacher

    @functools.wraps(original_init_model)
    def init_model(self):
        original_init_model(self)
        check_ref_holds_teacher(self)
        check_lora_student_has_its_teacher(self)
        _prepare_distribution_losses(self)

    module.ActorRolloutRefWorker.init_model = init_model



# verl's code the LoRA student's teacher relies on: the actor worker computes log-probs with its
# TrainingWorker's infer_batch, which reads the trainer's adapters-off request.
_LORA_REFERENCE_REQUEST_FINGERPRINTS = (
    ("ActorRolloutRefWorker.compute_log_prob", "fe5b9b04b0c571c4"),
    ("TrainingWorker.infer_batch", "3ebb58da0ac11502"),
)
# The trainers that send a LoRA actor's reference pass to compute_log_prob with no_lora_adapter.
_LORA_REFERENCE_TRAINERS = ("verl.trainer.ppo.v1.trainer_base", "verl.trainer.ppo.ray_trainer")


def _lora_trainers_ask_the_actor_for_the_reference() -> None:
    import importlib.util
    from pathlib import Path

    for name in _LORA_REFERENCE_TRAINERS:
        source = Path(importlib.util.find_spec(name).origin).read_text()
        _expect(
            'metadata["no_lora_adapter"] = True' in source and "self.actor_rollout_wg.compute_log_prob(" in source,
            f"{name} no longer asks a LoRA actor for the reference log-probs with no_lora_adapter",
        )


def _teacher_beside_lora_actor(module: ModuleType) -> None:
    require_supported_verl()
    from verl.distill.lora_teacher import with_teacher_beside_lora_actor

    fix = "use the verl version verl-distill was written for, or train the full student"
    for qualified_name, fingerprint in _LORA_REFERENCE_REQUEST_FINGERPRINTS:
        class_name, method = qualified_name.split(".")
        require_unchanged(getattr(getattr(module, class_name), method), fingerprint, fix)
    init_model_source = inspect.getsource(module.ActorRolloutRefWorker.init_model)
    _expect(
        'if "ref" in self.role:' in init_model_source and "self.ref = self.ref_worker_cls(" in init_model_source,
        "ActorRolloutRefWorker.init_model no longer builds the reference model where the role names it",
    )
    _lora_trainers_ask_the_actor_for_the_reference()
    module.ActorRolloutRefWorker.init_model = with_teacher_beside_lora_actor(module.ActorRolloutRefWorker.init_model)


def _gloo_process_group_on_cpu(module: ModuleType) -> None:
    require_supported_verl()
    original_init_group = module.initialize_global_process_group_ray
    _expect(
        list(inspect.signature(original_init_group).parameters) == ["timeout_second", "backend"]
        and 'backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in inspect.getsource(original_init_group),
        "initialize_global_process_group_ray(timeout_second, backend) no longer defaults to cpu:gloo,<device>:<backend>",
    )

    @functools.wraps(original_init_group)
    def initialize_process_group(timeout_second=None, backend=None):
        return original_init_group(timeout_second=timeout_second, backend=backend or "gloo")

    module.initialize_global_process_group_ray = initialize_process_group


def _adapt_fsdp_engine(module: ModuleType) -> None:
    require_supported_verl()
    pinned_policy = module.CPUOffloadPolicy
    _expect(pinned_policy is not None, "FSDP2 CPUOffloadPolicy is missing")

    class UnpinnedCPUOffloadPolicy(pinned_policy):
        """Pinning host memory needs an accelerator; on a CPU the offloaded tensors stay pageable."""

        def __init__(self, pin_memory: bool = False):
            super().__init__(pin_memory=False)

    module.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy

    from verl.distill.token_log_probs import token_log_probs

    _expect(
        module.logprobs_from_logits.__module__ == "verl.utils.torch_functional",
        "the FSDP engine no longer takes logprobs_from_logits from verl.utils.torch_functional",
    )
    module.logprobs_from_logits = token_log_probs


ROLLOUT_POLL_ENV = "VERL_DISTILL_ROLLOUT_POLL_S"
DEFAULT_ROLLOUT_POLL_S = 0.05


def _poll_rollouts_promptly(module: ModuleType) -> None:
    require_supported_verl()

    stock_buffer = module.ReplayBuffer
    _expect(
        inspect.signature(stock_buffer.__init__).parameters["poll_interval"].default == 2.0,
        "ReplayBuffer no longer takes poll_interval=2.0",
    )
    poll_seconds = float(os.environ.get(ROLLOUT_POLL_ENV, DEFAULT_ROLLOUT_POLL_S))

    class PromptlyPolledReplayBuffer(stock_buffer):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("poll_interval", poll_seconds)
            super().__init__(*args, **kwargs)

    PromptlyPolledReplayBuffer.__name__ = PromptlyPolledReplayBuffer.__qualname__ = stock_buffer.__name__
    module.ReplayBuffer = PromptlyPolledReplayBuffer


def _resume_from_complete_checkpoints(module: ModuleType) -> None:
    require_supported_verl()
    from verl.distill.checkpoints import TRACKER_NAME, find_latest_complete_checkpoint

    _expect(
        module.get_checkpoint_tracker_filename("") == TRACKER_NAME,
        f"the checkpoint tracker is no longer named {TRACKER_NAME}",
    )
    _expect(
        "int(f.read().decode())" in inspect.getsource(module.find_latest_ckpt_path),
        "find_latest_ckpt_path no longer reads the step number from the tracker file",
    )
    module.find_latest_ckpt_path = find_latest_complete_checkpoint


def _value_models_without_flash_attention(module: ModuleType) -> None:
    require_supported_verl()
    flash_loader = module.load_valuehead_model
    _expect(
        inspect.getsource(flash_loader).count('attn_implementation="flash_attention_2"') == 2,
        "load_valuehead_model no longer hard-codes flash_attention_2",
    )

    @functools.wraps(flash_loader)
    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            pretrained_model_name_or_path=local_path,
            torch_dtype=torch_dtype,
            config=model_config,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        )

    module.load_valuehead_model = load_valuehead_model


MODEL_PHASES = ("_compute_old_log_prob", "_compute_ref_log_prob", "_compute_values", "_update_critic", "_update_actor")


def _send_model_phases_their_fields(module: ModuleType) -> None:
    require_supported_verl()
    from verl.distill.phase_fields import send_model_fields_only

    trainer_cls = module.PPOTrainer
    for name in MODEL_PHASES:
        phase = getattr(trainer_cls, name, None)
        _expect(
            phase is not None and "_wg." in inspect.getsource(phase) and "(batch)" in inspect.getsource(phase),
            f"PPOTrainer.{name} no longer hands its batch meta to a worker group",
        )
        setattr(trainer_cls, name, send_model_fields_only(phase))


# verl's code the validation KL relies on: where _validate takes each validation batch from the replay
# buffer (and frees it), and what the reference phase writes back.
VALIDATION_CODE_FINGERPRINTS = {"_validate": "b49df6b1cabefe9b", "_compute_ref_log_prob": "6144382217765824"}


def _measure_teacher_kl_on_validation(module: ModuleType) -> None:
    require_supported_verl()
    from verl.distill.validation_teacher_kl import measure_teacher_kl

    trainer_cls = module.PPOTrainer
    fix = f"reinstall an unmodified verl=={SUPPORTED_VERL_VERSION} (the validation teacher KL relies on this code)"
    for name, fingerprint in VALIDATION_CODE_FINGERPRINTS.items():
        require_unchanged(getattr(trainer_cls, name), fingerprint, fix)
    student_phase = inspect.getsource(trainer_cls._compute_old_log_prob)
    _expect(
        "self.actor_rollout_wg.compute_log_prob(batch)" in student_phase and 'data.pop("log_probs")' in student_phase,
        "the actor's compute_log_prob no longer leaves the log-probs in the batch's log_probs field",
    )
    trainer_cls._validate = measure_teacher_kl(trainer_cls._validate)


# verl code the selective reference pass relies on: the phase it calls on a sub-batch writes
# ref_log_prob for exactly that batch's keys, _step_once scores rewards before that phase, and the
# reference worker takes its micro-batch size from the batch's info when the batch carries one.
SELECTIVE_REFERENCE_PASS_RELIES_ON = (
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer._compute_ref_log_prob", "6144382217765824"),
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer._step_once", "b82ae0c246dd687f"),
    ("verl.workers.engine_workers", "TrainingWorker.infer_batch", "3ebb58da0ac11502"),
)


def _reference_pass_on_selected_responses(module: ModuleType) -> None:
    require_supported_verl()
    from verl.distill.selective_teacher import selective_reference_pass

    for module_name, qualified_name, fingerprint in SELECTIVE_REFERENCE_PASS_RELIES_ON:
        owner = module if module_name == "verl.trainer.ppo.v1.trainer_base" else importlib.import_module(module_name)
        class_name, function_name = qualified_name.split(".")
        require_unchanged(
            getattr(getattr(owner, class_name), function_name),
            fingerprint,
            "set actor_rollout_ref.actor.distill.select_strategy=all, or install the verl verl-distill supports",
        )
    trainer_cls = module.PPOTrainer
    trainer_cls._compute_ref_log_prob = selective_reference_pass(trainer_cls._compute_ref_log_prob)


def _wrap_driver_hook(module: ModuleType) -> None:
    require_supported_verl()
    from verl.distill.driver import check_command_line

    # Hydra composes the config before main() runs, and fails on keys a YAML lacks with a long
    # message: the trainer's own command line is checked now, while ``import verl`` loads us.
    check_command_line()
    original_auto_set_device = module.auto_set_device
    _expect(
        list(inspect.signature(original_auto_set_device).parameters) == ["config"]
        and "get_platform().device_name" in inspect.getsource(original_auto_set_device),
        "auto_set_device(config) no longer sets trainer.device from the platform",
    )

    @functools.wraps(original_auto_set_device)
    def auto_set_device(config) -> None:
        from verl.distill.driver import choose_platform, prepare_trainer_config

        # the platform first: verl's function rewrites trainer.device to the platform it resolves
        choose_platform(config)
        original_auto_set_device(config)
        prepare_trainer_config(config)

    module.auto_set_device = auto_set_device


def _append_file_metrics(module: ModuleType) -> None:
    require_supported_verl()
    stock_logger = module.FileLogger
    stock_init = inspect.getsource(stock_logger.__init__)
    _expect(
        'open(self.filepath, "wb", buffering=0)' in stock_init
        and '"VERL_FILE_LOGGER_PATH"' in stock_init
        and '"VERL_FILE_LOGGER_ROOT"' in stock_init,
        "FileLogger no longer opens <VERL_FILE_LOGGER_PATH or VERL_FILE_LOGGER_ROOT/project/experiment.jsonl> with 'wb'",
    )

    class AppendingFileLogger(stock_logger):
        """verl's file logger, same path rules, but a resumed run adds to its metrics file."""

        def __init__(self, project_name: str, experiment_name: str):
            self.project_name = project_name
            self.experiment_name = experiment_name
            self.filepath = os.getenv("VERL_FILE_LOGGER_PATH") or os.path.join(
                os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", ".")), project_name, f"{experiment_name}.jsonl"
            )
            os.makedirs(os.path.dirname(os.path.abspath(self.filepath)), exist_ok=True)
            print(f"Creating file logger at {os.path.abspath(self.filepath)} (appending)")
            self.fp = open(self.filepath, "ab", buffering=0)

    AppendingFileLogger.__name__ = AppendingFileLogger.__qualname__ = stock_logger.__name__
    module.FileLogger = AppendingFileLogger


DISTILLATION_RUN_ENV = "VERL_DISTILL_RUN"


def distillation_run() -> bool:
    """True in every process of a run whose config selects distillation: the driver marks the Ray job
    with ``VERL_DISTILL_RUN=1`` (:func:`verl.distill.driver.prepare_trainer_config`)."""
    return os.environ.get(DISTILLATION_RUN_ENV) == "1"


class DistillationRunNotMarkedError(RuntimeError):
    """A distillation config reached a process of a run the driver did not mark as distillation."""


def require_distillation_run() -> None:
    """Refuse to build a distillation config in a process without the distillation adaptations,
    where the actor would silently train with verl's PPO loss instead of the distillation loss."""
    if not distillation_run():
        raise DistillationRunNotMarkedError(
            f"verl-distill: this process builds a distillation config but its run is not marked with "
            f"{DISTILLATION_RUN_ENV}=1, so verl's PPO loss would replace the distillation loss; start the "
            f"run with python -m verl.trainer.main_ppo (its driver marks it), or set "
            f"ray_kwargs.ray_init.runtime_env.env_vars.{DISTILLATION_RUN_ENV}=1"
        )


RESPONSE_SELECTION_ENV = "VERL_DISTILL_SELECT"


def response_selection_run() -> bool:
    """True in every process of a distillation run whose teacher scores only some responses: the
    driver names ``actor.distill.select_strategy`` in ``VERL_DISTILL_SELECT`` when it is not ``all``."""
    return distillation_run() and os.environ.get(RESPONSE_SELECTION_ENV, "all") != "all"


def _lora_teacher_run() -> bool:
    from verl.distill.lora_teacher import lora_teacher_run

    return lora_teacher_run()


def _cpu_job() -> bool:
    from verl.distill.cpu_job import cpu_platform_active

    return cpu_platform_active()


def _trainer_driver() -> bool:
    import sys

    from verl.distill.driver import trainer_arguments

    return trainer_arguments(sys.orig_argv) is not None


@dataclass(frozen=True)
class Adaptation:
    """One change of verl's behaviour: in which verl module, which names it replaces there, and the
    condition (checked in each process when verl imports the module) under which it applies."""

    module: str
    replaces: tuple[str, ...]
    condition: str
    applies: Callable[[], bool]
    adapt: Callable[[ModuleType], None]


# The docs' table of run-time adaptations (docs/algo/distillation.md) lists these rows.
ADAPTATIONS: tuple[Adaptation, ...] = (
    Adaptation(
        "verl.utils.device",
        ("auto_set_device",),
        "the driver process of python -m verl.trainer.main_ppo",
        _trainer_driver,
        _wrap_driver_hook,
    ),
    Adaptation(
        "verl.workers.engine_workers",
        ("ppo_loss", "ActorRolloutRefWorker.init_model"),
        "distillation run",
        distillation_run,
        _adapt_engine_workers,
    ),
    Adaptation(
        "verl.workers.engine_workers",
        ("ActorRolloutRefWorker.init_model",),
        "distillation run with a LoRA student and a separate teacher",
        lambda: distillation_run() and _lora_teacher_run(),
        _teacher_beside_lora_actor,
    ),
    Adaptation(
        "verl.workers.engine_workers",
        ("initialize_global_process_group_ray",),
        "CPU job",
        _cpu_job,
        _gloo_process_group_on_cpu,
    ),
    Adaptation(
        "verl.workers.engine.fsdp.transformer_impl",
        ("CPUOffloadPolicy", "logprobs_from_logits"),
        "CPU job",
        _cpu_job,
        _adapt_fsdp_engine,
    ),
    Adaptation(
        "verl.trainer.ppo.v1.replay_buffer",
        ("ReplayBuffer",),
        "CPU job",
        _cpu_job,
        _poll_rollouts_promptly,
    ),
    Adaptation(
        "verl.trainer.ppo.v1.trainer_base",
        tuple(f"PPOTrainer.{phase}" for phase in MODEL_PHASES),
        "CPU job",
        _cpu_job,
        _send_model_phases_their_fields,
    ),
    # after the one above: the selected rows' sub-batch goes through it to verl's phase
    Adaptation(
        "verl.trainer.ppo.v1.trainer_base",
        ("PPOTrainer._compute_ref_log_prob",),
        "distillation run with select_strategy other than all",
        response_selection_run,
        _reference_pass_on_selected_responses,
    ),
    Adaptation(
        "verl.trainer.ppo.v1.trainer_base",
        ("PPOTrainer._validate",),
        "distillation run",
        distillation_run,
        _measure_teacher_kl_on_validation,
    ),
    Adaptation(
        "verl.utils.model",
        ("load_valuehead_model",),
        "CPU job",
        _cpu_job,
        _value_models_without_flash_attention,
    ),
    Adaptation(
        "verl.utils.checkpoint.checkpoint_manager",
        ("find_latest_ckpt_path",),
        "distillation run or CPU job",
        lambda: distillation_run() or _cpu_job(),
        _resume_from_complete_checkpoints,
    ),
    Adaptation(
        "verl.utils.tracking",
        ("FileLogger",),
        "distillation run or CPU job",
        lambda: distillation_run() or _cpu_job(),
        _append_file_metrics,
    ),
)


def _applied_when_due(adaptation: Adaptation) -> Callable[[ModuleType], None]:
    def apply(module: ModuleType) -> None:
        if adaptation.applies():
            adaptation.adapt(module)

    apply.__qualname__ = adaptation.adapt.__qualname__
    return apply


def install() -> None:
    """Register every run-time adaptation; each applies, where its condition holds, when verl
    imports the module concerned."""
    require_supported_verl()
    for adaptation in ADAPTATIONS:
        when_imported(adaptation.module, _applied_when_due(adaptation))
