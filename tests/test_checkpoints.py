"""Which checkpoint ``resume_mode=auto`` resumes from: verl's tracker trusted when readable, a fallback
only for an unreadable tracker, and never a silent restart from step 0 when checkpoints exist."""

import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
from checkpoint_folders import cut_short, track, write_step
from omegaconf import OmegaConf

from verl.distill.checkpoints import ResumeError, checkpoint_problem, find_latest_complete_checkpoint, resume_problem


def test_a_tracked_checkpoint_is_taken_and_newer_folders_ignored(tmp_path, caplog):
    write_step(tmp_path, 2)
    write_step(tmp_path, 4)
    write_step(tmp_path, 6)  # saved, but the run died before the tracker moved on
    track(tmp_path, "4")
    with caplog.at_level(logging.WARNING):
        assert find_latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "global_step_4")
    assert caplog.records == []


def test_a_tracked_folder_that_looks_incomplete_from_this_node_is_still_trusted(tmp_path, caplog):
    # a two-node run without a shared filesystem: rank 1's shards are on the other node's disk
    folder = write_step(tmp_path, 4, world_size=2)
    for shard in (folder / "actor").glob("*_rank_1.pt"):
        shard.unlink()
    write_step(tmp_path, 2)
    track(tmp_path, "4")
    with caplog.at_level(logging.WARNING):
        assert find_latest_complete_checkpoint(str(tmp_path)) == str(folder)
    assert "looks incomplete from this node" in caplog.text and "ranks [1]" in caplog.text


def test_a_tracker_naming_a_folder_this_node_does_not_see_is_an_error(tmp_path):
    write_step(tmp_path, 2)
    track(tmp_path, "8")
    with pytest.raises(ResumeError) as error:
        find_latest_complete_checkpoint(str(tmp_path))
    message = str(error.value)
    assert "trainer.resume_mode" in message and "global_step_8" in message and str(tmp_path) in message
    assert "; fix: " in message and "\n" not in message


def test_an_empty_tracker_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    write_step(tmp_path, 2)
    write_step(tmp_path, 4)
    cut_short(write_step(tmp_path, 6) / "data.pt")
    track(tmp_path, "")  # killed between truncating the tracker and writing it
    with caplog.at_level(logging.WARNING):
        assert find_latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "global_step_4")
    assert "holds ''" in caplog.text and "global_step_6: data.pt missing or cut short" in caplog.text


def test_without_a_tracker_the_newest_complete_checkpoint_is_taken(tmp_path):
    write_step(tmp_path, 2)
    write_step(tmp_path, 10)
    cut_short(write_step(tmp_path, 12) / "actor" / "model_world_size_1_rank_0.pt")
    assert find_latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "global_step_10")


@pytest.mark.parametrize("tracker", [None, "", "two"], ids=["no tracker", "empty tracker", "garbled tracker"])
def test_checkpoints_none_of_them_complete_are_an_error_not_a_restart(tmp_path, tracker):
    shutil.rmtree(write_step(tmp_path, 2) / "actor")
    write_step(tmp_path, 4, data=False)
    if tracker is not None:
        track(tmp_path, tracker)
    with pytest.raises(ResumeError) as error:
        find_latest_complete_checkpoint(str(tmp_path))
    message = str(error.value)
    assert "trainer.resume_mode=disable" in message and str(tmp_path) in message
    assert "global_step_4: data.pt missing" in message and "global_step_2: no actor/ weights" in message


@pytest.mark.parametrize(
    "damage, problem",
    [
        pytest.param(
            lambda folder: (folder / "actor" / "optim_world_size_2_rank_1.pt").unlink(),
            "lacks optim shards of ranks [1]",
            id="a rank's optimizer shard missing",
        ),
        pytest.param(
            lambda folder: (folder / "actor" / "model_world_size_2_rank_0.pt").unlink(),
            "lacks model shards of ranks [0]",
            id="a rank's model shard missing",
        ),
        pytest.param(
            lambda folder: [file.unlink() for file in (folder / "actor").glob("model_*")],
            "has no model shards",
            id="model shards deleted",
        ),
        pytest.param(
            lambda folder: cut_short(folder / "actor" / "extra_state_world_size_2_rank_1.pt"),
            "extra_state_world_size_2_rank_1.pt is cut short",
            id="a shard cut short",
        ),
        pytest.param(lambda folder: (folder / "data.pt").unlink(), "data.pt missing or cut short", id="no data.pt"),
    ],
)
def test_a_damaged_two_rank_checkpoint_is_incomplete(tmp_path, damage, problem):
    folder = write_step(tmp_path, 2, world_size=2)
    assert checkpoint_problem(folder) is None
    damage(folder)
    assert problem in checkpoint_problem(folder)
    with pytest.raises(ResumeError, match="none is complete"):
        find_latest_complete_checkpoint(str(tmp_path))


def test_nothing_to_resume_from_means_training_from_scratch(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert find_latest_complete_checkpoint(None) is None
        assert find_latest_complete_checkpoint(str(tmp_path / "missing")) is None
        assert find_latest_complete_checkpoint(str(tmp_path)) is None
    assert caplog.records == []  # a fresh run is not a problem


def test_the_driver_sees_the_resume_problem_before_ray(tmp_path):
    write_step(tmp_path, 2)
    track(tmp_path, "6")
    config = OmegaConf.create({"trainer": {"resume_mode": "auto", "default_local_dir": str(tmp_path)}})
    assert "global_step_6" in resume_problem(config)
    config.trainer.resume_mode = "disable"
    assert resume_problem(config) is None
    config.trainer.resume_mode = "auto"
    track(tmp_path, "2")
    assert resume_problem(config) is None


def test_the_trainers_resolve_checkpoints_with_the_replacement_in_a_distillation_run():
    # verl's trainers bind find_latest_ckpt_path at import time: the replacement must come first.
    check = textwrap.dedent(
        """
        import verl.trainer.ppo.ray_trainer as legacy_trainer
        import verl.trainer.ppo.v1.trainer_base as trainer_base
        from verl.distill.checkpoints import find_latest_complete_checkpoint
        assert trainer_base.find_latest_ckpt_path is find_latest_complete_checkpoint
        assert legacy_trainer.find_latest_ckpt_path is find_latest_complete_checkpoint
        """
    )
    # the test process is marked as a CPU distillation run (conftest); the child inherits the marks
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
