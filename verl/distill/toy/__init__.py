"""A toy distillation task the project builds itself, offline and deterministically per machine type.

Two-digit addition with the answer's digits reversed, a character-level tokenizer with a ChatML
template, a tiny Qwen2 teacher (>= 90% greedy accuracy) and a less-trained student of the same
shape, and verl RLHF parquet files. ``python -m verl.distill.toy build`` or
``build_toy_assets()``; the scorer for verl is ``verl/distill/toy/reward.py::compute_score``.
"""

from verl.distill.toy.build import ToyAssets, ToySpec, build_toy_assets, load_toy_assets
from verl.distill.toy.reward import DATA_SOURCE, compute_score

__all__ = ["DATA_SOURCE", "ToyAssets", "ToySpec", "build_toy_assets", "compute_score", "load_toy_assets"]
