"""Tiny Qwen2 causal language models for the toy task, created and saved as HF folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from verl.distill.toy.tokenizer import MODEL_MAX_LENGTH


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a tiny Qwen2 model.

    The defaults shorten the plateau before the model learns the task (measured on 8 seeds):
    full multi-head attention (grouped key/value heads took several times longer), 8 small heads
    rather than 4, and rope_theta 100 so that neighbouring positions of a 20-token sequence
    differ in most rotary frequencies (at Qwen's 10,000 nearly all of them barely turn).
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 8
    intermediate_size: int = 256
    rope_theta: float = 100.0


def new_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A freshly initialised fp32 model (weights drawn from torch's global RNG; seed it first)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        dtype="float32",
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Weights (safetensors), config, generation config and tokenizer files in one folder."""
    # A progress bar per 1 MB file would drown the build's one-line-per-phase output.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
