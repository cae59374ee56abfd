"""The wheel adds files next to verl's and never replaces one; registration is loud."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _installed_files(distribution: str) -> set[str]:
    files = md.distribution(distribution).files
    assert files, f"{distribution} has no RECORD: reinstall it (make install)"
    return {str(f) for f in files if not str(f).endswith(".pyc")}


def test_no_file_of_ours_collides_with_verl():
    ours = {f for f in _installed_files("verl-distill") if f.startswith("verl/")}
    assert ours, "verl-distill installed no file under verl/"
    collisions = ours & _installed_files("verl")
    assert not collisions, f"files owned by both verl and verl-distill: {sorted(collisions)}"


def test_no_parent_package_init_is_shipped():
    ours = _installed_files("verl-distill")
    verl_inits = {f for f in _installed_files("verl") if f.endswith("__init__.py")}
    assert not (ours & verl_inits)
    # the sources themselves must not carry one either, or the next build would ship it
    for init in verl_inits:
        assert not (REPO / init).exists(), f"{init} would overwrite verl's own file"


def test_yaml_configs_are_installed():
    ours = _installed_files("verl-distill")
    assert "verl/trainer/config/distillation_trainer.yaml" in ours
    assert "verl/trainer/config/distillation_megatron_trainer.yaml" in ours


def test_entry_point_is_registered_in_verl_plugins_group():
    points = [ep for ep in md.entry_points(group="verl.plugins") if ep.dist.name == "verl-distill"]
    assert [ep.value for ep in points] == ["verl.distill.plugin"]


def test_plugin_loads_and_registers_everything():
    # verl swallows plugin errors at DEBUG level: import explicitly so a failure is a failure here.
    import verl.distill.plugin  # noqa: F401
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.plugin.platform import PlatformRegistry
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    assert PlatformRegistry.get("cpu") is not None
    assert RolloutReplicaRegistry.get("hf").__name__ == "HFReplica"
    assert ("hf", "async") in _ROLLOUT_REGISTRY
    assert get_reward_manager_cls("distillation").__name__ == "DistillationRewardManager"


def test_broken_registration_is_loud(tmp_path):
    # A plugin whose registration raises must print an error, not vanish into verl's DEBUG log.
    script = (
        "import verl.distill.import_hooks as hooks\n"
        "def boom(module):\n"
        "    raise RuntimeError('registration exploded')\n"
        "hooks.when_imported('json.tool', boom)\n"
        "import json.tool\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "registration exploded" in result.stderr
    assert "verl-distill: hook" in result.stderr


def test_adaptations_refuse_an_unknown_verl(monkeypatch):
    import verl
    from verl.distill import compat

    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(compat.UnsupportedVerlError, match="verl==0.9.1"):
        compat.require_supported_verl()
