"""The toy distillation task: scorer, tokenizer, data layout, models, cache and determinism.

Determinism and cache behaviour are checked on shrunken builds (seconds each); the real default
assets are built once into the user cache (``$VERL_DISTILL_CACHE`` or ``~/.cache/verl-distill``,
the same place the demo uses) and checked against the accuracy thresholds.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import verl.distill.toy.build as toy_build
from verl.distill.toy import DATA_SOURCE, ToySpec, build_toy_assets, compute_score, load_toy_assets
from verl.distill.toy.__main__ import main as toy_cli
from verl.distill.toy.build import MANIFEST_NAME, cache_dir_name
from verl.distill.toy.cache import build_once
from verl.distill.toy.generation import greedy_accuracy
from verl.distill.toy.models import ModelSpec
from verl.distill.toy.probe import ESTIMATORS, ProbeConfig, get_estimator, run_probe
from verl.distill.toy.reward import format_answer, parse_answer
from verl.distill.toy.supervised import TeacherSchedule
from verl.distill.toy.task import Problem, prompt_ids, split_problems

TINY_SPEC = ToySpec(
    val_size=64,
    model=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    schedule=TeacherSchedule(batch_size=32, warmup_steps=5, max_constant_steps=20, decay_steps=10),
    snapshot_every=5,
    min_teacher_accuracy=0.0,
)


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return build_toy_assets(cache_dir=tmp_path_factory.mktemp("toy-a"), seed=0, spec=TINY_SPEC)


@pytest.fixture(scope="session")
def default_assets():
    return build_toy_assets()


# --- scorer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        ("64", "46", 1.0),
        (" 891\n", "198", 1.0),
        ("46", "46", 0.0),  # not reversed
        ("640", "46", 0.0),  # "046": leading zero is not forgiven
        ("6 4", "46", 0.0),
        ("64x", "46", 0.0),
        ("", "46", 0.0),
        ("64", 46, 1.0),  # an integer ground truth is compared as its decimal string
    ],
)
def test_compute_score(response, ground_truth, expected):
    assert compute_score(DATA_SOURCE, response, ground_truth, extra_info={"split": "val"}) == expected


def test_compute_score_rejects_other_data_sources():
    with pytest.raises(ValueError, match="gsm8k"):
        compute_score("openai/gsm8k", "64", "46")


def test_answer_format_round_trip():
    for total in (20, 46, 100, 198):
        assert parse_answer(format_answer(total)) == str(total)
    assert parse_answer("12a") is None


def test_reward_file_loads_by_path_as_verl_does():
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from omegaconf import OmegaConf

    import verl.distill.toy.reward as reward_module

    config = OmegaConf.create(
        {"reward": {"custom_reward_function": {"path": reward_module.__file__, "name": "compute_score"}}}
    )
    scorer = get_custom_reward_fn(config)
    assert scorer(data_source=DATA_SOURCE, solution_str="64", ground_truth="46", extra_info={}) == 1.0
    assert scorer(data_source=DATA_SOURCE, solution_str="46", ground_truth="46", extra_info={}) == 0.0


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_loads_offline_and_round_trips(default_assets, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for folder in (default_assets.tokenizer, default_assets.teacher, default_assets.student):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = "system user assistant 12+34=\n99 + 10 = 109"
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert len(tokenizer) < 64
        assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"
        assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
        # verl's qwen2 continuous-token builder needs a one-token newline
        assert len(tokenizer.encode("\n", add_special_tokens=False)) == 1


def test_chat_template_renders_chatml(default_assets):
    tokenizer = AutoTokenizer.from_pretrained(default_assets.tokenizer)
    messages = [{"role": "user", "content": "12+34="}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == rendered
    assert len(ids) == 14
    response = tokenizer.encode("64", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(response, skip_special_tokens=True) == "64"


# --- data ---------------------------------------------------------------------------------


def test_parquet_has_verl_rlhf_layout(default_assets):
    train = pq.read_table(default_assets.train_files).to_pylist()
    val = pq.read_table(default_assets.val_files).to_pylist()
    assert len(train) + len(val) == 90 * 90
    for split, rows in (("train", train), ("val", val)):
        assert set(rows[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        for index, row in enumerate(rows):
            assert row["data_source"] == DATA_SOURCE
            assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == index
            a, b = row["extra_info"]["a"], row["extra_info"]["b"]
            assert row["prompt"] == [{"role": "user", "content": f"{a}+{b}="}]
            assert row["reward_model"] == {"style": "rule", "ground_truth": str(a + b)}
    pairs = lambda rows: {(r["extra_info"]["a"], r["extra_info"]["b"]) for r in rows}  # noqa: E731
    assert not pairs(train) & pairs(val)


def test_verl_reads_the_data_with_the_toy_tokenizer(default_assets, tmp_path):
    from omegaconf import OmegaConf

    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    tokenizer = AutoTokenizer.from_pretrained(default_assets.student)
    config = OmegaConf.create(
        {"max_prompt_length": 14, "filter_overlong_prompts": True, "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path)}
    )
    dataset = RLHFDataset(data_files=[str(default_assets.val_files)], tokenizer=tokenizer, config=config)
    assert len(dataset) == 512  # every prompt is 14 tokens: none filtered
    row = dataset[3]
    assert row["data_source"] == DATA_SOURCE and row["index"] == 3
    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen2")
    ids = builder.build_initial_tokens(row["raw_prompt"])
    assert tokenizer.decode(ids) == f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"


def test_split_depends_on_seed_and_is_disjoint():
    train0, val0 = split_problems(0, 100)
    train1, val1 = split_problems(1, 100)
    assert val0 != val1
    assert not set(train0) & set(val0)
    with pytest.raises(ValueError, match="val_size"):
        split_problems(0, 0)


# --- models -------------------------------------------------------------------------------


def test_default_teacher_and_student_meet_the_accuracy_thresholds(default_assets):
    assert default_assets.teacher_accuracy >= 0.9
    assert default_assets.student_accuracy <= 0.5 * default_assets.teacher_accuracy
    manifest = json.loads(default_assets.manifest.read_text())
    assert manifest["sizes"]["teacher_parameters"] == manifest["sizes"]["student_parameters"]


def test_saved_models_reproduce_the_recorded_accuracies(default_assets):
    tokenizer = AutoTokenizer.from_pretrained(default_assets.tokenizer)
    val = [Problem(r["a"], r["b"]) for r in pq.read_table(default_assets.val_files).column("extra_info").to_pylist()]
    prompts = prompt_ids(tokenizer, val)
    for folder, recorded in (
        (default_assets.teacher, default_assets.teacher_accuracy),
        (default_assets.student, default_assets.student_accuracy),
    ):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "qwen2"
        assert next(model.parameters()).dtype == torch.float32
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
            assert (folder / name).is_file(), name
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert greedy_accuracy(model, tokenizer, val, prompts) == pytest.approx(recorded, abs=1e-9)


# --- cache and determinism -----------------------------------------------------------------


def test_same_seed_builds_are_byte_identical(tiny_assets, tmp_path):
    again = build_toy_assets(cache_dir=tmp_path, seed=0, spec=TINY_SPEC)
    first, second = _file_hashes(tiny_assets.root), _file_hashes(again.root)
    assert any(name.endswith(".safetensors") for name in first)
    assert any(name.endswith(".parquet") for name in first)
    assert first == second
    assert json.loads(again.manifest.read_text())["files"] == second


def test_another_seed_gives_other_assets(tiny_assets, tmp_path):
    other = build_toy_assets(cache_dir=tmp_path, seed=1, spec=TINY_SPEC)
    assert other.root.name != tiny_assets.root.name
    assert _file_hashes(other.root)["data/val.parquet"] != _file_hashes(tiny_assets.root)["data/val.parquet"]
    assert _file_hashes(other.root)["teacher/model.safetensors"] != _file_hashes(tiny_assets.root)["teacher/model.safetensors"]


def test_complete_cache_is_reused(tiny_assets, monkeypatch):
    manifest_mtime = tiny_assets.manifest.stat().st_mtime_ns
    monkeypatch.setattr(toy_build, "_build", lambda *args: pytest.fail("a complete build was built again"))
    again = build_toy_assets(cache_dir=tiny_assets.root.parent, seed=0, spec=TINY_SPEC)
    assert again == tiny_assets
    assert again.manifest.stat().st_mtime_ns == manifest_mtime


def test_half_written_cache_is_rebuilt(tmp_path):
    first = build_toy_assets(cache_dir=tmp_path, seed=0, spec=TINY_SPEC)
    first.manifest.unlink()
    (first.root / "teacher" / "model.safetensors").write_bytes(b"truncated")
    leftover = tmp_path / f".{first.root.name}.tmp-crashed"
    leftover.mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete toy build"):
        load_toy_assets(first.root)
    lines = []
    rebuilt = build_toy_assets(cache_dir=tmp_path, seed=0, spec=TINY_SPEC, progress=lines.append)
    assert any(line.startswith("teacher:") for line in lines)
    assert rebuilt.manifest.is_file()
    assert _file_hashes(rebuilt.root) == json.loads(rebuilt.manifest.read_text())["files"]
    assert not leftover.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_rebuilds(tiny_assets, tmp_path):
    build_toy_assets(cache_dir=tmp_path, seed=0, spec=TINY_SPEC)
    lines = []
    build_toy_assets(cache_dir=tmp_path, seed=0, spec=TINY_SPEC, force=True, progress=lines.append)
    assert any(line.startswith("teacher:") for line in lines)


def test_cache_dir_defaults_to_env_var(monkeypatch, tiny_assets):
    monkeypatch.setenv("VERL_DISTILL_CACHE", str(tiny_assets.root.parent))
    assert build_toy_assets(seed=0, spec=TINY_SPEC).root == tiny_assets.root


def test_concurrent_builders_build_once(tmp_path):
    builds = []

    def slow_build(staging: Path) -> None:
        builds.append(staging)
        time.sleep(0.3)
        (staging / "done").write_text("x")

    def is_complete(directory: Path) -> bool:
        return (directory / "done").is_file()

    threads = [
        threading.Thread(target=build_once, args=(tmp_path / "asset", slow_build, is_complete)) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert (tmp_path / "asset" / "done").is_file()


def test_failed_build_leaves_no_directory(tmp_path):
    def failing_build(staging: Path) -> None:
        (staging / "partial").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_once(tmp_path / "asset", failing_build, lambda d: False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset.lock"]


def test_cache_name_changes_with_seed_and_spec():
    assert cache_dir_name(TINY_SPEC, 0) != cache_dir_name(TINY_SPEC, 1)
    assert cache_dir_name(TINY_SPEC, 0) != cache_dir_name(ToySpec(), 0)
    assert cache_dir_name(ToySpec(), 0) == cache_dir_name(ToySpec(), 0)


def test_spec_rejects_a_student_fraction_above_one_half():
    with pytest.raises(ValueError, match="student_accuracy_fraction"):
        ToySpec(student_accuracy_fraction=0.6)


# --- command line -------------------------------------------------------------------------


def test_cli_prints_phases_and_paths(default_assets, capsys):
    assert toy_cli(["build", "--cache-dir", str(default_assets.root.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    values = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("reusing"))
    for key in ("teacher", "student", "tokenizer", "train_files", "val_files"):
        assert Path(values[key]) == getattr(default_assets, key)
        assert Path(values[key]).exists()
    manifest = json.loads(Path(values["manifest"]).read_text())
    assert manifest["paths"]["teacher"] == values["teacher"]
    assert {"teacher_accuracy", "student_accuracy", "sizes", "seed", "build_seconds"} <= set(manifest)


# --- probe --------------------------------------------------------------------------------


def test_probe_estimators_agree_with_closed_forms():
    torch.manual_seed(0)
    student_logp = torch.log_softmax(torch.randn(2, 3, 5, requires_grad=True), -1)
    teacher_logp = torch.log_softmax(torch.randn(2, 3, 5), -1)
    tokens = torch.randint(5, (2, 3))
    x = teacher_logp.gather(-1, tokens[..., None])[..., 0] - student_logp.gather(-1, tokens[..., None])[..., 0]
    k3 = torch.exp(x) - x - 1
    torch.testing.assert_close(get_estimator("k3_st")(student_logp, teacher_logp, tokens, 5.0), k3)
    torch.testing.assert_close(get_estimator("k2")(student_logp, teacher_logp, tokens, 5.0), 0.5 * x**2)
    exact = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    torch.testing.assert_close(get_estimator("reverse_kl")(student_logp, teacher_logp, tokens, 5.0), exact)
    with pytest.raises(ValueError, match="valid names"):
        get_estimator("k4")


def test_k3_straight_through_keeps_a_gradient_where_verl_clamp_has_none():
    student_logit = torch.tensor([[[-8.0, 0.0]]], requires_grad=True)  # pi(y=0) ~ 3e-4
    teacher_logp = torch.log_softmax(torch.tensor([[[0.0, -8.0]]]), -1)  # nu(y=0) ~ 1
    tokens = torch.tensor([[0]])
    grads = {}
    for name in ("k3_st", "k3_verl"):
        student_logit.grad = None
        ESTIMATORS[name](torch.log_softmax(student_logit, -1), teacher_logp, tokens, 5.0).sum().backward()
        grads[name] = student_logit.grad[0, 0, 0].item()
    assert grads["k3_verl"] == 0.0
    # d k3/d x at x = 5 is e^5 - 1; x = log nu - log pi falls as the student's logit rises
    assert grads["k3_st"] == pytest.approx(-(torch.e**5 - 1) * (1 - torch.softmax(student_logit, -1)[0, 0, 0].item()), rel=1e-4)


def test_probe_runs_and_reports(tiny_assets):
    result = run_probe(tiny_assets, ProbeConfig(batch_size=8, steps=4, eval_every=2, target_fraction=0.0))
    assert [step for step, _ in result.history] == [2, 4]
    assert result.steps_to_target == 2
    with pytest.raises(ValueError, match="schedule"):
        run_probe(tiny_assets, ProbeConfig(schedule="linear"))
