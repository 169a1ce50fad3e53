"""The evaluation callback: metrics against hand-computed values with scripted responses, one
prompt per replicated record, and what lands in the logger and the JSONL file."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from steer.eval.benchmarks import (
    Benchmark,
    EvaluationCallback,
    answer_extractor,
    evaluate_benchmark,
    summarize,
)
from steer.data.records import PromptRecord
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from steer.rewards.base import RewardOutput
from steer.rewards.math import MathReward
from steer.rollout.base import RolloutBatch, left_pad

torch.set_num_threads(1)

# Three prompts x 4 samples. Correct: A 3/4, B 1/4, C 0/4.
REFERENCES = ["1", "2", "3"]
ANSWERS = [["1", "1", "5", "1"], ["7", "7", "2", None], [None, None, None, None]]


def response(answer: str | None) -> str:
    return "no idea" if answer is None else f"so \\boxed{{{answer}}}"


class ScriptedEngine:
    """Returns the scripted responses of each prompt, in order; records the calls it got."""

    def __init__(self, tokenizer, script: list[list[str]]) -> None:
        self.tokenizer, self.script, self.calls, self.next_prompt = tokenizer, script, [], 0

    def sync_weights(self, policy) -> None:
        pass

    def generate(self, prompt_token_ids, params) -> RolloutBatch:
        self.calls.append((len(prompt_token_ids), params))
        texts = []
        for _ in prompt_token_ids:
            texts += self.script[self.next_prompt][: params.n]
            self.next_prompt += 1
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        responses = [self.tokenizer(text, add_special_tokens=False).input_ids + [eos] for text in texts]
        width = max(map(len, responses))
        response_ids = torch.full((len(responses), width), pad)
        response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
        for row, ids in enumerate(responses):
            response_ids[row, : len(ids)] = torch.tensor(ids)
            response_mask[row, : len(ids)] = True
        prompt_ids, prompt_mask = left_pad([ids for ids in prompt_token_ids for _ in range(params.n)], pad)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask,
                            torch.zeros(response_ids.shape), torch.zeros(len(responses), dtype=torch.bool))


class FakeLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step) -> None:
        self.logged.append((metrics, step))


class FakeModule:
    """What the callback uses of RLVRModule: policy, tokenizer, engine, reward, step, loggers."""

    def __init__(self, script: list[list[str]], reward=None) -> None:
        torch.manual_seed(0)
        self.tokenizer = build_char_tokenizer()
        self.policy = build_tiny_policy(self.tokenizer, hidden_size=16, num_layers=1, num_heads=2).train()
        self.rollout_engine = ScriptedEngine(self.tokenizer, script)
        self.reward = reward or MathReward(num_workers=0)
        self.rl_step = 0
        self.loggers = [FakeLogger()]


def records(copies: int = 1) -> list[PromptRecord]:
    return [PromptRecord(f"Q{i}", reference, num_copies=copies) for i, reference in enumerate(REFERENCES)]


def script() -> list[list[str]]:
    return [[response(answer) for answer in answers] for answers in ANSWERS]


def test_metrics_match_hand_computed_values():
    module = FakeModule(script())
    benchmark = Benchmark("toy", records(), samples_per_prompt=4, pass_at_k=[1, 2, 4, 8], maj_at_k=[1, 4],
                          batch_prompts=2)
    metrics = evaluate_benchmark(module, benchmark, max_prompt_length=64)

    assert metrics["mean_at_4"] == pytest.approx(4 / 12)
    assert metrics["pass_at_1"] == pytest.approx(4 / 12)  # unbiased pass@1 == mean accuracy
    # pass@2 per prompt: 1 - C(n-c, 2) / C(4, 2): A (c=3) 1, B (c=1) 1 - 3/6, C 0.
    assert metrics["pass_at_2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["pass_at_4"] == pytest.approx(2 / 3)
    assert "pass_at_8" not in metrics  # more than the 4 samples: skipped
    # maj@4: A votes "1" (right), B votes "7" (wrong), C has no answer (wrong). maj@1 = first sample.
    assert metrics["maj_at_4"] == pytest.approx(1 / 3)
    assert metrics["maj_at_1"] == pytest.approx(1 / 3)
    for name in ("mean_at_4", "pass_at_2", "maj_at_4"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    assert metrics["pass_at_4_ci_low"] == pytest.approx(0.0) and metrics["pass_at_4_ci_high"] == pytest.approx(1.0)
    assert 0 < metrics["entropy"] < math.log(len(module.tokenizer)) + 1e-4
    assert metrics["prompts"] == 3 and metrics["dropped_prompts"] == 0
    lengths = [len(response(a)) + 1 for answers in ANSWERS for a in answers]  # + EOS
    assert metrics["response_length_mean"] == pytest.approx(np.mean(lengths))
    assert metrics["truncated_rate"] == 0
    assert [calls for calls, _ in module.rollout_engine.calls] == [2, 1]  # batch_prompts=2


def test_summarize_bootstrap_interval_is_deterministic_and_degenerate_for_constant_scores():
    correct = np.array([[True, True], [True, True]])
    metrics = summarize(correct, None, pass_ks=[1], maj_ks=[2])
    assert metrics["mean_at_2"] == metrics["mean_at_2_ci_low"] == metrics["mean_at_2_ci_high"] == 1.0
    assert "maj_at_2" not in metrics  # no answers: maj is skipped
    mixed = np.array([[True, False], [False, False], [True, True]])
    assert summarize(mixed, None, [], []) == summarize(mixed, None, [], [])


def test_replicated_record_is_one_prompt_sampled_k_times():
    """num_copies=4 with samples_per_prompt=null: each record is generated once with n=4."""
    module = FakeModule(script())
    benchmark = Benchmark("replicated", records(copies=4), samples_per_prompt=None)
    metrics = evaluate_benchmark(module, benchmark, max_prompt_length=64)
    ((prompts, params),) = module.rollout_engine.calls
    assert prompts == 3 and params.n == 4
    assert metrics["mean_at_4"] == pytest.approx(4 / 12) and metrics["prompts"] == 3

    mixed = [PromptRecord("a", "1", num_copies=32), PromptRecord("b", "2", num_copies=1)]
    with pytest.raises(ValueError, match="num_copies"):
        evaluate_benchmark(FakeModule(script()), Benchmark("mixed", mixed, samples_per_prompt=None), 64)


def test_reward_without_answer_extraction_skips_majority_vote():
    def first_char_reward(responses, references):
        correct = [r.startswith("s") for r in responses]
        return RewardOutput([float(c) for c in correct], correct)

    assert answer_extractor(first_char_reward) is None
    assert answer_extractor(MathReward(num_workers=0))("a \\boxed{\\dfrac12}") == "\\frac{1}{2}"
    module = FakeModule(script(), reward=first_char_reward)
    metrics = evaluate_benchmark(module, Benchmark("code-like", records(), samples_per_prompt=4), 64)
    assert "pass_at_4" in metrics and not any(key.startswith("maj_at") for key in metrics)


def test_callback_logs_keys_and_writes_jsonl(tmp_path):
    module = FakeModule(script() + script())
    output = tmp_path / "eval_results.jsonl"
    callback = EvaluationCallback([Benchmark("toy", records(), samples_per_prompt=4)], every_n_steps=2,
                                  max_prompt_length=64, output_file=str(output))
    callback.on_train_start(None, module)
    module.rl_step = 1
    callback.on_train_batch_end(None, module, None, None, 0)  # not a multiple of 2: no evaluation
    module.rl_step = 2
    callback.on_train_batch_end(None, module, None, None, 1)
    callback.on_train_end(None, module)  # step 2 already evaluated: nothing new
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(line["step"], line["benchmark"]) for line in lines] == [(0, "toy"), (2, "toy")]
    assert lines[0]["metrics"]["mean_at_4"] == pytest.approx(4 / 12)
    assert lines[0]["extra"]["samples_per_prompt"] == 4 and lines[0]["num_prompts"] == 3
    logged, step = module.loggers[0].logged[0]
    assert step == 0
    for key in ("mean_at_4", "entropy", "pass_at_4", "pass_at_4_ci_low", "pass_at_4_ci_high", "maj_at_4"):
        assert f"eval/toy/{key}" in logged
    assert all("@" not in key and "(" not in key for key in logged)  # MLflow-safe
    assert module.policy.training  # restored after evaluation


def test_all_prompts_too_long_gives_counts_only():
    module = FakeModule(script())
    metrics = evaluate_benchmark(module, Benchmark("long", records(), samples_per_prompt=2), max_prompt_length=1)
    assert metrics == {"prompts": 0.0, "dropped_prompts": 3.0}


def test_diversity_metrics_count_addition_orders_of_correct_samples():
    """The arithmetic order signature through the whole evaluation path, against hand counts."""
    first, other, swapped = "1+2=3, 3+4=7. \\boxed{7}", "2+4=6, 6+1=7. \\boxed{7}", "2+1=3, 3+4=7. \\boxed{7}"
    wrong = "1+2=3, 3+4=8. \\boxed{8}"
    scripted = [[first, first, other, wrong],      # 3 correct, 2 orders
                [swapped, first, other, "\\boxed{7}"],  # 4 correct: 3 orders + the unparsed class
                [wrong, wrong, wrong, wrong]]      # none correct: not in the diversity means
    module = FakeModule(scripted)
    records = [PromptRecord(f"Q{i}", "7") for i in range(3)]
    benchmark = Benchmark("sums", records, samples_per_prompt=4, pass_at_k=[1, 4],
                          diversity="steer.data.arithmetic.order_signature")
    metrics = evaluate_benchmark(module, benchmark, max_prompt_length=64)
    assert metrics["diversity_prompts"] == 2
    assert metrics["distinct_solutions"] == pytest.approx((2 + 4) / 2)
    h_first = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert metrics["solution_entropy"] == pytest.approx((h_first + math.log(4)) / 2)
    assert metrics["unparsed_solution_share"] == pytest.approx((0 + 1 / 4) / 2)
    assert metrics["distinct_solutions_ci_low"] <= 3 <= metrics["distinct_solutions_ci_high"]
    assert metrics["pass_at_4"] == pytest.approx(2 / 3)

    module = FakeModule(scripted)  # the generic signature: distinct response texts (whitespace collapsed)
    metrics = evaluate_benchmark(module, replace(benchmark, diversity="response"), max_prompt_length=64)
    assert metrics["distinct_solutions"] == pytest.approx((2 + 4) / 2)
    module = FakeModule(scripted)
    assert "distinct_solutions" not in evaluate_benchmark(module, replace(benchmark, diversity=None), 64)
    with pytest.raises(ValueError, match="diversity"):
        Benchmark("sums", records, diversity="steer.data.arithmetic.no_such_function")
