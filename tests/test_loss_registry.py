"""The actor's loss registry: our losses, verl's policy losses through ppo_loss, clear errors."""

import pytest

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss
from verl.workers.roles.utils.loss_registry import (
    DISTILLATION_LOSS_MODES,
    LOSS_MODE_KEY,
    LOSS_REGISTRY,
    get_loss_fn,
    is_distillation_mode,
    register_loss,
    valid_loss_modes,
)
from verl.workers.roles.utils.losses import distillation_loss
from verl.workers.utils.losses import ppo_loss


@pytest.fixture
def scratch_names():
    """Names registered by a test are removed afterwards from every registry."""
    names = []
    yield names
    for name in names:
        LOSS_REGISTRY.pop(name, None)
        POLICY_LOSS_REGISTRY.pop(name, None)
        DISTILLATION_LOSS_MODES.discard(name)


def test_distillation_resolves_to_our_loss_and_ppo_to_verls():
    assert get_loss_fn("distillation") is distillation_loss
    assert get_loss_fn("ppo") is ppo_loss


@pytest.mark.parametrize("policy_loss_mode", sorted(POLICY_LOSS_REGISTRY))
def test_every_verl_policy_loss_resolves_to_verls_ppo_loss(policy_loss_mode):
    assert get_loss_fn(policy_loss_mode) is ppo_loss


def test_unknown_mode_names_the_key_and_every_valid_mode():
    with pytest.raises(ValueError) as error:
        get_loss_fn("distilation")
    message = str(error.value)
    assert "\n" not in message
    assert f"{LOSS_MODE_KEY}='distilation'" in message
    listed = message.split("valid loss modes: ")[1].split(", ")
    assert {"distillation", "ppo"} <= set(listed)
    assert set(listed) == {*LOSS_REGISTRY, *POLICY_LOSS_REGISTRY}


def test_valid_loss_modes_lists_ours_then_verls_once_each():
    modes = valid_loss_modes()
    assert modes[: len(LOSS_REGISTRY)] == list(LOSS_REGISTRY)
    assert {"ppo", "distillation"} <= set(LOSS_REGISTRY)
    assert set(modes) == {*LOSS_REGISTRY, *POLICY_LOSS_REGISTRY}
    assert len(modes) == len(set(modes))


def test_a_policy_loss_registered_later_in_verl_is_accepted(scratch_names):
    scratch_names.append("scratch_policy_loss")
    assert "scratch_policy_loss" not in valid_loss_modes()
    register_policy_loss("scratch_policy_loss")(lambda **kwargs: None)
    assert "scratch_policy_loss" in valid_loss_modes()
    assert get_loss_fn("scratch_policy_loss") is ppo_loss


def test_register_loss_adds_a_mode_and_refuses_to_replace_another_function(scratch_names):
    scratch_names.append("scratch_loss")

    @register_loss("scratch_loss")
    def scratch_loss(config, model_output, data, dp_group=None):
        raise AssertionError("never called")

    assert get_loss_fn("scratch_loss") is scratch_loss
    assert register_loss("scratch_loss")(scratch_loss) is scratch_loss  # the same function again: fine
    with pytest.raises(ValueError, match=r"'scratch_loss' is already registered to .*scratch_loss"):
        register_loss("scratch_loss")(lambda config, model_output, data, dp_group=None: None)
    with pytest.raises(ValueError, match="'distillation' is already registered"):
        register_loss("distillation")(scratch_loss)
    assert get_loss_fn("distillation") is distillation_loss


def test_ours_take_precedence_over_a_same_named_verl_policy_loss(scratch_names):
    scratch_names.append("scratch_shadowed")
    register_policy_loss("scratch_shadowed")(lambda **kwargs: None)

    @register_loss("scratch_shadowed")
    def shadowing_loss(config, model_output, data, dp_group=None):
        raise AssertionError("never called")

    assert get_loss_fn("scratch_shadowed") is shadowing_loss
    assert valid_loss_modes().count("scratch_shadowed") == 1


def test_is_distillation_mode(scratch_names):
    assert is_distillation_mode("distillation")
    for mode in ["ppo", "vanilla", "gspo", "no_such_mode"]:
        assert not is_distillation_mode(mode)
    scratch_names.append("scratch_distillation")
    register_loss("scratch_distillation", distillation=True)(distillation_loss)
    assert is_distillation_mode("scratch_distillation")
