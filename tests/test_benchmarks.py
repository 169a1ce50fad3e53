"""Smoke tests of the benchmark scripts in experiments/benchmarks/: they run end to end on today's
code at the smallest size and report positive, consistent numbers (the numbers themselves are the
scripts' job, not the tests')."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCH))

SMALLEST = [
    "model.warmup=null",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "algorithm.n=4",
    "algorithm.prompts_per_step=4",
    "algorithm.minibatch_prompts=2",
    "rollout.max_new_tokens=12",
    "threads=1",
]


def test_bench_step_reports_every_phase_and_rate(tmp_path):
    import bench_step

    out = tmp_path / "step.json"
    bench_step.main(["--warmup", "1", "--steps", "2", "--json", str(out), *SMALLEST])
    result = json.loads(out.read_text())
    assert result["measured_steps"] == 2 and len(result["step_s"]) == 2
    # The module's own phase timers, all present; the measured phases add up to less than the step.
    for phase in ("rollout", "reward", "old_logprobs", "update"):
        assert result["phase_median_s"][phase] > 0, phase
    phases = sum(v for k, v in result["phase_median_s"].items() if k != "other")
    assert 0 < phases <= result["step_median_s"] * 1.05
    assert result["parameters"] > 1000
    # 4 prompts x 4 samples, at most 12 new tokens each.
    assert 0 < result["generated_tokens_per_step"] <= 16 * 12
    assert result["generated_tokens_per_s"] > 0 and result["trained_tokens_per_s"] == pytest.approx(result["generated_tokens_per_s"])
    assert result["peak_rss_mb"] > 50


def test_bench_step_rejects_no_measured_steps():
    import bench_step

    with pytest.raises(ValueError, match="steps >= 1"):
        bench_step.measure(SMALLEST, warmup=0, steps=0)


def test_bench_interventions_quick_covers_presets_and_minibatch_pass(tmp_path):
    import bench_interventions

    out = tmp_path / "interventions.json"
    bench_interventions.main(["--quick", "--presets", "steer", "clip_cov", "--json", str(out), "threads=1"])
    result = json.loads(out.read_text())
    assert result["presets"] == ["grpo", "steer", "clip_cov"]
    for name in result["presets"]:
        assert result["loss_backward_ms_median"][name] > 0
        assert result["step_ms_median"][name] > 0
    assert result["table"]["grpo"]["overhead_ms_per_rl_step"] == 0
    assert result["optimizer_steps_per_rl_step"] == 2  # 4 prompts per step, 2 per mini-batch


def test_bench_interventions_lists_every_preset():
    import bench_interventions

    names = bench_interventions.presets()
    on_disk = {p.stem for p in (REPO / "conf" / "intervention").glob("*.yaml")}
    assert names[0] == "grpo" and set(names) == on_disk and len(names) == len(on_disk)


def test_bench_vs_trl_workload_matches_our_config():
    """The spec handed to the TRL worker: our model settings, our first prompts, the same knobs."""
    import bench_vs_trl

    spec = bench_vs_trl.workload("small", steps=2, threads=1)
    hidden, layers, heads = bench_vs_trl.SIZES["small"]
    assert (spec["tiny"]["hidden_size"], spec["tiny"]["num_layers"], spec["tiny"]["num_heads"]) == (hidden, layers, heads)
    assert len(spec["prompts"]) == len(spec["references"]) == 2 * bench_vs_trl.PROMPTS
    assert all(isinstance(p, str) and p for p in spec["prompts"])
    assert spec["prompts"][0] != spec["prompts"][1]
    assert spec["lr"] > 0 and spec["reward"]["_target_"].endswith("MathReward")


def test_bench_vs_trl_variable_workload_makes_eos_about_one_in_32():
    """The variable workload's policy: only the EOS logit is biased, to ~1/32 per token at random init."""
    import bench_vs_trl
    import torch

    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    spec = bench_vs_trl.workload("small", steps=1, threads=1, workload_name="variable")
    assert spec["new_tokens"] == 128 and spec["eos_probability"] == pytest.approx(1 / 32)
    tokenizer = build_char_tokenizer()
    plain = build_tiny_policy(tokenizer, **spec["tiny"]).eval()
    biased = bench_vs_trl.with_eos_bias(build_tiny_policy(tokenizer, **spec["tiny"]), tokenizer.eos_token_id, 1 / 32).eval()
    ids = torch.randint(5, 90, (16, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p_plain = plain(input_ids=ids).logits.softmax(-1)
        p_biased = biased(input_ids=ids).logits.softmax(-1)
    eos = tokenizer.eos_token_id
    assert float(p_plain[..., eos].mean()) == pytest.approx(1 / 100, rel=0.3)
    assert float(p_biased[..., eos].mean()) == pytest.approx(1 / 32, rel=0.3)
    others = [t for t in range(p_plain.shape[-1]) if t != eos]
    ratio = p_biased[..., others] / p_plain[..., others]  # at each position every other token loses the same factor
    assert float((ratio.std(-1) / ratio.mean(-1)).max()) < 1e-4
    assert biased.get_output_embeddings().weight is biased.get_input_embeddings().weight  # still tied


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".venv-trl" / "bin" / "python").exists(), reason="needs the TRL venv: make bench-trl")
def test_bench_vs_trl_one_pair(tmp_path):
    out = tmp_path / "vs_trl.json"
    command = [sys.executable, str(BENCH / "bench_vs_trl.py"), "--pairs", "1", "--sizes", "small", "--steps", "3",
               "--warmup", "1", "--threads", "1", "--workloads", "variable", "--ours", "default=",
               "--ours", "packed=algorithm.pack_sequences=true",
               "--ours", "packed_shared=algorithm.pack_sequences=true algorithm.share_prompt_prefix=true",
               "--trl-bf16", "--trl-attn", "eager", "--trl-reuse-freed-memory", "--json", str(out)]
    subprocess.run(command, cwd=REPO, check=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    report = json.loads(out.read_text())
    assert report["trl_bf16"] is True and report["trl_attn"] == "eager" and report["trl_reuse_freed_memory"] is True
    summary = report["results"]["variable"]["small"]
    assert summary["runs"]["trl"][0]["malloc_mmap_threshold"] == str(32 << 20)  # the thresholds reached TRL's process
    for name in ("default", "packed", "packed_shared"):
        ours = summary["ours"][name]
        assert ours["parameters"] == summary["parameters"]
        assert ours["ratio_wall"] > 0 and ours["ratio_step"] > 0


def test_profile_summary_counts_only_the_rl_step(tmp_path):
    """profile_step.py's reading of py-spy's collapsed stacks: phases and self time as % of the
    samples inside the module's training_step; Lightning's Strategy.training_step alone is not the step."""
    import profile_step

    raw = tmp_path / "profile.raw"
    step = "run (steer/app.py:1);Strategy.training_step (lightning/strategy.py:3);RLVRModule.training_step (steer/module.py:216)"
    raw.write_text("\n".join([
        f"{step};HFRolloutEngine.generate (steer/rollout/hf.py:76);Linear.forward (torch/linear.py:5) 30",
        f"{step};RLVRModule._accumulate_gradients (steer/module.py:300);backward (torch/__init__.py:1) 50",
        f"{step};RLVRModule._score_without_grad (steer/module.py:450);Linear.forward (torch/linear.py:5) 20",
        "import_module (importlib/__init__.py:1) 400",
        "Strategy.training_step (lightning/strategy.py:3);other (x.py:1) 7",
    ]) + "\n")
    text = profile_step.summarise(raw, top=5)
    assert text.startswith("100 samples inside training_step")
    assert " 30.0%  rollout (generate)" in text and " 50.0%  update: optimiser step" in text and " 20.0%  old_logprobs" in text
    assert " 50.0%  Linear.forward (linear.py)" in text  # self time: 30 + 20 of the 100 step samples


def test_gpu_mfu_counts_flops_from_the_measured_step(tmp_path):
    """gpu_mfu.py at a tiny shape on CPU: the MFU it prints is the FLOP count over the measured time."""
    import gpu_mfu

    assert gpu_mfu.forward_flops_per_token(1000, 2, 8, 10.0) == 2000 + 4 * 2 * 8 * 10
    assert gpu_mfu.default_peak("NVIDIA H200") == 989.0 and gpu_mfu.default_peak("cpu") is None
    small = ["model.compute_dtype=float32", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
             "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=64", "algorithm.prompts_per_step=4",
             "algorithm.minibatch_prompts=2", "algorithm.n=2", "rollout.max_new_tokens=8", "threads=1"]
    out = tmp_path / "mfu.json"
    result = gpu_mfu.main(["--warmup", "1", "--steps", "1", "--peak-tflops", "0.001", "--json", str(out), *small])
    assert json.loads(out.read_text())["update_mfu"] == pytest.approx(result["update_mfu"])
    tokens, rows = result["generated_tokens_per_step"], 8
    n = result["non_embedding_parameters"]
    assert 0 < n < result["parameters"]
    forward = (2 * n + 4 * 1 * 32 * tokens / rows) * tokens
    assert result["update_mfu"] == pytest.approx(3 * forward / result["phase_median_s"]["update"] / 1e9)
    assert 0 < result["step_mfu"] < result["update_mfu"] * 2


def test_gpu_precision_runs_its_three_trainings_at_toy_size_on_cpu(tmp_path):
    """gpu_precision.py --cpu-smoke: the configured steer_math layout moves its float32 weights as far
    as the float32 reference; bfloat16 parameters (check switched off) keep a few percent of it.
    In a subprocess, as a user runs it: its FSDP run sets up a process group (and MASTER_PORT) that
    must not outlive it in the test process."""
    import os

    from tests.conftest import SHARED_DATA

    out = tmp_path / "precision.json"
    env = {**os.environ, "STEER_DATA_DIR": str(SHARED_DATA)}
    run = subprocess.run([sys.executable, str(BENCH / "gpu_precision.py"), "--cpu-smoke", "--steps", "1", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "bfloat16 parameters" in run.stdout  # the printed table
    results = json.loads(out.read_text())
    assert results.keys() == {"configured", "float32", "bfloat16 parameters"}
    configured, reference, bf16 = results["configured"], results["float32"], results["bfloat16 parameters"]
    assert configured["parameter_dtypes"] == ["float32"] and bf16["parameter_dtypes"] == ["bfloat16"]
    assert configured["moved"] > 0.99 and abs(configured["mean_abs_drift"] / reference["mean_abs_drift"] - 1) < 0.1
    assert bf16["moved"] < 0.1 and bf16["mean_abs_drift"] < 0.1 * reference["mean_abs_drift"]
    assert configured["generated_tokens_per_s"] > 0 and configured["trained_tokens_per_s"] > 0
    assert configured["estimated_peak_gib"] > 0 and "peak (estimate)" in configured["estimate"]


def test_count_metric_keys_counts_a_runs_keys_by_namespace(tmp_path):
    """count_metric_keys.py on a store: every metric key of the runs once, the comparison run left out;
    and, trained at the smallest size, the keys a run logs."""
    from mlflow.entities import Metric

    from experiments.benchmarks.count_metric_keys import count_line, metric_keys, train_and_count
    from steer.tracking import RunFolderMLFlowLogger

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    for name, keys in [("a", ["reward/accuracy", "actor/entropy"]), ("b", ["reward/accuracy", "time/step_s"])]:
        logger = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=uri, run_name=name)
        logger.experiment.log_batch(logger.run_id, metrics=[Metric(k, 1.0, 0, 0) for k in keys])
    comparison = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=uri, run_name="comparison")
    comparison.experiment.set_tag(comparison.run_id, "steer.kind", "comparison")
    comparison.experiment.log_metric(comparison.run_id, "table/rows", 3.0)
    keys = metric_keys(tmp_path / "store" / "mlflow.db")
    assert keys == ["actor/entropy", "reward/accuracy", "time/step_s"]
    assert count_line(keys) == "3 metric keys: actor 1, reward 1, time 1"
    trained = train_and_count([*SMALLEST, "eval.every_n_steps=1", "eval.benchmarks.arithmetic.samples_per_prompt=1",
                               "data.task.num_heldout=4", "callbacks.entropy_probe.figures=[]"], steps=1)
    assert {"reward/accuracy", "actor/entropy", "eval/arithmetic/mean_at_1"} <= set(trained) and len(trained) > 50


def test_bench_update_kernels_prints_every_setting(capsys):
    import bench_update_kernels

    bench_update_kernels.main(["--size", "default", "--repeats", "1", "--threads", "1", "--settings", "float32", "bfloat16",
                               "float32+eager"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"float32", "bfloat16", "float32+eager"}
    assert float(rows["float32"][2]) == 0.0  # the reference itself
    assert 0 < float(rows["bfloat16"][2]) < 0.1  # bf16 moves the log-probs, a little
    assert float(rows["float32+eager"][2]) < 1e-4  # another kernel, the same arithmetic up to round-off


def test_bench_update_layouts_counts_less_work_for_each_saving():
    import bench_update_layouts

    # float32: the slots do not depend on the dtype, and bf16 autocast is ~7x slower on a CPU without
    # native bf16 (153 s of this test on an AVX2-only CPU, 16 s in float32).
    results = bench_update_layouts.main(["--shape", "fixed", "paper", "--size", "small", "--rounds", "1", "--threads", "1",
                                          "--float32"])
    for shape, result in results.items():
        slots = result["slots"]
        # Sharing and packing each remove work, and together the most: the prompts once per group, no padding.
        assert slots["packed_shared"] < min(slots["shared"], slots["packed"]) <= max(slots["shared"], slots["packed"]) < slots["padded"], shape
        assert all(seconds > 0 for seconds in result["median_s"].values())


def test_bench_sampling_modes_measures_every_mode(capsys):
    import bench_sampling_modes

    results = bench_sampling_modes.main(["--sizes", "small", "--rounds", "1", "--calls", "1", "--threads", "1",
                                         "--new-tokens", "4"])
    assert set(results["small"]) == {"bf16_autocast", "no_grad", "today", "today_bf16"} and all(v > 0 for v in results["small"].values())
    assert "64 rows x 4 tokens" in capsys.readouterr().out


def test_bench_finished_rows_drops_rows_only_when_asked(capsys):
    import bench_finished_rows

    bench_finished_rows.main(["--repeats", "1", "--fractions", "0", "8"])
    lines = capsys.readouterr().out.splitlines()
    values = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[1:]}
    assert set(values) == set(bench_finished_rows.CASES)
    for case, (_, _, _, rows, _) in bench_finished_rows.CASES.items():
        assert values[case][1] == rows  # F=0: every row in every step
    assert values["variable-large"][3] < 0.5 * 64  # F=8: most steps run a fraction of the rows
