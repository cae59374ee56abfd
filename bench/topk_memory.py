"""Issue #14 item 5, top-k memory: peak extra memory per response token of the teacher's top-k in the
reference pass and of a ``*_topk`` loss's forward + backward in the update, against the vocabulary
size V, for the code before the chunking (a git revision) and the installed code.

Each case runs in a fresh Python process. It builds one micro-batch of packed sequences (short
prompts, ``--tokens`` response tokens in all), its [rows, V] logits and the carried top-k, and runs a
warm-up of the same code on a tiny vocabulary. The extra memory of the call is the peak, over the
call, of the bytes of tensors it allocated and had not yet freed: torch's profiler
(``profile_memory=True``) records every CPU allocation and free with the running total, and the
largest total is the peak. Tensors that existed before the call (the logits, the batch) are not
counted; everything the call makes is: copies and temporaries (also those inside one operator),
tensors autograd keeps for the backward, and, for the loss, the logits' gradient (one [rows, V]
tensor in the logits' dtype, which stays after the call). Divided by the response tokens and by
V x 4 bytes it is the ratio the goal is stated in.

Cross-check, on a second call on fresh inputs without the profiler: the resident set size before it
(VmRSS) and its peak during it (VmHWM, reset with ``/proc/self/clear_refs``, Linux >= 4.0); glibc
serves every allocation of 64 KiB or more with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed blocks
leave the RSS at once. The kernel's RSS counters are approximate to a few MiB, so only the larger
cases can be compared. That call is also timed (one call on one thread; indicative only, the seconds
depend on the machine's load, the memory does not).

"Before" is the code of ``--before-rev`` (the three modules the chunking changed, loaded from git into
the process in place of the installed ones); "after" is the installed package (``make install``).

    .venv/bin/python bench/topk_memory.py --out bench/results/topk_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import RESULTS_DIR, format_table, machine_info, rounded

REPO_DIR = Path(__file__).resolve().parent.parent
# The last commit before the top-k chunking (issue #14 item 5).
BEFORE_REV = "f1f079e"
CHANGED_MODULES = {  # in import order: each imports the ones above it
    "verl.distill.divergences": "verl/distill/divergences.py",
    "verl.distill.teacher_topk": "verl/distill/teacher_topk.py",
    "verl.workers.roles.utils.distribution_losses": "verl/workers/roles/utils/distribution_losses.py",
}
PHASES = ("reference", "update")
PROMPT_TOKENS = 8
SAMPLES = 4
ROLLOUT_TEMPERATURE = 0.7
# The goal of issue #14 item 5: extra peak memory per token <= 2 x V x 4 bytes.
GOAL_FLOAT32_ROWS = 2.0


@dataclass
class Case:
    phase: str  # "reference": the teacher's top-k fields; "update": forward_kl_topk's forward + backward
    code: str  # "before" or "after"
    vocab: int
    tokens: int  # response tokens of the micro-batch
    dtype: str  # of the logits
    topk: int
    chunk_tokens: int  # logits_chunk_tokens ("after" only)
    before_rev: str


@dataclass
class Measurement:
    case: Case
    peak_allocated_bytes: int  # torch's allocations during the call, at their peak (the profiler's count)
    baseline_rss_bytes: int  # the cross-check: resident set size before the call ...
    peak_rss_bytes: int  # ... and at its peak during the call
    seconds: float
    extra_bytes_per_token: float = field(init=False)
    ratio_to_vocab_float32: float = field(init=False)  # extra per token / (V x 4 bytes)
    rss_ratio_to_vocab_float32: float = field(init=False)

    def __post_init__(self):
        self.extra_bytes_per_token = self.peak_allocated_bytes / self.case.tokens
        self.ratio_to_vocab_float32 = self.extra_bytes_per_token / (self.case.vocab * 4)
        rss_extra = self.peak_rss_bytes - self.baseline_rss_bytes
        self.rss_ratio_to_vocab_float32 = rss_extra / self.case.tokens / (self.case.vocab * 4)


# --- inside the measuring process --------------------------------------------------------------


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _load_revision(rev: str) -> None:
    """Put the changed modules as they were at ``rev`` in place of the installed ones."""
    import verl.distill  # noqa: F401  (the parent packages, installed)
    import verl.workers.roles.utils  # noqa: F401

    for name, path in CHANGED_MODULES.items():
        source = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=REPO_DIR, check=True, capture_output=True, text=True
        ).stdout
        module = types.ModuleType(name)
        module.__file__ = f"{rev}:{path}"
        sys.modules[name] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)


def _micro_batch(case: Case, with_teacher_topk: bool):
    """Packed sequences (short prompt + response), the logits of every row, and the loss's config."""
    from types import SimpleNamespace

    import torch
    from tensordict import TensorDict

    from verl.distill.loss_config import DistillLossConfig
    from verl.distill.teacher_topk import CARRIED_FIELDS
    from verl.utils import tensordict_utils as tu

    generator = torch.Generator().manual_seed(0)
    responses = [case.tokens // SAMPLES + (index < case.tokens % SAMPLES) for index in range(SAMPLES)]
    tokens = [torch.randint(0, case.vocab, (PROMPT_TOKENS + length,), generator=generator) for length in responses]
    data = TensorDict(
        {
            "input_ids": torch.nested.as_nested_tensor(tokens, layout=torch.jagged),
            "response_mask": torch.nested.as_nested_tensor(
                [torch.ones(length, dtype=torch.int64) for length in responses], layout=torch.jagged
            ),
        },
        batch_size=[SAMPLES],
    )
    tu.assign_non_tensor(data, use_remove_padding=True)
    rows = sum(len(sequence) for sequence in tokens)
    dtype = getattr(torch, case.dtype)
    logits = torch.empty((1, rows, case.vocab), dtype=dtype)
    for start in range(0, rows, 64):  # filled in slices: no float32 copy of the whole tensor
        logits[0, start : start + 64] = 3 * torch.randn((min(64, rows - start), case.vocab), generator=generator)
    options = DistillLossConfig(topk=case.topk, logits_chunk_tokens=case.chunk_tokens)
    if with_teacher_topk:
        ids = torch.stack([torch.randperm(case.vocab, generator=generator)[: case.topk] for _ in range(case.tokens)])
        log_probs = torch.log_softmax(torch.randn(case.tokens, case.topk + 1, generator=generator), dim=-1)
        fields = [ids.int(), log_probs[:, :-1].contiguous(), log_probs[:, -1].contiguous()]
        offsets = data["response_mask"].offsets()
        for key, values in zip(CARRIED_FIELDS, fields, strict=True):
            data[key] = torch.nested.nested_tensor_from_jagged(values, offsets)
    config = SimpleNamespace(distill=options, model_config=SimpleNamespace(tokenizer=range(case.vocab)))
    return data, logits, options, config


def _run_phase(case: Case):
    """The measured call: returns a function that runs it on freshly built inputs of ``case``."""
    import torch

    data, logits, options, config = _micro_batch(case, with_teacher_topk=case.phase == "update")
    if case.phase == "reference":
        from verl.distill.teacher_topk import teacher_topk_fields

        rows = logits.shape[1]
        output_args = {"temperature_rmpad": torch.full((1, rows), ROLLOUT_TEMPERATURE)}
        output = types.SimpleNamespace(logits=logits)
        return lambda: teacher_topk_fields(output, output_args, data, options, case.vocab)

    from verl.workers.roles.utils.distribution_losses import TOKEN_DIVERGENCE_KEY, forward_kl_topk_loss

    logits.requires_grad_(True)

    def update():
        outputs = forward_kl_topk_loss(config, data=data, student_logits=logits)
        outputs[TOKEN_DIVERGENCE_KEY].sum().backward()

    return update


def _peak_allocated_bytes(call) -> int:
    """The most bytes of tensors allocated by ``call`` and alive at one moment, from the profiler's record
    of every allocation and free (each carries the running total); tensors that existed before are not
    counted."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    peak, pending = 0, list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
        pending.extend(event.children)
    return peak


def measure(case: Case) -> Measurement:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # two threads on a shared 2-core machine time the other jobs, not this code
    if case.code == "before":
        _load_revision(case.before_rev)
    warm_up = Case(**{**asdict(case), "vocab": max(64, case.topk), "tokens": 16})
    _run_phase(warm_up)()  # loads kernels, thread pools and lazy imports outside the measurement
    # first timed, with the resident set size around it; then on fresh inputs under the profiler
    call = _run_phase(case)
    gc.collect()
    baseline_rss = _status_bytes("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    peak_rss = _status_bytes("VmHWM")
    del call
    gc.collect()
    return Measurement(case, _peak_allocated_bytes(_run_phase(case)), baseline_rss, peak_rss, seconds)


# --- the driver ----------------------------------------------------------------------------------


def measure_in_fresh_process(case: Case) -> Measurement:
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    completed = subprocess.run(
        [sys.executable, __file__, "--measure-one", json.dumps(asdict(case))],
        env=environment,
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{case}: the measuring process failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    fields = ("peak_allocated_bytes", "baseline_rss_bytes", "peak_rss_bytes", "seconds")
    return Measurement(Case(**result["case"]), *(result[name] for name in fields))


def table(measurements: list[Measurement]) -> str:
    by_key = {(m.case.phase, m.case.vocab, m.case.tokens, m.case.dtype, m.case.code): m for m in measurements}
    rows = []
    for key in dict.fromkeys((m.case.phase, m.case.vocab, m.case.tokens, m.case.dtype) for m in measurements):
        before, after = by_key.get((*key, "before")), by_key.get((*key, "after"))
        rows.append(
            [
                *key,
                before.peak_allocated_bytes / 2**20 if before else None,
                after.peak_allocated_bytes / 2**20 if after else None,
                before.ratio_to_vocab_float32 if before else None,
                after.ratio_to_vocab_float32 if after else None,
                after.ratio_to_vocab_float32 <= GOAL_FLOAT32_ROWS if after else None,
                before.rss_ratio_to_vocab_float32 if before else None,
                after.rss_ratio_to_vocab_float32 if after else None,
                before.seconds if before else None,
                after.seconds if after else None,
            ]
        )
    headers = [
        "phase",
        "V",
        "tokens",
        "logits",
        "extra MiB before",
        "after",
        "per token / (V x 4 B) before",
        "after",
        f"after <= {GOAL_FLOAT32_ROWS:g}",
        "RSS: before",
        "after",
        "s before",
        "s after",
    ]
    return format_table(headers, rows)


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--vocabs", type=int_list, default=[1024, 32768, 151936], help="comma-separated (default: %(default)s)")
    add("--tokens", type=int_list, default=[256, 1024], help="response tokens per micro-batch (default: %(default)s)")
    add("--dtypes", default="float32,bfloat16", help="of the logits, comma-separated (default: %(default)s)")
    add("--phases", default=",".join(PHASES), help="comma-separated (default: %(default)s)")
    add("--topk", type=int, default=32, help="distill.topk (default: %(default)s)")
    add("--chunk-tokens", type=int, default=64, help="distill.logits_chunk_tokens (default: %(default)s)")
    add("--before-rev", default=BEFORE_REV, help="git revision of the 'before' code (default: %(default)s)")
    add("--skip-before", action="store_true", help="measure the installed code only")
    add("--out", default=str(RESULTS_DIR / "topk_memory.json"), help="JSON results (default: %(default)s)")
    add("--measure-one", help=argparse.SUPPRESS)  # internal: one case, in this process
    args = parser.parse_args(argv)
    if args.measure_one:
        print(json.dumps(asdict(measure(Case(**json.loads(args.measure_one))))))
        return 0

    codes = ["after"] if args.skip_before else ["before", "after"]
    measurements = []
    for phase in args.phases.split(","):
        for vocab in args.vocabs:
            for tokens in args.tokens:
                for dtype in args.dtypes.split(","):
                    for code in codes:
                        case = Case(
                            phase, code, vocab, tokens, dtype, args.topk, args.chunk_tokens, args.before_rev
                        )
                        measurements.append(measure_in_fresh_process(case))
                        m = measurements[-1]
                        print(
                            f"{phase} V={vocab} tokens={tokens} {dtype} {code}: "
                            f"{m.peak_allocated_bytes / 2**20:.1f} MiB extra, {m.ratio_to_vocab_float32:.2f} "
                            f"x V x 4 B per token (RSS {m.rss_ratio_to_vocab_float32:.2f}), {m.seconds:.2f} s",
                            flush=True,
                        )
    printed = table(measurements)
    print(printed)
    after = [m for m in measurements if m.case.code == "after"]
    summary = {
        "goal": f"extra peak memory per response token <= {GOAL_FLOAT32_ROWS:g} x V x 4 bytes",
        "goal_met": all(m.ratio_to_vocab_float32 <= GOAL_FLOAT32_ROWS for m in after) if after else None,
        "max_ratio_after": max((m.ratio_to_vocab_float32 for m in after), default=None),
        "method": (
            "fresh process per case; peak of the torch allocations made by the call (profiler allocation "
            "events), cross-checked by VmHWM - VmRSS around a second, timed call (see bench/README.md)"
        ),
        "invocation": " ".join(sys.argv),
        "machine": machine_info(),
        "measurements": [asdict(m) for m in measurements],
        "table": printed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rounded(summary), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
