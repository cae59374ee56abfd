"""The agent loop of an off-policy step: the "generated" response is the dataset's text.

:class:`DatasetResponseAgentLoop` is verl's ``SingleTurnAgentLoop`` whose generation call is answered
by :class:`DatasetResponseServer` instead of the rollout server, so the prompt is rendered with the
student's chat template, and the response merged, truncated and laid out (prompt_ids, response_ids,
response_mask, attention mask and position ids downstream) by verl's own code, exactly as for a
sampled response. The response tokens are the response text encoded with the student's tokenizer (no
special tokens added) followed by its end-of-sequence token, which a rollout returns at the end of a
finished response; a response longer than ``actor_rollout_ref.rollout.response_length``
(= ``data.max_response_length``) is cut there, without the end-of-sequence token, as a rollout that
hits the limit is. When the trainer asks the rollout for log-probs (``rollout.calculate_log_probs``,
read as the old log-probs under ``algorithm.rollout_correction.bypass_mode``), the rollout server
scores the response tokens under the student's current weights in one forward pass (a
``prompt_logprobs`` request, as verl's teacher servers answer), so they are what a sampled response's
log-probs are: the student's own.

Registered in verl's agent-loop registry as ``distill_dataset_response`` (:mod:`verl.distill.plugin`);
:mod:`verl.distill.off_policy_rollout` names it for the rows of an off-policy step.
"""

import copy
from typing import Any

from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.workers.rollout.replica import TokenOutput


def response_token_ids(tokenizer, text: str) -> list[int]:
    """The tokens a rollout returns for a finished response reading ``text``."""
    if tokenizer.eos_token_id is None:
        raise ValueError("off-policy responses: the student's tokenizer has no end-of-sequence token to end them with")
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


class DatasetResponseServer:
    """Stands in for the rollout server towards one agent loop: its answer is a fixed response."""

    def __init__(self, rollout_server, response_ids: list[int], weights_version: int):
        self._rollout_server = rollout_server
        self._response_ids = response_ids
        # the trainer's staleness control reads these: a dataset response is as fresh as the step using it
        self._version = {key: weights_version for key in ("global_steps", "min_global_steps", "max_global_steps")}

    async def generate(
        self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **_
    ) -> TokenOutput:
        log_probs = None
        if sampling_params.get("logprobs"):
            log_probs = await self._student_log_probs(request_id, prompt_ids, sampling_params)
        return TokenOutput(
            token_ids=list(self._response_ids),
            log_probs=log_probs,
            stop_reason="completed",
            extra_fields=dict(self._version),
        )

    async def _student_log_probs(self, request_id: str, prompt_ids: list[int], sampling_params: dict) -> list[float]:
        scored = await self._rollout_server.generate(
            request_id=request_id,
            prompt_ids=list(prompt_ids) + self._response_ids,
            sampling_params={
                "max_tokens": 1,
                "temperature": sampling_params.get("temperature", 1.0),
                "prompt_logprobs": 0,
            },
        )
        # row t holds the log-prob of token t + 1 (vLLM's layout): the response starts at row len(prompt) - 1
        rows = scored.extra_fields["prompt_logprobs"][len(prompt_ids) - 1 :][: len(self._response_ids)]
        return [float(row[0]) for row in rows]


class DatasetResponseAgentLoop(SingleTurnAgentLoop):
    """``SingleTurnAgentLoop`` answering with the row's ``data.off_policy_response_key`` text."""

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> Any:
        response_key = self.config.data.get("off_policy_response_key", "response")
        text = kwargs.get(response_key)
        if not isinstance(text, str):
            raise ValueError(
                f"off-policy row {kwargs.get('index')}: column {response_key!r} holds {type(text).__name__}, not the "
                "response text; set data.off_policy_response_key to the column of data.off_policy_files that holds it"
            )
        response_ids = response_token_ids(self.tokenizer, text)[: self.response_length]
        # a copy answers this one call, so the loop itself keeps verl's server and can serve other samples
        answering = copy.copy(self)
        answering.server_manager = DatasetResponseServer(self.server_manager, response_ids, kwargs["global_steps"] - 1)
        return await SingleTurnAgentLoop.run(answering, sampling_params, **kwargs)
