"""Load verl-style RL parquet files (DAPO-Math-17k, AIME, AMC, MATH500, ...) as PromptRecords.

Schema (verl convention): ``prompt`` (chat messages ``[{role, content}]`` or plain text),
``reward_model.ground_truth`` (the reference answer) and ``data_source`` (the benchmark name).
Benchmarks that estimate avg@32 by replicating every row 32 times (AIME24/25, AMC23) collapse to
one record per problem with ``num_copies=32``: the rollout engine samples n per prompt itself.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig

from steer.data.records import PromptRecord
from steer.knobs import ConfigError, number, select

REQUIRED_COLUMNS = ("prompt", "reward_model")

MATH_BENCHMARKS: dict[str, str] = {
    "aime24": "aime24.parquet",
    "aime25": "aime25.parquet",
    "amc23": "amc23.parquet",
    "math500": "math500.parquet",
    "minerva_math": "minerva_math.parquet",
    "olympiadbench": "olympiadbench.parquet",
    "gsm8k": "gsm8k_test.parquet",
    "omni_math": "omni.parquet",
    "dapo_math_17k": "DAPO-Math-17k.parquet",
}
"""Benchmark name -> file name inside a data directory (the STEER repository's ``datasets/``)."""

_HF_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def benchmark_path(name: str, data_dir: str | Path) -> Path:
    """Path of benchmark ``name`` in ``data_dir`` (also looks in ``data_dir/math/``)."""
    if name not in MATH_BENCHMARKS:
        raise ValueError(f"unknown math benchmark {name!r}; valid names: {', '.join(sorted(MATH_BENCHMARKS))}")
    path = Path(data_dir) / MATH_BENCHMARKS[name]
    nested = Path(data_dir) / "math" / MATH_BENCHMARKS[name]
    return nested if not path.exists() and nested.exists() else path


def load_verl_parquet(
    source: str | Path, split: str = "train", limit: int | None = None, dedupe: bool = True
) -> list[PromptRecord]:
    """Read a verl-style dataset into prompt records.

    Args:
        source: a parquet file, a directory of parquet files, a glob (``data/*.parquet``), or a
            Hugging Face dataset id (loaded with ``datasets.load_dataset``; needs the hub).
        split: dataset split, for Hugging Face ids only (local files have no splits).
        limit: keep at most this many records (after de-duplication), in file order.
        dedupe: collapse rows with the same prompt and ground truth into one record whose
            ``num_copies`` counts them; first-seen order is kept.

    Raises:
        FileNotFoundError: a local source that matches no file.
        ValueError: a file lacking ``prompt`` / ``reward_model`` / ``reward_model.ground_truth``.
    """
    paths = local_parquet_files(str(source))
    sources: list[tuple[str, str, Iterable[dict[str, Any]]]]  # (origin for messages, default data_source, rows)
    if paths is not None:
        sources = [(str(path), path.stem, _read_parquet_rows(path)) for path in paths]
    else:
        sources = [(f"{source} [{split}]", str(source), _read_hub_rows(str(source), split))]

    records: list[PromptRecord] = []
    index_by_key: dict[tuple, int] = {}
    for origin, default_source, file_rows in sources:
        for row in file_rows:
            record = _record_from_row(row, origin, default_source)
            key = (_prompt_key(record.prompt), str(record.reference), record.data_source)
            if dedupe and key in index_by_key:
                records[index_by_key[key]].num_copies += 1
                continue
            if limit is not None and len(records) >= limit:
                continue  # keep counting copies of the records already taken
            index_by_key[key] = len(records)
            records.append(record)
    return records


def local_parquet_files(source: str) -> list[Path] | None:
    """Files a local source names, or None if ``source`` looks like a Hugging Face dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files in directory {path}")
        return files
    if glob.has_magic(source):
        files = sorted(Path(match) for match in glob.glob(str(path)))
        if not files:
            raise FileNotFoundError(f"no files match {source}")
        return files
    if source.endswith(".parquet") or source.startswith((".", "/", "~")) or not _HF_ID_RE.fullmatch(source):
        raise FileNotFoundError(f"dataset file not found: {path}")
    return None


def _read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one parquet file with the columns we need, after checking they exist."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    _check_columns(names, str(path))
    columns = [*REQUIRED_COLUMNS, *(["data_source"] if "data_source" in names else [])]
    return pq.read_table(path, columns=columns).to_pylist()


def _read_hub_rows(dataset_id: str, split: str) -> Iterable[dict[str, Any]]:
    """Rows of a Hugging Face dataset (imported lazily: ``datasets`` is an optional extra)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"loading {dataset_id!r} from the hub needs `pip install datasets`") from error
    dataset = datasets.load_dataset(dataset_id, split=split)
    _check_columns(dataset.column_names, f"{dataset_id} [{split}]")
    return iter(dataset)


def _check_columns(names: list[str], origin: str) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in names]
    if missing:
        raise ValueError(f"{origin}: missing column(s) {missing}; found {names}")


def _record_from_row(row: dict[str, Any], origin: str, default_source: str) -> PromptRecord:
    reward_model = row["reward_model"]
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise ValueError(f"{origin}: column 'reward_model' has no field 'ground_truth' (got {reward_model!r})")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        prompt = [{"role": str(message["role"]), "content": str(message["content"])} for message in prompt]
    return PromptRecord(
        prompt=prompt,
        reference=reward_model["ground_truth"],
        data_source=str(row.get("data_source") or default_source),
    )


def _prompt_key(prompt: str | list[dict[str, str]]) -> str | tuple:
    return prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)


def check_verl_parquet_spec(knob: str, spec: DictConfig) -> None:
    limit = select(spec, "limit")
    if limit is not None:
        number(f"{knob}.limit", limit, 1, integer=True, allowed="an integer >= 1, or null for every row")
    source = str(select(spec, "source"))
    hint = " (data_dir, i.e. STEER_DATA_DIR, is the datasets folder)" if "source" in spec else ""
    try:
        files = local_parquet_files(source)
    except FileNotFoundError as error:
        raise ConfigError(f"{knob}.source={source!r}: {error}; allowed: a parquet file, a folder or glob of "
                          f"parquet files, or a Hugging Face dataset id{hint}") from None
    if files is None:
        return  # a Hugging Face dataset id: checked when it is downloaded
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            schema, rows = pq.read_schema(path), pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as error:
            raise ConfigError(f"{knob}.source: {path} is not a readable parquet file ({error})") from None
        missing = [column for column in REQUIRED_COLUMNS if column not in schema.names]
        if missing:
            raise ConfigError(f"{knob}.source: {path} lacks column(s) {missing} (found {schema.names}); "
                              "allowed: verl-style parquet with 'prompt' and 'reward_model.ground_truth'")
        reward_model = schema.field("reward_model").type
        if pa.types.is_struct(reward_model) and reward_model.get_field_index("ground_truth") < 0:
            raise ConfigError(f"{knob}.source: {path} column 'reward_model' has no field 'ground_truth' "
                              f"(found {[f.name for f in reward_model]})")
        if rows == 0:
            raise ConfigError(f"{knob}.source: {path} holds no rows; allowed: a parquet file with at least one prompt")
