"""The rows to evaluate (a parquet file in verl's RLHF layout) and how an answer to one is scored."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from verl.distill.evaluation.errors import EvaluationInputError

# Data sources scored by this project's own tasks (imported on first use); every other data
# source goes to verl's default_compute_score.
PROJECT_SCORERS = {"toy_addition": "verl.distill.toy.reward"}


@dataclass(frozen=True)
class EvalRow:
    """One prompt of the dataset with what its scorer needs."""

    messages: list[dict]
    data_source: str
    ground_truth: Any
    extra_info: Optional[dict]


def to_python(value: Any) -> Any:
    """Parquet cells come back as numpy arrays and scalars; scorers and JSON want Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {key: to_python(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_python(item) for item in value]
    return value


def load_rows(data_file: str, prompt_key: str = "prompt", num_samples: int = -1) -> list[EvalRow]:
    """Read the first ``num_samples`` rows (all when negative) of a parquet file in verl's RLHF layout."""
    path = Path(data_file).expanduser()
    layout_fix = "give a parquet file in verl's RLHF layout (e.g. from examples/data_preprocess/gsm8k.py)"
    if not path.is_file():
        raise EvaluationInputError(str(data_file), "no such data file", layout_fix)
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as error:
        problem = f"unreadable parquet file ({type(error).__name__})"
        raise EvaluationInputError(str(data_file), problem, layout_fix) from None
    for column in (prompt_key, "data_source", "reward_model"):
        if column not in frame.columns:
            raise EvaluationInputError(
                str(data_file),
                f"has no '{column}' column (columns: {', '.join(map(str, frame.columns))})",
                f"{layout_fix}, or pass --prompt_key for another prompt column",
            )
    if num_samples >= 0:
        frame = frame.head(num_samples)
    if frame.empty:
        raise EvaluationInputError(
            str(data_file), "has no rows to evaluate", "use a non-empty file and --num_samples > 0"
        )
    rows = []
    for index, record in enumerate(frame.to_dict("records")):
        messages, reward_model = to_python(record[prompt_key]), to_python(record["reward_model"])
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise EvaluationInputError(
                str(data_file), f"row {index}: '{prompt_key}' is not a list of {{role, content}} messages", layout_fix
            )
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise EvaluationInputError(str(data_file), f"row {index}: reward_model has no ground_truth", layout_fix)
        extra_info = to_python(record.get("extra_info"))
        rows.append(
            EvalRow(
                messages=messages,
                data_source=str(record["data_source"]),
                ground_truth=reward_model["ground_truth"],
                extra_info=extra_info if isinstance(extra_info, dict) else None,
            )
        )
    return rows


@dataclass(frozen=True)
class RowScore:
    score: float
    correct: bool


def _as_row_score(result: Any) -> RowScore:
    """verl's scorers return a number, a bool, a tuple starting with the score or a dict with ``score``."""
    if isinstance(result, dict):
        score = float(result["score"])
        return RowScore(score, bool(result["acc"]) if "acc" in result else score >= 1.0)
    if isinstance(result, list | tuple):
        result = result[0]
    score = float(result)
    return RowScore(score, score >= 1.0)


def load_custom_scorer(spec: str) -> Callable[..., Any]:
    """``path.py[:fn_name]`` -> the function (``compute_score`` by default)."""
    file_name, _, function_name = spec.partition(":")
    function_name = function_name or "compute_score"
    fix = "pass --compute_score path/to/file.py[:function_name]"
    if not Path(file_name).expanduser().is_file():
        raise EvaluationInputError(file_name, "no such compute_score file", fix)
    from verl.utils.import_utils import load_extern_object

    try:
        function = load_extern_object(str(Path(file_name).expanduser()), function_name)
    except AttributeError:
        raise EvaluationInputError(file_name, f"defines no function '{function_name}'", fix) from None
    except Exception as error:  # the user's module itself fails to import
        problem = f"does not import ({type(error).__name__}: {error})"
        raise EvaluationInputError(file_name, problem, "fix the file so that `python file.py` runs") from None
    if not callable(function):
        raise EvaluationInputError(file_name, f"'{function_name}' is not a function", fix)
    return function


class Scorer:
    """Scores a response for a row: the user's function if given, else the data source's scorer."""

    def __init__(self, custom: Optional[Callable[..., Any]] = None):
        self.custom = custom
        self._project_scorers: dict[str, Callable[..., Any]] = {}

    def scorer_for(self, data_source: str) -> Callable[..., Any]:
        if self.custom is not None:
            return self.custom
        if data_source in PROJECT_SCORERS:
            if data_source not in self._project_scorers:
                import importlib

                module_name = PROJECT_SCORERS[data_source]
                try:
                    self._project_scorers[data_source] = importlib.import_module(module_name).compute_score
                except (ImportError, AttributeError) as error:
                    raise EvaluationInputError(
                        f"data_source {data_source}",
                        f"its scorer {module_name}.compute_score cannot be imported ({error})",
                        "reinstall verl-distill, or pass --compute_score file.py[:fn]",
                    ) from None
            return self._project_scorers[data_source]
        from verl.utils.reward_score import default_compute_score

        return default_compute_score

    def __call__(self, row: EvalRow, response: str) -> RowScore:
        result = self.scorer_for(row.data_source)(
            data_source=row.data_source, solution_str=response, ground_truth=row.ground_truth, extra_info=row.extra_info
        )
        return _as_row_score(result)

    def check(self, rows: Sequence[EvalRow]) -> None:
        """Score an empty answer once per data source, so an unscorable source fails before any model loads."""
        first_rows = {row.data_source: row for row in rows}
        for data_source, row in first_rows.items():
            try:
                self(row, "")
            except NotImplementedError:
                raise EvaluationInputError(
                    f"data_source {data_source!r}",
                    "has no scorer in verl's default_compute_score",
                    "pass --compute_score file.py[:fn] with compute_score(data_source, solution_str, ground_truth, "
                    "extra_info)",
                ) from None
            except EvaluationInputError:
                raise
            except Exception as error:
                raise EvaluationInputError(
                    f"data_source {data_source!r}",
                    f"the scorer failed on an empty answer ({type(error).__name__}: {error})",
                    "fix the compute_score function or the row's reward_model.ground_truth",
                ) from None
