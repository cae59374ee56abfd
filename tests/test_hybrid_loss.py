"""hybrid_loss: rl_coef * verl's policy loss + distillation_coef * the distillation KL, as the engine calls it."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_configs import CONFIG_DIR, yaml_lines_missing_a_comment
from test_losses import (
    AGG_MODES,
    BATCH,
    MAX_RESPONSE,
    DistillActorConfig,
    actor_config,
    aggregate,
    make_batch,
    run_engine,
)

from verl.distill.actor_config import FSDPDistillActorConfig
from verl.distill.loss_config import DistillLossConfig
from verl.distill.validation import validate_distillation_config
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.roles.utils.hybrid_loss import hybrid_loss
from verl.workers.roles.utils.loss_registry import get_loss_fn, is_distillation_mode, needs_teacher_logits
from verl.workers.roles.utils.losses import distillation_loss
from verl.workers.utils.losses import ppo_loss

CLIP = 0.2  # verl's default clip_ratio
VOCAB = 5


def hybrid_config(rl_coef=1.0, distillation_coef=1.0, rl_policy_loss="vanilla", **overrides):
    distill = DistillLossConfig(rl_coef=rl_coef, distillation_coef=distillation_coef, rl_policy_loss=rl_policy_loss)
    return actor_config(
        DistillActorConfig, distill=distill, policy_loss=PolicyLossConfig(loss_mode="hybrid"), **overrides
    )


def hybrid(config):
    def loss_fn(model_output, data, dp_group=None):
        return hybrid_loss(config, model_output, data, dp_group)

    return loss_fn


def verl_ppo(config):
    def loss_fn(model_output, data, dp_group=None):
        return ppo_loss(config, model_output, data, dp_group)

    return loss_fn


def distill(config):
    def loss_fn(model_output, data, dp_group=None):
        return distillation_loss(config, model_output, data, dp_group)

    return loss_fn


def with_task_signal(batch, seed, off_policy=True, rollout_is_weights=False):
    """GRPO-like advantages (one value per sequence, both signs) and, off policy, ratios beyond the clip range."""
    generator = torch.Generator().manual_seed(seed)
    per_sequence = torch.randn(BATCH, 1, generator=generator)
    batch.data["advantages"] = per_sequence.expand(BATCH, MAX_RESPONSE).contiguous()
    if off_policy:
        shift = torch.tensor([0.5, -0.5, 0.05, -0.05]).repeat(BATCH * MAX_RESPONSE // 4 + 1)[: BATCH * MAX_RESPONSE]
        batch.data["old_log_probs"] = batch.student.detach() - shift.view(BATCH, MAX_RESPONSE)
    if rollout_is_weights:
        batch.data["rollout_is_weights"] = 0.5 + torch.rand(BATCH, MAX_RESPONSE, generator=generator)
    return batch


# ---------------------------------------------------------------------------------------------
# Closed forms on a small vocabulary
# ---------------------------------------------------------------------------------------------


def small_vocabulary_batch(seed):
    """A student and a teacher over VOCAB tokens; response tokens sampled from the student."""
    generator = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(BATCH, MAX_RESPONSE, VOCAB, generator=generator, requires_grad=True)
    teacher_logits = student_logits.detach() + torch.randn(BATCH, MAX_RESPONSE, VOCAB, generator=generator)
    probs = torch.softmax(student_logits.detach(), dim=-1).view(-1, VOCAB)
    tokens = torch.multinomial(probs, 1, generator=generator).view(BATCH, MAX_RESPONSE, 1)
    student = torch.log_softmax(student_logits, dim=-1).gather(-1, tokens).squeeze(-1)
    teacher = torch.log_softmax(teacher_logits, dim=-1).gather(-1, tokens).squeeze(-1)
    batch = make_batch(seed=seed, teacher=teacher, student=student.detach())
    return batch, student_logits, student, tokens


def ppo_clip_closed_form(advantages, ratio):
    """Per-token PPO-clip loss and its derivative in log pi (no dual clip: ratio < 3 here)."""
    clipped = ((advantages > 0) & (ratio > 1 + CLIP)) | ((advantages < 0) & (ratio < 1 - CLIP))
    value = torch.where(clipped, -advantages * ratio.clamp(1 - CLIP, 1 + CLIP), -advantages * ratio)
    slope = torch.where(clipped, torch.zeros_like(ratio), -advantages * ratio)
    return value, slope


def kl_closed_form(estimator, log_ratio):
    """Per-token estimate of KL(pi || nu) and its derivative in log pi, r = log pi - log nu."""
    if estimator == "k2":
        return 0.5 * log_ratio.square(), log_ratio
    return torch.exp(-log_ratio) + log_ratio - 1, 1 - torch.exp(-log_ratio)  # low_var_kl, |r| < 2.5


@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("estimator", ["k2", "low_var_kl"])
def test_value_and_logit_gradient_match_the_closed_form(estimator, off_policy):
    batch, student_logits, student, tokens = small_vocabulary_batch(seed=21)
    with_task_signal(batch, seed=21, off_policy=off_policy)
    config = hybrid_config(rl_coef=0.7, distillation_coef=0.3, kl_loss_type=estimator)
    loss, metrics = hybrid_loss(config, batch.model_output(batch.data, student=student), batch.data)
    loss.backward()

    mask, count = batch.mask, batch.mask.sum()
    advantages = batch.data["advantages"]
    ratio = torch.exp(student.detach() - batch.data["old_log_probs"])
    log_ratio = student.detach() - batch.teacher
    assert log_ratio[mask].min() > -2.5  # low_var_kl's gradient is k3's exact one here (no truncation)
    pg_value, pg_slope = ppo_clip_closed_form(advantages, ratio)
    kl_value, kl_slope = kl_closed_form(estimator, log_ratio)
    pg_loss, kl_loss = pg_value[mask].sum() / count, kl_value[mask].sum() / count
    assert aggregate(metrics["pg_loss"]) == pytest.approx(pg_loss.item(), rel=1e-5)
    assert aggregate(metrics["kl_loss"]) == pytest.approx(kl_loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx((0.7 * pg_loss + 0.3 * kl_loss).item(), rel=1e-5)

    # d log_softmax(z)[y] / dz = onehot(y) - softmax(z), weighted by dL/d log pi(y) at each token
    weight = torch.where(mask, (0.7 * pg_slope + 0.3 * kl_slope) / count, 0.0)
    one_hot = torch.zeros(BATCH, MAX_RESPONSE, VOCAB).scatter(-1, tokens, 1.0)
    expected = weight.unsqueeze(-1) * (one_hot - torch.softmax(student_logits.detach(), dim=-1))
    torch.testing.assert_close(student_logits.grad, expected, rtol=1e-4, atol=1e-7)
    if off_policy:  # clipping really happened, and the teacher still pulls the clipped tokens
        clipped = mask & (pg_slope == 0)
        assert clipped.any() and torch.all(student_logits.grad[clipped].abs().sum(-1) > 0)


# ---------------------------------------------------------------------------------------------
# The two ends: each coefficient at 0 gives the other loss exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg_mode", AGG_MODES)
@pytest.mark.parametrize("estimator", ["low_var_kl", "k2", "k3+"])
def test_rl_coef_zero_is_exactly_the_distillation_loss(estimator, agg_mode):
    batch = with_task_signal(make_batch(seed=22), seed=22)
    entropy = torch.rand(BATCH, MAX_RESPONSE, generator=torch.Generator().manual_seed(22))
    common = dict(kl_loss_type=estimator, loss_agg_mode=agg_mode, entropy_coeff=0.01)
    # kl_loss_coef is not read by hybrid: distillation_coef is the KL's only weight
    ours = hybrid_config(rl_coef=0.0, distillation_coef=0.6, kl_loss_coef=5.0, **common)
    reference = actor_config(DistillActorConfig, kl_loss_coef=0.6, **common)
    hybrid_value, hybrid_gradient, hybrid_metrics = run_engine(hybrid(ours), batch, 2, entropy=entropy)
    distill_value, distill_gradient, distill_metrics = run_engine(distill(reference), batch, 2, entropy=entropy)
    assert hybrid_value == distill_value
    assert torch.equal(hybrid_gradient, distill_gradient)
    for key in ("kl_loss", "teacher_log_prob_mean", "student_log_prob_mean", "entropy_loss"):
        assert aggregate(hybrid_metrics[key]) == aggregate(distill_metrics[key])
    assert aggregate(hybrid_metrics["pg_loss"]) != 0  # the PG term exists; its weight is 0


@pytest.mark.parametrize("agg_mode", AGG_MODES)
@pytest.mark.parametrize("policy_loss", ["vanilla", "gspo", "gpg", "cispo", "sapo"])
def test_distillation_coef_zero_is_exactly_verls_ppo_loss_without_kl(policy_loss, agg_mode):
    batch = with_task_signal(make_batch(seed=23), seed=23, rollout_is_weights=True)
    entropy = torch.rand(BATCH, MAX_RESPONSE, generator=torch.Generator().manual_seed(23))
    common = dict(loss_agg_mode=agg_mode, entropy_coeff=0.01)
    ours = hybrid_config(rl_coef=1.0, distillation_coef=0.0, rl_policy_loss=policy_loss, **common)
    verls = actor_config(ActorConfig, use_kl_loss=False, policy_loss=PolicyLossConfig(loss_mode=policy_loss), **common)
    hybrid_value, hybrid_gradient, hybrid_metrics = run_engine(hybrid(ours), batch, 2, entropy=entropy)
    verl_value, verl_gradient, verl_metrics = run_engine(verl_ppo(verls), batch, 2, entropy=entropy)
    assert hybrid_value == verl_value
    assert torch.equal(hybrid_gradient, verl_gradient)
    assert aggregate(hybrid_metrics["pg_loss"]) == aggregate(verl_metrics["actor/pg_loss"])
    policy_metrics = {key for key in verl_metrics if key not in ("actor/pg_loss", "actor/entropy_loss")}
    assert policy_metrics <= set(hybrid_metrics)
    for key in policy_metrics:
        assert aggregate(hybrid_metrics[key]) == aggregate(verl_metrics[key])
    assert aggregate(hybrid_metrics["kl_loss"]) > 0  # the KL term exists; its weight is 0


def test_coefficients_scale_each_term():
    batch = with_task_signal(make_batch(seed=24), seed=24)
    _, pg_only, _ = run_engine(hybrid(hybrid_config(1.0, 0.0)), batch)
    _, kl_only, _ = run_engine(hybrid(hybrid_config(0.0, 1.0)), batch)
    value, gradient, metrics = run_engine(hybrid(hybrid_config(0.25, 4.0)), batch)
    torch.testing.assert_close(gradient, 0.25 * pg_only + 4.0 * kl_only)
    assert value == pytest.approx(0.25 * aggregate(metrics["pg_loss"]) + 4.0 * aggregate(metrics["kl_loss"]))
    assert (aggregate(metrics["rl_coef"]), aggregate(metrics["distillation_coef"])) == (0.25, 4.0)


# ---------------------------------------------------------------------------------------------
# Global-batch normalisation and metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("micro_batch_count", [2, 4])
@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_micro_batch_split_changes_neither_loss_nor_gradient(agg_mode, micro_batch_count):
    batch = with_task_signal(make_batch(seed=25), seed=25, rollout_is_weights=True)
    config = hybrid_config(rl_coef=0.5, distillation_coef=2.0, loss_agg_mode=agg_mode)
    whole_value, whole_gradient, whole_metrics = run_engine(hybrid(config), batch, 1)
    split_value, split_gradient, split_metrics = run_engine(hybrid(config), batch, micro_batch_count)
    assert split_value == pytest.approx(whole_value, rel=1e-6)
    torch.testing.assert_close(split_gradient, whole_gradient, rtol=1e-6, atol=1e-9)
    for key in ("pg_loss", "kl_loss", "teacher_log_prob_mean", "student_log_prob_mean"):
        assert aggregate(split_metrics[key]) == pytest.approx(aggregate(whole_metrics[key]), rel=1e-6)


def test_metrics_are_present_and_separate():
    batch = with_task_signal(make_batch(seed=26), seed=26)
    entropy = torch.rand(BATCH, MAX_RESPONSE, generator=torch.Generator().manual_seed(26))
    config = hybrid_config(rl_coef=0.5, distillation_coef=2.0, kl_loss_type="k2")
    _, _, metrics = run_engine(hybrid(config), batch, 2, entropy=entropy)
    assert set(metrics) == {
        "pg_loss",
        "kl_loss",
        "rl_coef",
        "distillation_coef",
        "distillation_mode",
        "teacher_log_prob_mean",
        "student_log_prob_mean",
        "entropy_loss",
        "actor/pg_clipfrac",
        "actor/ppo_kl",
        "actor/pg_clipfrac_lower",
    }
    mask = batch.mask
    k2 = 0.5 * (batch.student.detach() - batch.teacher).square()
    assert aggregate(metrics["kl_loss"]) == pytest.approx(k2[mask].mean().item(), rel=1e-5)  # unweighted
    assert aggregate(metrics["distillation_mode"]) == 1.0
    assert aggregate(metrics["teacher_log_prob_mean"]) == pytest.approx(batch.teacher[mask].mean().item(), rel=1e-5)
    assert aggregate(metrics["student_log_prob_mean"]) == pytest.approx(batch.student[mask].mean().item(), rel=1e-5)
    assert 0 < aggregate(metrics["actor/pg_clipfrac"]) < 1
    assert all(math.isfinite(aggregate(values)) for values in metrics.values())


def test_masked_teacher_garbage_changes_nothing():
    clean = with_task_signal(make_batch(seed=27, masked_garbage=False), seed=27)
    dirty = with_task_signal(make_batch(seed=27, masked_garbage=True), seed=27)
    clean_value, clean_gradient, _ = run_engine(hybrid(hybrid_config()), clean)
    dirty_value, dirty_gradient, _ = run_engine(hybrid(hybrid_config()), dirty)
    assert dirty_value == pytest.approx(clean_value, rel=1e-6)
    torch.testing.assert_close(dirty_gradient, clean_gradient)
    assert torch.all(dirty_gradient[~dirty.mask] == 0)


# ---------------------------------------------------------------------------------------------
# Bad input, options, registry and trainer config
# ---------------------------------------------------------------------------------------------


def test_unknown_rl_policy_loss_names_the_key_and_the_valid_names():
    batch = make_batch(seed=28)
    with pytest.raises(ValueError, match=r"actor\.distill\.rl_policy_loss='hybrid'; valid .*vanilla.*gspo"):
        run_engine(hybrid(hybrid_config(rl_policy_loss="hybrid")), batch)


def test_k1_as_the_distillation_estimator_is_refused():
    with pytest.raises(ValueError, match=r"kl_loss_type='k1'.*does not involve the teacher"):
        run_engine(hybrid(hybrid_config(kl_loss_type="k1")), make_batch(seed=29))


def test_missing_teacher_log_probs_is_a_clear_error():
    batch = make_batch(seed=30)
    del batch.data["ref_log_prob"]
    with pytest.raises(ValueError, match=r"hybrid loss: data has no 'ref_log_prob'.*use_kl_loss=true"):
        run_engine(hybrid(hybrid_config()), batch)


def test_coefficients_default_to_one():
    options = DistillLossConfig()
    assert (options.rl_coef, options.distillation_coef, options.rl_policy_loss) == (1.0, 1.0, "vanilla")


@pytest.mark.parametrize(
    "options, key",
    [
        (dict(rl_coef=-0.1), "rl_coef=-0.1 must be finite and >= 0"),
        (dict(distillation_coef=math.inf), "distillation_coef=inf must be finite and >= 0"),
        (dict(rl_coef=math.nan), "rl_coef=nan must be finite and >= 0"),
        (dict(rl_coef=0.0, distillation_coef=0.0), "distillation_coef=0.0 and rl_coef=0.0 are both 0"),
        (dict(rl_policy_loss=""), "rl_policy_loss='' must name one of verl's policy losses"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, key):
    with pytest.raises(ValueError) as error:
        DistillLossConfig(**options)
    message = str(error.value)
    assert message.startswith(f"actor_rollout_ref.actor.distill.{key}") and "\n" not in message


def test_hybrid_is_a_registered_distillation_mode_on_sampled_tokens():
    assert get_loss_fn("hybrid") is hybrid_loss
    assert is_distillation_mode("hybrid")
    assert not needs_teacher_logits("hybrid")


def compose_hybrid(tiny_assets, *overrides):
    paths = [
        f"actor_rollout_ref.model.path={tiny_assets.student}",
        f"actor_rollout_ref.ref.model.path={tiny_assets.teacher}",
        f"data.train_files={tiny_assets.train_files}",
        f"data.val_files={tiny_assets.val_files}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "critic.ppo_micro_batch_size_per_gpu=1",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("distillation_hybrid_trainer", overrides=paths + list(overrides))


def test_hybrid_trainer_config_composes_grpo_with_a_task_reward(tiny_assets):
    config = compose_hybrid(tiny_assets)
    actor = config.actor_rollout_ref.actor
    assert actor.policy_loss.loss_mode == "hybrid" and actor.use_kl_loss is True
    assert config.actor_rollout_ref.rollout.n == 4
    assert config.reward.reward_manager.name == "naive"
    assert (config.algorithm.adv_estimator, config.algorithm.use_kl_in_reward) == ("grpo", False)
    assert config.critic.enable is False
    actor_dataclass = omega_conf_to_dataclass(actor)
    assert type(actor_dataclass) is FSDPDistillActorConfig
    assert actor_dataclass.distill == DistillLossConfig()
    validate_distillation_config(config)


def test_hybrid_trainer_config_accepts_ppo_with_a_critic(tiny_assets):
    config = compose_hybrid(
        tiny_assets, "algorithm.adv_estimator=gae", "critic.enable=true", f"critic.model.path={tiny_assets.student}"
    )
    validate_distillation_config(config)


def test_hybrid_trainer_config_comments_every_field():
    assert yaml_lines_missing_a_comment(f"{CONFIG_DIR}/distillation_hybrid_trainer.yaml") == []
