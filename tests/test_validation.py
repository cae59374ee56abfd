"""Driver-side checks of a distillation config: each mistake is one line naming the key and the fix."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

import verl
from verl.distill.validation import DistillConfigError, validate_distillation_config

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
PROMPT = [{"role": "user", "content": "1 + 2 ="}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_teacher_slot import TOKENS, save_tiny_model

    root = tmp_path_factory.mktemp("validation")
    paths = {
        "student": save_tiny_model(root / "student", vocab_size=16),
        "teacher": save_tiny_model(root / "teacher", vocab_size=32, hidden_size=16),
        "other_tokenizer": save_tiny_model(root / "other", tokens=list(reversed(TOKENS))),
        "train": str(root / "train.parquet"),
        "no_prompt": str(root / "no_prompt.parquet"),
        "empty": str(root / "empty.parquet"),
        "corrupt": str(root / "corrupt.parquet"),
        "jsonl": str(root / "val.jsonl"),
        "empty_jsonl": str(root / "empty.jsonl"),
        "csv": str(root / "train.csv"),
        "not_a_model": str(root / "not_a_model"),
    }
    pq.write_table(pa.table({"prompt": [PROMPT], "data_source": ["toy"]}), paths["train"])
    pq.write_table(pa.table({"question": ["1 + 2 ="]}), paths["no_prompt"])
    pq.write_table(pa.table({"prompt": pa.array([], type=pa.string())}), paths["empty"])
    with open(paths["corrupt"], "wb") as handle:
        handle.write(b"not parquet at all")
    with open(paths["jsonl"], "w") as handle:
        handle.write(json.dumps({"prompt": PROMPT}) + "\n")
    open(paths["empty_jsonl"], "w").close()
    open(paths["csv"], "w").write("prompt\n1 + 2 =\n")
    os.makedirs(paths["not_a_model"])
    return paths


def distillation_config(files, *overrides, config_name="distillation_trainer"):
    base = [
        f"actor_rollout_ref.model.path={files['student']}",
        f"actor_rollout_ref.ref.model.path={files['teacher']}",
        f"data.train_files={files['train']}",
        f"data.val_files={files['jsonl']}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name, overrides=base + list(overrides))


def refusal(config) -> str:
    with pytest.raises(DistillConfigError) as raised:
        validate_distillation_config(config)
    message = str(raised.value)
    assert "\n" not in message and "; fix: " in message
    return message


@pytest.mark.parametrize("config_name", ["distillation_trainer", "distillation_megatron_trainer"])
def test_a_working_distillation_config_passes(files, config_name):
    validate_distillation_config(distillation_config(files, config_name=config_name))


def test_configs_without_distillation_are_left_to_verl():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        ppo = compose("ppo_trainer", overrides=["data.train_files=/missing.parquet"])
    validate_distillation_config(ppo)


def test_missing_teacher(files):
    message = refusal(distillation_config(files, "actor_rollout_ref.ref.model.path=null"))
    assert message.startswith("actor_rollout_ref.ref.model.path: no teacher")


@pytest.mark.parametrize(
    ("teacher", "problem"),
    [
        ("not_a_model", "is not a model folder (no config.json)"),
        ("train", "is a file, not a model folder"),
        (None, "does not exist"),
    ],
)
def test_teacher_that_is_not_a_model_folder(files, teacher, problem):
    path = files[teacher] if teacher else os.path.join(os.path.dirname(files["train"]), "missing_teacher")
    message = refusal(distillation_config(files, f"actor_rollout_ref.ref.model.path={path}"))
    assert message.startswith(f"actor_rollout_ref.ref.model.path ({path}): {problem}")


def test_teacher_with_another_tokenizer(files):
    message = refusal(distillation_config(files, f"actor_rollout_ref.ref.model.path={files['other_tokenizer']}"))
    assert message.startswith("actor_rollout_ref.ref.model.path: the teacher's tokenizer differs from the student's")


def test_teacher_with_stock_ref_config_would_be_ignored(files):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        stock = compose(
            "ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={files['student']}",
                f"+actor_rollout_ref.ref.model.path={files['teacher']}",
                "actor_rollout_ref.actor.use_kl_loss=true",
            ],
        )
    message = refusal(stock)
    assert message.startswith("actor_rollout_ref.ref._target_: 'verl.workers.config.FSDPActorConfig' ignores")
    assert "--config-name=distillation_trainer" in message


def test_unknown_teacher_key(files):
    message = refusal(distillation_config(files, "+actor_rollout_ref.ref.model.lora_rank=8"))
    assert message.startswith("actor_rollout_ref.ref.model.lora_rank: is not a teacher model setting")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_rank"),
        ("actor_rollout_ref.model.lora.rank=8", "actor_rollout_ref.model.lora.rank"),
        ("actor_rollout_ref.model.lora_adapter_path=/adapters", "actor_rollout_ref.model.lora_adapter_path"),
    ],
)
def test_lora_student(files, override, key):
    message = refusal(distillation_config(files, override))
    assert message.startswith(f"{key}: a LoRA student")


def test_unknown_loss_mode(files):
    message = refusal(distillation_config(files, "actor_rollout_ref.actor.policy_loss.loss_mode=distilation"))
    assert message.startswith("actor_rollout_ref.actor.policy_loss.loss_mode: unknown loss mode 'distilation'")
    assert "distillation" in message.split("fix:")[1]


def test_distillation_loss_without_kl_loss(files):
    message = refusal(distillation_config(files, "actor_rollout_ref.actor.use_kl_loss=false"))
    assert message.startswith("actor_rollout_ref.actor.use_kl_loss: is false")


@pytest.mark.parametrize("kl_loss_type", ["full", "k4"])
def test_unknown_kl_estimator(files, kl_loss_type):
    message = refusal(distillation_config(files, f"actor_rollout_ref.actor.kl_loss_type={kl_loss_type}"))
    assert message.startswith(f"actor_rollout_ref.actor.kl_loss_type: unknown KL estimator '{kl_loss_type}'")


@pytest.mark.parametrize("kl_loss_type", ["kl", "k1"])
def test_k1_as_distillation_loss(files, kl_loss_type):
    message = refusal(distillation_config(files, f"actor_rollout_ref.actor.kl_loss_type={kl_loss_type}"))
    assert message.startswith(f"actor_rollout_ref.actor.kl_loss_type: '{kl_loss_type}' (k1) as a loss")


@pytest.mark.parametrize("kl_loss_type", ["k1+", "mse", "k3+", "low_var_kl"])
def test_estimators_with_a_teacher_gradient_pass(files, kl_loss_type):
    validate_distillation_config(distillation_config(files, f"actor_rollout_ref.actor.kl_loss_type={kl_loss_type}"))


def test_reward_model_would_replace_zero_rewards(files):
    message = refusal(distillation_config(files, "reward.reward_model.enable=true"))
    assert message.startswith("reward.reward_model.enable:")


@pytest.mark.parametrize(
    ("estimator", "problem"),
    [("grpoo", "unknown advantage estimator 'grpoo'"), ("gae", "gae needs a critic"), ("gdpo", "gdpo needs")],
)
def test_advantage_estimator(files, estimator, problem):
    message = refusal(distillation_config(files, f"algorithm.adv_estimator={estimator}"))
    assert message.startswith(f"algorithm.adv_estimator: {problem}")


def test_rollout_n_below_one(files):
    message = refusal(distillation_config(files, "actor_rollout_ref.rollout.n=0"))
    assert message.startswith("actor_rollout_ref.rollout.n: must be a whole number >= 1")


def test_rollout_n_too_small_for_the_estimator(files):
    message = refusal(distillation_config(files, "algorithm.adv_estimator=grpo_passk"))
    assert message.startswith("actor_rollout_ref.rollout.n: grpo_passk compares samples")
    validate_distillation_config(
        distillation_config(files, "algorithm.adv_estimator=grpo_passk", "actor_rollout_ref.rollout.n=2")
    )


@pytest.mark.parametrize(
    ("key", "file", "problem"),
    [
        ("data.train_files", None, "does not exist"),
        ("data.train_files", "not_a_model", "is not a file"),
        ("data.train_files", "csv", "has an unsupported format"),
        ("data.train_files", "corrupt", "is unreadable"),
        ("data.train_files", "empty", "is empty"),
        ("data.val_files", "empty_jsonl", "is empty"),
        ("data.val_files", "no_prompt", "has no 'prompt' column (columns: question)"),
    ],
)
def test_data_file(files, key, file, problem):
    path = files[file] if file else "/no/such/train.parquet"
    message = refusal(distillation_config(files, f"{key}={path}"))
    assert message.startswith(f"{key} ({path}): {problem}")


def test_data_files_as_a_list_are_each_checked(files):
    listed = f"data.train_files=[{files['train']},{files['no_prompt']}]"
    message = refusal(distillation_config(files, listed))
    assert message.startswith(f"data.train_files ({files['no_prompt']}): has no 'prompt' column")


def test_prompt_key_names_the_column(files):
    other_column = [f"data.{split}_files={files['no_prompt']}" for split in ("train", "val")]
    validate_distillation_config(distillation_config(files, "data.prompt_key=question", *other_column))


@pytest.mark.parametrize("loss_mode", ["forward_kl_topk", "reverse_kl_topk", "jsd_topk"])
def test_distribution_losses_need_the_fsdp_actor(files, loss_mode):
    config = distillation_config(
        files, f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}", config_name="distillation_megatron_trainer"
    )
    assert "actor_rollout_ref.actor.policy_loss.loss_mode" in refusal(config) and "megatron" in refusal(config)
    validate_distillation_config(distillation_config(files, f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("actor_rollout_ref.actor.distill.topk=0", "actor_rollout_ref.actor.distill.topk"),
        ("actor_rollout_ref.actor.distill.jsd_beta=2", "actor_rollout_ref.actor.distill.jsd_beta"),
        ("+actor_rollout_ref.actor.distill.nonsense=1", "actor_rollout_ref.actor.distill"),
    ],
)
def test_bad_distill_option_is_one_line(files, override, key):
    message = refusal(distillation_config(files, override))
    assert message.startswith(key) and "\n" not in message


def test_hybrid_with_unknown_policy_loss(files):
    config = distillation_config(
        files, "actor_rollout_ref.actor.distill.rl_policy_loss=nope", config_name="distillation_hybrid_trainer"
    )
    assert refusal(config).startswith("actor_rollout_ref.actor.distill.rl_policy_loss: unknown policy loss 'nope'")
