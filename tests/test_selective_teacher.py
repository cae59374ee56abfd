"""The selective reference pass: verl's own ``_compute_ref_log_prob`` run on the selected rows only
(a recording reference worker group stands in for the teacher, a dict for TransferQueue), and the
losses' KL over the scored tokens only."""

import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transfer_queue
from omegaconf import OmegaConf
from tensordict import TensorDict
from test_hybrid_loss import hybrid, hybrid_config, with_task_signal
from test_losses import AGG_MODES, DistillActorConfig, actor_config, aggregate, distill, make_batch, run_engine
from transfer_queue import KVBatchMeta

from verl.distill.loss_config import DistillLossConfig
from verl.distill.response_selection import KL_WEIGHT_KEY, teacher_token_weights
from verl.distill.micro_batches import micro_batch_for
from verl.distill.selective_teacher import selective_reference_pass
from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
from verl.utils import tensordict_utils as tu
from verl.workers.config import PolicyLossConfig

N = 4


class Store:
    """TransferQueue's key-value interface over a dict: key -> {field: per-sample tensor or object}."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def kv_batch_get(self, keys, partition_id, select_fields):
        columns = {}
        for name in select_fields:
            values = [self.rows[key][name] for key in keys]
            if isinstance(values[0], torch.Tensor):
                columns[name] = torch.nested.as_nested_tensor(values, layout=torch.jagged)
            else:
                columns[name] = np.array(values, dtype=object)
        return tu.get_tensordict(columns)

    def kv_batch_put(self, keys, partition_id, fields: TensorDict):
        for name, column in fields.items():
            for key, value in zip(keys, column.unbind(), strict=True):
                self.rows.setdefault(key, {})[name] = value


class RecordingReferenceWorkers:
    """The reference worker group: records the keys it scores, writes full-sequence log-probs
    (position t holds the log-prob of token t + 1, as verl's engine returns them)."""

    def __init__(self, store: Store, dp_size: int, micro_batch_size: int):
        self.store, self.scored = store, []
        self._dispatch_info = {}
        self.dp_size, self.micro_batch_size = dp_size, micro_batch_size

    def _query_dispatch_info(self, mesh_name):
        assert mesh_name == "ref"
        return list(range(self.dp_size))

    def compute_ref_log_prob(self, batch: KVBatchMeta) -> KVBatchMeta:
        assert len(batch) % self.dp_size == 0  # verl's dispatch splits it over the ranks
        # verl's engine cuts each rank's rows into equal micro-batches (the batch's info wins over the config)
        micro_batch_size = batch.extra_info.get("micro_batch_size_per_gpu", self.micro_batch_size)
        assert micro_batch_size <= self.micro_batch_size and (len(batch) // self.dp_size) % micro_batch_size == 0
        self.scored.append(list(batch.keys))
        for key in batch.keys:
            row = self.store.rows[key]
            self.store.rows[key]["log_probs"] = teacher_log_probs(key, len(row["prompts"]) + len(row["responses"]))
        return KVBatchMeta(keys=list(batch.keys), tags=list(batch.tags), partition_id=batch.partition_id)


def teacher_log_probs(key: str, sequence_length: int) -> torch.Tensor:
    return -(torch.arange(sequence_length, dtype=torch.float32) + 1) / (10 + abs(hash(key)) % 7)


def a_step(store: Store, groups: int, scores=None, padding_rows: int = 0, partition: str = "train") -> KVBatchMeta:
    """``groups`` prompts of N responses each (keys {uid}_{session}_0, rows shuffled as after verl's
    balancing), plus verl's padding rows; rewards ``scores[g][i]`` in the last response token."""
    rng = np.random.default_rng(0)
    keys, tags = [], []
    for g in range(groups):
        prompt = torch.tensor([5 + g, 6, 7])
        for session in range(N):
            key, length = f"uid{g}-x_{session}_0", int(rng.integers(2, 6))
            reward = torch.zeros(length)
            reward[-1] = scores[g][session] if scores is not None else 0.0
            store.rows[key] = {
                "uid": f"uid{g}-x",
                "prompts": prompt,
                "responses": torch.arange(length),
                "response_mask": torch.ones(length, dtype=torch.int64),
                "rm_scores": reward,
            }
            keys.append(key)
            tags.append({"seq_len": 3 + length, "response_len": length})
    for p in range(padding_rows):
        key = f"pad_{p}_0"
        store.rows[key] = {
            "uid": "pad",
            "prompts": torch.tensor([0]),
            "responses": torch.tensor([0]),
            "response_mask": torch.zeros(1, dtype=torch.int64),
            "rm_scores": torch.zeros(1),
        }
        keys.append(key)
        tags.append({"seq_len": 2, "response_len": 1, "is_padding": True})
    order = rng.permutation(len(keys)).tolist()
    return KVBatchMeta(keys=[keys[i] for i in order], tags=[tags[i] for i in order], partition_id=partition)


def verls_reference_pass():
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    # verl's own phase, without the CPU job's field selection (it would ask a real TransferQueue)
    return inspect.unwrap(PPOTrainer._compute_ref_log_prob)


def run_phase(
    monkeypatch,
    strategy,
    k,
    groups=4,
    scores=None,
    padding_rows=0,
    dp_size=1,
    seed=None,
    micro_batch_size=None,
    partition="train",
):
    store = Store()
    monkeypatch.setattr(transfer_queue, "kv_batch_get", store.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", store.kv_batch_put)
    batch = a_step(store, groups, scores, padding_rows, partition)
    config = OmegaConf.create(
        {
            "data": {"seed": seed},
            "actor_rollout_ref": {
                "rollout": {"temperature": 1.0, "n": N},
                # sized for the whole batch, as a user sets it for a stock reference pass
                "ref": {"log_prob_micro_batch_size_per_gpu": micro_batch_size or (groups * N + padding_rows) // dp_size},
                "actor": {"distill": {"select_strategy": strategy, "select_k": k}},
            },
        }
    )
    workers = RecordingReferenceWorkers(store, dp_size, config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu)
    trainer = SimpleNamespace(config=config, ref_policy_wg=workers, ref_in_actor=False, global_steps=3)
    metrics = {}
    returned = selective_reference_pass(verls_reference_pass())(trainer, batch, metrics)
    assert returned is batch
    return store, batch, workers, metrics


def selected_keys(store, batch):
    return [key for key in batch.keys if float(store.rows[key][KL_WEIGHT_KEY].sum()) > 0]


@pytest.mark.parametrize("k", [1, 2])
def test_the_teacher_scores_only_the_selected_responses(monkeypatch, k):
    store, batch, workers, metrics = run_phase(monkeypatch, "random", k, groups=4, padding_rows=2)
    (scored,) = workers.scored  # one call to the reference workers, with the selected rows only
    assert sorted(scored) == sorted(selected_keys(store, batch))
    per_group = {}
    for key in scored:
        per_group.setdefault(key.split("_")[0], []).append(key)
    assert sorted(len(rows) for rows in per_group.values()) == [k] * 4
    for key in batch.keys:
        row = store.rows[key]
        responses = len(row["responses"])
        if key in scored:  # verl's phase cut the response's log-probs out of the teacher's output
            expected = teacher_log_probs(key, len(row["prompts"]) + responses)[-responses - 1 : -1]
            torch.testing.assert_close(row["ref_log_prob"], expected)
        else:
            assert torch.equal(row["ref_log_prob"], torch.zeros(responses))
            assert torch.equal(row[KL_WEIGHT_KEY], torch.zeros(responses))
    assert metrics["distill/select_ratio"] == k / N
    assert metrics["distill/teacher_rows"] == 4 * k
    seq_len = {key: tag["seq_len"] for key, tag in zip(batch.keys, batch.tags, strict=True)}
    assert metrics["distill/teacher_tokens"] == sum(seq_len[key] for key in scored)
    assert metrics["distill/teacher_token_share"] == pytest.approx(
        sum(seq_len[key] for key in scored) / sum(seq_len.values())
    )
    # what verl's phase sets for the phases after it reached the step's batch, not the reference
    # pass's micro-batch size (the actor's worker would take it as its own)
    assert batch.extra_info["temperature"] == 1.0 and batch.extra_info["compute_loss"] is False
    assert "micro_batch_size_per_gpu" not in batch.extra_info


def test_the_kl_weights_make_a_token_mean_over_the_scored_responses(monkeypatch):
    store, batch, _, _ = run_phase(monkeypatch, "random", 1, groups=3)
    tokens = {key: len(store.rows[key]["responses"]) for key in batch.keys}
    scored = selected_keys(store, batch)
    for key in scored:
        assert torch.allclose(store.rows[key][KL_WEIGHT_KEY], torch.tensor(sum(tokens.values()) / sum(tokens[k] for k in scored)))


def test_best_and_worst_score_the_responses_with_the_highest_and_lowest_rewards(monkeypatch):
    scores = [[0.1, 0.9, 0.5, 0.2], [1.0, 0.0, 0.3, 0.7], [0.0, 0.0, 1.0, 0.4]]
    for strategy, expected in (("best", [[1, 2], [0, 3], [2, 3]]), ("worst", [[0, 3], [1, 2], [0, 1]])):
        store, batch, workers, _ = run_phase(monkeypatch, strategy, 2, groups=3, scores=scores)
        chosen = sorted(workers.scored[0])
        assert chosen == sorted(f"uid{g}-x_{session}_0" for g in range(3) for session in expected[g])


def test_the_same_config_and_step_draw_the_same_responses(monkeypatch):
    first = sorted(run_phase(monkeypatch, "random", 1, groups=6, seed=11)[2].scored[0])
    again = sorted(run_phase(monkeypatch, "random", 1, groups=6, seed=11)[2].scored[0])
    other = sorted(run_phase(monkeypatch, "random", 1, groups=6, seed=12)[2].scored[0])
    assert first == again and first != other


def test_a_sub_batch_the_reference_ranks_cannot_split_evenly_is_filled_with_padding_rows_first(monkeypatch):
    # 3 prompts x 1 response = 3 rows for 2 data-parallel ranks: one verl padding row fills up
    store, batch, workers, metrics = run_phase(monkeypatch, "random", 1, groups=3, padding_rows=2, dp_size=2)
    (scored,) = workers.scored
    assert len(scored) == 4 and sum(key.startswith("pad_") for key in scored) == 1
    assert metrics["distill/teacher_rows"] == 4 and metrics["distill/select_ratio"] == 0.25
    assert len(selected_keys(store, batch)) == 3  # the filler row is scored but weighs nothing


@pytest.mark.parametrize("rows_per_rank, configured, expected", [(4, 16, 4), (16, 16, 16), (6, 4, 3), (7, 4, 1), (12, 8, 6)])
def test_the_micro_batch_is_the_largest_that_divides_the_selected_rows(rows_per_rank, configured, expected):
    assert micro_batch_for(rows_per_rank, configured) == expected


def test_a_micro_batch_size_chosen_for_the_whole_batch_still_splits_the_selected_rows(monkeypatch):
    # 6 prompts x 4 = 24 rows with micro-batches of 8; the teacher gets 6 rows, micro-batches of 6
    _, _, workers, _ = run_phase(monkeypatch, "random", 1, groups=6, micro_batch_size=8)
    assert len(workers.scored[0]) == 6


def test_select_all_is_verls_reference_pass(monkeypatch):
    store, batch, workers, metrics = run_phase(monkeypatch, "all", 1, groups=2, padding_rows=1)
    assert sorted(workers.scored[0]) == sorted(batch.keys)
    assert metrics == {} and all(KL_WEIGHT_KEY not in row for row in store.rows.values())


def test_the_teacher_kl_at_validation_scores_every_validation_response(monkeypatch):
    store, batch, workers, metrics = run_phase(monkeypatch, "random", 1, groups=2, partition="val")
    assert sorted(workers.scored[0]) == sorted(batch.keys)
    assert metrics == {} and all(KL_WEIGHT_KEY not in row for row in store.rows.values())


# --- the losses: the KL over the scored tokens, the policy gradient over all ------------------------


def with_selection(batch, selected):
    """The KL weights the selective reference pass writes, and garbage in the unscored teacher slots
    (the engine's micro-batch holds them padded to the response width, as here)."""
    tokens = batch.mask.sum(dim=1).tolist()
    weights = torch.tensor(teacher_token_weights(selected, tokens))
    batch.data[KL_WEIGHT_KEY] = weights[:, None].expand_as(batch.mask).contiguous()
    batch.data["ref_log_prob"][~torch.tensor(selected)] = math.nan
    return batch


SELECTED = [True, False, False, False, False, False, True, False]  # k = 1 of n = 4, two prompts


def distill_actor_config(**overrides):
    return actor_config(DistillActorConfig, **overrides)


def selection_config(config_fn, **overrides):
    return config_fn(rollout_n=N, distill=DistillLossConfig(select_strategy="random", select_k=1), **overrides)


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_the_kl_is_the_loss_of_the_scored_responses_alone(agg_mode):
    batch = with_selection(make_batch(seed=4, masked_garbage=False), SELECTED)
    config = selection_config(distill_actor_config, kl_loss_type="low_var_kl", loss_agg_mode=agg_mode)
    loss, grad, metrics = run_engine(distill(config), batch)
    rows = torch.tensor(SELECTED)
    mask = batch.mask[rows]
    per_token = kl_penalty(batch.student.detach()[rows], batch.teacher[rows], "low_var_kl")
    expected = agg_loss(per_token, mask, agg_mode, batch_num_tokens=mask.sum(), global_batch_size=int(rows.sum()))
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.all(grad[~rows] == 0) and grad[rows][mask].abs().min() > 0
    assert aggregate(metrics["teacher_log_prob_mean"]) == pytest.approx(batch.teacher[rows][mask].mean().item(), rel=1e-5)


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_the_selected_kl_does_not_depend_on_the_micro_batch_split(micro_batches):
    batch = with_selection(make_batch(seed=5), SELECTED)
    config = selection_config(distill_actor_config, kl_loss_type="k2")
    whole_loss, whole_grad, _ = run_engine(distill(config), batch)
    split_loss, split_grad, _ = run_engine(distill(config), batch, micro_batch_count=micro_batches)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    torch.testing.assert_close(split_grad, whole_grad)


def test_hybrid_keeps_the_policy_gradient_on_every_response():
    plain = with_task_signal(make_batch(seed=6, masked_garbage=False), seed=6)
    selected = with_selection(with_task_signal(make_batch(seed=6, masked_garbage=False), seed=6), SELECTED)
    rl_only = hybrid_config(rl_coef=1.0, distillation_coef=0.0, rollout_n=N)
    _, pg_grad, _ = run_engine(hybrid(rl_only), plain)
    config = selection_config(distill_actor_config, policy_loss=PolicyLossConfig(loss_mode="hybrid"), kl_loss_type="k2")
    _, grad, metrics = run_engine(hybrid(config), selected)
    _, plain_metrics = run_engine(hybrid(hybrid_config(kl_loss_type="k2", rollout_n=N)), plain)[1:]
    rows = torch.tensor(SELECTED)
    assert aggregate(metrics["pg_loss"]) == pytest.approx(aggregate(plain_metrics["pg_loss"]), rel=1e-6)
    # unscored responses: the policy gradient alone; scored ones: policy gradient + KL
    torch.testing.assert_close(grad[~rows], pg_grad[~rows])
    assert (grad[rows] - pg_grad[rows])[selected.mask[rows]].abs().min() > 0
    assert aggregate(metrics["kl_loss"]) != pytest.approx(aggregate(plain_metrics["kl_loss"]))
