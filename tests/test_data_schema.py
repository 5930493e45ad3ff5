"""Schema check: each problem is reported naming the file, the column and a row."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrank.data.schema import SchemaError, check_schema
from mtrank.data.synth import SynthConfig, generate
from mtrank.spec import FeatureSpec, TaskSpec

FEATURES = FeatureSpec(
    num_users=10,
    num_items=50,
    max_len=8,
    history_sparse={"category": 5},
    history_dense=["watch"],
    item_sparse={"category": 5},
    item_dense=["duration"],
    user_sparse={"segment": 3},
    user_dense=["activity"],
    num_treatments=2,
    extra_columns=["true_effect"],
)
TASKS = [TaskSpec("click"), TaskSpec("watch_time", kind="regression")]


def _users() -> dict[str, pa.Array]:
    return {
        "user_id": pa.array([0, 1, 2, 3], pa.int64()),
        "hist_item_id": pa.array([[1, 2, 3], [4], [], [5, 6]], pa.list_(pa.int64())),
        "hist_ts": pa.array([[1, 2, 2], [5], [], [3, 9]], pa.list_(pa.int64())),
        "hist_category": pa.array([[0, 1, 2], [3], [], [4, 4]], pa.list_(pa.int32())),
        "hist_watch": pa.array([[0.5, 1.0, 2.0], [3.0], [], [1.0, 0.0]], pa.list_(pa.float32())),
        "segment": pa.array([0, 1, 2, 0], pa.int32()),
        "activity": pa.array([1.0, 0.5, 2.0, 1.0], pa.float32()),
    }


def _samples() -> dict[str, pa.Array]:
    return {
        "user_id": pa.array([0, 1, 2, 3, 0], pa.int64()),
        "item_id": pa.array([1, 2, 3, 4, 49], pa.int64()),
        "ts": pa.array([3, 6, 7, 10, 11], pa.int64()),
        "category": pa.array([0, 1, 2, 3, 4], pa.int32()),
        "duration": pa.array([10.0, 20.0, 30.0, 5.0, 7.0], pa.float32()),
        "click": pa.array([0, 1, 0, 1, 1], pa.int8()),
        "watch_time": pa.array([1.0, 2.0, 0.0, 3.5, 1.0], pa.float32()),
        "treatment": pa.array([0, 1, 1, 0, 1], pa.int8()),
        "propensity": pa.array([0.5] * 5, pa.float32()),
        "true_effect": pa.array([0.1] * 5, pa.float32()),
    }


def _write(tmp_path: Path, users: dict, samples: dict) -> tuple[Path, Path]:
    up, sp = tmp_path / "users.parquet", tmp_path / "train.parquet"
    pq.write_table(pa.table(users), up)
    pq.write_table(pa.table(samples), sp)
    return up, sp


def _set(table: dict, column: str, row: int, value) -> dict:
    """A copy of ``table`` with one cell replaced (keeps the column's type)."""
    values = table[column].to_pylist()
    values[row] = value
    return {**table, column: pa.array(values, table[column].type)}


def test_valid_data_passes(tmp_path: Path) -> None:
    up, sp = _write(tmp_path, _users(), _samples())
    check_schema(up, [sp], FEATURES, TASKS)


CASES: list[tuple[str, Callable[[dict, dict], tuple[dict, dict]], str, str, int, str]] = [
    # (id, mutate(users, samples) -> (users, samples), file, column, row, what)
    (
        "missing_column",
        lambda u, s: (u, {k: v for k, v in s.items() if k != "duration"}),
        "train",
        "duration",
        0,
        "missing column",
    ),
    (
        "missing_history_channel",
        lambda u, s: ({k: v for k, v in u.items() if k != "hist_watch"}, s),
        "users",
        "hist_watch",
        0,
        "missing column",
    ),
    (
        "string_id",
        lambda u, s: (u, {**s, "item_id": pa.array([str(x) for x in range(5)])}),
        "train",
        "item_id",
        0,
        "wrong type",
    ),
    (
        "history_not_a_list",
        lambda u, s: ({**u, "hist_category": pa.array([0, 1, 2, 3])}, s),
        "users",
        "hist_category",
        0,
        "wrong type",
    ),
    (
        "float_history_ids",
        lambda u, s: ({**u, "hist_item_id": pa.array([[1.0], [2.0], [], [3.0]])}, s),
        "users",
        "hist_item_id",
        0,
        "wrong type",
    ),
    ("nan_label", lambda u, s: (u, _set(s, "watch_time", 3, float("nan"))), "train", "watch_time", 3, "NaN"),
    (
        "inf_label",
        lambda u, s: (u, {**s, "click": pa.array([0.0, 1.0, float("inf"), 1.0, 0.0])}),
        "train",
        "click",
        2,
        "NaN or infinite",
    ),
    ("nan_dense_feature", lambda u, s: (u, _set(s, "duration", 4, float("nan"))), "train", "duration", 4, "NaN"),
    (
        "nan_history_dense",
        lambda u, s: (_set(u, "hist_watch", 3, [1.0, float("nan")]), s),
        "users",
        "hist_watch",
        3,
        "NaN",
    ),
    ("nan_user_dense", lambda u, s: (_set(u, "activity", 1, float("nan")), s), "users", "activity", 1, "NaN"),
    ("negative_item", lambda u, s: (u, _set(s, "item_id", 2, -1)), "train", "item_id", 2, "out of vocabulary"),
    ("item_out_of_vocab", lambda u, s: (u, _set(s, "item_id", 1, 50)), "train", "item_id", 1, "out of vocabulary"),
    ("user_out_of_vocab", lambda u, s: (_set(u, "user_id", 2, 10), s), "users", "user_id", 2, "out of vocabulary"),
    (
        "hist_item_out_of_vocab",
        lambda u, s: (_set(u, "hist_item_id", 3, [5, 500]), s),
        "users",
        "hist_item_id",
        3,
        "out of vocabulary",
    ),
    (
        "hist_side_channel_oov",
        lambda u, s: (_set(u, "hist_category", 1, [7]), s),
        "users",
        "hist_category",
        1,
        "out of vocabulary",
    ),
    ("item_side_feature_oov", lambda u, s: (u, _set(s, "category", 4, 5)), "train", "category", 4, "out of vocabulary"),
    ("user_side_feature_oov", lambda u, s: (_set(u, "segment", 3, 3), s), "users", "segment", 3, "out of vocabulary"),
    ("treatment_oov", lambda u, s: (u, _set(s, "treatment", 1, 2)), "train", "treatment", 1, "out of vocabulary"),
    ("history_unsorted", lambda u, s: (_set(u, "hist_ts", 3, [9, 3]), s), "users", "hist_ts", 3, "not sorted"),
    (
        "history_lengths_differ",
        lambda u, s: (_set(u, "hist_category", 3, [4]), s),
        "users",
        "hist_category",
        3,
        "history length differs",
    ),
    ("unknown_user", lambda u, s: (u, _set(s, "user_id", 4, 9)), "train", "user_id", 4, "not in the users table"),
    ("duplicate_user", lambda u, s: (_set(u, "user_id", 3, 1), s), "users", "user_id", 3, "duplicate user_id"),
    ("binary_label_not_01", lambda u, s: (u, _set(s, "click", 2, 2)), "train", "click", 2, "not in {0, 1}"),
    ("null_label", lambda u, s: (u, _set(s, "click", 1, None)), "train", "click", 1, "null"),
    ("bad_propensity", lambda u, s: (u, _set(s, "propensity", 0, 0.0)), "train", "propensity", 0, "propensity"),
]


@pytest.mark.parametrize(("mutate", "file", "column", "row", "what"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_schema_error_names_file_column_and_row(
    tmp_path: Path, mutate: Callable, file: str, column: str, row: int, what: str
) -> None:
    users, samples = mutate(_users(), _samples())
    up, sp = _write(tmp_path, users, samples)
    with pytest.raises(SchemaError) as info:
        check_schema(up, [sp], FEATURES, TASKS)
    message = str(info.value)
    line = next((x for x in message.splitlines() if f"{file}.parquet: column {column!r}" in x), None)
    assert line is not None, message
    assert what in line, message
    assert re.search(rf"\bat row {row}\b", line), message
    assert isinstance(info.value, ValueError)


def test_all_problems_in_one_error(tmp_path: Path) -> None:
    users = _set(_users(), "hist_ts", 0, [3, 2, 1])
    samples = _set(_set(_samples(), "click", 0, 5), "item_id", 3, 99)
    up, sp = _write(tmp_path, users, samples)
    with pytest.raises(SchemaError, match=r"3 problems") as info:
        check_schema(up, [sp], FEATURES, TASKS)
    assert "users.parquet: column 'hist_ts'" in str(info.value)


def test_large_synthetic_set_checks_fast(tmp_path: Path) -> None:
    import time

    config = SynthConfig(num_users=2000, samples_per_user=300, history_mean=200, seed=1)
    paths = generate(config, tmp_path)
    start = time.perf_counter()
    check_schema(paths["users"], [paths["train"], paths["val"], paths["test"]], config.features(), config.tasks())
    elapsed = time.perf_counter() - start
    rows = sum(pq.ParquetFile(paths[s]).metadata.num_rows for s in ("train", "val", "test"))
    assert rows > 500_000
    assert elapsed < 5.0, f"schema check of {rows} rows took {elapsed:.1f}s"
    assert np.isfinite(elapsed)
