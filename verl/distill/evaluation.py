"""Evaluate checkpoints of a distillation run: accuracy, KL to the teacher, response length.

A checkpoint is a Hugging Face folder (``config.json`` + weights + tokenizer), a verl FSDP actor
checkpoint (``…/global_step_N/actor``: ``model_world_size_W_rank_R.pt``, ``fsdp_config.json``,
``huggingface/``), its parent ``…/global_step_N``, or a run folder holding several ``global_step_N``
(all of them, in step order). FSDP checkpoints are merged to Hugging Face format with verl's own
:mod:`verl.model_merger` before they are loaded.

Each row of a parquet file in verl's RLHF layout (``data_source``, ``prompt`` = chat messages,
``reward_model.ground_truth``, ``extra_info``) is rendered with the tokenizer's chat template exactly
as verl's RLHFDataset does (``apply_chat_template(messages, add_generation_prompt=True)``), answered by
the checkpoint (greedy unless ``temperature > 0``) and scored:

* ``toy_addition`` rows by :func:`verl.distill.toy.reward.compute_score`,
* other data sources by verl's :func:`verl.utils.reward_score.default_compute_score`,
* every row by a user's ``compute_score`` when one is given (as verl's ``custom_reward_function``).

All inputs are checked before any model is loaded; a bad one raises :class:`EvaluationInputError`,
one line naming the file and the fix.
"""

import argparse
import contextlib
import json
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

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

# Data sources scored by this project's own tasks (imported on first use); every other data
# source goes to verl's default_compute_score.
PROJECT_SCORERS = {"toy_addition": "verl.distill.toy.reward"}

RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"

_STEP_PATTERN = re.compile(r"^(?:global_step|step|checkpoint)[_-](\d+)$")
_HF_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_FSDP_SHARD_PATTERN = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


class EvaluationInputError(ValueError):
    """An input that cannot be evaluated: which file, what is wrong and how to fix it (one line)."""

    def __init__(self, subject: str, problem: str, fix: str):
        super().__init__(" ".join(f"{subject}: {problem}; fix: {fix}".split()))


# --------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint to evaluate.

    Attributes:
        path: the path as the user gave it (or, for a run folder, the ``global_step_N`` found in it).
        kind: ``hf`` (a Hugging Face folder) or ``fsdp`` (a verl FSDP actor checkpoint to merge).
        model_dir: the Hugging Face folder, or the FSDP actor folder holding the shards.
        step: the training step read from the path (``global_step_N``, ``step_N``, ``checkpoint-N``).
        label: a short name for tables and plots.
    """

    path: str
    kind: str
    model_dir: Path
    step: Optional[int]
    label: str

    @property
    def tokenizer_dir(self) -> Path:
        return self.model_dir / "huggingface" if self.kind == "fsdp" else self.model_dir


def infer_step(path: str | Path) -> Optional[int]:
    """The training step named by the deepest ``global_step_N`` / ``step_N`` / ``checkpoint-N`` part of ``path``."""
    for part in reversed(Path(path).parts):
        match = _STEP_PATTERN.match(part)
        if match:
            return int(match.group(1))
    return None


def _label(path: Path) -> str:
    parts = [part for part in path.resolve().parts if part not in ("actor", "huggingface")]
    return "/".join(parts[-2:])


def resolve_checkpoints(paths: Sequence[str]) -> list[Checkpoint]:
    """Check every path and expand run folders (parents of ``global_step_N``) into their checkpoints."""
    checkpoints = []
    for given in paths:
        folder = Path(given).expanduser()
        steps = _run_folder_steps(folder)
        if steps:
            checkpoints.extend(resolve_checkpoint(str(step_dir)) for step_dir in steps)
        else:
            checkpoints.append(resolve_checkpoint(given))
    return checkpoints


def _run_folder_steps(folder: Path) -> list[Path]:
    if not folder.is_dir() or (folder / "config.json").exists() or (folder / "actor").is_dir():
        return []
    steps = [child for child in folder.iterdir() if child.is_dir() and child.name.startswith("global_step_")]
    return sorted((child for child in steps if infer_step(child.name) is not None), key=lambda d: infer_step(d.name))


def resolve_checkpoint(given: str) -> Checkpoint:
    """Identify and check one checkpoint folder without loading any weights."""
    folder = Path(given).expanduser()
    if not folder.exists():
        raise EvaluationInputError(
            str(given),
            "no such checkpoint folder",
            "pass a Hugging Face model folder or a verl …/global_step_N[/actor]",
        )
    if not folder.is_dir():
        raise EvaluationInputError(
            str(given),
            "is a file, not a checkpoint folder",
            "pass the folder that holds config.json or the FSDP shards",
        )
    if (folder / "actor").is_dir():
        folder = folder / "actor"
    if any(_FSDP_SHARD_PATTERN.match(child.name) for child in folder.iterdir()):
        _check_fsdp_folder(folder)
        kind = "fsdp"
    else:
        _check_hf_folder(folder)
        kind = "hf"
    return Checkpoint(path=str(given), kind=kind, model_dir=folder, step=infer_step(folder), label=_label(folder))


def _check_hf_folder(folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise EvaluationInputError(
            str(folder),
            "neither a Hugging Face model folder (no config.json) nor a verl FSDP checkpoint "
            "(no model_world_size_*_rank_*.pt)",
            "pass a folder saved with save_pretrained or a verl …/global_step_N/actor folder (merge a Megatron "
            "checkpoint first: python -m verl.model_merger merge --backend megatron)",
        )
    _check_json(config, "re-save the model with save_pretrained")
    weights = [path for pattern in _HF_WEIGHT_PATTERNS for path in folder.glob(pattern)]
    if not weights:
        raise EvaluationInputError(
            str(folder),
            "has config.json but no weights (*.safetensors or pytorch_model*.bin)",
            "save the model's weights into it with model.save_pretrained",
        )
    for weight_file in weights:
        _check_weight_file(weight_file)
    _check_tokenizer_files(folder)


def _check_fsdp_folder(folder: Path) -> None:
    fsdp_config = folder / "fsdp_config.json"
    if not fsdp_config.is_file():
        raise EvaluationInputError(
            str(fsdp_config), "missing from the FSDP checkpoint", "point at a checkpoint verl finished saving"
        )
    world_size = _check_json(fsdp_config, "point at a checkpoint verl finished saving").get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise EvaluationInputError(
            str(fsdp_config), f"world_size is {world_size!r}", "point at a checkpoint verl finished saving"
        )
    for rank in range(world_size):
        shard = folder / f"model_world_size_{world_size}_rank_{rank}.pt"
        if not shard.is_file():
            raise EvaluationInputError(
                str(shard),
                f"missing (the checkpoint has {world_size} ranks)",
                "copy every rank's shard into the folder",
            )
        _check_weight_file(shard)
    hf_dir = folder / "huggingface"
    if not (hf_dir / "config.json").is_file():
        raise EvaluationInputError(
            str(hf_dir / "config.json"),
            "missing: the model merger needs the model config verl saves next to the shards",
            "copy the student's config.json (and tokenizer) into huggingface/",
        )
    _check_json(hf_dir / "config.json", "copy the student's config.json into huggingface/")
    _check_tokenizer_files(hf_dir)


def _check_json(path: Path, fix: str) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvaluationInputError(str(path), f"unreadable JSON ({type(error).__name__})", fix) from None
    if not isinstance(content, dict):
        raise EvaluationInputError(str(path), "is not a JSON object", fix)
    return content


def _check_weight_file(path: Path) -> None:
    """Read the file's index only: torch.save archives are zip files, safetensors start with a header."""
    fix = "re-save or re-copy the checkpoint (the file is truncated or not a weight file)"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:
            problem = f"unreadable safetensors file ({type(error).__name__})"
            raise EvaluationInputError(str(path), problem, fix) from None
    elif not zipfile.is_zipfile(path):
        raise EvaluationInputError(str(path), "unreadable torch checkpoint (not a torch.save archive)", fix)


def _check_tokenizer_files(folder: Path) -> None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise EvaluationInputError(
            str(folder),
            f"has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})",
            "save the student's tokenizer into it with tokenizer.save_pretrained",
        )


def merge_fsdp_checkpoint(actor_dir: Path, target_dir: Path) -> None:
    """Merge verl FSDP shards into a Hugging Face folder with verl's own model merger (weights in bf16)."""
    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    config = ModelMergerConfig(
        operation="merge",
        backend="fsdp",
        local_dir=str(actor_dir),
        target_dir=str(target_dir),
        hf_model_config_path=str(actor_dir / "huggingface"),
    )
    target_dir.mkdir(parents=True, exist_ok=True)
    # The merger reports on stdout; keep stdout for our own results.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            merger = FSDPModelMerger(config)
            merger.merge_and_save()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError) as error:
            # The shards passed the cheap archive check but their content does not load.
            raise EvaluationInputError(
                str(actor_dir),
                f"verl's model merger cannot read the shards ({type(error).__name__}: {str(error)[:160]})",
                "re-copy the checkpoint or evaluate another step",
            ) from None
        merger.cleanup()


@contextlib.contextmanager
def hf_model_folder(checkpoint: Checkpoint, merge_dir: Optional[Path]):
    """Yield a Hugging Face folder for ``checkpoint``, merging an FSDP checkpoint first.

    With ``merge_dir`` the merged folder is kept there and reused on the next run while the shards are
    unchanged; without it the merge goes to a temporary folder removed afterwards.
    """
    if checkpoint.kind == "hf":
        yield checkpoint.model_dir
        return
    source = checkpoint.model_dir.resolve()
    fingerprint = {
        "source": str(source),
        "shards": {p.name: p.stat().st_mtime_ns for p in sorted(source.glob("model_world_size_*_rank_*.pt"))},
    }
    if merge_dir is None:
        temporary = Path(tempfile.mkdtemp(prefix="verl-eval-merge-"))
        try:
            merge_fsdp_checkpoint(source, temporary)
            yield temporary
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return
    target = merge_dir / re.sub(r"[^\w.-]+", "_", str(source).strip("/"))
    marker = target / ".merged_from.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == fingerprint):
        shutil.rmtree(target, ignore_errors=True)
        merge_fsdp_checkpoint(source, target)
        marker.write_text(json.dumps(fingerprint, indent=1))
    yield target


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class EvalRow:
    """One prompt of the dataset with what its scorer needs."""

    messages: list[dict]
    data_source: str
    ground_truth: Any
    extra_info: Optional[dict]


def _plain(value: Any) -> Any:
    """Parquet cells come back as numpy arrays and scalars; scorers and JSON want Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def load_rows(data_file: str, prompt_key: str = "prompt", num_samples: int = -1) -> list[EvalRow]:
    """Read the first ``num_samples`` rows (all when negative) of a parquet file in verl's RLHF layout."""
    path = Path(data_file).expanduser()
    layout_fix = "give a parquet file in verl's RLHF layout (e.g. from examples/data_preprocess/gsm8k.py)"
    if not path.is_file():
        raise EvaluationInputError(str(data_file), "no such data file", layout_fix)
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as error:
        problem = f"unreadable parquet file ({type(error).__name__})"
        raise EvaluationInputError(str(data_file), problem, layout_fix) from None
    for column in (prompt_key, "data_source", "reward_model"):
        if column not in frame.columns:
            raise EvaluationInputError(
                str(data_file),
                f"has no '{column}' column (columns: {', '.join(map(str, frame.columns))})",
                f"{layout_fix}, or pass --prompt_key for another prompt column",
            )
    if num_samples >= 0:
        frame = frame.head(num_samples)
    if frame.empty:
        raise EvaluationInputError(
            str(data_file), "has no rows to evaluate", "use a non-empty file and --num_samples > 0"
        )
    rows = []
    for index, record in enumerate(frame.to_dict("records")):
        messages, reward_model = _plain(record[prompt_key]), _plain(record["reward_model"])
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise EvaluationInputError(
                str(data_file), f"row {index}: '{prompt_key}' is not a list of {{role, content}} messages", layout_fix
            )
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise EvaluationInputError(str(data_file), f"row {index}: reward_model has no ground_truth", layout_fix)
        extra_info = _plain(record.get("extra_info"))
        rows.append(
            EvalRow(
                messages=messages,
                data_source=str(record["data_source"]),
                ground_truth=reward_model["ground_truth"],
                extra_info=extra_info if isinstance(extra_info, dict) else None,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class RowScore:
    score: float
    correct: bool


def _as_row_score(result: Any) -> RowScore:
    """verl's scorers return a number, a bool, a tuple starting with the score or a dict with ``score``."""
    if isinstance(result, dict):
        score = float(result["score"])
        return RowScore(score, bool(result["acc"]) if "acc" in result else score >= 1.0)
    if isinstance(result, list | tuple):
        result = result[0]
    score = float(result)
    return RowScore(score, score >= 1.0)


def load_custom_scorer(spec: str) -> Callable[..., Any]:
    """``path.py[:fn_name]`` -> the function (``compute_score`` by default)."""
    file_name, _, function_name = spec.partition(":")
    function_name = function_name or "compute_score"
    fix = "pass --compute_score path/to/file.py[:function_name]"
    if not Path(file_name).expanduser().is_file():
        raise EvaluationInputError(file_name, "no such compute_score file", fix)
    from verl.utils.import_utils import load_extern_object

    try:
        function = load_extern_object(str(Path(file_name).expanduser()), function_name)
    except AttributeError:
        raise EvaluationInputError(file_name, f"defines no function '{function_name}'", fix) from None
    except Exception as error:  # the user's module itself fails to import
        problem = f"does not import ({type(error).__name__}: {error})"
        raise EvaluationInputError(file_name, problem, "fix the file so that `python file.py` runs") from None
    if not callable(function):
        raise EvaluationInputError(file_name, f"'{function_name}' is not a function", fix)
    return function


class Scorer:
    """Scores a response for a row: the user's function if given, else the data source's scorer."""

    def __init__(self, custom: Optional[Callable[..., Any]] = None):
        self.custom = custom
        self._project_scorers: dict[str, Callable[..., Any]] = {}

    def scorer_for(self, data_source: str) -> Callable[..., Any]:
        if self.custom is not None:
            return self.custom
        if data_source in PROJECT_SCORERS:
            if data_source not in self._project_scorers:
                import importlib

                module_name = PROJECT_SCORERS[data_source]
                try:
                    self._project_scorers[data_source] = importlib.import_module(module_name).compute_score
                except (ImportError, AttributeError) as error:
                    raise EvaluationInputError(
                        f"data_source {data_source}",
                        f"its scorer {module_name}.compute_score cannot be imported ({error})",
                        "reinstall verl-distill, or pass --compute_score file.py[:fn]",
                    ) from None
            return self._project_scorers[data_source]
        from verl.utils.reward_score import default_compute_score

        return default_compute_score

    def __call__(self, row: EvalRow, response: str) -> RowScore:
        result = self.scorer_for(row.data_source)(
            data_source=row.data_source, solution_str=response, ground_truth=row.ground_truth, extra_info=row.extra_info
        )
        return _as_row_score(result)

    def check(self, rows: Sequence[EvalRow]) -> None:
        """Score an empty answer once per data source, so an unscorable source fails before any model loads."""
        first_rows = {row.data_source: row for row in rows}
        for data_source, row in first_rows.items():
            try:
                self(row, "")
            except NotImplementedError:
                raise EvaluationInputError(
                    f"data_source {data_source!r}",
                    "has no scorer in verl's default_compute_score",
                    "pass --compute_score file.py[:fn] with compute_score(data_source, solution_str, ground_truth, "
                    "extra_info)",
                ) from None
            except EvaluationInputError:
                raise
            except Exception as error:
                raise EvaluationInputError(
                    f"data_source {data_source!r}",
                    f"the scorer failed on an empty answer ({type(error).__name__}: {error})",
                    "fix the compute_score function or the row's reward_model.ground_truth",
                ) from None


# --------------------------------------------------------------------------------------------
# Generation and metrics


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
                        "ground_truth": _plain(row.ground_truth),
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


# --------------------------------------------------------------------------------------------
# Reports


def render_markdown(results: Sequence[dict]) -> str:
    """A results table (one row per checkpoint) followed by each checkpoint's sample generations."""
    lines = [
        "| checkpoint | step | n | accuracy | mean score | KL(student‖teacher) | k3 (sampled) "
        "| mean response tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results:
        kl = entry["kl"] or {}
        lines.append(
            "| {label} | {step} | {n} | {accuracy:.4f} | {mean_score:.4f} | {kl} | {k3} | {length:.1f} |".format(
                label=entry["label"],
                step="" if entry["step"] is None else entry["step"],
                n=entry["n"],
                accuracy=entry["accuracy"],
                mean_score=entry["mean_score"],
                kl=_fmt(kl.get("kl_student_teacher")),
                k3=_fmt(kl.get("kl_k3_sampled")),
                length=entry["response_length_mean"],
            )
        )
    if results:
        first = results[0]
        lines += ["", f"Data: `{first['data_file']}`; settings: `{json.dumps(first['settings'], sort_keys=True)}`."]
        lines += ["", ACCURACY_DEFINITION, "", KL_DEFINITION]
    for entry in results:
        lines += ["", f"## Samples: {entry['label']}"]
        for number, sample in enumerate(entry["samples"], start=1):
            lines += [
                "",
                f"**{number}.** correct: {sample['correct']} (score {sample['score']:g}), "
                f"ground truth: `{sample['ground_truth']}`",
                "",
                "```text",
                sample["prompt"] + sample["response"],
                "```",
            ]
    return "\n".join(lines) + "\n"


def _fmt(value: Optional[float]) -> str:
    # KL values of near-identical models are far below 1e-4: keep significant digits, not decimals.
    return "" if value is None else f"{value:.4g}"


def plot_results(results: Sequence[dict], path: Path) -> None:
    """Accuracy and (with a teacher) KL against training step.

    Checkpoints without a step in their path (a base model, the teacher) are drawn as dashed reference
    lines; when no checkpoint has a step, all are drawn in the order given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_kl = any(entry["kl"] for entry in results)
    figure, axes = plt.subplots(1, 2 if with_kl else 1, figsize=(11 if with_kl else 6, 4), squeeze=False)
    panels = [("accuracy", lambda e: e["accuracy"])]
    if with_kl:
        panels.append(("KL(student‖teacher) per token", lambda e: e["kl"]["kl_student_teacher"] if e["kl"] else None))
    by_step = any(entry["step"] is not None for entry in results)
    stepped = sorted((e for e in results if e["step"] is not None), key=lambda e: e["step"])
    references = [e for e in results if e["step"] is None] if by_step else []
    for axis, (title, value) in zip(axes[0], panels, strict=True):
        if by_step:
            points = [(e["step"], value(e)) for e in stepped if value(e) is not None]
            if len(stepped) <= 12:
                axis.set_xticks([e["step"] for e in stepped])
            else:
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_xlabel("training step")
        else:
            points = [(index, value(e)) for index, e in enumerate(results) if value(e) is not None]
            axis.set_xticks(range(len(results)), [e["label"] for e in results], rotation=20, ha="right")
            axis.set_xlabel("checkpoint")
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label="checkpoints")
        for number, entry in enumerate(references):
            if value(entry) is not None:
                axis.axhline(value(entry), linestyle="--", color=f"C{number + 1}", label=entry["label"])
        if title == "accuracy":
            axis.set_ylim(-0.03, 1.03)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_reports(results: Sequence[dict], output_dir: Path, plot: bool) -> None:
    """Write results.json, results.md and, with several checkpoints and ``plot``, results.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"accuracy_definition": ACCURACY_DEFINITION, "kl_definition": KL_DEFINITION, "checkpoints": list(results)}
    (output_dir / RESULTS_JSON).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (output_dir / RESULTS_MD).write_text(render_markdown(results))
    if plot and len(results) > 1:
        plot_results(results, output_dir / RESULTS_PNG)


# --------------------------------------------------------------------------------------------
# Driver


@dataclass
class EvaluationConfig:
    """Everything one evaluation run needs; the command-line options map one to one."""

    checkpoints: list[str]
    data_file: str
    output_dir: str
    teacher_path: Optional[str] = None
    compute_score: Optional[str] = None
    prompt_key: str = "prompt"
    num_samples: int = -1
    num_examples: int = 3
    temperature: float = 0.0
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    merge_dir: Optional[str] = None
    plot: bool = True


@dataclass
class EvaluationPlan:
    """The checked inputs: nothing here has loaded model weights yet."""

    checkpoints: list[Checkpoint]
    teacher: Optional[Checkpoint]
    rows: list[EvalRow]
    scorer: Scorer


def plan_evaluation(config: EvaluationConfig) -> EvaluationPlan:
    """Check every input (cheap checks first) and raise :class:`EvaluationInputError` on the first bad one."""
    _check_settings(config)
    checkpoints = resolve_checkpoints(config.checkpoints)
    if not checkpoints:
        raise EvaluationInputError("--model_path", "no checkpoint given", "pass at least one checkpoint folder")
    teacher = resolve_checkpoint(config.teacher_path) if config.teacher_path else None
    rows = load_rows(config.data_file, config.prompt_key, config.num_samples)
    scorer = Scorer(load_custom_scorer(config.compute_score) if config.compute_score else None)
    scorer.check(rows)
    if config.plot and len(checkpoints) > 1:
        _require_matplotlib()
    for checkpoint in checkpoints:
        _check_tokenizer(checkpoint)
    if teacher is not None:
        _check_tokenizer(teacher)
        for checkpoint in checkpoints:
            _check_same_tokens(checkpoint, teacher)
    return EvaluationPlan(checkpoints, teacher, rows, scorer)


def _check_settings(config: EvaluationConfig) -> None:
    if config.temperature < 0:
        raise EvaluationInputError("--temperature", f"is {config.temperature}", "use 0 (greedy) or a positive value")
    for option in ("max_new_tokens", "batch_size"):
        if getattr(config, option) < 1:
            raise EvaluationInputError(f"--{option}", f"is {getattr(config, option)}", "use a positive integer")
    if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
        raise EvaluationInputError("--device", f"is {config.device!r}", "use auto, cpu, cuda or cuda:N")
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvaluationInputError("--device", f"{config.device} but no GPU is visible", "use --device cpu or auto")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EvaluationInputError(
            "results.png", "needs matplotlib, which is not installed", "pip install matplotlib, or pass --no_plot"
        ) from None


def _check_tokenizer(checkpoint: Checkpoint) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.tokenizer_dir)
    except Exception as error:
        raise EvaluationInputError(
            str(checkpoint.tokenizer_dir),
            f"the tokenizer does not load ({type(error).__name__})",
            "save the student's tokenizer into it with tokenizer.save_pretrained",
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise EvaluationInputError(
            str(checkpoint.tokenizer_dir),
            "the tokenizer has no chat template (verl renders prompts with apply_chat_template)",
            "save a tokenizer with a chat template (e.g. the instruct model's) into the folder",
        )


def _check_same_tokens(checkpoint: Checkpoint, teacher: Checkpoint) -> None:
    from verl.distill.teacher import TokenizerMismatchError, check_tokenizers_match

    try:
        check_tokenizers_match(str(checkpoint.tokenizer_dir), str(teacher.tokenizer_dir))
    except TokenizerMismatchError as error:
        raise EvaluationInputError(
            f"--teacher_path {teacher.path}",
            f"its tokenizer differs from {checkpoint.path}'s ({error})",
            "use a teacher with the student's tokenizer: the teacher scores the student's token ids",
        ) from None


def run_evaluation(config: EvaluationConfig, plan: Optional[EvaluationPlan] = None) -> list[dict]:
    """Evaluate every checkpoint, write the reports into ``config.output_dir`` and return the entries."""
    plan = plan or plan_evaluation(config)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    settings = GenerationSettings(config.temperature, config.max_new_tokens, config.batch_size, config.seed)
    recorded_settings = {
        **asdict(settings),
        "num_samples": config.num_samples,
        "prompt_key": config.prompt_key,
        "teacher_path": config.teacher_path,
        "compute_score": config.compute_score,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }
    merge_dir = Path(config.merge_dir).expanduser() if config.merge_dir else None
    teacher_context = hf_model_folder(plan.teacher, merge_dir) if plan.teacher else contextlib.nullcontext()
    results = []
    with teacher_context as teacher_folder:
        teacher = load_model(teacher_folder, device, dtype) if plan.teacher else None
        for checkpoint in plan.checkpoints:
            with hf_model_folder(checkpoint, merge_dir) as folder:
                student = load_model(folder, device, dtype)
                metrics = evaluate_checkpoint(
                    student, teacher, plan.rows, plan.scorer, settings, config.num_examples, checkpoint.label
                )
                del student  # before the next checkpoint loads: one student in memory at a time
            results.append(
                {
                    "path": checkpoint.path,
                    "label": checkpoint.label,
                    "kind": checkpoint.kind,
                    "step": checkpoint.step,
                    **metrics,
                    "data_file": str(Path(config.data_file).expanduser().resolve()),
                    "settings": recorded_settings,
                }
            )
    write_reports(results, Path(config.output_dir).expanduser(), config.plot)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate_model.py",
        description="Evaluate checkpoints (Hugging Face folders or verl FSDP checkpoints) on a parquet file in "
        "verl's RLHF layout: accuracy, KL to a teacher, response length, sample generations. "
        f"{ACCURACY_DEFINITION} {KL_DEFINITION}",
    )
    add = parser.add_argument
    add(
        "--model_path",
        "--checkpoints",
        dest="checkpoints",
        metavar="PATH",
        nargs="+",
        required=True,
        help="checkpoints to evaluate: Hugging Face folders, verl …/global_step_N/actor or …/global_step_N folders "
        "(FSDP, merged with verl.model_merger), or a run folder holding global_step_N folders (all, in step order); "
        "the step for the plot is read from global_step_N / step_N / checkpoint-N in the path (required)",
    )
    add(
        "--data",
        "--data_path",
        dest="data_file",
        metavar="FILE",
        required=True,
        help="parquet file in verl's RLHF layout (required)",
    )
    add("--output_dir", default="eval_results", help="folder for results.json/.md/.png (default: %(default)s)")
    add(
        "--teacher_path",
        default=None,
        help="teacher checkpoint (same forms as --model_path, same tokenizer as the student); adds kl_student_teacher "
        "and kl_k3_sampled, defined above (default: none, no KL)",
    )
    add(
        "--compute_score",
        default=None,
        help="path.py[:fn_name] scoring every row, called as fn(data_source=, solution_str=, ground_truth=, "
        "extra_info=); fn_name defaults to compute_score (default: none: toy_addition rows -> "
        "verl.distill.toy.reward.compute_score, others -> verl.utils.reward_score.default_compute_score)",
    )
    add("--prompt_key", default="prompt", help="column holding the chat messages (default: %(default)s)")
    add("--num_samples", type=int, default=-1, help="evaluate the first N rows only, -1: all (default: %(default)s)")
    add("--num_examples", type=int, default=3, help="sample generations kept per checkpoint (default: %(default)s)")
    add("--temperature", type=float, default=0.0, help="0 greedy, > 0 sampling (default: %(default)s)")
    add("--max_new_tokens", type=int, default=256, help="maximum response tokens (default: %(default)s)")
    add("--batch_size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    add("--seed", type=int, default=0, help="sampling seed, reset for every checkpoint (default: %(default)s)")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: %(default)s)")
    add(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations; auto: bfloat16 on GPU, float32 on CPU (default: %(default)s)",
    )
    add(
        "--merge_dir",
        default=None,
        help="keep merged FSDP checkpoints here and reuse them while the shards are unchanged "
        "(default: merge into a temporary folder, removed after use)",
    )
    add(
        "--no_plot",
        dest="plot",
        action="store_false",
        help="skip results.png (default: drawn when there are several checkpoints)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: returns 0, or 2 after a one-line error on bad input."""
    arguments = build_parser().parse_args(argv)
    config = EvaluationConfig(**vars(arguments))
    try:
        plan = plan_evaluation(config)
        results = run_evaluation(config, plan)
    except EvaluationInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for entry in results:
        kl = entry["kl"]
        kl_text = "" if kl is None else f" kl={kl['kl_student_teacher']:.4g} k3={kl['kl_k3_sampled']:.4g}"
        print(
            f"{entry['label']}: step={entry['step']} n={entry['n']} accuracy={entry['accuracy']:.4f}"
            f"{kl_text} response_tokens={entry['response_length_mean']:.1f}"
        )
    print(f"results in {Path(config.output_dir).expanduser()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
