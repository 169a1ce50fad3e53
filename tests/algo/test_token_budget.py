"""Micro-batches by a token budget (``algorithm.micro_batch_tokens``): rows sorted by length into
micro-batches of at most a budget of padded tokens, each cut to its own longest prompt and response.

The update must be the one of the padded path (one forward over the whole mini-batch, every row
padded to the longest): the same loss and the same gradients for every loss aggregation, to float32
round-off (the sums over micro-batches and the matrix products of other shapes add in another
order: measured <= 3e-7 of each gradient's largest entry; 1e-5 allowed). Rollouts are scripted
(responses of 2 to 15 tokens) so that both runs train on the very same batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import steer.app
from steer.algo.batching import padded_tokens, token_budget_microbatches
from steer.app import train
from steer.models.loader import cpp_compiler_found
from steer.module import RLVRModule
from tests.conftest import TINY_RUN, compose
from tests.distributed.ddp_driver import ScriptedRollout
from tests.test_module_perf import GradientRecorder

# ---------------------------------------------------------------------------- the partition


def test_micro_batches_sort_rows_by_length_and_stay_within_the_budget():
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 30, (40,), generator=generator)
    responses = torch.randint(0, 200, (40,), generator=generator)
    parts = token_budget_microbatches(prompts, responses, budget=600)
    order = torch.cat(parts)
    assert sorted(order.tolist()) == list(range(40))  # a permutation: every row once
    totals = (prompts + responses.clamp(min=1))[order]
    assert bool((totals[:-1] >= totals[1:]).all())  # longest first
    start = 0
    for index, part in enumerate(parts):
        assert padded_tokens(prompts[part], responses[part]) <= 600 or len(part) == 1
        start += len(part)
        if index + 1 < len(parts):  # greedy: the next row would not have fitted
            grown = torch.cat([part, order[start : start + 1]])
            assert padded_tokens(prompts[grown], responses[grown]) > 600
    padded = padded_tokens(prompts, responses)
    assert sum(padded_tokens(prompts[p], responses[p]) for p in parts) < 0.75 * padded  # the point of it


def test_a_row_longer_than_the_budget_is_a_micro_batch_of_its_own_and_rows_are_capped():
    prompts, responses = torch.tensor([10, 10, 10, 10]), torch.tensor([500, 5, 5, 5])
    assert [p.tolist() for p in token_budget_microbatches(prompts, responses, budget=100)] == [[0], [1, 2, 3]]
    assert [p.tolist() for p in token_budget_microbatches(prompts, responses, 100, max_rows=2)] == [[0], [1, 2], [3]]
    # FSDP ranks run as many forwards as the rank that needs most: the largest micro-batch is halved
    assert [p.tolist() for p in token_budget_microbatches(prompts, responses, 100, count=3)] == [[0], [1], [2, 3]]
    assert len(token_budget_microbatches(prompts, responses, 100, count=4)) == 4
    with pytest.raises(ValueError, match="cannot cut"):
        token_budget_microbatches(prompts, responses, 100, count=5)
    with pytest.raises(ValueError, match="budget"):
        token_budget_microbatches(prompts, responses, 0)


# ---------------------------------------------------------------------------- the update

ONE_STEP = [
    *TINY_RUN,
    "algorithm.steps=1",
    "algorithm.minibatch_prompts=4",  # one mini-batch of 16 rows
    "rollout.max_new_tokens=16",
    "callbacks.entropy_probe=null",
    "callbacks.checkpoint=null",
    "logger=none",
    "eval.every_n_steps=100",  # after the last step: evaluated at step 0 and at the end only
]


def _train(tmp_path, monkeypatch, overrides):
    """One RL step on scripted rollouts; returns (metrics, gradient, forwards as (rows, columns))."""
    build, captured, forwards = steer.app.build_module, {}, []

    def build_scripted(cfg, prompts=None):
        module, info = build(cfg, prompts)
        tokenizer = module.tokenizer
        module.rollout_engine = ScriptedRollout(tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)
        captured["recorder"] = GradientRecorder()
        module.observers.append(captured["recorder"])
        return module, info

    original = RLVRModule.logprobs_and_entropy

    def recorded(self, rollout, rows, width, model=None, **options):
        logprobs, entropy = original(self, rollout, rows, width, model, **options)
        if torch.is_grad_enabled():
            forwards.append((len(rows), int(rollout.prompt_mask[rows].sum(-1).max()) + width))
        return logprobs, entropy

    with monkeypatch.context() as patch:
        patch.setattr(steer.app, "build_module", build_scripted)
        patch.setattr(RLVRModule, "logprobs_and_entropy", recorded)
        metrics = train(compose(overrides, tmp_path))
    return metrics, captured["recorder"].gradients[0], forwards


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("less_padding", [["algorithm.micro_batch_tokens=150"], ["algorithm.pack_sequences=true"],
                                          ["algorithm.micro_batch_tokens=150", "algorithm.pack_sequences=true"],
                                          ["algorithm.pack_sequences=true", "algorithm.share_prompt_prefix=true"]],
                         ids=["token_budget", "packed", "both", "packed_shared"])
def test_less_padding_gives_the_padded_update(tmp_path, monkeypatch, aggregation, less_padding):
    overrides = [*ONE_STEP, f"algorithm.loss_aggregation={aggregation}", "algorithm.grad_clip=0"]
    padded, padded_grad, padded_forwards = _train(tmp_path / "padded", monkeypatch, overrides)
    budget, budget_grad, budget_forwards = _train(tmp_path / "budget", monkeypatch, [*overrides, *less_padding])
    assert len(padded_forwards) == 1
    if "algorithm.micro_batch_tokens=150" in less_padding:  # the budget really split the mini-batch
        assert len(budget_forwards) >= 3
        assert all(rows * columns <= 150 or rows == 1 for rows, columns in budget_forwards)
        assert sum(r * c for r, c in budget_forwards) < padded_forwards[0][0] * padded_forwards[0][1]
    assert padded_grad.abs().max() > 0
    torch.testing.assert_close(budget_grad, padded_grad, rtol=0, atol=1e-5 * float(padded_grad.abs().max()))
    for key in ("actor/policy_loss", "actor/pg_loss", "actor/entropy", "reward/mean"):
        assert budget[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-7), key


@pytest.mark.skipif(not cpp_compiler_found(), reason="torch.compile's CPU kernels need a C++ compiler")
def test_the_compiled_packed_shared_update_gives_the_padded_update(tmp_path, monkeypatch):
    """``model.compile=true`` end to end (the module passes it to every packed + shared forward):
    the same gradient and metrics as the padded update, and the compiled layer pieces ran."""
    import steer.algo.packed_shared as packed_shared

    overrides = [*ONE_STEP, "algorithm.grad_clip=0"]
    padded, padded_grad, _ = _train(tmp_path / "padded", monkeypatch, overrides)
    packed_shared.compiled_layer_pieces.cache_clear()
    compiled, compiled_grad, _ = _train(tmp_path / "compiled", monkeypatch, [
        *overrides, "algorithm.pack_sequences=true", "algorithm.share_prompt_prefix=true", "model.compile=true"])
    assert packed_shared.compiled_layer_pieces.cache_info().misses == 1
    assert padded_grad.abs().max() > 0
    torch.testing.assert_close(compiled_grad, padded_grad, rtol=0, atol=1e-5 * float(padded_grad.abs().max()))
    for key in ("actor/policy_loss", "actor/pg_loss", "actor/entropy", "reward/mean"):
        assert compiled[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-7), key


def test_a_global_selection_follows_the_sorted_rows(tmp_path, monkeypatch):
    """Clip-Cov with ``scope: global`` selects over the whole mini-batch, then hands each micro-batch
    its rows: with the rows sorted by length the same tokens are selected and the update is the same."""
    overrides = [*ONE_STEP, "algorithm.grad_clip=0", "intervention=clip_cov", "intervention.components.clip_cov.scope=global",
                 "intervention.components.clip_cov.ratio=0.1", "intervention.components.clip_cov.omega_low=-1000",
                 "intervention.components.clip_cov.omega_high=1000", "algorithm.minibatch_prompts=2"]
    padded, padded_grad, _ = _train(tmp_path / "padded", monkeypatch, overrides)
    budget, budget_grad, forwards = _train(tmp_path / "budget", monkeypatch, [*overrides, "algorithm.micro_batch_tokens=100"])
    assert len(forwards) > 2
    assert budget["intervention/clip_cov/share_masked"] == pytest.approx(padded["intervention/clip_cov/share_masked"], rel=1e-6)
    assert padded["intervention/clip_cov/share_masked"] > 0
    torch.testing.assert_close(budget_grad, padded_grad, rtol=0, atol=1e-5 * float(padded_grad.abs().max()))


# ---------------------------------------------------------------------------- several ranks


def _ranks_worker(rank: int, world: int, folder: str) -> None:
    """Rank 0 holds long responses (several micro-batches), rank 1 short ones (one): both must run
    as many forwards (FSDP gathers the weights in every one of them)."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        lengths = torch.tensor([0] * 10 + ([40, 38, 35, 30, 33, 36] if rank == 0 else [3, 2, 4, 1, 2, 3]))
        rollout = SimpleNamespace(prompt_mask=torch.ones(16, 10, dtype=torch.bool), response_lengths=lengths)
        module = SimpleNamespace(algorithm=SimpleNamespace(micro_batch_tokens=110, micro_batch_size=None),
                                 data_parallel_size=world, device="cpu")
        rows = torch.arange(10, 16)
        parts = RLVRModule.microbatches(module, rollout, rows)
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps([part.tolist() for part in parts]))
    finally:
        dist.destroy_process_group()


def test_every_rank_makes_as_many_micro_batches_as_the_rank_that_needs_most(tmp_path):
    mp.spawn(_ranks_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    long, short = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    assert len(long) == 3 and len(short) == 3  # alone, the short rank would make one micro-batch of 6 rows
    assert len(token_budget_microbatches(torch.full((6,), 10), torch.tensor([3, 2, 4, 1, 2, 3]), 110)) == 1
    for parts in (long, short):  # positions in the rows asked for
        assert sorted(sum(parts, [])) == list(range(6))
