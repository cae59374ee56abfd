"""Which checkpoints to evaluate: Hugging Face folders, verl FSDP checkpoints (merged with verl's model
merger) and run folders, all checked without loading any weights."""

import contextlib
import io
import json
import logging
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from verl.distill.evaluation.errors import EvaluationInputError

_STEP_PATTERN = re.compile(r"^(?:global_step|step|checkpoint)[_-](\d+)$")
_HF_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_FSDP_SHARD_PATTERN = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
# Warnings verl's model merger triggers in libraries it calls, each harmless here: (logger, start of the
# message). torch warns when a DeviceMesh is unpickled in a process without process groups, which is how
# the merger reads every DTensor shard (it only matters for torch.compile); transformers warns that the
# merger passes `torch_dtype` (the argument's old name) to from_config.
_MERGER_WARNINGS = (
    ("torch.distributed.device_mesh", "It seems like pickling/unpickling of the DeviceMesh"),
    ("transformers.modeling_utils", "`torch_dtype` is deprecated"),
    ("transformers.configuration_utils", "`torch_dtype` is deprecated"),
)


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
    """Merge verl FSDP shards into a Hugging Face folder with verl's own model merger (weights in bf16); a
    LoRA student's adapters are merged into its weights."""
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
    # The merger prints its progress (device mesh, shard count, target folder) on stdout: keep it out of
    # our results and show it only when the merge fails.
    merger_output = io.StringIO()
    with contextlib.redirect_stdout(merger_output), _without_known_merger_warnings():
        try:
            merger = FSDPModelMerger(config)
            merger.merge_and_save()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError) as error:
            # The shards passed the cheap archive check but their content does not load.
            sys.stderr.write(merger_output.getvalue())
            raise EvaluationInputError(
                str(actor_dir),
                f"verl's model merger cannot read the shards ({type(error).__name__}: {str(error)[:160]})",
                "re-copy the checkpoint or evaluate another step",
            ) from None
        except BaseException:
            sys.stderr.write(merger_output.getvalue())
            raise
        merger.cleanup()
    _merge_lora_adapter(target_dir)


LORA_ADAPTER_FOLDER = "lora_adapter"


def _merge_lora_adapter(target_dir: Path) -> None:
    """Fold a LoRA student's adapters into the merged weights. verl's merger writes a LoRA checkpoint as
    the base model plus a ``lora_adapter`` folder, and loading the folder alone would score the base."""
    adapter = target_dir / LORA_ADAPTER_FOLDER
    if not (adapter / "adapter_config.json").is_file():
        return
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(target_dir)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _without_known_merger_warnings():
    """Drop exactly the warnings of ``_MERGER_WARNINGS``, only while the merger runs; any other
    record of those loggers still goes through."""
    installed = [(logging.getLogger(name), _DropMessages(prefix)) for name, prefix in _MERGER_WARNINGS]
    for logger, drop in installed:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in installed:
            logger.removeFilter(drop)


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
