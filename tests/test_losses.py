"""distillation_loss as verl's engine calls it: nested log-probs, global-batch normalization, metrics."""

import math
from dataclasses import dataclass, field

import pytest
import torch
from tensordict import TensorDict

from verl.distill.loss_config import DistillLossConfig
from verl.trainer.ppo.core_algos import kl_penalty
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.utils.py_functional import append_to_dict
from verl.workers.config import ActorConfig
from verl.workers.roles.utils.losses import distillation_loss
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
ESTIMATORS = ["low_var_kl", "k3", "k2", "mse", "abs", "low_var_kl+", "k3+", "k2+", "mse+", "abs+", "k1+", "kl+"]
MAX_PROMPT, MAX_RESPONSE, BATCH = 4, 6, 8


@dataclass
class DistillActorConfig(ActorConfig):
    """What the lead mounts: verl's actor config plus ``distill``."""

    distill: DistillLossConfig = field(default_factory=DistillLossConfig)


def actor_config(config_class=ActorConfig, **overrides):
    settings = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, use_kl_loss=True, kl_loss_coef=1.0)
    settings.update(overrides)
    return config_class(**settings)


@dataclass
class Batch:
    """A global batch laid out as verl's engine receives it, plus the student's response log-probs."""

    data: TensorDict
    student: torch.Tensor  # [BATCH, MAX_RESPONSE] leaf: the student's log-prob of each response token
    teacher: torch.Tensor  # [BATCH, MAX_RESPONSE] the teacher's log-probs (ref slot)
    mask: torch.Tensor  # [BATCH, MAX_RESPONSE] bool response mask
    prompt_lens: list[int]
    response_lens: list[int]

    def micro_batches(self, count: int) -> list[TensorDict]:
        return tu.chunk_tensordict(self.data, count)

    def model_output(self, micro_batch: TensorDict, student=None, entropy=None) -> dict:
        """Nested full-sequence outputs as the engine returns them: position i holds token i+1's value.

        Prompt positions hold NaN: the loss must never look at them.
        """
        student = self.student if student is None else student
        outputs = {"log_probs": self._nested(micro_batch, student)}
        if entropy is not None:
            outputs["entropy"] = self._nested(micro_batch, entropy)
        return outputs

    def _nested(self, micro_batch: TensorDict, per_response_token: torch.Tensor) -> torch.Tensor:
        pieces = []
        for row in micro_batch["row"].tolist():
            prompt_len, response_len = self.prompt_lens[row], self.response_lens[row]
            pieces += [
                torch.full((prompt_len - 1,), math.nan, dtype=per_response_token.dtype),
                per_response_token[row, :response_len],
                torch.full((1,), math.nan, dtype=per_response_token.dtype),
            ]
        return torch.nested.nested_tensor_from_jagged(torch.cat(pieces), micro_batch["input_ids"].offsets())


def make_batch(seed: int = 0, teacher=None, student=None, holes: bool = True, masked_garbage: bool = True) -> Batch:
    """Varying prompt and response lengths, right-padded responses; ``holes`` masks some response tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, MAX_PROMPT + 1, (BATCH,), generator=generator)
    response_lens = torch.randint(1, MAX_RESPONSE + 1, (BATCH,), generator=generator)
    response_lens[0] = MAX_RESPONSE
    positions_p, positions_r = torch.arange(MAX_PROMPT), torch.arange(MAX_RESPONSE)
    prompt_attention = (positions_p[None, :] >= MAX_PROMPT - prompt_lens[:, None]).long()
    response_attention = (positions_r[None, :] < response_lens[:, None]).long()
    attention_mask = torch.cat([prompt_attention, response_attention], dim=1)
    input_ids = torch.randint(1, 50, (BATCH, MAX_PROMPT + MAX_RESPONSE), generator=generator) * attention_mask
    response_mask = response_attention.clone()
    if holes:  # e.g. tool-output tokens inside a response: scored by nobody
        response_mask[1::3, 1] = 0
    if teacher is None:
        teacher = -3 * torch.rand(BATCH, MAX_RESPONSE, generator=generator)
    if student is None:
        student = -3 * torch.rand(BATCH, MAX_RESPONSE, generator=generator)
    slot = teacher.clone()
    if masked_garbage:
        masked = ~response_mask.bool()
        garbage = torch.tensor([math.nan, -math.inf, 1e30, 0.0]).repeat(BATCH * MAX_RESPONSE)[: masked.sum()]
        slot[masked] = garbage.to(slot.dtype)
    data = TensorDict(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
            "response_mask": response_mask,
            "prompts": input_ids[:, :MAX_PROMPT],
            "responses": input_ids[:, MAX_PROMPT:],
            "ref_log_prob": slot,
            "old_log_probs": student.detach().float().clone(),
            "advantages": torch.zeros(BATCH, MAX_RESPONSE),
            "row": torch.arange(BATCH),
        },
        batch_size=BATCH,
    )
    data = left_right_2_no_padding(data)
    # As FSDPEngine.forward_backward_batch and the trainer's _update_actor set them (one dp rank).
    tu.assign_non_tensor(
        data, dp_size=1, batch_num_tokens=int(data["loss_mask"].sum().item()), global_batch_size=BATCH
    )
    return Batch(
        data=data,
        student=student.clone().requires_grad_(True),
        teacher=teacher,
        mask=response_mask.bool(),
        prompt_lens=prompt_lens.tolist(),
        response_lens=response_lens.tolist(),
    )


def run_engine(loss_fn, batch: Batch, micro_batch_count: int = 1, **output_kwargs):
    """Forward + backward over micro-batches like forward_backward_batch; returns summed loss and metric lists."""
    batch.student.grad = None
    total, metrics = 0.0, {}
    for micro_batch in batch.micro_batches(micro_batch_count):
        loss, micro_metrics = loss_fn(
            model_output=batch.model_output(micro_batch, **output_kwargs), data=micro_batch, dp_group=None
        )
        loss.backward()
        total += loss.item()
        append_to_dict(metrics, micro_metrics)
    return total, batch.student.grad.clone(), metrics


def distill(config):
    def loss_fn(model_output, data, dp_group=None):
        return distillation_loss(config, model_output, data, dp_group)

    return loss_fn


def aggregate(values):
    return values.aggregate() if isinstance(values, Metric) else sum(values) / len(values)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_loss_value_equals_verls_kl_loss(estimator, agg_mode):
    """Same number as verl's ppo_loss KL term (zero advantages: its policy-gradient term is 0)."""
    batch = make_batch(seed=1, masked_garbage=False)
    config = actor_config(kl_loss_type=estimator, loss_agg_mode=agg_mode, kl_loss_coef=0.7)
    ours, _, ours_metrics = run_engine(distill(config), batch)
    verls, _, verl_metrics = run_engine(lambda **kw: ppo_loss(config, **kw), batch)
    assert ours == pytest.approx(verls, rel=1e-6, abs=1e-7)
    assert aggregate(ours_metrics["kl_loss"]) == pytest.approx(aggregate(verl_metrics["kl_loss"]), rel=1e-6)


@pytest.mark.parametrize("estimator", ["k2", "mse", "abs", "low_var_kl+", "k3+", "k1+", "low_var_kl"])
def test_gradient_equals_verls_where_no_clamp_binds(estimator):
    """Teacher within e^2.5 of the student: every estimator has verl's gradient, low_var_kl included."""
    generator = torch.Generator().manual_seed(2)
    student = -1 - 2 * torch.rand(BATCH, MAX_RESPONSE, generator=generator)
    teacher = student + 4 * torch.rand(BATCH, MAX_RESPONSE, generator=generator) - 2  # |r| < 2
    batch = make_batch(seed=2, teacher=teacher, student=student, masked_garbage=False)
    config = actor_config(kl_loss_type=estimator)
    _, ours, _ = run_engine(distill(config), batch)
    _, verls, _ = run_engine(lambda **kw: ppo_loss(config, **kw), batch)
    torch.testing.assert_close(ours, verls, rtol=1e-5, atol=1e-7)
    assert ours[batch.mask].abs().min() > 0


def test_low_var_kl_pulls_where_verls_clamp_gives_zero_gradient():
    """A confident teacher far from the student: verl's clamped k3 has no gradient, ours does."""
    student = torch.full((BATCH, MAX_RESPONSE), -8.0)  # teacher 3000x more likely: k3 > 10
    student[::2] = -0.05  # student sure of a token the teacher gives e^-30: k3 > 10 too
    teacher = torch.where(student < -1, torch.tensor(-0.01), torch.tensor(-30.0))
    batch = make_batch(seed=3, teacher=teacher, student=student, masked_garbage=False)
    config = actor_config(kl_loss_type="low_var_kl")
    ours_loss, ours, _ = run_engine(distill(config), batch)
    verls_loss, verls, _ = run_engine(lambda **kw: ppo_loss(config, **kw), batch)
    assert ours_loss == pytest.approx(verls_loss)  # the value is verl's: clamped at 10 per token
    assert torch.all(verls == 0)
    n_tokens = batch.mask.sum()
    up, down = batch.mask & (student < -1), batch.mask & (student > -1)
    # d/d log pi = 1 - min(nu/pi, e^2.5), divided by the token count (token-mean)
    torch.testing.assert_close(ours[up], torch.full_like(ours[up], (1 - math.exp(2.5)) / n_tokens))
    torch.testing.assert_close(ours[down], torch.full_like(ours[down], (1 - math.exp(-29.95)) / n_tokens))


def test_log_ratio_clamp_is_read_from_the_distill_options():
    student = torch.full((BATCH, MAX_RESPONSE), -8.0)
    teacher = torch.full((BATCH, MAX_RESPONSE), -0.01)
    batch = make_batch(seed=4, teacher=teacher, student=student, masked_garbage=False)
    config = actor_config(DistillActorConfig, distill=DistillLossConfig(log_ratio_clamp=1.0))
    _, gradient, _ = run_engine(distill(config), batch)
    expected = (1 - math.e) / batch.mask.sum()
    torch.testing.assert_close(gradient[batch.mask], torch.full_like(gradient[batch.mask], expected))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(estimator):
    teacher = -3 * torch.rand(BATCH, MAX_RESPONSE, generator=torch.Generator().manual_seed(5))
    batch = make_batch(seed=5, teacher=teacher, student=teacher.clone())
    loss, gradient, _ = run_engine(distill(actor_config(kl_loss_type=estimator)), batch)
    assert loss == 0.0
    assert torch.all(gradient == 0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradient_descent_moves_the_student_toward_the_teacher(estimator):
    batch = make_batch(seed=6)
    _, gradient, _ = run_engine(distill(actor_config(kl_loss_type=estimator)), batch)
    gap = (batch.student.detach() - batch.teacher)[batch.mask]
    # A descent step -lr * gradient lowers log pi where it exceeds log nu and raises it elsewhere.
    assert torch.all(torch.sign(gradient[batch.mask]) == torch.sign(gap))
    assert torch.all(gradient[~batch.mask] == 0)


@pytest.mark.parametrize("estimator", ["low_var_kl", "k2", "abs+"])
def test_prompt_padding_and_masked_response_tokens_are_ignored(estimator):
    """NaN prompt log-probs, and NaN/-inf/1e30 teacher values at masked tokens change nothing."""
    clean = make_batch(seed=7, masked_garbage=False)
    dirty = make_batch(seed=7, masked_garbage=True)
    assert not torch.equal(clean.data["ref_log_prob"].nan_to_num(), dirty.data["ref_log_prob"].nan_to_num())
    config = actor_config(kl_loss_type=estimator)
    clean_loss, clean_gradient, _ = run_engine(distill(config), clean)
    dirty_loss, dirty_gradient, _ = run_engine(distill(config), dirty)
    assert math.isfinite(dirty_loss) and dirty_loss == pytest.approx(clean_loss, rel=1e-6)
    torch.testing.assert_close(dirty_gradient, clean_gradient)
    assert torch.all(dirty_gradient[~dirty.mask] == 0)


def per_token_k2(batch: Batch) -> torch.Tensor:
    return 0.5 * (batch.student.detach() - batch.teacher).square() * batch.mask


def closed_form_aggregation(values: torch.Tensor, mask: torch.Tensor, agg_mode: str) -> float:
    token_sums, token_counts = values.sum(-1), mask.sum(-1)
    return {
        "token-mean": values.sum() / mask.sum(),
        "token-sum": values.sum(),
        "seq-mean-token-sum": token_sums.mean(),
        "seq-mean-token-mean": (token_sums / token_counts).mean(),
        "seq-mean-token-sum-norm": token_sums.mean() / MAX_RESPONSE,
    }[agg_mode].item()


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_every_loss_agg_mode_matches_its_closed_form(agg_mode):
    batch = make_batch(seed=8)
    loss, _, _ = run_engine(distill(actor_config(kl_loss_type="k2", loss_agg_mode=agg_mode, kl_loss_coef=2.0)), batch)
    assert loss == pytest.approx(2.0 * closed_form_aggregation(per_token_k2(batch), batch.mask, agg_mode), rel=1e-5)


@pytest.mark.parametrize("micro_batch_count", [2, 4])
@pytest.mark.parametrize("estimator", ["low_var_kl", "k2", "k3+"])
@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_micro_batch_split_changes_neither_loss_nor_gradient(agg_mode, estimator, micro_batch_count):
    batch = make_batch(seed=9)
    config = actor_config(kl_loss_type=estimator, loss_agg_mode=agg_mode)
    whole_loss, whole_gradient, whole_metrics = run_engine(distill(config), batch, 1)
    split_loss, split_gradient, split_metrics = run_engine(distill(config), batch, micro_batch_count)
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    torch.testing.assert_close(split_gradient, whole_gradient, rtol=1e-6, atol=1e-9)
    for key in ("kl_loss", "teacher_log_prob_mean", "student_log_prob_mean"):
        assert aggregate(split_metrics[key]) == pytest.approx(aggregate(whole_metrics[key]), rel=1e-6)


def test_metrics_are_present_and_aggregate_to_global_means():
    batch = make_batch(seed=10)
    config = actor_config(kl_loss_type="low_var_kl", kl_loss_coef=0.5)
    loss, _, metrics = run_engine(distill(config), batch, micro_batch_count=2)
    assert set(metrics) == {
        "kl_loss",
        "kl_coef",
        "pg_loss",
        "distillation_mode",
        "teacher_log_prob_mean",
        "student_log_prob_mean",
    }
    assert metrics["pg_loss"] == [0.0, 0.0] and aggregate(metrics["pg_loss"]) == 0.0
    assert aggregate(metrics["distillation_mode"]) == 1.0
    assert aggregate(metrics["kl_coef"]) == 0.5
    for key in ("kl_loss", "teacher_log_prob_mean", "student_log_prob_mean"):
        assert metrics[key].aggregation == AggregationType.SUM  # partial sums of global-batch means
    assert aggregate(metrics["kl_loss"]) == pytest.approx(loss / 0.5, rel=1e-6)
    mask = batch.mask
    assert aggregate(metrics["teacher_log_prob_mean"]) == pytest.approx(batch.teacher[mask].mean().item(), rel=1e-5)
    student_mean = batch.student.detach()[mask].mean().item()
    assert aggregate(metrics["student_log_prob_mean"]) == pytest.approx(student_mean, rel=1e-5)


def test_metrics_use_mean_aggregation_without_global_batch_info():
    batch = make_batch(seed=10)
    for key in ("batch_num_tokens", "global_batch_size"):
        tu.assign_non_tensor(batch.data, **{key: None})
    _, _, metrics = run_engine(distill(actor_config()), batch, micro_batch_count=2)
    assert metrics["kl_loss"].aggregation == AggregationType.MEAN


def test_teacher_log_prob_mean_reports_the_floored_teacher():
    teacher = torch.full((BATCH, MAX_RESPONSE), -math.inf)
    batch = make_batch(seed=11, teacher=teacher)
    _, _, metrics = run_engine(distill(actor_config()), batch)
    assert aggregate(metrics["teacher_log_prob_mean"]) == pytest.approx(DistillLossConfig().teacher_log_prob_floor)


def test_entropy_bonus_is_subtracted_and_reported():
    batch = make_batch(seed=12)
    entropy = torch.rand(BATCH, MAX_RESPONSE, generator=torch.Generator().manual_seed(12), requires_grad=True)
    config = actor_config(kl_loss_type="k2", entropy_coeff=0.1)
    loss_without, _, metrics_without = run_engine(distill(config), batch)
    loss_with, _, metrics_with = run_engine(distill(config), batch, entropy=entropy)
    assert "entropy_loss" not in metrics_without
    entropy_mean = entropy.detach()[batch.mask].mean().item()
    assert aggregate(metrics_with["entropy_loss"]) == pytest.approx(entropy_mean, rel=1e-5)
    assert loss_with == pytest.approx(loss_without - 0.1 * entropy_mean, rel=1e-5)
    # The bonus raises entropy on response tokens only.
    assert torch.all(entropy.grad[batch.mask] < 0) and torch.all(entropy.grad[~batch.mask] == 0)


@pytest.mark.parametrize("estimator", ["k1", "kl"])
def test_k1_is_rejected_because_its_gradient_ignores_the_teacher(estimator):
    batch = make_batch(seed=13)
    expected = rf"actor_rollout_ref\.actor\.kl_loss_type='{estimator}'.*does not involve the teacher"
    with pytest.raises(ValueError, match=expected):
        run_engine(distill(actor_config(kl_loss_type=estimator)), batch)


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown actor_rollout_ref\.actor\.kl_loss_type='k4'.*low_var_kl.*k3\+"):
        run_engine(distill(actor_config(kl_loss_type="k4")), make_batch(seed=14))


def test_missing_teacher_log_probs_is_a_clear_error():
    batch = make_batch(seed=15)
    del batch.data["ref_log_prob"]
    with pytest.raises(ValueError, match=r"ref_log_prob.*use_kl_loss=true"):
        run_engine(distill(actor_config()), batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_half_precision_and_infinite_teacher_stay_finite(dtype, estimator):
    generator = torch.Generator().manual_seed(16)
    teacher = -20 * torch.rand(BATCH, MAX_RESPONSE, generator=generator)
    teacher[:, ::2] = -math.inf
    teacher[:, 1] = -1e4
    student = (-5 * torch.rand(BATCH, MAX_RESPONSE, generator=generator)).to(dtype)
    batch = make_batch(seed=16, teacher=teacher.to(dtype), student=student)
    loss, gradient, metrics = run_engine(distill(actor_config(kl_loss_type=estimator)), batch)
    assert math.isfinite(loss) and loss > 0
    assert gradient.dtype == dtype and torch.isfinite(gradient).all()
    assert all(math.isfinite(aggregate(values)) for values in metrics.values())


def test_global_batch_info_is_stored_on_the_config_like_ppo_loss():
    batch = make_batch(seed=17)
    config = actor_config()
    run_engine(distill(config), batch, micro_batch_count=2)
    assert config.global_batch_info == {
        "dp_size": 1,
        "batch_num_tokens": int(batch.mask.sum()),
        "global_batch_size": BATCH,
        "loss_scale_factor": None,
    }


def test_token_sum_loss_is_the_sum_of_verls_kl_penalty_values():
    batch = make_batch(seed=18, holes=False)
    for estimator in ("low_var_kl", "k2", "abs"):
        loss, _, _ = run_engine(distill(actor_config(kl_loss_type=estimator, loss_agg_mode="token-sum")), batch)
        expected = kl_penalty(batch.student.detach(), batch.teacher, estimator)[batch.mask].sum().item()
        assert loss == pytest.approx(expected, rel=1e-6)
