"""The one error of the evaluator: a bad input, reported in one line before any model loads."""


class EvaluationInputError(ValueError):
    """An input that cannot be evaluated: which file, what is wrong and how to fix it (one line)."""

    def __init__(self, subject: str, problem: str, fix: str):
        super().__init__(" ".join(f"{subject}: {problem}; fix: {fix}".split()))
