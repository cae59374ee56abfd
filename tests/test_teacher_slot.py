"""The teacher in verl's reference slot: config classes, tokenizer check, guards on verl's init_model."""

import os
from copy import deepcopy
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config

import verl
from verl.distill.teacher import (
    REF_MODEL_CONFIG_ASSIGNMENT,
    TEACHER_REF_TARGETS,
    FSDPTeacherRefConfig,
    McoreTeacherRefConfig,
    TeacherSlotError,
    TokenizerMismatchError,
    build_teacher_model_config,
    check_ref_holds_teacher,
    check_tokenizers_match,
    student_lora_setting,
    verify_init_model_routes_ref_model_config,
)
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, MtpConfig

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
TOKENS = ["<unk>", "<pad>", "<eos>", "1", "2", "+", "="]


def save_tiny_model(path, tokens=TOKENS, vocab_size=None, hidden_size=8):
    """A model folder as verl reads it: HF config and tokenizer (no weights are needed to build configs)."""
    word_level = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(path)
    Qwen2Config(
        vocab_size=vocab_size or len(tokens),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("student"), vocab_size=16, hidden_size=8)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    # same tokenizer, bigger model with a differently padded embedding matrix
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), vocab_size=32, hidden_size=16)


def compose_trainer(config_name, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name, overrides=overrides)


def ref_config_and_student(config):
    """The two configs verl's ActorRolloutRefWorker.init_model builds before the ref engine."""
    ref_node = deepcopy(config.actor_rollout_ref.ref)
    with open_dict(ref_node):  # init_model renames the ref's log-prob batch keys first
        ref_node.ppo_mini_batch_size = config.actor_rollout_ref.actor.ppo_mini_batch_size
        ref_node.ppo_micro_batch_size = ref_node.pop("log_prob_micro_batch_size", None)
        ref_node.ppo_micro_batch_size_per_gpu = ref_node.pop("log_prob_micro_batch_size_per_gpu", None) or 1
        ref_node.use_dynamic_bsz = ref_node.pop("log_prob_use_dynamic_bsz", False)
        ref_node.ppo_max_token_len_per_gpu = ref_node.pop("log_prob_max_token_len_per_gpu", None)
    return omega_conf_to_dataclass(ref_node), omega_conf_to_dataclass(config.actor_rollout_ref.model)


def assign_student_as_verl_does(ref_config, student):
    exec(REF_MODEL_CONFIG_ASSIGNMENT, {"deepcopy": deepcopy}, {"ref_config": ref_config, "model_config": student})
    ref_config.model_config.mtp = MtpConfig(enable=False)


@pytest.mark.parametrize(
    ("config_name", "ref_class"),
    [("distillation_trainer", FSDPTeacherRefConfig), ("distillation_megatron_trainer", McoreTeacherRefConfig)],
)
def test_verls_assignment_of_the_student_gives_the_ref_the_teacher(config_name, ref_class, student_dir, teacher_dir):
    config = compose_trainer(
        config_name,
        [
            f"actor_rollout_ref.model.path={student_dir}",
            f"actor_rollout_ref.ref.model.path={teacher_dir}",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
            "actor_rollout_ref.ref.model.override_config={max_position_embeddings: 64}",
        ],
    )
    ref_config, student = ref_config_and_student(config)
    assert type(ref_config) is ref_class

    assign_student_as_verl_does(ref_config, student)

    teacher = ref_config.model_config
    assert teacher.local_path == teacher_dir and teacher.tokenizer_path == teacher_dir
    assert teacher.hf_config.hidden_size == 16 and teacher.hf_config.vocab_size == 32
    # the student's loading settings follow, the teacher's own keys merge in
    assert teacher.override_config == {"attn_implementation": "sdpa", "max_position_embeddings": 64}
    assert teacher.hf_config.max_position_embeddings == 64
    assert student.local_path == student_dir and student.hf_config.hidden_size == 8
    assert student.override_config == {"attn_implementation": "sdpa"}


def test_without_a_teacher_the_ref_is_the_student_as_in_verl(student_dir):
    config = compose_trainer("distillation_trainer", [f"actor_rollout_ref.model.path={student_dir}"])
    ref_config, student = ref_config_and_student(config)
    assign_student_as_verl_does(ref_config, student)
    assert ref_config.model_config.local_path == student_dir


def test_teacher_drops_the_students_adapters_and_mtp(student_dir, teacher_dir):
    student = HFModelConfig(
        path=student_dir, lora_rank=8, lora_adapter_path="/adapters", lora={"rank": 8}, mtp=MtpConfig(enable=True)
    )
    teacher = build_teacher_model_config(student, {"path": teacher_dir, "trust_remote_code": None})
    assert (teacher.lora_rank, teacher.lora_adapter_path, teacher.lora, teacher.mtp.enable) == (0, None, {}, False)
    assert teacher.trust_remote_code is student.trust_remote_code  # null in the yaml: the student's setting


def test_unknown_teacher_key_is_refused_with_its_name(student_dir, teacher_dir):
    config = compose_trainer(
        "distillation_trainer",
        [f"actor_rollout_ref.model.path={student_dir}", "+actor_rollout_ref.ref.model.lora_rank=8"],
    )
    with pytest.raises(Exception, match=r"actor_rollout_ref\.ref\.model\.lora_rank is not a teacher model setting"):
        ref_config_and_student(config)


def test_ref_targets_name_importable_classes():
    assert TEACHER_REF_TARGETS["fsdp2"] == "verl.distill.teacher.FSDPTeacherRefConfig"
    assert TEACHER_REF_TARGETS["megatron"] == "verl.distill.teacher.McoreTeacherRefConfig"


def test_tokenizers_with_the_same_map_and_different_embedding_sizes_match(student_dir, teacher_dir):
    check_tokenizers_match(student_dir, teacher_dir)


def test_tokenizers_with_a_different_map_are_refused(student_dir, tmp_path):
    other = save_tiny_model(tmp_path / "other", tokens=["<unk>", "<pad>", "<eos>", "2", "1", "+", "="], vocab_size=16)
    with pytest.raises(TokenizerMismatchError, match="2 tokens map to different ids"):
        check_tokenizers_match(student_dir, other)


def test_tokenizers_with_extra_tokens_are_refused(student_dir, tmp_path):
    bigger = save_tiny_model(tmp_path / "bigger", tokens=TOKENS + ["3"], vocab_size=16)
    with pytest.raises(TokenizerMismatchError, match="'3': student None, teacher 7"):
        check_tokenizers_match(student_dir, bigger)


def test_verls_init_model_still_routes_the_ref_model_config():
    verify_init_model_routes_ref_model_config()


@pytest.mark.parametrize(
    ("changed_source", "missing_step"),
    [
        ("ref_config = build(self.config.ref)\nWorkerConfig(model_config=ref_config.model_config)", "ref_config"),
        ("ref_config.model_config = deepcopy(model_config)\nWorkerConfig(model_config=model_config)", "model_"),
    ],
)
def test_init_model_guard_fails_loudly_when_verl_changes(changed_source, missing_step):
    with pytest.raises(TeacherSlotError, match=f"no longer contains `{missing_step}"):
        verify_init_model_routes_ref_model_config(changed_source)


def fake_worker(requested_teacher, loaded_path):
    ref_node = OmegaConf.create({"model": {"path": requested_teacher}})
    loaded = SimpleNamespace(engine=SimpleNamespace(model_config=SimpleNamespace(path=loaded_path)))
    return SimpleNamespace(config=SimpleNamespace(ref=ref_node), ref=loaded)


def test_ref_engine_check_accepts_the_teacher_and_refuses_the_student():
    check_ref_holds_teacher(fake_worker("/teacher", "/teacher"))
    check_ref_holds_teacher(fake_worker(None, "/student"))  # no teacher requested: stock verl
    with pytest.raises(TeacherSlotError, match="loaded '/student' instead of the teacher '/teacher'"):
        check_ref_holds_teacher(fake_worker("/teacher", "/student"))


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ({"lora_rank": 8}, "actor_rollout_ref.model.lora_rank"),
        ({"lora": {"rank": 16}}, "actor_rollout_ref.model.lora.rank"),
        ({"lora_adapter_path": "/adapters"}, "actor_rollout_ref.model.lora_adapter_path"),
    ],
)
def test_lora_student_is_detected_by_the_key_verl_reads(model, key):
    assert student_lora_setting({"lora_rank": 0, "lora": {"rank": 0}, **model})[0] == key


def test_full_student_is_not_lora():
    assert student_lora_setting({"lora_rank": 0, "lora": {"rank": 0}, "lora_adapter_path": None}) is None
