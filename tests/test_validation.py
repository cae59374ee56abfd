"""Driver-side checks of a distillation config: each mistake is one line naming the key and the fix."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

import verl
from verl.distill.validation import (
    DistillConfigError,
    FSDPSetting,
    fsdp_only_setting,
    refuse_fsdp_settings_on_megatron,
    validate_distillation_config,
)

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
PROMPT = [{"role": "user", "content": "1 + 2 ="}]
# The tiny tokenizers split on whitespace: a prompt is as many tokens as its messages have words.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] + ' ' }}{% endfor %}"
# Prompts of 4, 4 and 8 tokens: row 2 is the first one longer than 5.
PROMPTS_OF_4_4_8_TOKENS = [PROMPT, PROMPT, [{"role": "user", "content": "1 + 1 + 1 + 2 ="}]]


def with_chat_template(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_teacher_slot import TOKENS, save_tiny_model

    root = tmp_path_factory.mktemp("validation")
    paths = {
        "student": with_chat_template(save_tiny_model(root / "student", vocab_size=16)),
        "teacher": with_chat_template(save_tiny_model(root / "teacher", vocab_size=32, hidden_size=16)),
        "other_tokenizer": save_tiny_model(root / "other", tokens=list(reversed(TOKENS))),
        "no_chat_template": save_tiny_model(root / "no_chat_template"),
        "train": str(root / "train.parquet"),
        "long_prompts": str(root / "long_prompts.parquet"),
        "long_prompts_jsonl": str(root / "long_prompts.jsonl"),
        "string_prompts": str(root / "string_prompts.parquet"),
        "images": str(root / "images.parquet"),
        "no_prompt": str(root / "no_prompt.parquet"),
        "empty": str(root / "empty.parquet"),
        "corrupt": str(root / "corrupt.parquet"),
        "jsonl": str(root / "val.jsonl"),
        "empty_jsonl": str(root / "empty.jsonl"),
        "corrupt_jsonl": str(root / "corrupt.jsonl"),
        "csv": str(root / "train.csv"),
        "not_a_model": str(root / "not_a_model"),
    }
    pq.write_table(pa.table({"prompt": [PROMPT], "data_source": ["toy"]}), paths["train"])
    pq.write_table(pa.table({"prompt": PROMPTS_OF_4_4_8_TOKENS}), paths["long_prompts"])
    with open(paths["long_prompts_jsonl"], "w") as handle:
        handle.writelines(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS_OF_4_4_8_TOKENS)
    pq.write_table(pa.table({"prompt": ["1 + 2 ="]}), paths["string_prompts"])
    pq.write_table(pa.table({"prompt": PROMPTS_OF_4_4_8_TOKENS, "images": [["a.png"]] * 3}), paths["images"])
    pq.write_table(pa.table({"question": [PROMPT]}), paths["no_prompt"])
    pq.write_table(pa.table({"prompt": pa.array([], type=pa.string())}), paths["empty"])
    with open(paths["corrupt"], "wb") as handle:
        handle.write(b"not parquet at all")
    with open(paths["jsonl"], "w") as handle:
        handle.write(json.dumps({"prompt": PROMPT}) + "\n")
    open(paths["empty_jsonl"], "w").close()
    with open(paths["corrupt_jsonl"], "w") as handle:
        handle.write(json.dumps({"prompt": PROMPT}) + "\n" + '{"prompt": [' + "\n")
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
    "overrides",
    [
        pytest.param(["actor_rollout_ref.model.lora_rank=8"], id="rank"),
        pytest.param(
            ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_adapter_path=/adapters"],
            id="pre-trained adapter",
        ),
        pytest.param(
            [
                "actor_rollout_ref.model.lora_rank=8",
                "actor_rollout_ref.actor.policy_loss.loss_mode=forward_kl_topk",
                "actor_rollout_ref.actor.distill.topk=7",
            ],
            id="top-k loss with a separate teacher",
        ),
        pytest.param(["actor_rollout_ref.model.lora_rank=8", "{student_as_teacher}"], id="teacher = the student"),
    ],
)
def test_a_lora_student_passes(files, overrides):
    """A LoRA student trains against a separate teacher (or against its own base when the teacher is its path)."""
    overrides = [o.format(student_as_teacher=f"actor_rollout_ref.ref.model.path={files['student']}") for o in overrides]
    validate_distillation_config(distillation_config(files, *overrides))


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (
            ["actor_rollout_ref.model.lora.rank=8"],
            "actor_rollout_ref.model.lora.rank: is the Megatron engine's LoRA setting: verl's FSDP engine ignores it",
        ),
        (
            ["actor_rollout_ref.model.lora_adapter_path=/adapters"],
            "actor_rollout_ref.model.lora_adapter_path: is set but actor_rollout_ref.model.lora_rank is 0",
        ),
        (
            ["{student_as_teacher}", "actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.ref.model.trust_remote_code=false"],
            "actor_rollout_ref.ref.model.trust_remote_code: has no effect: the teacher is the LoRA student's own base model",
        ),
        (
            [
                "{student_as_teacher}",
                "actor_rollout_ref.model.lora_rank=8",
                "actor_rollout_ref.actor.policy_loss.loss_mode=reverse_kl_topk",
            ],
            "actor_rollout_ref.actor.policy_loss.loss_mode: reverse_kl_topk needs the teacher's logits",
        ),
    ],
    ids=["Megatron key on FSDP", "adapter without rank", "teacher setting on the student's base", "top-k on the base"],
)
def test_lora_settings_that_cannot_work(files, overrides, start):
    overrides = [o.format(student_as_teacher=f"actor_rollout_ref.ref.model.path={files['student']}") for o in overrides]
    assert refusal(distillation_config(files, *overrides)).startswith(start)


def test_a_lora_student_on_megatron(files):
    config = distillation_config(
        files, "actor_rollout_ref.model.lora.rank=8", config_name="distillation_megatron_trainer"
    )
    assert refusal(config).startswith(
        "actor_rollout_ref.model.lora.rank: a LoRA student is supported with the FSDP engine, not 'megatron'"
    )


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
    fsdp = distillation_config(
        files, f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}", "actor_rollout_ref.actor.distill.topk=4"
    )
    validate_distillation_config(fsdp)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.use_v1=false", "trainer.use_v1"),
        ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", "actor_rollout_ref.actor.ulysses_sequence_parallel_size"),
        ("actor_rollout_ref.ref.ulysses_sequence_parallel_size=2", "actor_rollout_ref.ref.ulysses_sequence_parallel_size"),
        ("actor_rollout_ref.model.use_fused_kernels=true", "actor_rollout_ref.model.use_fused_kernels"),
    ],
)
def test_what_breaks_the_reference_pass_top_k_is_refused(files, override, key):
    loss_mode = "actor_rollout_ref.actor.policy_loss.loss_mode=reverse_kl_topk"
    assert refusal(distillation_config(files, loss_mode, override)).startswith(key + ":")
    validate_distillation_config(distillation_config(files, override))  # the sampled-token loss is unaffected


@pytest.mark.parametrize(
    "override, key",
    [
        ("actor_rollout_ref.actor.distill.topk=0", "actor_rollout_ref.actor.distill.topk"),
        ("actor_rollout_ref.actor.distill.jsd_beta=2", "actor_rollout_ref.actor.distill.jsd_beta"),
        ("+actor_rollout_ref.actor.distill.nonsense=1", "actor_rollout_ref.actor.distill"),
        (
            "actor_rollout_ref.actor.distill.validation_teacher_kl=sometimes",
            "actor_rollout_ref.actor.distill.validation_teacher_kl",
        ),
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


# --- distill.select_strategy / select_k --------------------------------------------------------

SELECT_KEY = "actor_rollout_ref.actor.distill.select_strategy"
SELECT_K_KEY = "actor_rollout_ref.actor.distill.select_k"


@pytest.mark.parametrize(
    "config_name, overrides",
    [
        ("distillation_hybrid_trainer", [f"{SELECT_KEY}=best", f"{SELECT_K_KEY}=2"]),
        ("distillation_hybrid_trainer", [f"{SELECT_KEY}=worst", f"{SELECT_K_KEY}=3"]),
        ("distillation_hybrid_trainer", [f"{SELECT_KEY}=random"]),
        ("distillation_trainer", [f"{SELECT_KEY}=random", "actor_rollout_ref.rollout.n=4"]),
    ],
)
def test_selection_strategies_that_can_work_pass(files, config_name, overrides):
    validate_distillation_config(distillation_config(files, *overrides, config_name=config_name))


@pytest.mark.parametrize(
    "config_name, overrides, start",
    [
        (
            "distillation_hybrid_trainer",
            [f"{SELECT_KEY}=top"],
            f"{SELECT_KEY}: 'top' is not a selection strategy (valid: all, random, best, worst)",
        ),
        ("distillation_hybrid_trainer", [f"{SELECT_KEY}=random", f"{SELECT_K_KEY}=0"], f"{SELECT_K_KEY}: 0 must be"),
        (
            "distillation_hybrid_trainer",
            [f"{SELECT_KEY}=random", f"{SELECT_K_KEY}=5"],
            f"{SELECT_K_KEY}: is 5: it selects more than the 4 responses of each prompt",
        ),
        (
            "distillation_hybrid_trainer",
            [f"{SELECT_KEY}=best", f"{SELECT_K_KEY}=4"],
            f"{SELECT_K_KEY}: is 4: it selects all 4 responses of each prompt",
        ),
        (
            "distillation_trainer",
            [f"{SELECT_KEY}=random"],
            f"{SELECT_KEY}: random chooses among a prompt's responses, but actor_rollout_ref.rollout.n=1 gives one",
        ),
        (
            "distillation_trainer",
            [f"{SELECT_KEY}=best", "actor_rollout_ref.rollout.n=4"],
            f"{SELECT_KEY}: best ranks a prompt's responses by their task reward, but the distillation reward "
            "manager gives every response 0; fix: set " + f"{SELECT_KEY}=random",
        ),
        (
            "distillation_trainer",
            [f"{SELECT_KEY}=random", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.policy_loss.loss_mode=reverse_kl_topk"],
            f"{SELECT_KEY}: random leaves the teacher's log-probs of unselected responses uncomputed, which loss_mode reverse_kl_topk",
        ),
        (
            "distillation_opd_trainer",
            [f"{SELECT_KEY}=random", "actor_rollout_ref.rollout.n=4"],
            f"{SELECT_KEY}: random leaves the teacher's log-probs of unselected responses uncomputed, which loss_mode vanilla",
        ),
        (
            "distillation_hybrid_trainer",
            [f"{SELECT_KEY}=random", "algorithm.use_kl_in_reward=true"],
            f"{SELECT_KEY}: random leaves the teacher's log-probs of unselected responses uncomputed, which the in-reward",
        ),
        (
            "distillation_hybrid_trainer",
            [f"{SELECT_KEY}=random", "trainer.use_v1=false"],
            f"{SELECT_KEY}: random selects responses in the v1 trainer's reference pass",
        ),
    ],
)
def test_selection_that_cannot_work_is_one_line(files, config_name, overrides, start):
    assert refusal(distillation_config(files, *overrides, config_name=config_name)).startswith(start)


# --- distill.topk and the vocabulary ----------------------------------------------------------

TOPK_KEY = "actor_rollout_ref.actor.distill.topk"


@pytest.mark.parametrize("loss_mode", ["forward_kl_topk", "reverse_kl_topk", "jsd_topk"])
def test_topk_larger_than_the_vocabulary_is_refused(files, loss_mode):
    mode = f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"
    message = refusal(distillation_config(files, mode, f"{TOPK_KEY}=8"))
    assert message == (
        f"{TOPK_KEY}: is 8, more than the 7 tokens of the student's tokenizer; "
        f"fix: set it to at most 7; {TOPK_KEY}=7 gives the exact full-vocabulary divergence"
    )
    validate_distillation_config(distillation_config(files, mode, f"{TOPK_KEY}=7"))  # the full vocabulary


def test_topk_is_not_checked_for_losses_that_keep_no_top_k(files):
    validate_distillation_config(distillation_config(files, f"{TOPK_KEY}=1000"))  # the default sampled-token loss


# --- prompt lengths ---------------------------------------------------------------------------


def test_prompt_longer_than_max_prompt_length_is_refused_with_its_row(files):
    config = distillation_config(files, f"data.train_files={files['long_prompts']}", "data.max_prompt_length=5")
    message = refusal(config)
    assert message == (
        f"data.train_files ({files['long_prompts']}): row 2 has a prompt of 8 tokens (chat template applied), "
        "more than data.max_prompt_length=5, and data.truncation=error; fix: raise data.max_prompt_length "
        "(this prompt needs 8), or set data.truncation=left (keep each prompt's end) or "
        "data.filter_overlong_prompts=true (drop such rows)"
    )


def test_validation_prompts_are_measured_too(files):
    config = distillation_config(files, f"data.val_files={files['long_prompts_jsonl']}", "data.max_prompt_length=5")
    assert refusal(config).startswith(f"data.val_files ({files['long_prompts_jsonl']}): row 2 has a prompt of 8 tokens")


@pytest.mark.parametrize(
    "setting",
    [
        "data.max_prompt_length=8",
        "data.truncation=left",
        "data.filter_overlong_prompts=true",  # verl's dataset drops the long rows
        "data.custom_cls.path=my_dataset.py",  # a dataset of one's own reads prompts its own way
    ],
)
def test_long_prompts_pass_when_verl_would_not_see_them_or_is_told_to_cut_them(files, setting):
    validate_distillation_config(
        distillation_config(files, f"data.train_files={files['long_prompts']}", "data.max_prompt_length=5", setting)
    )


@pytest.mark.parametrize(("shuffle", "refused"), [(False, False), (True, True)])
def test_max_samples_limits_the_rows_verl_keeps(files, shuffle, refused):
    config = distillation_config(
        files,
        f"data.train_files={files['long_prompts']}",
        "data.max_prompt_length=5",
        "data.train_max_samples=2",  # the first two rows, unless verl picks two at random
        f"data.shuffle={shuffle}",
    )
    if refused:
        assert "row 2 has a prompt of 8 tokens" in refusal(config)
    else:
        validate_distillation_config(config)


def test_prompts_with_images_are_left_to_verl(files):
    validate_distillation_config(
        distillation_config(files, f"data.train_files={files['images']}", "data.max_prompt_length=5")
    )


def test_a_row_past_the_first_that_cannot_be_parsed_is_refused(files):
    message = refusal(distillation_config(files, f"data.val_files={files['corrupt_jsonl']}"))
    assert message.startswith(f"data.val_files ({files['corrupt_jsonl']}): is unreadable (JSONDecodeError")


def test_a_prompt_that_is_not_chat_messages_is_refused(files):
    message = refusal(distillation_config(files, f"data.train_files={files['string_prompts']}"))
    assert message.startswith(
        f"data.train_files ({files['string_prompts']}): row 0 has a prompt the chat template cannot render "
        "(not a list of chat messages but str)"
    )


def test_a_student_without_chat_template_is_refused(files):
    no_template = files["no_chat_template"]
    config = distillation_config(
        files, f"actor_rollout_ref.model.path={no_template}", f"actor_rollout_ref.ref.model.path={no_template}"
    )
    assert refusal(config).startswith("actor_rollout_ref.model.path: the student's tokenizer has no chat template")
    config.actor_rollout_ref.model.custom_chat_template = CHAT_TEMPLATE
    validate_distillation_config(config)


def test_prompt_lengths_are_those_verls_dataset_filter_keeps_and_drops(tiny_assets, tmp_path):
    """The check measures prompts exactly as verl's RLHFDataset does when it filters long prompts."""
    import pandas as pd
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from verl.distill.validation import _prompt_lengths
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.student)
    prompts = [list(prompt) for prompt in pd.read_parquet(tiny_assets.train_files)["prompt"]]
    prompts[3] = [{"role": "system", "content": "add the two numbers"}, *prompts[3]]
    prompts[5] = [{"role": "user", "content": "9" * 40 + "+1="}]
    data_file = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": prompts}), data_file)
    lengths = _prompt_lengths(tokenizer, prompts, options={})
    limit = sorted(lengths)[len(lengths) // 2]
    assert min(lengths) <= limit < max(lengths)
    dataset_config = OmegaConf.create(
        {"max_prompt_length": limit, "filter_overlong_prompts": True, "cache_dir": str(tmp_path / "cache")}
    )
    kept = RLHFDataset(str(data_file), tokenizer, dataset_config)
    assert [row["prompt"] for row in kept.dataframe] == [p for p, n in zip(prompts, lengths, strict=True) if n <= limit]


# --- FSDP settings given to the Megatron config -----------------------------------------------


@pytest.mark.parametrize(
    ("key", "megatron_key"),
    [
        ("actor_rollout_ref.actor.fsdp_config.param_offload", "actor_rollout_ref.actor.megatron.param_offload"),
        ("actor_rollout_ref.ref.fsdp_config.param_offload", "actor_rollout_ref.ref.megatron.param_offload"),
        ("actor_rollout_ref.actor.fsdp_config.offload_policy", "actor_rollout_ref.actor.megatron.param_offload"),
        ("actor_rollout_ref.actor.fsdp_config.qat.enable", "actor_rollout_ref.actor.megatron.qat.enable"),
        ("actor_rollout_ref.actor.fsdp_config", "actor_rollout_ref.actor.megatron"),
        ("critic.fsdp.optimizer_offload", "critic.megatron.optimizer_offload"),
        (
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
            "actor_rollout_ref.actor.megatron.context_parallel_size",
        ),
        ("actor_rollout_ref.actor.grad_clip", "actor_rollout_ref.actor.optim.clip_grad"),
        ("actor_rollout_ref.actor.optim.min_lr_ratio", "actor_rollout_ref.actor.optim.min_lr"),
        ("actor_rollout_ref.actor.fsdp_config.wrap_policy.min_num_params", None),
        ("actor_rollout_ref.ref.fsdp_config.reshard_after_forward", None),
    ],
)
def test_fsdp_settings_name_their_megatron_counterpart(key, megatron_key):
    assert fsdp_only_setting(key) == FSDPSetting(key, megatron_key)


def _leaves(node, prefix):
    if not isinstance(node, dict) or not node:
        return {prefix}
    return {leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}")}


def test_the_fsdp_settings_table_matches_verls_configs(files):
    """Every key verl's FSDP configs have and its Megatron configs lack is known, with a real counterpart."""
    from omegaconf import OmegaConf

    fsdp = distillation_config(files)
    megatron = distillation_config(files, config_name="distillation_megatron_trainer")

    def role_leaves(config):
        return {
            leaf
            for role in ("actor_rollout_ref.actor", "actor_rollout_ref.ref", "critic")
            for leaf in _leaves(OmegaConf.to_container(OmegaConf.select(config, role), resolve=False), role)
        }

    fsdp_only, megatron_keys = role_leaves(fsdp) - role_leaves(megatron), role_leaves(megatron)
    assert "actor_rollout_ref.actor.fsdp_config.param_offload" in fsdp_only
    assert [key for key in sorted(fsdp_only) if fsdp_only_setting(key) is None] == []
    assert [key for key in sorted(megatron_keys) if fsdp_only_setting(key) is not None] == []
    counterparts = {fsdp_only_setting(key).megatron_key for key in fsdp_only} - {None}
    absent = object()
    assert [key for key in sorted(counterparts) if OmegaConf.select(megatron, key, default=absent) is absent] == []


def test_fsdp_overrides_of_the_megatron_config_are_refused_before_composing():
    with pytest.raises(DistillConfigError) as raised:
        refuse_fsdp_settings_on_megatron(
            "distillation_megatron_trainer",
            ["trainer.total_training_steps", "actor_rollout_ref.ref.fsdp_config.param_offload"],
        )
    assert str(raised.value) == (
        "actor_rollout_ref.ref.fsdp_config.param_offload: is an FSDP setting, and "
        "--config-name=distillation_megatron_trainer trains with Megatron; fix: use "
        "actor_rollout_ref.ref.megatron.param_offload, or train with FSDP: --config-name=distillation_trainer"
    )
    refuse_fsdp_settings_on_megatron("distillation_trainer", ["actor_rollout_ref.ref.fsdp_config.param_offload"])


def test_fsdp_settings_added_to_the_megatron_config_are_refused(files):
    config = distillation_config(
        files, "+actor_rollout_ref.actor.fsdp_config.param_offload=true", config_name="distillation_megatron_trainer"
    )
    assert refusal(config).startswith(
        "actor_rollout_ref.actor.fsdp_config.param_offload: is an FSDP setting, and --config-name="
        "distillation_megatron_trainer trains with Megatron; fix: use actor_rollout_ref.actor.megatron.param_offload"
    )


@pytest.mark.parametrize(
    ("config_name", "override", "problem"),
    [
        ("distillation_megatron_trainer", "actor_rollout_ref.actor.strategy=fsdp", "is 'fsdp', and"),
        ("distillation_megatron_trainer", "actor_rollout_ref.ref.strategy=fsdp2", "is 'fsdp2', and"),
        ("distillation_megatron_trainer", "critic.strategy=fsdp", "is 'fsdp', and"),
        ("distillation_trainer", "actor_rollout_ref.actor.strategy=megatron", "is 'megatron', and"),
    ],
)
def test_a_strategy_of_the_other_engine_is_refused(files, config_name, override, problem):
    key = override.split("=")[0]
    message = refusal(distillation_config(files, override, config_name=config_name))
    assert message.startswith(f"{key}: {problem}"), message


# --- the trainer's command line, read before Hydra ---------------------------------------------


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        (["python", "-m", "verl.trainer.main_ppo", "--config-name=x", "a=1"], ["--config-name=x", "a=1"]),
        (["python", "-X", "importtime", "-m", "verl.trainer.main_ppo"], []),
        (["python", "/site-packages/verl/trainer/main_ppo.py", "a=1"], ["a=1"]),
        (["python", "-m", "pytest", "-m", "verl.trainer.main_ppo"], None),
        (["python", "-u", "/ray/_private/workers/default_worker.py", "--node-ip-address=1.2.3.4"], None),
    ],
)
def test_the_trainer_command_is_recognised(command, arguments):
    from verl.distill.driver import trainer_arguments

    assert trainer_arguments(command) == arguments


def test_hydra_arguments_are_split_into_config_name_and_overrides():
    from verl.distill.driver import hydra_config_name_and_overrides

    arguments = ["--config-name", "distillation_megatron_trainer", "a.b=1", "+c=2", "~d", "--cfg", "job"]
    assert hydra_config_name_and_overrides(arguments) == (
        "distillation_megatron_trainer",
        ["a.b=1", "+c=2", "~d"],
    )
    assert hydra_config_name_and_overrides(["-cn", "n"])[0] == "n"
    assert hydra_config_name_and_overrides(["--config-name=n"])[0] == "n"


@pytest.mark.parametrize("long_file", ["long_prompts", "long_prompts_jsonl"])
def test_prompt_lengths_are_checked_on_the_first_rows_only(files, long_file, monkeypatch, caplog):
    """A multi-million-row file must not be tokenized on the driver: only its first rows are."""
    import verl.distill.validation as validation

    config = distillation_config(files, f"data.train_files={files[long_file]}", "data.max_prompt_length=5")
    monkeypatch.setattr(validation, "PROMPT_CHECK_ROWS", 2)  # the 8-token prompt is row 2
    with caplog.at_level("WARNING", logger="verl.distill.validation"):
        validate_distillation_config(config)
    assert f"prompt lengths of {files[long_file]} checked on its first 2 rows only" in caplog.text
    monkeypatch.setattr(validation, "PROMPT_CHECK_ROWS", 3)
    assert "row 2 has a prompt of 8 tokens" in refusal(config)


@pytest.mark.parametrize(
    "teacher",
    ["Qwen/Qwen2.5-7B-Instruct", "hdfs://cluster/models/teacher", "s3://bucket/teacher"],
    ids=["hub id", "hdfs", "s3"],
)
def test_a_teacher_only_the_workers_see_is_let_through_with_a_warning(files, teacher, caplog):
    config = distillation_config(files, f"actor_rollout_ref.ref.model.path={teacher}")
    with caplog.at_level("WARNING", logger="verl.distill.validation"):
        validate_distillation_config(config)
    assert f"{teacher} is not a local path on the driver" in caplog.text and "tokenizers is skipped" in caplog.text


def test_a_student_only_the_workers_see_skips_the_tokenizer_checks_with_a_warning(files, caplog):
    student = "hdfs://cluster/models/student"
    config = distillation_config(files, f"actor_rollout_ref.model.path={student}")
    with caplog.at_level("WARNING", logger="verl.distill.validation"):
        validate_distillation_config(config)
    assert f"actor_rollout_ref.model.path={student} is not a local path on the driver" in caplog.text


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (["trainer.use_v1=false"], "trainer.use_v1=false"),
        (["trainer.v1.trainer_mode=colocate_async"], "trainer.v1.trainer_mode=colocate_async"),
        (["trainer.use_v1=false", "actor_rollout_ref.actor.distill.validation_teacher_kl=false"], None),
        ([], None),
    ],
)
def test_a_trainer_that_cannot_measure_the_validation_teacher_kl_is_warned_about(files, overrides, warned, caplog):
    with caplog.at_level("WARNING", logger="verl.distill.validation"):
        validate_distillation_config(distillation_config(files, *overrides))
    notes = [record.message for record in caplog.records if "validation_teacher_kl" in record.message]
    if warned is None:
        assert notes == []
    else:
        assert len(notes) == 1 and f"not measured with {warned}" in notes[0]
