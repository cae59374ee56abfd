"""Divergences between student and teacher: sampled-token estimators and top-k + tail distribution losses."""

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl.distill.divergences import (
    check_sampled_kl_estimator,
    forward_kl_topk,
    jsd_topk,
    low_var_kl,
    reverse_kl_topk,
    sampled_kl_estimator_names,
    sampled_token_kl,
    teacher_topk,
)
from verl.distill.loss_config import DistillLossConfig
from verl.trainer.ppo.core_algos import kl_penalty

FLOOR = DistillLossConfig().teacher_log_prob_floor
CLAMP = DistillLossConfig().log_ratio_clamp
# Rounded to float32 up front: the estimators compute in float32 and the closed forms must see the same numbers.
log_probs = st.floats(min_value=-40.0, max_value=-2**-10, width=32)
SETTINGS = settings(max_examples=60, deadline=None)


def student_and_grad(student_value: float, teacher_value: float, estimator: str):
    student = torch.tensor([student_value], requires_grad=True)
    value = sampled_token_kl(student, torch.tensor([teacher_value]), estimator)
    value.sum().backward()
    return value.item(), student.grad.item()


# ---------------------------------------------------------------- sampled-token estimators


@SETTINGS
@given(student=log_probs, teacher=log_probs)
def test_each_estimator_matches_its_closed_form(student, teacher):
    r = student - teacher
    k3 = math.exp(-max(min(r, 20), -20)) + max(min(r, 20), -20) - 1
    closed_forms = {
        "low_var_kl": (min(k3, 10.0), 1 - min(math.exp(-r), math.exp(CLAMP))),
        "k2": (0.5 * r * r, r),
        "abs": (abs(r), math.copysign(1.0, r) if r != 0 else 0.0),
        "low_var_kl+": (min(k3, 10.0), r),
        "abs+": (abs(r), r),
        "k1+": (r, r),
    }
    for estimator, (value, gradient) in closed_forms.items():
        ours_value, ours_gradient = student_and_grad(student, teacher, estimator)
        assert ours_value == pytest.approx(value, rel=1e-5, abs=1e-5), estimator
        assert ours_gradient == pytest.approx(gradient, rel=1e-4, abs=1e-5), estimator


@SETTINGS
@given(student=log_probs, teacher=log_probs)
def test_values_equal_verls_kl_penalty(student, teacher):
    for estimator in sampled_kl_estimator_names():
        expected = kl_penalty(torch.tensor([student]), torch.tensor([teacher]), estimator).item()
        ours, _ = student_and_grad(student, teacher, estimator)
        assert ours == pytest.approx(expected, rel=1e-6, abs=1e-6), estimator


def test_aliases_are_the_same_estimator():
    student, teacher = torch.tensor([-3.0, -0.2]), torch.tensor([-0.1, -5.0])
    for first, second in [("low_var_kl", "k3"), ("k2", "mse"), ("k3+", "low_var_kl+"), ("k1+", "kl+")]:
        assert torch.equal(sampled_token_kl(student, teacher, first), sampled_token_kl(student, teacher, second))


def test_expectations_under_the_student_are_the_exact_kl():
    """Sum over y of pi(y) * estimator(y) = KL(pi || nu) for k1 and k3 (no clamp binds here)."""
    pi = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.0]), -1)
    nu = torch.log_softmax(torch.tensor([0.3, 0.9, -1.0, 0.1]), -1)
    exact = (pi.exp() * (pi - nu)).sum()
    for estimator in ("low_var_kl", "k1+"):
        expectation = (pi.exp() * sampled_token_kl(pi, nu, estimator)).sum()
        torch.testing.assert_close(expectation, exact)


def test_expected_k2_gradient_is_the_reverse_kl_gradient():
    logits = torch.tensor([1.0, 0.2, -0.5, 0.0], requires_grad=True)
    nu = torch.log_softmax(torch.tensor([0.3, 0.9, -1.0, 0.1]), -1)
    pi = torch.log_softmax(logits, -1)
    # Score-function form: samples y ~ pi are fixed, so weight each token's loss by pi(y) (detached).
    (pi.exp().detach() * sampled_token_kl(pi, nu, "k2")).sum().backward()
    estimator_gradient = logits.grad.clone()
    logits.grad = None
    pi = torch.log_softmax(logits, -1)
    (pi.exp() * (pi - nu)).sum().backward()
    torch.testing.assert_close(estimator_gradient, logits.grad)


@pytest.mark.parametrize("estimator", sampled_kl_estimator_names())
def test_student_equal_to_teacher_has_zero_value_and_gradient(estimator):
    teacher = torch.tensor([-0.01, -2.0, -35.0])
    student = teacher.clone().requires_grad_(True)
    value = sampled_token_kl(student, teacher, estimator)
    value.sum().backward()
    assert torch.all(value == 0) and torch.all(student.grad == 0)


@SETTINGS
@given(student=log_probs, teacher=log_probs)
def test_every_gradient_moves_the_student_toward_the_teacher(student, teacher):
    if student == teacher:
        return
    for estimator in sampled_kl_estimator_names():
        _, gradient = student_and_grad(student, teacher, estimator)
        assert math.copysign(1.0, gradient) == math.copysign(1.0, student - teacher) and gradient != 0, estimator


def test_our_low_var_kl_has_a_gradient_where_verls_clamp_has_none():
    student = torch.tensor([-8.0, -0.05, -4.0, -12.0], requires_grad=True)
    teacher = torch.tensor([-0.01, -30.0, -0.5, float("-inf")])
    verl_student = student.detach().clone().requires_grad_(True)
    kl_penalty(verl_student, teacher.clamp(min=FLOOR), "low_var_kl").sum().backward()
    assert torch.all(verl_student.grad == 0)
    sampled_token_kl(student, teacher, "low_var_kl").sum().backward()
    assert torch.all(student.grad != 0) and torch.isfinite(student.grad).all()
    assert student.grad[0] == pytest.approx(1 - math.exp(CLAMP))  # teacher far likelier: pull up, bounded
    assert student.grad[1] == pytest.approx(1.0)  # teacher rules the token out: push down


@pytest.mark.parametrize("clamp", [0.5, 2.5, 5.0])
def test_low_var_kl_gradient_is_bounded_by_the_clamp(clamp):
    log_ratio = torch.linspace(-60, 60, 241, requires_grad=True)
    low_var_kl(log_ratio, clamp).sum().backward()
    assert log_ratio.grad.min() == pytest.approx(1 - math.exp(clamp))
    assert log_ratio.grad.max() <= 1


def test_low_var_kl_learns_a_confident_teacher_where_verls_stalls():
    """Categorical students sample tokens and follow the estimator's gradient toward a confident teacher."""

    def train(loss_of) -> float:
        generator = torch.Generator().manual_seed(0)
        contexts, vocab = 16, 10
        wrong_tokens = -12 - 10 * torch.rand(contexts, vocab - 1, generator=generator)
        teacher = torch.log_softmax(torch.cat([torch.full((contexts, 1), 8.0), wrong_tokens], 1), -1)
        logits = torch.randn(contexts, vocab, generator=generator)
        logits[:, 1] += 4  # the student starts sure of a token the teacher rules out
        logits.requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=0.05)
        for _ in range(120):
            student = torch.log_softmax(logits, -1)
            tokens = torch.multinomial(student.detach().exp(), 32, replacement=True, generator=generator)
            loss = loss_of(student.gather(1, tokens), teacher.gather(1, tokens)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        student = torch.log_softmax(logits.detach(), -1)
        return (student.exp() * (student - teacher)).sum(-1).mean().item()

    start = train(lambda student, teacher: 0 * student)
    verls = train(lambda student, teacher: kl_penalty(student, teacher, "low_var_kl"))
    ours = train(lambda student, teacher: sampled_token_kl(student, teacher, "low_var_kl"))
    assert verls > 0.9 * start  # clamped: hardly moves
    assert ours < 0.1 * start


def test_k1_is_rejected_with_the_reason_and_k1_plus_accepted():
    for estimator in ("k1", "kl"):
        with pytest.raises(ValueError, match="does not involve the teacher"):
            check_sampled_kl_estimator(estimator)
    check_sampled_kl_estimator("k1+")
    with pytest.raises(ValueError, match=r"Unknown actor_rollout_ref\.actor\.kl_loss_type='full'; valid: low_var_kl"):
        check_sampled_kl_estimator("full")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", sampled_kl_estimator_names())
def test_half_precision_and_infinite_teacher_give_finite_float32(dtype, estimator):
    student = torch.tensor([-0.5, -3.0, -60.0, -0.01], dtype=dtype, requires_grad=True)
    teacher = torch.tensor([float("-inf"), -1e4, -0.2, -45.0], dtype=dtype)
    value = sampled_token_kl(student, teacher, estimator)
    value.sum().backward()
    assert value.dtype == torch.float32 and torch.isfinite(value).all()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad).all()


# ---------------------------------------------------------------- top-k + tail divergences


mpmath.mp.dps = 50  # the reference divergences: exact enough that float32 is the only error left


def exact_distribution(logits_row, temperature, ids_row=None) -> list:
    """softmax(z / T) in 50 digits; with ids, the (k+1)-category version: ids' masses, then the rest."""
    weights = [mpmath.exp(mpmath.mpf(float(z)) / temperature) for z in logits_row]
    probs = [weight / mpmath.fsum(weights) for weight in weights]
    if ids_row is None:
        return probs
    top = [probs[index] for index in ids_row]
    return top + [mpmath.fsum(prob for index, prob in enumerate(probs) if index not in set(ids_row))]


def exact_kl(p: list, q: list):
    return mpmath.fsum(pc * mpmath.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)


def exact_jsd(p: list, q: list, beta: float):
    """[beta KL(p || m) + (1 - beta) KL(q || m)] / (beta (1 - beta)) with m = beta p + (1 - beta) q."""
    if beta == 0:
        return exact_kl(p, q)
    if beta == 1:
        return exact_kl(q, p)
    b = mpmath.mpf(beta)
    mixture = [b * pc + (1 - b) * qc for pc, qc in zip(p, q)]
    return (b * exact_kl(p, mixture) + (1 - b) * exact_kl(q, mixture)) / (b * (1 - b))


def exact_losses(student_logits, teacher_logits, ids=None, temperature=1.0, beta=0.5) -> dict[str, torch.Tensor]:
    """Reference forward KL, reverse KL and JSD per row (over the whole vocabulary when ids is None).

    The JSD divides O(beta^2) terms by beta: every decade of beta near an endpoint costs two digits.
    """
    distance_to_endpoint = min(beta, 1 - beta)
    extra_digits = 2 * int(-math.log10(distance_to_endpoint)) if distance_to_endpoint > 0 else 0
    rows = {"forward": [], "reverse": [], "jsd": []}
    with mpmath.workdps(mpmath.mp.dps + extra_digits):
        for row in range(student_logits.shape[0]):
            ids_row = None if ids is None else ids[row].tolist()
            p = exact_distribution(teacher_logits[row].tolist(), temperature, ids_row)
            q = exact_distribution(student_logits[row].tolist(), temperature, ids_row)
            rows["forward"].append(float(exact_kl(p, q)))
            rows["reverse"].append(float(exact_kl(q, p)))
            rows["jsd"].append(float(exact_jsd(p, q, beta)))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in rows.items()}


def topk_losses(student_logits, top, temperature=1.0, beta=0.5, with_tail=True) -> dict[str, torch.Tensor]:
    kwargs = dict(temperature=temperature)
    if with_tail:
        kwargs["teacher_tail_log_prob"] = top.tail_log_prob
    return {
        "forward": forward_kl_topk(student_logits, top.ids, top.log_probs, **kwargs),
        "reverse": reverse_kl_topk(student_logits, top.ids, top.log_probs, **kwargs),
        "jsd": jsd_topk(student_logits, top.ids, top.log_probs, beta=beta, **kwargs),
    }


@st.composite
def distributions(draw, allow_masked_teacher=False):
    vocab = draw(st.integers(min_value=2, max_value=9))
    k = draw(st.integers(min_value=1, max_value=vocab))
    rows = draw(st.integers(min_value=1, max_value=3))
    logit = st.floats(min_value=-6.0, max_value=6.0)
    matrix = st.lists(st.lists(logit, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows)
    student, teacher = torch.tensor(draw(matrix)), torch.tensor(draw(matrix))
    if allow_masked_teacher:
        masked = torch.tensor(draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab)))
        masked[0] = False
        teacher[:, masked] = -math.inf
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return student, teacher, k, temperature


betas = st.one_of(st.floats(min_value=0.0, max_value=1.0), st.sampled_from([0.0, 1e-300, 1e-9, 1 - 1e-9, 1.0]))


@SETTINGS
@given(case=distributions(), beta=betas)
def test_topk_losses_equal_the_exact_tail_bucket_divergences(case, beta):
    student, teacher, k, temperature = case
    top = teacher_topk(teacher, k, temperature)
    ours = topk_losses(student, top, temperature, beta)
    exact = exact_losses(student, teacher, top.ids, temperature, beta)
    for name in ours:
        torch.testing.assert_close(ours[name].double(), exact[name], rtol=1e-5, atol=1e-5, msg=name)
        assert ours[name].dtype == torch.float32


@SETTINGS
@given(case=distributions(), beta=betas)
def test_topk_losses_are_never_negative(case, beta):
    student, teacher, k, temperature = case
    top = teacher_topk(teacher, k, temperature)
    for with_tail in (True, False):
        for name, loss in topk_losses(student, top, temperature, beta, with_tail).items():
            assert torch.all(loss >= 0), name


@SETTINGS
@given(case=distributions())
def test_k_equal_to_the_vocabulary_is_the_exact_full_divergence(case):
    student, teacher, _, temperature = case
    vocab = student.shape[-1]
    top = teacher_topk(teacher, vocab, temperature)
    assert torch.all(top.tail_log_prob == -math.inf)
    exact = exact_losses(student, teacher, temperature=temperature, beta=0.3)
    for with_tail in (True, False):  # without the tail, 1 - sum(top-k) is rounding noise: still exact
        ours = topk_losses(student, top, temperature, beta=0.3, with_tail=with_tail)
        for name in ours:
            torch.testing.assert_close(ours[name].double(), exact[name], rtol=1e-5, atol=1e-6, msg=name)


@SETTINGS
@given(case=distributions())
def test_jsd_endpoints_are_forward_and_reverse_kl_and_it_is_continuous(case):
    student, teacher, k, temperature = case
    top = teacher_topk(teacher, k, temperature)
    at_zero, at_one = topk_losses(student, top, temperature, beta=0.0), topk_losses(student, top, temperature, beta=1.0)
    assert torch.equal(at_zero["jsd"], at_zero["forward"])
    assert torch.equal(at_one["jsd"], at_one["reverse"])
    # Next to an endpoint the gap is O(beta * chi^2); chi^2 < 1e12 for these distributions.
    for beta, endpoint in ((5e-324, at_zero["forward"]), (1e-20, at_zero["forward"]), (1 - 2**-52, at_one["reverse"])):
        logits = student.clone().requires_grad_(True)
        near = topk_losses(logits, top, temperature, beta)["jsd"]
        near.sum().backward()
        torch.testing.assert_close(near, endpoint, rtol=1e-4, atol=1e-4)
        assert torch.isfinite(logits.grad).all()


def test_jsd_at_one_half_is_four_times_the_usual_jensen_shannon_divergence():
    student, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[-1.0, 0.5, 1.5]])
    top = teacher_topk(teacher, 3)
    p, q = exact_distribution(teacher[0].tolist(), 1.0), exact_distribution(student[0].tolist(), 1.0)
    mixture = [(pc + qc) / 2 for pc, qc in zip(p, q)]
    usual = float(exact_kl(p, mixture) + exact_kl(q, mixture)) / 2
    assert topk_losses(student, top, beta=0.5)["jsd"].item() == pytest.approx(4 * usual, rel=1e-6)
    assert 4 * usual <= 4 * math.log(2)


def test_a_near_certain_teacher_needs_its_exact_tail():
    """1 - sum(top-k) of float32 log-probs is noise at 1e-6; the exact tail keeps reverse KL right."""
    student, teacher = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, 14.0, 0.0]])
    top = teacher_topk(teacher, 1)
    exact = exact_losses(student, teacher, top.ids)["reverse"]
    torch.testing.assert_close(topk_losses(student, top)["reverse"].double(), exact, rtol=1e-6, atol=1e-6)
    derived = topk_losses(student, top, with_tail=False)["reverse"].double()
    assert (derived - exact).abs() > 1e-3


@SETTINGS
@given(case=distributions(allow_masked_teacher=True), beta=betas)
def test_infinite_teacher_logits_give_finite_values_and_gradients(case, beta):
    student, teacher, k, temperature = case
    top = teacher_topk(teacher, k, temperature)
    for with_tail in (True, False):
        logits = student.clone().requires_grad_(True)
        losses = topk_losses(logits, top, temperature, beta, with_tail)
        sum(loss.sum() for loss in losses.values()).backward()
        for name, loss in losses.items():
            assert torch.isfinite(loss).all() and torch.all(loss >= 0), name
        assert torch.isfinite(logits.grad).all()


def test_a_student_off_the_teachers_top_k_pays_for_its_tail_mass():
    """Without the tail bucket, reverse KL restricted to the top-k could be made small by leaving the top-k."""
    teacher = torch.tensor([[4.0, 3.5, 0.0, 0.0, 0.0, 0.0]])
    top = teacher_topk(teacher, 2)
    student = torch.tensor([[-4.0, -4.0, 3.0, 3.0, 3.0, 3.0]])
    q = torch.softmax(student, -1)[0, top.ids[0]]
    truncated = (q * (q.log() - top.log_probs[0])).sum()
    assert truncated < 0.01 and topk_losses(student, top)["reverse"] > 1.0


@pytest.mark.parametrize("name", ["forward", "reverse", "jsd"])
def test_topk_gradient_is_zero_at_the_teacher_and_descends_toward_it(name):
    teacher = torch.tensor([[1.0, 0.3, -0.7, 0.0, -2.0]])
    top = teacher_topk(teacher, 3)
    at_teacher = teacher.clone().requires_grad_(True)
    topk_losses(at_teacher, top)[name].sum().backward()
    torch.testing.assert_close(at_teacher.grad, torch.zeros_like(teacher), atol=1e-6, rtol=0)
    student = torch.tensor([[-1.0, 1.0, 0.5, 0.0, 0.0]], requires_grad=True)
    before = topk_losses(student, top)[name].sum()
    before.backward()
    after = topk_losses(student.detach() - 0.1 * student.grad, top)[name].sum()
    assert after < before


def test_temperature_divides_teacher_and_student_logits_alike():
    student, teacher = torch.tensor([[2.0, -1.0, 0.5, 0.0]]), torch.tensor([[0.0, 3.0, -2.0, 1.0]])
    top = teacher_topk(teacher, 2, temperature=3.0)
    scaled = teacher_topk(teacher / 3.0, 2)
    for name, loss in topk_losses(student, top, temperature=3.0).items():
        torch.testing.assert_close(loss, topk_losses(student / 3.0, scaled)[name], msg=name)
        assert not torch.allclose(loss, topk_losses(student, teacher_topk(teacher, 2))[name])


def test_teacher_topk_ignores_padded_vocabulary_rows_and_normalizes_over_the_real_ones():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 50.0, 60.0]])  # the last two rows pad the embedding
    top = teacher_topk(logits, 2, temperature=2.0, valid_vocab_size=4)
    assert top.ids.tolist() == [[1, 3]]
    assert top.log_probs.dtype == top.tail_log_prob.dtype == torch.float32
    real = torch.log_softmax(logits[:, :4] / 2.0, -1)
    torch.testing.assert_close(top.log_probs, real.gather(-1, top.ids))
    torch.testing.assert_close(top.tail_log_prob, torch.logsumexp(real[:, [0, 2]], -1))


def test_teacher_topk_rejects_bad_sizes():
    logits = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.distill\.topk=7 must lie in \[1, 6\]"):
        teacher_topk(logits, 7, valid_vocab_size=6)
    with pytest.raises(ValueError, match=r"valid_vocab_size=9 must lie in \[1, 8\]"):
        teacher_topk(logits, 2, valid_vocab_size=9)
    with pytest.raises(ValueError, match=r"temperature=0 must be > 0"):
        teacher_topk(logits, 2, temperature=0)
    with pytest.raises(ValueError, match=r"jsd_beta=1.5 must lie in \[0, 1\]"):
        jsd_topk(logits, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), beta=1.5)


def test_topk_losses_accept_half_precision_student_logits():
    top = teacher_topk(torch.tensor([[1.0, 0.3, -0.7, 0.0]]), 2)
    student = torch.tensor([[0.2, 0.1, 0.0, -0.3]], dtype=torch.bfloat16, requires_grad=True)
    losses = topk_losses(student, top)
    sum(losses.values()).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.dtype == torch.bfloat16
    for name, loss in topk_losses(student.detach().float(), top).items():
        assert losses[name].dtype == torch.float32
        torch.testing.assert_close(losses[name], loss)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"log_ratio_clamp": 0.0}, "log_ratio_clamp"),
        ({"log_ratio_clamp": 25.0}, "log_ratio_clamp"),
        ({"temperature": -1.0}, "temperature"),
        ({"topk": 0}, "topk"),
        ({"logits_chunk_tokens": 0}, "logits_chunk_tokens"),
        ({"jsd_beta": 1.2}, "jsd_beta"),
        ({"teacher_log_prob_floor": -math.inf}, "teacher_log_prob_floor"),
        ({"teacher_log_prob_floor": 1.0}, "teacher_log_prob_floor"),
    ],
)
def test_loss_config_rejects_bad_values_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"^actor_rollout_ref\.actor\.distill\.{key}=.*\(default"):
        DistillLossConfig(**overrides)


def test_loss_config_documents_every_option_with_its_default():
    from dataclasses import fields

    options = [option for option in fields(DistillLossConfig) if option.name != "_target_"]
    assert {option.name for option in options} == {
        "log_ratio_clamp",
        "temperature",
        "topk",
        "logits_chunk_tokens",
        "jsd_beta",
        "teacher_log_prob_floor",
        "rl_coef",
        "distillation_coef",
        "rl_policy_loss",
        "validation_teacher_kl",
        "select_strategy",
        "select_k",
    }
    for option in options:
        assert option.metadata["help"].startswith(f"Default {option.default}."), option.name
