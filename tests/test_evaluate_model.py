"""Checkpoint evaluation: HF folders and merged verl FSDP checkpoints, accuracy, KL, reports, bad input.

Tiny random Qwen2 models share a byte-level ChatML tokenizer built on the spot. The FSDP checkpoints
are written in-process by verl's own FSDPCheckpointManager (FSDP2 over a one-rank gloo group), the
same code path the trainer's FSDP engine saves with, so the evaluator merges them with verl's model
merger exactly as it would merge a training run's.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from verl.distill import evaluation
from verl.utils import normalize_token_ids
from verl.distill.evaluation import (
    EvalRow,
    EvaluationConfig,
    EvaluationInputError,
    Scorer,
    infer_step,
    main,
    resolve_checkpoints,
    run_evaluation,
    token_divergences,
)

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_NEW_TOKENS = 6
ROWS = 8

EXACT_MATCH_SCORER = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if solution_str == ground_truth else 0.0
"""


def byte_level_chatml_tokenizer(reverse_ids: bool = False):
    """All 256 byte-level characters as tokens (no merges) + ChatML specials; ``"\\n"`` is one token.

    ``reverse_ids`` numbers the characters the other way round: same tokens, another token -> id map.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=reverse_ids)
    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Qwen2Tokenizer (what a qwen2 folder loads with) adds <|endoftext|> as unk: declare it up front
    # so the saved and the reloaded vocabularies have the same size.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_qwen2(folder: Path, tokenizer, hidden_size: int, seed: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # Untied, wider-than-default weights: a tied random model just repeats the last prompt token.
        tie_word_embeddings=False,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_fsdp_checkpoints(sources: dict[int, Path], run_dir: Path) -> None:
    """Write ``run_dir/global_step_N/actor`` for each ``{N: hf_folder}`` with verl's FSDPCheckpointManager."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    store = dist.FileStore(tempfile.mktemp(prefix="eval-test-store-"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
        for step, source in sources.items():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            fully_shard(model, mesh=mesh)
            manager = FSDPCheckpointManager(
                model=model,
                optimizer=None,
                processing_class=AutoTokenizer.from_pretrained(source),
                checkpoint_config={"save_contents": ["model"], "load_contents": ["model"]},
            )
            manager.save_checkpoint(str(run_dir / f"global_step_{step}" / "actor"), global_step=step)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Student and teacher HF folders, a run folder with FSDP checkpoints at steps 2 (teacher) and 4 (student)."""
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = byte_level_chatml_tokenizer()
    student = save_tiny_qwen2(root / "student", tokenizer, hidden_size=32, seed=0)
    teacher = save_tiny_qwen2(root / "teacher", tokenizer, hidden_size=48, seed=1)
    run_dir = root / "run"
    save_fsdp_checkpoints({2: teacher, 4: student}, run_dir)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(student)  # as a qwen2 folder loads: Qwen2Tokenizer
    assert len(reloaded) == len(tokenizer) and len(reloaded.encode("\n")) == 1
    return {"root": root, "student": student, "teacher": teacher, "run": run_dir}


def addition_rows(count: int) -> list[dict]:
    """Prompts of equal token length, so batching adds no padding to the prompts."""
    return [
        {
            "data_source": "exact_match",
            "prompt": [{"role": "user", "content": f"{10 + 7 * index}+{20 + 3 * index}="}],
            "reward_model": {"style": "rule", "ground_truth": str(30 + 10 * index)},
            "extra_info": {"index": index},
        }
        for index in range(count)
    ]


def write_exact_match_scorer(folder: Path) -> Path:
    scorer_file = folder / "exact_match.py"
    scorer_file.write_text(EXACT_MATCH_SCORER)
    return scorer_file


def write_parquet(rows: list[dict], path: Path) -> Path:
    pd.DataFrame(rows).to_parquet(path)
    return path


def reference_greedy_response(model_dir: Path, messages: list[dict]) -> str:
    """Greedy decoding without padding, KV cache or generate(): an independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = normalize_token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    response = []
    with torch.inference_mode():
        for _ in range(MAX_NEW_TOKENS):
            token = int(model(torch.tensor([ids + response])).logits[0, -1].argmax())
            response.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(response, skip_special_tokens=True)


def config_for(output_dir: Path, checkpoints: list, data_file: Path, **overrides) -> EvaluationConfig:
    settings = dict(
        checkpoints=[str(path) for path in checkpoints],
        data_file=str(data_file),
        output_dir=str(output_dir),
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=3,
        num_examples=2,
    )
    settings.update(overrides)
    return EvaluationConfig(**settings)


# ------------------------------------------------------------------------------------------------
# Pure pieces


@pytest.mark.parametrize(
    ("path", "step"),
    [
        ("ckpt/proj/exp/global_step_40/actor", 40),
        ("ckpt/proj/exp/global_step_40", 40),
        ("out/checkpoint-1500", 1500),
        ("runs/step_7/huggingface", 7),
        ("models/Qwen2.5-0.5B-Instruct", None),
        ("models/global_step_x", None),
    ],
)
def test_step_is_read_from_the_path(path, step):
    assert infer_step(path) == step


def test_divergences_are_zero_for_equal_models_and_exact_otherwise():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 11, generator=generator)
    teacher = torch.randn(5, 11, generator=generator)
    tokens = torch.randint(0, 11, (5,), generator=generator)

    exact, k3 = token_divergences(student, student.clone(), tokens)
    assert torch.equal(exact, torch.zeros(5)) and torch.equal(k3, torch.zeros(5))

    exact, k3 = token_divergences(student, teacher, tokens)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=student), torch.distributions.Categorical(logits=teacher)
    )
    torch.testing.assert_close(exact, expected)
    # k3's expectation over the student's own tokens is the exact KL.
    all_tokens = torch.arange(11).repeat(5, 1)
    k3_every_token = torch.stack(
        [token_divergences(student, teacher, all_tokens[:, token])[1] for token in range(11)], dim=-1
    )
    torch.testing.assert_close((student.softmax(-1) * k3_every_token).sum(-1), expected)
    assert (k3 >= 0).all()


def test_wider_teacher_vocabulary_is_compared_on_the_shared_ids():
    student = torch.randn(3, 8)
    teacher = torch.cat([student, torch.full((3, 4), -30.0)], dim=-1)  # padded rows, almost no mass
    exact, k3 = token_divergences(student, teacher, torch.tensor([0, 3, 7]))
    assert torch.equal(exact, torch.zeros(3)) and torch.equal(k3, torch.zeros(3))


def test_scorers_follow_the_data_source(monkeypatch):
    gsm8k_row = EvalRow([{"role": "user", "content": "q"}], "openai/gsm8k", "46", None)
    assert Scorer()(gsm8k_row, "so 12 + 34 = 46 #### 46").correct
    assert not Scorer()(gsm8k_row, "#### 45").correct

    calls = []

    def project_scorer(data_source, solution_str, ground_truth, extra_info=None):
        calls.append((data_source, solution_str, ground_truth, extra_info))
        return {"score": 0.5, "acc": True}

    fake_module = type(sys)("fake_project_task")
    fake_module.compute_score = project_scorer
    monkeypatch.setitem(sys.modules, "fake_project_task", fake_module)
    monkeypatch.setitem(evaluation.PROJECT_SCORERS, "fake_source", "fake_project_task")
    result = Scorer()(EvalRow([], "fake_source", "7", {"index": 3}), "answer")
    assert (result.score, result.correct) == (0.5, True)
    assert calls == [("fake_source", "answer", "7", {"index": 3})]

    from verl.distill.toy.reward import compute_score as toy_score
    from verl.distill.toy.reward import format_answer

    toy_row = EvalRow([{"role": "user", "content": "12+34="}], "toy_addition", "46", {"index": 0})
    for response in (format_answer(46), "46", "x"):
        expected = toy_score(data_source="toy_addition", solution_str=response, ground_truth="46")
        assert Scorer()(toy_row, response).score == expected
    assert Scorer()(toy_row, format_answer(46)).correct

    with pytest.raises(EvaluationInputError, match="no_such_source.*--compute_score"):
        Scorer().check([EvalRow([], "no_such_source", "1", None)])


def test_help_documents_every_option_with_its_default():
    parser = evaluation.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and ("default" in action.help or "required" in action.help), action.dest
        assert action.option_strings[0] in text
    assert "KL(student || teacher)" in text and "k3" in text


# ------------------------------------------------------------------------------------------------
# End to end on tiny models


def test_accuracy_matches_greedy_answers_and_kl_is_zero_against_itself(assets, tmp_path):
    rows = addition_rows(ROWS)
    # Half the rows expect the student's true greedy answer, the other half an answer it cannot give.
    for index, row in enumerate(rows):
        if index % 2 == 0:
            row["reward_model"]["ground_truth"] = reference_greedy_response(assets["student"], row["prompt"])
        else:
            row["reward_model"]["ground_truth"] = "\x00never"
    data_file = write_parquet(rows, tmp_path / "data.parquet")
    scorer_file = write_exact_match_scorer(tmp_path)

    config = config_for(
        tmp_path / "out",
        [assets["student"]],
        data_file,
        teacher_path=str(assets["student"]),
        compute_score=str(scorer_file),
    )
    [entry] = run_evaluation(config)

    assert entry["n"] == ROWS
    assert entry["accuracy"] == 0.5
    assert entry["mean_score"] == 0.5
    assert entry["kl"]["kl_student_teacher"] == 0.0 and entry["kl"]["kl_k3_sampled"] == 0.0
    assert entry["kl"]["tokens"] == round(entry["response_length_mean"] * ROWS)
    assert 1 <= entry["response_length_mean"] <= MAX_NEW_TOKENS
    assert [sample["correct"] for sample in entry["samples"]] == [True, False]
    assert entry["samples"][0]["response"] == rows[0]["reward_model"]["ground_truth"]
    assert entry["samples"][0]["prompt"].endswith("<|im_start|>assistant\n")
    assert entry["step"] is None and entry["kind"] == "hf"
    assert entry["settings"]["temperature"] == 0.0 and entry["settings"]["compute_score"] == str(scorer_file)
    assert not (tmp_path / "out" / "results.png").exists()  # one checkpoint: no plot


def test_sampling_restarts_the_seed_for_every_checkpoint(assets, tmp_path):
    data_file = write_parquet(addition_rows(4), tmp_path / "data.parquet")
    scorer_file = write_exact_match_scorer(tmp_path)
    common = dict(compute_score=str(scorer_file), num_examples=4, plot=False)
    sampled = run_evaluation(
        config_for(tmp_path / "sampled", [assets["student"]] * 2, data_file, temperature=1.0, **common)
    )
    [greedy] = run_evaluation(config_for(tmp_path / "greedy", [assets["student"]], data_file, **common))
    responses = [[sample["response"] for sample in entry["samples"]] for entry in (*sampled, greedy)]
    assert responses[0] == responses[1]
    assert responses[0] != responses[2]
    assert sampled[0]["settings"]["temperature"] == 1.0


@pytest.fixture
def saved_figures(monkeypatch):
    """What each saved figure shows: ``{axis title: [(x values, y values) per line]}``."""
    import matplotlib.figure

    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(figure, *args, **kwargs):
        figures.append(
            {
                axis.get_title(): [(list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()]
                for axis in figure.axes
            }
        )
        return real_savefig(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    return figures


def test_fsdp_run_is_merged_and_reports_agree(assets, tmp_path, monkeypatch, saved_figures):
    rows = addition_rows(4)
    for row in rows[:3]:  # the student answers these "correctly", the teacher most likely not
        row["reward_model"]["ground_truth"] = reference_greedy_response(assets["student"], row["prompt"])
    data_file = write_parquet(rows, tmp_path / "data.parquet")
    scorer_file = write_exact_match_scorer(tmp_path)
    output_dir = tmp_path / "out"
    # The run folder expands to global_step_2 (teacher weights) and global_step_4 (student weights).
    config = config_for(
        output_dir,
        [assets["run"], assets["student"]],
        data_file,
        teacher_path=str(assets["teacher"]),
        compute_score=str(scorer_file),
        merge_dir=str(tmp_path / "merged"),
    )
    results = run_evaluation(config)

    assert [(entry["kind"], entry["step"]) for entry in results] == [("fsdp", 2), ("fsdp", 4), ("hf", None)]
    teacher_copy, student_copy, student = (entry["kl"]["kl_student_teacher"] for entry in results)
    # The merged step-2 checkpoint is the teacher up to bf16 rounding; step 4 is the (bf16) student.
    assert 0 < teacher_copy < 1e-3 * student_copy
    assert student > 0 and results[2]["kl"]["kl_k3_sampled"] > 0
    assert results[2]["accuracy"] == 0.75

    written = json.loads((output_dir / "results.json").read_text())
    assert written["kl_definition"] == evaluation.KL_DEFINITION
    assert [entry["accuracy"] for entry in written["checkpoints"]] == [entry["accuracy"] for entry in results]
    assert all(entry["data_file"] == str(data_file.resolve()) for entry in written["checkpoints"])

    table = [line for line in (output_dir / "results.md").read_text().splitlines() if line.startswith("| ")][1:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    assert [row[1] for row in cells] == ["2", "4", ""]
    assert [float(row[3]) for row in cells] == [round(entry["accuracy"], 4) for entry in results]
    assert [float(row[5]) for row in cells] == pytest.approx(
        [entry["kl"]["kl_student_teacher"] for entry in results], rel=1e-3
    )

    assert (output_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [panels] = saved_figures
    accuracy_lines = panels["accuracy"]
    assert accuracy_lines[0] == ([2, 4], [results[0]["accuracy"], results[1]["accuracy"]])
    assert accuracy_lines[1][1] == [results[2]["accuracy"]] * 2  # the step-less checkpoint: a reference line
    kl_points = next(lines for title, lines in panels.items() if title.startswith("KL"))[0]
    assert kl_points == ([2, 4], [teacher_copy, student_copy])

    # A second run reuses the merged folders instead of merging again.
    monkeypatch.setattr(evaluation.checkpoints, "merge_fsdp_checkpoint", lambda *args: pytest.fail("merged again"))
    again = run_evaluation(
        config_for(
            tmp_path / "again",
            [assets["run"] / "global_step_4"],
            data_file,
            compute_score=str(scorer_file),
            merge_dir=str(tmp_path / "merged"),
        )
    )
    assert again[0]["accuracy"] == results[1]["accuracy"] and again[0]["kl"] is None


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing expensive loaded


def _missing(root: Path, assets) -> Path:
    return root / "does-not-exist"


def _empty_folder(root: Path, assets) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _truncated_safetensors(root: Path, assets) -> Path:
    folder = root / "truncated"
    folder.mkdir()
    for source in assets["student"].iterdir():
        (folder / source.name).write_bytes(source.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return folder


def _no_tokenizer(root: Path, assets) -> Path:
    folder = root / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((assets["student"] / name).read_bytes())
    return folder


def _garbage_shard(root: Path, assets) -> Path:
    actor = root / "global_step_9" / "actor"
    actor.mkdir(parents=True)
    source = assets["run"] / "global_step_4" / "actor"
    (actor / "fsdp_config.json").write_text((source / "fsdp_config.json").read_text())
    (actor / "huggingface").mkdir()
    for item in (source / "huggingface").iterdir():
        (actor / "huggingface" / item.name).write_bytes(item.read_bytes())
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"not a torch archive")
    return root / "global_step_9"


def _missing_rank(root: Path, assets) -> Path:
    actor = root / "global_step_5" / "actor"
    actor.mkdir(parents=True)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))
    source = assets["run"] / "global_step_4" / "actor" / "model_world_size_1_rank_0.pt"
    (actor / "model_world_size_2_rank_0.pt").write_bytes(source.read_bytes())
    return actor


@pytest.mark.parametrize(
    ("make_checkpoint", "message"),
    [
        (_missing, "no such checkpoint folder"),
        (_empty_folder, "no config.json"),
        (_truncated_safetensors, "unreadable safetensors"),
        (_no_tokenizer, "has no tokenizer"),
        (_garbage_shard, "not a torch.save archive"),
        (_missing_rank, "model_world_size_2_rank_1.pt: missing"),
    ],
)
def test_bad_checkpoint_is_one_line_before_any_model_loads(
    assets, tmp_path, capsys, monkeypatch, make_checkpoint, message
):
    monkeypatch.setattr(evaluation.cli, "load_model", lambda *args: pytest.fail("a model was loaded"))
    monkeypatch.setattr(
        evaluation.checkpoints, "merge_fsdp_checkpoint", lambda *args: pytest.fail("a checkpoint was merged")
    )
    data_file = write_parquet(addition_rows(2), tmp_path / "data.parquet")
    bad = make_checkpoint(tmp_path, assets)
    # The good checkpoint first: nothing may be loaded for it either.
    arguments = ["--model_path", str(assets["student"]), str(bad), "--data", str(data_file)]
    code = main([*arguments, "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.count("\n") == 0 and error.startswith("error: ") and "fix: " in error
    assert message in error and str(bad.name) in error
    assert not (tmp_path / "out").exists()


def test_shard_with_corrupt_content_is_one_line(assets, tmp_path, capsys):
    """A shard that passes the cheap archive check fails inside verl's merger: still one line, exit 2."""
    actor = tmp_path / "global_step_6" / "actor"
    shutil.copytree(assets["run"] / "global_step_4" / "actor", actor)
    shard = actor / "model_world_size_1_rank_0.pt"
    content = bytearray(shard.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 4096] = bytes(4096)
    shard.write_bytes(bytes(content))
    data_file = write_parquet(addition_rows(1), tmp_path / "data.parquet")

    scorer_file = write_exact_match_scorer(tmp_path)
    code = main(["--model_path", str(actor), "--data", str(data_file), "--compute_score", str(scorer_file)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith(f"error: {actor}: verl's model merger cannot read the shards") and "fix: " in error


def test_teacher_with_another_tokenizer_is_one_line(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluation.cli, "load_model", lambda *args: pytest.fail("a model was loaded"))
    teacher = shutil.copytree(assets["teacher"], tmp_path / "teacher")
    byte_level_chatml_tokenizer(reverse_ids=True).save_pretrained(teacher)
    data_file = write_parquet(addition_rows(1), tmp_path / "data.parquet")
    arguments = ["--model_path", str(assets["student"]), "--data", str(data_file), "--teacher_path", str(teacher)]
    code = main([*arguments, "--compute_score", str(write_exact_match_scorer(tmp_path))])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0
    assert f"--teacher_path {teacher}: its tokenizer differs" in error and "map to different ids" in error


def test_missing_data_file_and_unknown_data_source_are_one_line(assets, tmp_path, capsys):
    code = main(["--model_path", str(assets["student"]), "--data", str(tmp_path / "nope.parquet")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and "nope.parquet: no such data file" in error

    rows = addition_rows(2)
    for row in rows:
        row["data_source"] = "unknown/bench"
    data_file = write_parquet(rows, tmp_path / "data.parquet")
    code = main(["--model_path", str(assets["student"]), "--data", str(data_file)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and "'unknown/bench'" in error and "--compute_score" in error


def test_wrapper_script_error_is_one_line_without_traceback(assets, tmp_path):
    """run_evaluation.sh -> evaluate_model.py: environment defaults and extra arguments reach the CLI."""
    environment = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": sys.executable,
        "CHECKPOINTS": f"{assets['student']} {tmp_path / 'missing'}",
        "DATA": str(tmp_path / "data.parquet"),
        "TEACHER": str(assets["teacher"]),
        "OUTPUT_DIR": str(tmp_path / "out"),
    }
    completed = subprocess.run(
        ["bash", str(REPO / "examples/distillation/run_evaluation.sh"), "--num_samples", "1"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: no such checkpoint folder; fix: pass a Hugging Face model folder or a verl "
        "…/global_step_N[/actor]"
    ]


def test_evaluating_fsdp_checkpoints_prints_results_and_progress_bars_only(assets, tmp_path):
    """No third-party warning (torch's DeviceMesh unpickling, transformers' `torch_dtype` deprecation,
    both triggered by verl's model merger) and none of the merger's own chatter. A fresh process: a
    warning printed once per process by an earlier test would otherwise hide here."""
    rows = addition_rows(2)
    data_file = write_parquet(rows, tmp_path / "data.parquet")
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples/distillation/evaluate_model.py"),
            "--checkpoints",
            str(assets["run"]),
            "--data",
            str(data_file),
            "--teacher_path",
            str(assets["teacher"]),
            "--compute_score",
            str(write_exact_match_scorer(tmp_path)),
            "--max_new_tokens",
            "4",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # tqdm redraws its bars with carriage returns: every piece of stderr must be part of a bar
    pieces = [piece.strip() for piece in completed.stderr.replace("\r", "\n").splitlines() if piece.strip()]
    assert pieces and all("%|" in piece for piece in pieces), completed.stderr[-3000:]
    # a warning written right after a bar's last redraw shares its piece
    for known_warning in ("DeviceMesh", "deprecated", "Warning"):
        assert known_warning not in completed.stderr, completed.stderr[-3000:]
    assert [line.split(":")[0] for line in completed.stdout.splitlines()] == [
        "run/global_step_2",
        "run/global_step_4",
        "results in " + str(tmp_path / "out"),
    ]


def test_run_folder_expands_to_its_checkpoints_in_step_order(assets):
    checkpoints = resolve_checkpoints([str(assets["run"])])
    assert [(c.kind, c.step, c.model_dir.name) for c in checkpoints] == [("fsdp", 2, "actor"), ("fsdp", 4, "actor")]
    assert checkpoints[0].label.endswith("global_step_2")


def test_plot_without_steps_keeps_the_given_order(tmp_path, saved_figures):
    entries = [
        {"label": label, "step": None, "accuracy": accuracy, "kl": None}
        for label, accuracy in (("base", 0.25), ("tuned", 0.75), ("teacher", 0.5))
    ]
    evaluation.plot_results(entries, tmp_path / "plot.png")
    assert saved_figures == [{"accuracy": [([0, 1, 2], [0.25, 0.75, 0.5])]}]
