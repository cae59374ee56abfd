"""Generate each row's answer with a checkpoint and measure accuracy, KL to the teacher and length."""

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from verl.distill.evaluation.errors import EvaluationInputError
from verl.distill.evaluation.rows import EvalRow, RowScore, Scorer, to_python

KL_DEFINITION = (
    "kl_student_teacher: exact reverse KL over the full vocabulary, KL(student || teacher) = "
    "sum_v p_s(v) * (log p_s(v) - log p_t(v)), with p_s, p_t the softmax of each model's logits at "
    "temperature 1 for the next token after the same prefix (prompt + the student's own response so "
    "far, token ids of the student's chat template); kl_k3_sampled: the sampled-token estimate "
    "exp(r) - r - 1 with r = log p_t(y) - log p_s(y) at the token y the student produced (unclamped). "
    "Both are averaged over all response tokens of all rows (end-of-sequence token included, padding "
    "excluded). When the two output layers differ in width (padded embeddings), both models are "
    "compared on their shared first min(V_s, V_t) ids."
)

ACCURACY_DEFINITION = (
    "accuracy: fraction of rows answered correctly - the scorer's 'acc' field when it returns a dict "
    "with one, otherwise a score >= 1 (full credit); mean_score: mean of the scorer's score."
)


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are produced.

    Attributes:
        temperature: 0 decodes greedily; above 0 samples from softmax(logits / temperature) (no top-k/top-p).
        max_new_tokens: response budget; a response without end-of-sequence token within it counts as truncated.
        batch_size: prompts generated together (left-padded).
        seed: seeds sampling, reset before every checkpoint so all checkpoints see the same random stream.
    """

    temperature: float = 0.0
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    eos_token_ids: list[int]


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_dtype(requested: str, device: str):
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def load_model(folder: Path, device: str, dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if not eos_ids:
        raise EvaluationInputError(
            str(folder),
            "neither the tokenizer nor generation_config.json names an end-of-sequence token",
            "set the tokenizer's eos_token and save it into the folder",
        )
    return LoadedModel(model, tokenizer, sorted(eos_ids))


def token_divergences(student_logits, teacher_logits, response_ids):
    """Per-token reverse KL between student and teacher, shapes ``[T, V_s]``, ``[T, V_t]``, ``[T]`` -> two ``[T]``.

    With log p_s = log_softmax(student_logits) and log p_t = log_softmax(teacher_logits) over the shared
    first ``V = min(V_s, V_t)`` ids (temperature 1):

    * exact:  KL(p_s || p_t) = sum_v p_s(v) * (log p_s(v) - log p_t(v))   (>= 0, 0 iff p_s == p_t)
    * k3:     exp(r) - r - 1 with r = log p_t(y) - log p_s(y) at the response token y   (>= 0, unclamped;
      its expectation under y ~ p_s is the exact KL)
    """
    import torch

    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student_log_probs = torch.log_softmax(student_logits[..., :width].float(), dim=-1)
    teacher_log_probs = torch.log_softmax(teacher_logits[..., :width].float(), dim=-1)
    exact = (student_log_probs.exp() * (student_log_probs - teacher_log_probs)).sum(-1).clamp_min(0.0)
    index = response_ids.unsqueeze(-1)
    log_ratio = (teacher_log_probs.gather(-1, index) - student_log_probs.gather(-1, index)).squeeze(-1)
    k3 = torch.expm1(log_ratio) - log_ratio
    return exact, k3


def _response_logits(model, sequences, attention_mask, response_width: int):
    """Logits predicting each of the last ``response_width`` tokens of left-padded ``sequences``."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    output = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=response_width + 1
    )
    return output.logits[:, :-1]


@dataclass
class _Totals:
    rows: int = 0
    correct: int = 0
    score: float = 0.0
    response_tokens: int = 0
    truncated: int = 0
    kl_tokens: int = 0
    kl_sum: float = 0.0
    k3_sum: float = 0.0
    by_source: dict = field(default_factory=dict)


def evaluate_checkpoint(
    student: LoadedModel,
    teacher: Optional[LoadedModel],
    rows: Sequence[EvalRow],
    scorer: Scorer,
    settings: GenerationSettings,
    num_examples: int = 3,
    progress_label: str = "",
) -> dict:
    """Generate a response for every row, score it and, with a teacher, measure the KL on it (see KL_DEFINITION)."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    from verl.utils import normalize_token_ids

    tokenizer, model = student.tokenizer, student.model
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else student.eos_token_ids[0]
    sampling = settings.temperature > 0
    # A fresh config: model.generate would otherwise fill unset fields (top_k, repetition_penalty, ...)
    # from the checkpoint's generation_config.json.
    model.generation_config = GenerationConfig(
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_k=0 if sampling else None,
        top_p=1.0 if sampling else None,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=student.eos_token_ids,
        pad_token_id=pad_id,
    )
    torch.manual_seed(settings.seed)
    totals, examples = _Totals(), []
    progress = tqdm(total=len(rows), desc=progress_label or "evaluating", unit="row", file=sys.stderr)
    for start in range(0, len(rows), settings.batch_size):
        batch = rows[start : start + settings.batch_size]
        prompts = [
            normalize_token_ids(tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True))
            for row in batch
        ]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.inference_mode():
            sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask)
        responses = sequences[:, width:]
        response_mask = _response_mask(responses, student.eos_token_ids)
        if teacher is not None and responses.shape[1] > 0:
            full_mask = torch.cat([attention_mask, response_mask.long()], dim=1)
            _add_divergences(totals, model, teacher.model, sequences, full_mask, responses, response_mask)
        for offset, row in enumerate(batch):
            length = int(response_mask[offset].sum())
            response_ids = responses[offset, :length].tolist()
            text = tokenizer.decode(response_ids, skip_special_tokens=True)
            result = scorer(row, text)
            finished = length > 0 and response_ids[-1] in student.eos_token_ids
            _add_row(totals, row.data_source, result, length, finished)
            if len(examples) < num_examples:
                examples.append(
                    {
                        "prompt": tokenizer.decode(prompts[offset]),
                        "response": text,
                        "ground_truth": to_python(row.ground_truth),
                        "data_source": row.data_source,
                        "score": result.score,
                        "correct": result.correct,
                    }
                )
        progress.update(len(batch))
    progress.close()
    return _summary(totals, teacher is not None, examples)


def _response_mask(responses, eos_token_ids: list[int]):
    """True up to and including the first end-of-sequence token of each response."""
    import torch

    is_eos = torch.isin(responses, torch.tensor(eos_token_ids, device=responses.device))
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0


def _add_divergences(totals: _Totals, student_model, teacher_model, sequences, full_mask, responses, response_mask):
    import torch

    teacher_device = next(teacher_model.parameters()).device
    with torch.inference_mode():
        student_logits = _response_logits(student_model, sequences, full_mask, responses.shape[1])
        teacher_logits = _response_logits(
            teacher_model, sequences.to(teacher_device), full_mask.to(teacher_device), responses.shape[1]
        ).to(student_logits.device)
        # Row by row: two [T, V] float32 log-prob tensors per row instead of per batch.
        for row in range(responses.shape[0]):
            mask = response_mask[row]
            exact, k3 = token_divergences(student_logits[row][mask], teacher_logits[row][mask], responses[row][mask])
            totals.kl_tokens += int(mask.sum())
            totals.kl_sum += float(exact.double().sum())
            totals.k3_sum += float(k3.double().sum())


def _add_row(totals: _Totals, data_source: str, result: RowScore, length: int, finished: bool) -> None:
    totals.rows += 1
    totals.correct += int(result.correct)
    totals.score += result.score
    totals.response_tokens += length
    totals.truncated += int(not finished)
    source = totals.by_source.setdefault(data_source, {"n": 0, "correct": 0})
    source["n"] += 1
    source["correct"] += int(result.correct)


def _summary(totals: _Totals, with_teacher: bool, examples: list[dict]) -> dict:
    kl = None
    if with_teacher:
        tokens = max(totals.kl_tokens, 1)
        kl = {
            "kl_student_teacher": totals.kl_sum / tokens,
            "kl_k3_sampled": totals.k3_sum / tokens,
            "tokens": totals.kl_tokens,
        }
    return {
        "n": totals.rows,
        "accuracy": totals.correct / totals.rows,
        "mean_score": totals.score / totals.rows,
        "accuracy_by_data_source": {
            source: counts["correct"] / counts["n"] for source, counts in sorted(totals.by_source.items())
        },
        "kl": kl,
        "response_length_mean": totals.response_tokens / totals.rows,
        "truncated_fraction": totals.truncated / totals.rows,
        "samples": examples,
    }
