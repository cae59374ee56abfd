"""On/off-policy mixing end to end on the toy task: λ = 0.5 through `python -m verl.trainer.main_ppo`, with
GKD's own loss, the generalized JSD over the teacher's top-k plus a tail bucket."""

import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trainer_runs import ray_tmpdir  # noqa: F401  (a fixture)
from trainer_runs import models_and_data, ray_started, run_trainer

from verl.distill.policy_mixing import PolicySchedule
from verl.distill.toy.task import read_problems, write_off_policy_parquet

pytestmark = pytest.mark.slow

STEPS = 5
BATCH = 16
SEED = 0
TOPK = 32  # of the toy tokenizer's 47 tokens: the tail bucket holds the rest
QUESTION = re.compile(r"\d+\+\d+=")


@pytest.fixture(scope="module")
def toy_assets():
    from verl.distill.toy.build import build_toy_assets

    return build_toy_assets()


def _dumped_samples(folder, step: int) -> list[tuple[str, str]]:
    """(question, response text) of each sample verl's rollout_data_dir dump holds for ``step``."""
    rows = [json.loads(line) for line in (folder / f"{step}.jsonl").read_text().splitlines()]
    return sorted((QUESTION.search(row["input"]).group(), row["output"]) for row in rows)


def test_half_the_steps_train_on_the_dataset_responses_scored_by_the_teacher(toy_assets, tmp_path):
    """One run of 5 steps at λ = 0.5 (seed 0: steps 1, 3, 4 off-policy): data/is_on_policy follows the
    documented seeded schedule; each off-policy step trained on exactly the scheduled rows of the
    off-policy file, with their responses (the teacher's correct answers) as the dumped text and the
    student's own probabilities as their rollout log-probs; the teacher
    scored them (it is sure of its own answers, unlike of the student's samples) and the loss on them is
    finite and non-zero, with a finite non-zero gradient. The loss is `jsd_topk` with a tail bucket: the
    teacher's top-k came from the reference pass with the batch, on both kinds of step."""
    off_policy_file = tmp_path / "off_policy.parquet"
    write_off_policy_parquet(read_problems(toy_assets.train_files), off_policy_file)
    rollouts = tmp_path / "rollouts"
    run = run_trainer(
        tmp_path,
        [
            *models_and_data(toy_assets),
            f"data.seed={SEED}",
            f"data.train_batch_size={BATCH}",
            "data.max_prompt_length=16",
            "data.max_response_length=8",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={BATCH}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={BATCH}",
            f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={BATCH}",
            f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={BATCH}",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            "trainer.save_freq=-1",
            f"trainer.total_training_steps={STEPS}",
            "trainer.project_name=tests",
            "trainer.experiment_name=mixing",
            f"trainer.rollout_data_dir={rollouts}",
            "data.on_policy_lambda=0.5",
            f"data.off_policy_files={off_policy_file}",
            # the actor recomputes the old log-probs, and verl compares them with the rollout's
            "algorithm.rollout_correction.bypass_mode=false",
            "actor_rollout_ref.actor.policy_loss.loss_mode=jsd_topk",
            f"actor_rollout_ref.actor.distill.topk={TOPK}",
        ],
        config_name="distillation_trainer",
    )
    assert run.returncode == 0, run.explain()
    # the rollout log-probs of the dataset responses are the student's own, as a sample's are (bf16 noise)
    assert max(run.series("training/rollout_probs_diff_max")) < 0.1

    schedule = PolicySchedule(0.5, seed=SEED)
    on_policy = [schedule.is_on_policy(step) for step in range(1, STEPS + 1)]
    assert run.series("data/is_on_policy") == [float(on) for on in on_policy]
    assert 0 < sum(on_policy) < STEPS
    # a divergence over the top-k, no policy gradient; the top-k holds a share of the sampled tokens
    assert run.series("actor/distillation_mode") == [1.0] * STEPS
    assert run.series("actor/pg_loss") == [0.0] * STEPS
    coverage = run.series("actor/teacher_topk_coverage")
    assert len(coverage) == STEPS and all(0 < value <= 1 for value in coverage), coverage

    file_rows = pq.read_table(off_policy_file).to_pylist()
    kl, teacher_log_prob, grad_norm = (
        run.series(key) for key in ("actor/kl_loss", "actor/teacher_log_prob_mean", "actor/grad_norm")
    )
    off_policy_rank = 0
    for step, is_on_policy in enumerate(on_policy, start=1):
        samples = _dumped_samples(rollouts, step)
        assert len(samples) == BATCH
        if is_on_policy:
            continue
        rows = schedule.off_policy_rows(off_policy_rank * BATCH, BATCH, len(file_rows))
        off_policy_rank += 1
        assert samples == sorted((file_rows[row]["prompt"][0]["content"], file_rows[row]["response"]) for row in rows)
        assert math.isfinite(kl[step - 1]) and kl[step - 1] > 0
        assert math.isfinite(grad_norm[step - 1]) and grad_norm[step - 1] > 0
    on_teacher = [value for value, on in zip(teacher_log_prob, on_policy) if on]
    off_teacher = [value for value, on in zip(teacher_log_prob, on_policy) if not on]
    assert max(on_teacher) < min(off_teacher), (on_teacher, off_teacher)


def test_an_off_policy_file_without_its_response_column_is_one_line_before_ray(toy_assets, tmp_path, ray_tmpdir):  # noqa: F811
    off_policy_file = tmp_path / "answers.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+2="}]], "answer": ["3"]}), off_policy_file)
    run = run_trainer(
        tmp_path,
        [
            *models_and_data(toy_assets),
            "data.on_policy_lambda=0.5",
            f"data.off_policy_files={off_policy_file}",
        ],
        config_name="distillation_trainer",
        timeout=300,
        ray_tmpdir=ray_tmpdir,
    )
    assert run.returncode == 2 and not ray_started(ray_tmpdir)
    errors = [line for line in run.stderr.splitlines() if line.startswith("verl-distill: error:")]
    assert errors == [
        f"verl-distill: error: data.off_policy_files ({off_policy_file}): has no 'response' column (columns: answer, "
        "prompt); fix: add the responses as a text column named 'response', or set data.off_policy_response_key to "
        "the column that holds them"
    ], run.stderr[-2000:]
    assert "Traceback" not in run.stderr
