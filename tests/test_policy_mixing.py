"""On/off-policy mixing (``data.on_policy_lambda``): the seeded step schedule, the rows of each off-policy
step, the agent loop that answers them from the dataset (token for token what a rollout returns), the
manager and replay buffer verl loads, and the driver's routing and one-line refusals."""

import asyncio
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensordict import TensorDict
from test_validation import CONFIG_DIR, PROMPT, distillation_config, files, refusal  # noqa: F401  (files: a fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl.distill import hf_rollout
from verl.distill.dataset_response_agent_loop import DatasetResponseAgentLoop, response_token_ids
from verl.distill.policy_mixing import (
    BATCHED_AGENT_LOOP_MANAGER,
    DATASET_RESPONSE_AGENT_LOOP,
    MANAGER_KEY,
    PolicySchedule,
    route_through_mixing,
)
from verl.distill.toy import build_toy_assets, compute_score
from verl.distill.toy.task import read_problems, write_off_policy_parquet
from verl.distill.validation import validate_distillation_config
from verl.experimental.agent_loop.agent_loop import DictConfigWrap
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

# --- the schedule ---------------------------------------------------------------------------------


def on_policy_steps(schedule: PolicySchedule, steps: int) -> list[bool]:
    return [schedule.is_on_policy(step) for step in range(1, steps + 1)]


def test_the_schedule_is_a_function_of_the_seed_and_the_step():
    first = on_policy_steps(PolicySchedule(0.5, seed=3), 200)
    assert on_policy_steps(PolicySchedule(0.5, seed=3), 200) == first
    assert on_policy_steps(PolicySchedule(0.5, seed=4), 200) != first
    # a step asked about alone (as after a resume) gets the same answer
    assert [PolicySchedule(0.5, seed=3).is_on_policy(step) for step in (150, 7)] == [first[149], first[6]]


@pytest.mark.parametrize("on_policy_lambda", [0.0, 0.3, 0.8, 1.0])
def test_the_share_of_on_policy_steps_is_lambda(on_policy_lambda):
    steps = 4000
    share = sum(on_policy_steps(PolicySchedule(on_policy_lambda, seed=0), steps)) / steps
    # binomial standard deviation <= 0.008 at 4000 steps; 5 of them
    assert abs(share - on_policy_lambda) <= 0.04
    if on_policy_lambda in (0.0, 1.0):
        assert share == on_policy_lambda


def test_off_policy_steps_are_counted_in_step_order_whatever_order_they_are_asked_in():
    schedule = PolicySchedule(0.4, seed=1)
    flags = on_policy_steps(schedule, 300)
    expected = [sum(not on for on in flags[: step - 1]) for step in range(1, 301)]
    fresh = PolicySchedule(0.4, seed=1)
    asked = {step: fresh.off_policy_steps_before(step) for step in (250, 3, 300, 1, 120)}
    assert asked == {step: expected[step - 1] for step in asked}


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_pass_over_the_off_policy_file_uses_every_row_once(shuffle):
    schedule = PolicySchedule(0.5, seed=2, shuffle=shuffle)
    rows = schedule.off_policy_rows(0, 3 * 10, num_rows=10)
    for start in (0, 10, 20):
        assert sorted(rows[start : start + 10]) == list(range(10))
    if shuffle:
        assert rows[:10] != rows[10:20] and rows[:10] != list(range(10))
    else:
        assert rows == list(range(10)) * 3
    # a position's row depends on the position alone: a step taken in two chunks gets the same rows
    assert schedule.off_policy_rows(0, 4, 10) + schedule.off_policy_rows(4, 8, 10) == rows[:12]


# --- the driver: routing and checks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return build_toy_assets()


@pytest.fixture(scope="module")
def off_policy_file(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("off_policy") / "off_policy.parquet"
    write_off_policy_parquet(read_problems(toy.train_files), path)
    return path


def test_the_toy_off_policy_file_holds_the_training_prompts_with_their_correct_answers(toy, off_policy_file, tmp_path):
    rows = pq.read_table(off_policy_file).to_pylist()
    train = pq.read_table(toy.train_files).to_pylist()
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in train]
    scores = [compute_score(row["data_source"], row["response"], row["reward_model"]["ground_truth"]) for row in rows]
    assert scores == [1.0] * len(rows)
    again = tmp_path / "again.parquet"
    write_off_policy_parquet(read_problems(toy.train_files), again)
    assert again.read_bytes() == off_policy_file.read_bytes()


def mixing_config(toy, off_policy_file, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(
            "distillation_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={toy.student}",
                f"actor_rollout_ref.ref.model.path={toy.teacher}",
                f"data.train_files={toy.train_files}",
                f"data.val_files={toy.val_files}",
                f"data.off_policy_files={off_policy_file}",
                "data.on_policy_lambda=0.5",
                "data.seed=7",
                "data.max_prompt_length=16",
                "data.max_response_length=8",
                "data.train_batch_size=4",
                *overrides,
            ],
        )


def test_lambda_one_leaves_verls_manager_and_replay_buffer(toy, off_policy_file):
    config = mixing_config(toy, off_policy_file, "data.on_policy_lambda=1.0")
    before = OmegaConf.to_container(config)
    assert route_through_mixing(config) == []
    assert OmegaConf.to_container(config) == before


@pytest.mark.parametrize(
    "manager, expected",
    [
        (None, "verl.distill.off_policy_rollout.MixedPolicyAgentLoopManager"),
        (BATCHED_AGENT_LOOP_MANAGER, "verl.distill.off_policy_rollout.BatchedMixedPolicyAgentLoopManager"),
    ],
)
def test_lambda_below_one_routes_through_loadable_extensions_of_verls_classes(toy, off_policy_file, manager, expected):
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
    from verl.utils.import_utils import load_class_from_fqn, load_extern_object

    config = mixing_config(toy, off_policy_file, *([f"+{MANAGER_KEY}={manager}"] if manager else []))
    changes = route_through_mixing(config)
    assert f"{MANAGER_KEY}={expected}" in changes
    sampler = config.trainer.v1.sampler
    assert dict(sampler.sampler_kwargs) == {"on_policy_lambda": 0.5, "policy_schedule_seed": 7}
    assert issubclass(load_class_from_fqn(OmegaConf.select(config, MANAGER_KEY)), AgentLoopManagerTQ)
    assert issubclass(load_extern_object(sampler.custom_sampler.path, sampler.custom_sampler.name), ReplayBuffer)


def test_a_mixing_config_passes_the_checks(toy, off_policy_file):
    validate_distillation_config(mixing_config(toy, off_policy_file))


@pytest.fixture(scope="module")
def mixing_files(files, tmp_path_factory):  # noqa: F811  (a fixture of test_validation)
    root = tmp_path_factory.mktemp("mixing")
    paths = {
        "good": str(root / "good.parquet"),
        "no_response": str(root / "no_response.parquet"),
        "number_responses": str(root / "number_responses.parquet"),
        "long_prompts": files["long_prompts"],
    }
    pq.write_table(pa.table({"prompt": [PROMPT, PROMPT], "response": ["3", "4"]}), paths["good"])
    pq.write_table(pa.table({"prompt": [PROMPT], "answer": ["3"], "data_source": ["toy"]}), paths["no_response"])
    pq.write_table(pa.table({"prompt": [PROMPT, PROMPT], "response": pa.array([3, None])}), paths["number_responses"])
    return paths


def test_the_validation_fixture_passes_with_an_off_policy_file(files, mixing_files):  # noqa: F811
    validate_distillation_config(
        distillation_config(files, "data.on_policy_lambda=0.25", f"data.off_policy_files={mixing_files['good']}")
    )


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "'half'", "true"])
def test_lambda_outside_zero_one_is_refused(files, value):  # noqa: F811
    message = refusal(distillation_config(files, f"data.on_policy_lambda={value}"))
    assert message.startswith("data.on_policy_lambda: is ") and "not a number in [0, 1]" in message


def test_lambda_below_one_needs_an_off_policy_file(files):  # noqa: F811
    message = refusal(distillation_config(files, "data.on_policy_lambda=0.75"))
    assert message == (
        "data.off_policy_files: no file given, but data.on_policy_lambda=0.75 makes about 25% of the steps "
        "off-policy; fix: set data.off_policy_files=/path/to/responses.parquet (a prompt and a response column), "
        "or data.on_policy_lambda=1.0"
    )


def test_a_file_without_the_response_column_names_file_column_columns_and_key(files, mixing_files):  # noqa: F811
    path = mixing_files["no_response"]
    message = refusal(distillation_config(files, "data.on_policy_lambda=0.5", f"data.off_policy_files={path}"))
    assert message == (
        f"data.off_policy_files ({path}): has no 'response' column (columns: answer, data_source, prompt); "
        "fix: add the responses as a text column named 'response', or set data.off_policy_response_key to "
        "the column that holds them"
    )
    validate_distillation_config(
        distillation_config(
            files, "data.on_policy_lambda=0.5", f"data.off_policy_files={path}", "data.off_policy_response_key=answer"
        )
    )


@pytest.mark.parametrize(
    "file, problem",
    [
        (None, "does not exist"),
        ("corrupt", "is unreadable"),
        ("no_prompt", "has no 'prompt' column"),
        ("number_responses", "row 0 of column 'response' is int, not text"),
    ],
)
def test_an_unusable_off_policy_file_is_refused_by_name(files, mixing_files, file, problem):  # noqa: F811
    path = (mixing_files.get(file) or files.get(file)) if file else "/no/such/responses.parquet"
    message = refusal(distillation_config(files, "data.on_policy_lambda=0.5", f"data.off_policy_files={path}"))
    assert message.startswith(f"data.off_policy_files ({path}): {problem}")


def test_the_prompts_of_the_off_policy_file_are_measured(files, mixing_files):  # noqa: F811
    path = mixing_files["long_prompts"]
    # the long-prompt file has no response column: its prompts are measured first only if the column is there
    with_responses = str(path).replace(".parquet", "_with_responses.parquet")
    table = pq.read_table(path)
    pq.write_table(table.append_column("response", pa.array(["x"] * table.num_rows)), with_responses)
    message = refusal(
        distillation_config(
            files, "data.on_policy_lambda=0.5", f"data.off_policy_files={with_responses}", "data.max_prompt_length=5"
        )
    )
    assert message.startswith(f"data.off_policy_files ({with_responses}): row 2 has a prompt of 8 tokens")


@pytest.mark.parametrize(
    "override, key",
    [
        ("actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.n"),
        ("trainer.use_v1=false", "trainer.use_v1"),
        ("trainer.v1.trainer_mode=colocate_async", "trainer.v1.trainer_mode"),
        (f"+{MANAGER_KEY}=my.own.Manager", MANAGER_KEY),
        ("trainer.v1.sampler.custom_sampler.path=pkg://my.sampler", "trainer.v1.sampler.custom_sampler.path"),
        ("algorithm.filter_groups.enable=true", "algorithm.filter_groups.enable"),
        ("trainer.v1.sampler.sync_refill_failed_groups=true", "trainer.v1.sampler.sync_refill_failed_groups"),
    ],
)
def test_what_mixing_cannot_plug_into_is_refused(files, mixing_files, override, key):  # noqa: F811
    config = distillation_config(
        files, "data.on_policy_lambda=0.5", f"data.off_policy_files={mixing_files['good']}", override
    )
    message = refusal(config)
    assert message.startswith(f"{key}: is ")
    assert "data.on_policy_lambda=0.5 makes about 50% of the steps off-policy" in message
    assert message.endswith("or data.on_policy_lambda=1.0")


# --- the agent loop: an off-policy sample is laid out as a sampled one ---------------------------


class _RolloutAnswering:
    """A rollout server that answers a generation request with given tokens and log-probs."""

    def __init__(self, output: TokenOutput):
        self.output = output

    async def generate(self, request_id, *, prompt_ids, sampling_params, **_):
        return self.output


class _RolloutScoring:
    """A rollout server that answers prompt_logprobs requests as the hf server does, with ``model``."""

    def __init__(self, model, rollout_config):
        self.model, self.rollout_config, self.requests = model, rollout_config, []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **_):
        self.requests.append(sampling_params)
        settings = hf_rollout.resolve_sampling(sampling_params, self.rollout_config, len(prompt_ids), 128)
        scored = hf_rollout.prompt_log_probs(self.model, [prompt_ids], settings)[0]
        return TokenOutput(token_ids=[], extra_fields={"prompt_logprobs": [[value] for value in scored] + [[0.0]]})


AGENT_CONFIG = OmegaConf.create(
    {
        "actor_rollout_ref": {"rollout": {"prompt_length": 16, "response_length": 8}},
        "data": {"apply_chat_template_kwargs": {}, "off_policy_response_key": "response"},
    }
)
ROLLOUT_CONFIG = OmegaConf.create(
    {
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": -1,
        "top_p": 1.0,
        "response_length": 8,
        "prompt_length": 16,
        "ignore_eos": False,
    }
)


async def run_agent_loop(loop_class, server, tokenizer, sampling_params, config=AGENT_CONFIG, **row):
    # verl builds agent loops inside the worker's running event loop
    agent_loop = loop_class(
        trainer_config=DictConfigWrap(config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        hf_model_type="qwen2",
    )
    return await agent_loop.run(sampling_params, **row)


@pytest.fixture(scope="module")
def teacher_and_student(toy):
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    return AutoTokenizer.from_pretrained(toy.teacher), load(toy.teacher), load(toy.student)


def test_an_off_policy_sample_is_token_for_token_what_the_rollout_returns_for_that_text(teacher_and_student):
    """The teacher generates an answer through the hf rollout's decoder; its text, given as an off-policy
    response, yields the same prompt, response tokens (with the end-of-sequence token), mask and
    rollout log-probs (the student's, scored by the rollout server) as the sampled response did."""
    tokenizer, teacher, student = teacher_and_student
    messages = [{"role": "user", "content": "29+65="}]
    prompt = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    greedy = hf_rollout.SamplingSettings(
        temperature=0.0, top_k=-1, top_p=1.0, greedy=True, max_tokens=8, return_log_probs=True, ignore_eos=False
    )
    eos = frozenset({tokenizer.eos_token_id})
    generated = hf_rollout.decode(teacher, [prompt], [greedy], eos, torch.Generator())[0]
    text = tokenizer.decode(generated.token_ids, skip_special_tokens=True)
    assert generated.token_ids[-1] == tokenizer.eos_token_id and text == "49"
    assert response_token_ids(tokenizer, text) == generated.token_ids

    # what the student's rollout would have reported for these tokens: its own log-probs of them
    student_log_probs = hf_rollout.prompt_log_probs(student, [prompt + generated.token_ids], greedy)[0][len(prompt) - 1 :]
    rollout = _RolloutAnswering(
        TokenOutput(token_ids=generated.token_ids, log_probs=student_log_probs, extra_fields={"global_steps": 2})
    )
    params = {"logprobs": True, "temperature": 0.0}
    sampled = asyncio.run(run_agent_loop(SingleTurnAgentLoop, rollout, tokenizer, params, raw_prompt=messages))
    scoring = _RolloutScoring(student, ROLLOUT_CONFIG)
    dataset = asyncio.run(
        run_agent_loop(
            DatasetResponseAgentLoop, scoring, tokenizer, params, raw_prompt=messages, response=text, global_steps=3
        )
    )

    assert dataset.prompt_ids == sampled.prompt_ids == prompt
    assert dataset.response_ids == sampled.response_ids == generated.token_ids
    assert dataset.response_mask == sampled.response_mask == [1, 1, 1]
    torch.testing.assert_close(torch.tensor(dataset.response_logprobs), torch.tensor(sampled.response_logprobs))
    assert scoring.requests == [{"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}]
    # the weights version of step 3's samples: the trainer's staleness control counts it as fresh
    assert dataset.extra_fields["min_global_steps"] == dataset.extra_fields["max_global_steps"] == 2


def test_without_rollout_log_probs_nothing_is_scored(teacher_and_student):
    tokenizer, _, student = teacher_and_student
    scoring = _RolloutScoring(student, ROLLOUT_CONFIG)
    output = asyncio.run(
        run_agent_loop(
            DatasetResponseAgentLoop,
            scoring,
            tokenizer,
            {"logprobs": False},
            raw_prompt=[{"role": "user", "content": "1+2="}],
            response="3",
            global_steps=1,
        )
    )
    assert output.response_logprobs is None and scoring.requests == []
    assert tokenizer.decode(output.response_ids) == "3" + tokenizer.eos_token


def test_a_response_longer_than_the_limit_is_cut_there_without_its_end_token(teacher_and_student):
    tokenizer, _, student = teacher_and_student
    output = asyncio.run(
        run_agent_loop(
            DatasetResponseAgentLoop,
            _RolloutScoring(student, ROLLOUT_CONFIG),
            tokenizer,
            {"logprobs": True, "temperature": 1.0},
            raw_prompt=[{"role": "user", "content": "1+2="}],
            response="1234567890",
            global_steps=1,
        )
    )
    assert output.response_ids == tokenizer.encode("12345678", add_special_tokens=False)
    assert len(output.response_logprobs) == 8 and all(math.isfinite(value) for value in output.response_logprobs)


def test_a_row_without_response_text_fails_naming_the_key(teacher_and_student):
    tokenizer, _, student = teacher_and_student
    with pytest.raises(ValueError, match="column 'response' holds NoneType.*data.off_policy_response_key"):
        asyncio.run(
            run_agent_loop(
                DatasetResponseAgentLoop,
                _RolloutScoring(student, ROLLOUT_CONFIG),
                tokenizer,
                {},
                raw_prompt=PROMPT,
                global_steps=1,
            )
        )


# --- the manager and the replay buffer --------------------------------------------------------------


def step_prompts(count: int, step: int, validate: bool = False) -> TensorDict:
    batch = tu.get_tensordict(
        {
            "raw_prompt": np.array([[{"role": "user", "content": f"train {i}"}] for i in range(count)], dtype=object),
            "uid": np.array([f"uid-{step}-{i}" for i in range(count)], dtype=object),
            "dummy_tensor": torch.zeros(count, 1, dtype=torch.uint8),
        }
    )
    tu.assign_non_tensor_data(batch, "global_steps", step)
    if validate:
        tu.assign_non_tensor_data(batch, "validate", True)
    return batch


@pytest.fixture
def new_manager(toy, off_policy_file, monkeypatch):
    """Builds the CPU job's mixing manager (no Ray needed until its workers start); returns it, the
    list of batches it hands to verl's manager, and the run's schedule."""
    from verl.distill.batched_agent_loop import BatchedAgentLoopManager
    from verl.distill.off_policy_rollout import BatchedMixedPolicyAgentLoopManager

    submitted = []
    monkeypatch.setattr(BatchedAgentLoopManager, "generate_sequences", lambda self, prompts: submitted.append(prompts))
    config = mixing_config(toy, off_policy_file)

    def build():
        submitted.clear()
        manager = BatchedMixedPolicyAgentLoopManager(config=config, llm_client=None)
        return manager, submitted, PolicySchedule.from_config(config)

    return build


def prompts_of(batch) -> list[str]:
    return [prompt[0]["content"] for prompt in batch["raw_prompt"]]


def test_off_policy_steps_get_the_scheduled_rows_of_the_file_and_keep_their_uids(new_manager, off_policy_file):
    manager, submitted, schedule = new_manager()
    file_rows = pq.read_table(off_policy_file).to_pylist()
    steps = range(1, 11)
    for step in steps:
        manager.generate_sequences(step_prompts(4, step))
    off_policy_rank = 0
    for step, batch in zip(steps, submitted, strict=True):
        assert list(batch["uid"]) == [f"uid-{step}-{i}" for i in range(4)]
        assert tu.get_non_tensor_data(batch, "global_steps", None) == step
        if schedule.is_on_policy(step):
            assert prompts_of(batch) == [f"train {i}" for i in range(4)]
            assert "agent_name" not in batch.keys()
            continue
        rows = [file_rows[row] for row in schedule.off_policy_rows(off_policy_rank * 4, 4, len(file_rows))]
        off_policy_rank += 1
        assert prompts_of(batch) == [row["prompt"][0]["content"] for row in rows]
        assert list(batch["response"]) == [row["response"] for row in rows]
        assert list(batch["agent_name"]) == [DATASET_RESPONSE_AGENT_LOOP] * 4
    assert 0 < off_policy_rank < len(steps)


def test_a_step_submitted_in_chunks_gets_the_rows_of_one_submission_and_validation_is_untouched(new_manager):
    manager, submitted, schedule = new_manager()
    step = next(step for step in range(1, 50) if not schedule.is_on_policy(step))
    manager.generate_sequences(step_prompts(4, step))
    whole = prompts_of(submitted[0])

    manager, submitted, _ = new_manager()
    manager.generate_sequences(step_prompts(2, step))
    manager.generate_sequences(step_prompts(2, step))
    assert prompts_of(submitted[0]) + prompts_of(submitted[1]) == whole

    validation = step_prompts(3, step, validate=True)
    manager.generate_sequences(validation)
    assert submitted[-1] is validation


def test_the_replay_buffer_reports_each_training_step_on_or_off_policy(monkeypatch):
    from verl.distill.off_policy_rollout import IS_ON_POLICY_METRIC, MixedPolicyReplayBuffer

    base = MixedPolicyReplayBuffer.__bases__[0]
    monkeypatch.setattr(base, "sample", lambda self, global_steps, partition_id, batch_size: ("batch", {"seen": 1.0}))
    buffer = MixedPolicyReplayBuffer(
        trainer_mode="sync",
        trainer_config=OmegaConf.create({}),
        max_off_policy_threshold=None,
        max_off_policy_strategy="drop",
        sampler_kwargs=OmegaConf.create({"on_policy_lambda": 0.5, "policy_schedule_seed": 7}),
    )
    schedule = PolicySchedule(0.5, seed=7)
    reported = [buffer.sample(step, "train", 4)[1] for step in range(1, 21)]
    assert [metrics[IS_ON_POLICY_METRIC] for metrics in reported] == [float(on) for on in on_policy_steps(schedule, 20)]
    assert all(metrics["seen"] == 1.0 for metrics in reported)
    assert IS_ON_POLICY_METRIC not in buffer.sample(3, "val", 4)[1]


def test_the_driver_warns_how_many_off_policy_responses_will_be_cut(files, tmp_path, caplog):  # noqa: F811
    # the tiny tokenizers split on whitespace: "1 2 1" is 3 tokens, 4 with the end-of-sequence token
    path = str(tmp_path / "long_responses.parquet")
    pq.write_table(pa.table({"prompt": [PROMPT] * 3, "response": ["1", "1 2 1", "1 2 1 2 1"]}), path)
    overrides = ("data.on_policy_lambda=0.5", f"data.off_policy_files={path}")
    with caplog.at_level("WARNING", logger="verl.distill.validation"):
        validate_distillation_config(distillation_config(files, *overrides, "data.max_response_length=3"))
    assert "2 of the 3 responses checked are longer than data.max_response_length=3 tokens" in caplog.text
    assert "longest 6" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="verl.distill.validation"):
        validate_distillation_config(distillation_config(files, *overrides, "data.max_response_length=6"))
    assert "longer than data.max_response_length" not in caplog.text
