"""The ``distillation`` reward manager: every sample's reward is zero.

In on-policy distillation the training signal is the divergence from the teacher, computed in the
actor's loss; there is no task reward. A reward of zero for every sample makes every advantage zero
(GRPO: ``(0 - mean) / (std + eps) = 0`` for any group size, a group of one included), so no
policy-gradient term remains. The manager needs nothing from the data set: no ``reward_model``
column, no ground truth, no ``data_source`` that verl knows how to score.

Select it with ``reward.reward_manager.name=distillation``. verl 0.9.1's trainer resolves reward
managers in the reward-loop registry (``verl.experimental.reward_loop.reward_manager``), which is
where this one registers.

Accuracy is still measured where it can be, so that validation keeps a meaningful
``val-core/<data_source>/acc/...``: ``reward_extra_info["acc"]`` is the scorer's value when the
sample carries ``reward_model.ground_truth`` and a scorer knows its data source, and ``None``
otherwise. verl stacks ``reward_extra_info`` across samples by key, so every sample reports the same
key; its validation metrics drop ``None`` values, so a data source without labels falls back to its
``reward`` metric (zero) instead of reporting a fake accuracy of zero.

Scorer, in order: the function named by ``reward.custom_reward_function`` if configured (verl hands
it over as ``compute_score``); verl-distill's toy task scorer for ``data_source == "toy_addition"``;
verl's ``default_compute_score`` (which raises ``NotImplementedError`` for a data source it does not
know: accuracy is then not reported).
"""

import inspect
import logging
from typing import Any, Callable, Optional

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

logger = logging.getLogger(__name__)

from verl.distill.toy.reward import DATA_SOURCE as TOY_DATA_SOURCE
def _custom_reward_function_configured(config) -> bool:
    reward_fn_config = config.get("reward", {}).get("custom_reward_function") or {}
    return bool(reward_fn_config.get("path"))


def _ground_truth(non_tensor_batch: dict) -> Any:
    reward_model = non_tensor_batch.get("reward_model")
    if not isinstance(reward_model, dict):
        return None
    return reward_model.get("ground_truth")


def _accuracy(score: Any) -> float:
    """A scorer returns a number or a dict with ``score`` (and possibly its own ``acc``)."""
    if isinstance(score, dict):
        return float(score.get("acc", score["score"]))
    return float(score)


@register("distillation")
class DistillationRewardManager(RewardManagerBase):
    """Zero reward for every sample; accuracy reported in ``reward_extra_info["acc"]`` where measurable."""

    def __init__(
        self,
        config,
        tokenizer,
        compute_score=None,
        reward_router_address=None,
        reward_model_tokenizer=None,
        **kwargs,
    ):
        super().__init__(config, tokenizer, compute_score)
        self.use_custom_scorer = compute_score is not None and _custom_reward_function_configured(config)
        self.data_sources_without_scorer: set[str] = set()

    def _scorer_for(self, data_source: str) -> Optional[Callable[..., Any]]:
        if self.use_custom_scorer:
            return self.compute_score
        if data_source == TOY_DATA_SOURCE:
            from verl.distill.toy.reward import compute_score as toy_compute_score

            return toy_compute_score
        if self.compute_score is not None:
            return self.compute_score
        from verl.utils.reward_score import default_compute_score

        return default_compute_score

    async def _score(self, scorer: Callable[..., Any], **kwargs) -> Any:
        if inspect.iscoroutinefunction(scorer):
            return await scorer(**kwargs)
        return await self.loop.run_in_executor(None, lambda: scorer(**kwargs))

    async def _measure_accuracy(self, data: DataProto) -> Optional[float]:
        sample = data[-1]  # a multi-turn output is judged by its last sequence, as verl's managers do
        ground_truth = _ground_truth(sample.non_tensor_batch)
        if ground_truth is None:
            return None
        data_source = str(sample.non_tensor_batch.get("data_source", "unknown"))
        if data_source in self.data_sources_without_scorer:
            return None

        response_ids = sample.batch["responses"]
        valid_length = int(sample.batch["attention_mask"][-response_ids.shape[-1] :].sum())
        response_str = await self.loop.run_in_executor(
            None, lambda: self.tokenizer.decode(response_ids[:valid_length], skip_special_tokens=True)
        )
        try:
            score = await self._score(
                self._scorer_for(data_source),
                data_source=data_source,
                solution_str=response_str,
                ground_truth=ground_truth,
                extra_info=dict(sample.non_tensor_batch.get("extra_info") or {}),
            )
        except NotImplementedError:
            self.data_sources_without_scorer.add(data_source)
            logger.warning(
                "distillation reward manager: no scorer for data_source %r, accuracy not reported", data_source
            )
            return None
        return _accuracy(score)

    async def run_single(self, data: DataProto) -> dict:
        return {"reward_score": 0.0, "reward_extra_info": {"acc": await self._measure_accuracy(data)}}
