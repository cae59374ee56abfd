"""The model phases of verl's v1 trainer read tensor fields only, not the dataset's columns."""

import pytest
from transfer_queue.metadata import KVBatchMeta

from verl.distill.phase_fields import ALL_FIELDS_ENV, model_phase_fields, send_model_fields_only

TENSOR = {"dtype": "torch.int64", "is_non_tensor": False}
OBJECT = {"dtype": None, "is_non_tensor": True}
SCHEMA = {
    "input_ids": TENSOR,
    "responses": TENSOR,
    "ref_log_prob": TENSOR,
    "raw_prompt": OBJECT,
    "reward_model": OBJECT,
    "uid": OBJECT,
    "multi_modal_inputs": OBJECT,
}


class _Trainer:
    def __init__(self, processor=None):
        self.processor = processor
        self.seen_fields = []

    def phase(self, batch, metrics):
        """Stands for PPOTrainer._update_actor: records what its worker call would read."""
        self.seen_fields.append(batch.fields)
        metrics["called"] = True
        return batch


def _batch(fields=None):
    return KVBatchMeta(keys=["a_0", "b_0"], tags=[{}, {}], partition_id="train", fields=fields)


def test_text_model_phases_read_tensor_fields_only():
    assert model_phase_fields(SCHEMA, multimodal=False) == ["input_ids", "responses", "ref_log_prob"]


def test_multimodal_model_phases_also_read_the_processor_inputs():
    expected = ["input_ids", "responses", "ref_log_prob", "multi_modal_inputs"]
    assert model_phase_fields(SCHEMA, multimodal=True) == expected


def test_phase_reads_the_selected_fields_and_the_batch_is_restored():
    trainer, batch, metrics = _Trainer(), _batch(), {}
    phase = send_model_fields_only(_Trainer.phase, field_schema=lambda meta: SCHEMA)
    assert phase(trainer, batch, metrics) is batch
    assert trainer.seen_fields == [["input_ids", "responses", "ref_log_prob"]]
    assert batch.fields is None and metrics == {"called": True}


def test_the_batch_is_restored_when_the_phase_fails():
    def failing_phase(trainer, batch, metrics):
        raise RuntimeError("worker died")

    batch = _batch()
    with pytest.raises(RuntimeError, match="worker died"):
        send_model_fields_only(failing_phase, field_schema=lambda meta: SCHEMA)(_Trainer(), batch, {})
    assert batch.fields is None


def test_multimodal_trainer_sends_processor_inputs():
    trainer = _Trainer(processor=object())
    send_model_fields_only(_Trainer.phase, field_schema=lambda meta: SCHEMA)(trainer, _batch(), {})
    assert "multi_modal_inputs" in trainer.seen_fields[0] and "raw_prompt" not in trainer.seen_fields[0]


def test_a_batch_naming_its_fields_and_the_opt_out_are_left_alone(monkeypatch):
    def no_schema(meta):
        raise AssertionError("the schema must not be read")

    trainer = _Trainer()
    phase = send_model_fields_only(_Trainer.phase, field_schema=no_schema)
    phase(trainer, _batch(fields=["responses"]), {})
    monkeypatch.setenv(ALL_FIELDS_ENV, "1")
    phase(trainer, _batch(), {})
    assert trainer.seen_fields == [["responses"], None]


def test_verl_trainer_phases_are_wrapped_once_verl_loads_them():
    import verl.distill.plugin  # noqa: F401
    from verl.distill.compat import MODEL_PHASES
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    for name in MODEL_PHASES:
        method = getattr(PPOTrainer, name)
        assert method.__wrapped__.__qualname__ == f"PPOTrainer.{name}"
