"""The trainer's weight updates, applied to the ``hf`` rollout's transformers model.

``ActorRolloutRefWorker.update_weights`` asks the actor's engine for ``get_per_tensor_param`` and hands
the rollout one of these streams:

* a full-weight actor, or a LoRA actor with ``actor_rollout_ref.model.lora.merge=True``: every weight
  under the base model's names (the adapters merged in), ``peft_config=None``;
* a LoRA actor without ``merge``, once per trainer process when ``rollout.load_format`` is ``dummy`` (verl's default): the
  base weights, ``peft_config`` set and ``base_sync_done=False``, under the base model's names except
  that each adapted module's weight is named ``<module>.base_layer.weight``;
* a LoRA actor after every update: the adapter tensors only (``lora_A``/``lora_B``, as
  ``peft.get_peft_model_state_dict`` names them), ``peft_config`` (``LoraConfig.to_dict()``) and
  ``base_sync_done=True``.

The rollout wraps its model in a PEFT model built from that ``peft_config`` at the first adapter
update and loads each update's adapters into it, so it samples from base + adapters exactly as the
actor computes them (rank, alpha, rsLoRA and DoRA included: PEFT's own layers do the arithmetic).
"""

from collections.abc import Callable
from typing import Any

import torch

ADAPTER_NAME = "default"


def is_adapter_weight(name: str) -> bool:
    return "lora_" in name or ".adapter_" in name


def _base_name(name: str) -> str:
    """The name a weight has in the model without adapters (PEFT wraps each adapted module's own layer as ``base_layer``)."""
    return name.replace(".base_layer.", ".")


def underlying_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model, inside a PEFT wrapper or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_full_state_dict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    not_sent: Callable[[str], bool] = lambda name: False,
) -> None:
    """Overwrite every weight of ``model`` with ``state_dict`` (cast to the model's dtype).

    A key the model does not have, or a model weight that is neither sent, nor tied to a sent weight
    (e.g. ``lm_head`` tied to the embeddings), nor allowed by ``not_sent``, is an error: a partial update
    would make the rollout sample from a mix of old and new weights.
    """
    own = model.state_dict()
    sent_storages = {own[name].data_ptr() for name in state_dict if name in own}
    result = model.load_state_dict(state_dict, strict=False)
    missing = [
        name for name in result.missing_keys if own[name].data_ptr() not in sent_storages and not not_sent(name)
    ]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"hf rollout: weight update does not match the rollout model "
            f"(unknown: {sorted(result.unexpected_keys)[:5]}, missing: {sorted(missing)[:5]}); "
            "the trainer and the rollout must load the same actor_rollout_ref.model.path"
        )


def load_base_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a LoRA actor's base weights (``base_sync_done=False``) into the base of ``model``, with or
    without adapters already in place: names are matched with and without ``.base_layer``."""
    base = underlying_model(model)
    own_by_base_name = {_base_name(name): name for name in base.state_dict() if not is_adapter_weight(name)}
    renamed = {own_by_base_name.get(_base_name(name), name): tensor for name, tensor in state_dict.items()}
    load_full_state_dict(base, renamed, not_sent=is_adapter_weight)


def load_adapters(
    model: torch.nn.Module, peft_config: dict[str, Any], adapter_weights: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """``model`` with the actor's adapters: wrapped in a PEFT model at the first call, the adapter
    weights replaced at every call. Every adapter weight of the model must be in ``adapter_weights``."""
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    if not isinstance(model, PeftModel):  # the actor's adapters never change shape during a run
        model = get_peft_model(model, PeftConfig.from_peft_type(**peft_config), adapter_name=ADAPTER_NAME).eval()
    result = set_peft_model_state_dict(model, adapter_weights, adapter_name=ADAPTER_NAME)
    missing = [name for name in result.missing_keys if is_adapter_weight(name)]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"hf rollout: LoRA update does not match the rollout's adapters "
            f"(unknown: {sorted(result.unexpected_keys)[:5]}, missing: {sorted(missing)[:5]})"
        )
    return model
