"""The ``distillation`` reward manager: zero rewards, accuracy where a scorer and a label exist."""

import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import verl  # noqa: F401  (loads the verl-distill plugin, as every verl process does)
from verl import DataProto
from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
from verl.trainer.ppo.metric_utils import process_validation_metrics
from verl.trainer.ppo.reward import load_reward_manager
from verl.utils.reward_score import default_compute_score
from verl.workers.reward_manager import distillation
from verl.workers.reward_manager.distillation import DistillationRewardManager

WORDS = ["<pad>", "<eos>", "question", "answer", "####", "72", "71", "so"]
PROMPT_LENGTH = 3
RESPONSE_LENGTH = 6


@pytest.fixture(scope="module")
def tokenizer():
    word_level = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>")


def reward_config(custom_reward_path=None):
    return OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {"path": custom_reward_path, "name": "compute_score"},
                "reward_manager": {"source": "register", "name": "distillation"},
                "sandbox_fusion": None,
            }
        }
    )


def sample(tokenizer, response: str, **fields) -> DataProto:
    """One finished rollout as the agent loop hands it to a reward worker (right-padded response)."""
    prompt_ids = tokenizer("question question question")["input_ids"]
    response_ids = tokenizer(response)["input_ids"]
    padding = [tokenizer.pad_token_id] * (RESPONSE_LENGTH - len(response_ids))
    attention_mask = [1] * (PROMPT_LENGTH + len(response_ids)) + [0] * len(padding)
    batch = {
        "prompts": torch.tensor([prompt_ids]),
        "responses": torch.tensor([response_ids + padding]),
        "attention_mask": torch.tensor([attention_mask]),
    }
    non_tensor = {key: np.array([value], dtype=object) for key, value in fields.items()}
    return DataProto.from_dict(tensors=batch, non_tensors=non_tensor)


def gsm8k(answer: str) -> dict:
    return {"data_source": "openai/gsm8k", "reward_model": {"ground_truth": answer, "style": "rule"}}


async def test_every_reward_is_zero_and_needs_no_labels(tokenizer):
    manager = DistillationRewardManager(reward_config(), tokenizer, compute_score=default_compute_score)
    result = await manager.run_single(sample(tokenizer, "so 72", data_source="my_unlabelled_prompts"))
    assert result == {"reward_score": 0.0, "reward_extra_info": {"acc": None}}
    assert type(result["reward_score"]) is float


async def test_needs_no_data_source_either(tokenizer):
    manager = DistillationRewardManager(reward_config(), tokenizer, compute_score=default_compute_score)
    result = await manager.run_single(sample(tokenizer, "so 72"))
    assert result == {"reward_score": 0.0, "reward_extra_info": {"acc": None}}


async def test_accuracy_on_labelled_gsm8k_with_zero_reward(tokenizer):
    manager = DistillationRewardManager(reward_config(), tokenizer, compute_score=default_compute_score)
    right = await manager.run_single(sample(tokenizer, "answer #### 72 <eos>", **gsm8k("72")))
    wrong = await manager.run_single(sample(tokenizer, "answer #### 71 <eos>", **gsm8k("72")))
    assert right == {"reward_score": 0.0, "reward_extra_info": {"acc": 1.0}}
    assert wrong == {"reward_score": 0.0, "reward_extra_info": {"acc": 0.0}}


async def test_labelled_data_source_without_scorer_reports_no_accuracy(tokenizer):
    manager = DistillationRewardManager(reward_config(), tokenizer, compute_score=default_compute_score)
    unscorable = {"data_source": "nobody_scores_this", "reward_model": {"ground_truth": "72"}}
    result = await manager.run_single(sample(tokenizer, "#### 72", **unscorable))
    assert result == {"reward_score": 0.0, "reward_extra_info": {"acc": None}}


async def test_validation_metrics_keep_real_accuracy_and_skip_unlabelled_sources(tokenizer):
    """What verl's validation computes from the manager's output (v1 trainer: process_validation_metrics)."""
    manager = DistillationRewardManager(reward_config(), tokenizer, compute_score=default_compute_score)
    rollouts = [
        ("answer #### 72", gsm8k("72")),
        ("answer #### 71", gsm8k("72")),
        ("so 72", {"data_source": "my_unlabelled_prompts"}),
        ("so 71", {"data_source": "my_unlabelled_prompts"}),
    ]
    results = [await manager.run_single(sample(tokenizer, text, **fields)) for text, fields in rollouts]

    assert {frozenset(r["reward_extra_info"]) for r in results} == {frozenset({"acc"})}
    stacked = np.array([r["reward_extra_info"]["acc"] for r in results])  # as verl's agent loop stacks them
    assert stacked.shape == (4,)

    data_sources = [fields["data_source"] for _, fields in rollouts]
    uids = ["q1", "q2", "q3", "q4"]
    metrics = process_validation_metrics(
        data_sources=data_sources,
        sample_uids=uids,
        infos_dict={"reward": [r["reward_score"] for r in results], "acc": stacked.tolist()},
        # the v1 trainer pads missing accuracies with 0 for data sources that report one at all
        expected_acc_counts={(source, uid): 1 for source, uid in zip(data_sources, uids, strict=True)},
    )
    assert metrics["openai/gsm8k"]["acc"]["mean@1"] == pytest.approx(0.5)
    assert "acc" not in metrics["my_unlabelled_prompts"]
    assert metrics["my_unlabelled_prompts"]["reward"]["mean@1"] == 0.0


async def test_custom_reward_function_scores_accuracy_but_not_reward(tokenizer):
    def partial_credit(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": 0.25, "pred": solution_str}

    manager = DistillationRewardManager(reward_config("my_reward.py"), tokenizer, compute_score=partial_credit)
    result = await manager.run_single(sample(tokenizer, "#### 72", **gsm8k("72")))
    assert result == {"reward_score": 0.0, "reward_extra_info": {"acc": 0.25}}


@pytest.mark.parametrize("response, accuracy", [("72", 1.0), ("72 72", 0.0)])
async def test_toy_task_is_scored_by_its_own_scorer(tokenizer, response, accuracy):
    # the toy task writes the sum with its digits reversed
    manager = DistillationRewardManager(reward_config(), tokenizer, compute_score=default_compute_score)
    toy = {"data_source": distillation.TOY_DATA_SOURCE, "reward_model": {"ground_truth": "27"}}
    result = await manager.run_single(sample(tokenizer, response, **toy))
    assert result == {"reward_score": 0.0, "reward_extra_info": {"acc": accuracy}}


def test_registered_in_the_reward_loop_registry():
    assert get_reward_manager_cls("distillation") is DistillationRewardManager


def test_plugin_registers_it_in_a_fresh_process():
    """This module imports the manager itself; a reward worker gets it only through the plugin."""
    probe = (
        "import verl\n"
        "from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls\n"
        "print(get_reward_manager_cls('distillation').__module__)"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "verl.workers.reward_manager.distillation"


async def test_built_by_verls_own_loader(tokenizer):
    """verl's reward workers build managers through load_reward_manager with these keyword arguments."""
    manager = load_reward_manager(reward_config(), tokenizer, reward_router_address=None, reward_model_tokenizer=None)
    assert isinstance(manager, DistillationRewardManager)
    result = await manager.run_single(sample(tokenizer, "answer #### 72", **gsm8k("72")))
    assert result == {"reward_score": 0.0, "reward_extra_info": {"acc": 1.0}}
