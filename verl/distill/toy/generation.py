"""Batched decoding of toy prompts and greedy validation accuracy.

All toy prompts render to the same length, so a batch needs neither padding nor attention masks.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from verl.distill.toy.reward import DATA_SOURCE, compute_score
from verl.distill.toy.task import MAX_RESPONSE_TOKENS, Problem, prompt_ids


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each row of ``prompts`` [n, p] and return the [n, max_new_tokens] responses.

    Greedy when ``temperature`` is None, else sampled from softmax(logits / temperature).
    Positions after a row's first EOS are ``pad_token_id``.
    """
    was_training = model.training
    model.eval()
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    new_tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if step == 0:
            outputs = model(prompts, use_cache=True)
        else:
            outputs = model(new_tokens[-1][:, None], past_key_values=outputs.past_key_values, use_cache=True)
        logits = outputs.logits[:, -1].float()
        if temperature is None:
            next_tokens = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        new_tokens.append(torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens))
        finished |= new_tokens[-1] == eos_token_id
        if finished.all():
            break
    model.train(was_training)
    responses = torch.stack(new_tokens, dim=1)
    padding = max_new_tokens - responses.shape[1]
    return torch.nn.functional.pad(responses, (0, padding), value=pad_token_id)


def greedy_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], prompts: torch.Tensor | None = None
) -> float:
    """Fraction of ``problems`` whose greedy response scores 1.0, decoded as verl's reward
    manager decodes it (special tokens skipped) and scored by the task's ``compute_score``.

    ``prompts`` may pass the already rendered ``prompt_ids(tokenizer, problems)``.
    """
    if prompts is None:
        prompts = prompt_ids(tokenizer, problems)
    responses = generate(model, prompts, MAX_RESPONSE_TOKENS, tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = [compute_score(DATA_SOURCE, text, problem.ground_truth) for text, problem in zip(texts, problems)]
    return sum(scores) / len(scores)
