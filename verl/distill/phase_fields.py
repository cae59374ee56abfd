"""Which fields of a batch verl's v1 trainer sends to the workers of its model phases.

The trainer hands every model phase (old log-probs, reference pass, values, actor and critic
updates) a ``KVBatchMeta`` that names no fields, so the phase's TransferQueue read returns every
field of every sample: with the model's tensors come the dataset's columns (``raw_prompt``,
``reward_model``, ``extra_info``, ...) and the agent loop's bookkeeping (``extra_fields``,
``metrics``, ``uid``, ...), one Python object per sample and field. TransferQueue packs them into
``NonTensorStack``s and the engine copies them again into each micro-batch; no engine reads them.
On the toy step (64 samples, 18 such fields) reading only the model's fields takes the reference
pass from 0.23 to 0.14 s and the update from 0.32 to 0.26 s.

A model phase therefore reads every tensor field and, of the per-sample Python objects, only
those an engine consumes (:data:`ENGINE_READ_OBJECT_FIELDS`), and these only for a model with a
multimodal processor (for a text model they are empty dicts). The trainer's own reads (rewards,
advantages, metrics, validation) name their fields and are untouched. A custom loss that reads a
dataset column in the worker gets them all back with ``VERL_DISTILL_WORKERS_GET_ALL_FIELDS=1``.
"""

import functools
import os
from collections.abc import Callable, Mapping

ALL_FIELDS_ENV = "VERL_DISTILL_WORKERS_GET_ALL_FIELDS"

# verl's engines pass a VLM's processed image/video inputs to the model from this per-sample field.
ENGINE_READ_OBJECT_FIELDS = frozenset({"multi_modal_inputs"})


def model_phase_fields(field_schema: Mapping[str, Mapping], multimodal: bool) -> list[str]:
    """The fields a model phase reads, given TransferQueue's schema of the batch (field -> spec)."""
    return [
        name
        for name, spec in field_schema.items()
        if not spec.get("is_non_tensor", False) or (multimodal and name in ENGINE_READ_OBJECT_FIELDS)
    ]


def _stored_field_schema(batch) -> Mapping[str, Mapping]:
    import transfer_queue as tq

    return tq.get_client().kv_retrieve_meta(keys=batch.keys, partition_id=batch.partition_id).field_schema


def send_model_fields_only(phase: Callable, field_schema: Callable = _stored_field_schema) -> Callable:
    """Wrap a trainer phase ``phase(trainer, batch, metrics)`` so that its worker calls read only
    :func:`model_phase_fields`; a batch that already names its fields is left as it is."""

    @functools.wraps(phase)
    def model_phase(trainer, batch, *args, **kwargs):
        if os.environ.get(ALL_FIELDS_ENV) == "1" or batch.fields is not None or len(batch) == 0:
            return phase(trainer, batch, *args, **kwargs)
        multimodal = getattr(trainer, "processor", None) is not None
        batch.fields = model_phase_fields(field_schema(batch), multimodal)
        try:
            return phase(trainer, batch, *args, **kwargs)
        finally:
            batch.fields = None

    return model_phase
