"""Schema check of the users and samples tables against a `FeatureSpec` and a task list.

`check_schema` reads the files in record batches (memory bounded), checks them vectorised
(pyarrow.compute / numpy on flattened lists) and raises one `SchemaError` listing every problem
found; each entry names the file, the column, the first offending row (0-based row of that file)
and how many rows are affected. Checked:

- missing columns; mistyped columns (non-integer id/time columns, non-numeric float columns,
  a history column that is not a list, or a list of the wrong element type); null values;
- ids out of vocabulary or negative: ``user_id < num_users``, ``item_id`` and ``hist_item_id <
  num_items``, every sparse feature / history channel ``< its vocabulary``, ``treatment <
  num_treatments``;
- NaN/inf in labels and dense features (history channels included); binary labels not in {0, 1};
  ``propensity`` outside (0, 1];
- histories not sorted by time; history lists of one user with different lengths across channels;
- duplicate ``user_id`` in the users table; samples whose user is not in the users table;
- ``request_id`` is required (integers) when ``features.request_candidates > 0``, optional otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrank.spec import FeatureSpec, TaskSpec

log = logging.getLogger(__name__)

_BATCH_ROWS = 131_072


class SchemaError(ValueError):
    """The data does not match the feature spec / task list; the message lists every problem."""


@dataclass
class _Problem:
    file: str
    column: str
    what: str
    row: int
    detail: str
    count: int = 1

    def __str__(self) -> str:
        more = f"; {self.count} rows affected" if self.count > 1 else ""
        return f"{self.file}: column {self.column!r}: {self.what} at row {self.row} ({self.detail}){more}"


class _Problems:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str, str], _Problem] = {}

    def add(self, file: str, column: str, what: str, row: int, detail: str, count: int = 1) -> None:
        key = (file, column, what)
        if key in self.items:
            self.items[key].count += count
        else:
            self.items[key] = _Problem(file, column, what, int(row), detail, int(count))


# expected column kinds
_INT, _FLOAT, _INT_LIST, _FLOAT_LIST = "int", "float", "int_list", "float_list"
_KIND_TEXT = {
    _INT: "integers",
    _FLOAT: "numbers",
    _INT_LIST: "lists of integers",
    _FLOAT_LIST: "lists of numbers",
}


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _type_ok(t: pa.DataType, kind: str) -> bool:
    if kind in (_INT_LIST, _FLOAT_LIST):
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            return False
        return _is_int(t.value_type) if kind == _INT_LIST else _is_num(t.value_type)
    return _is_int(t) if kind == _INT else _is_num(t)


def _np(array: pa.Array, dtype: type = np.float64) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=dtype)


def _check_columns(
    path: Path, expected: dict[str, str], problems: _Problems, optional: dict[str, str] | None = None
) -> dict[str, str]:
    """Presence and types; returns the well-typed columns to read (name -> kind)."""
    schema = pq.read_schema(path)
    file = str(path)
    good: dict[str, str] = {}
    first_row = None
    for name, kind in {**expected, **(optional or {})}.items():
        if name not in schema.names:
            if name in expected:
                problems.add(file, name, "missing column", 0, f"expected {_KIND_TEXT[kind]}; columns: {schema.names}")
            continue
        t = schema.field(name).type
        if not _type_ok(t, kind):
            if first_row is None:
                first_row = pq.ParquetFile(path).read_row_group(0) if pq.ParquetFile(path).num_row_groups else None
            sample = first_row.column(name)[0].as_py() if first_row is not None and first_row.num_rows else None
            problems.add(file, name, f"wrong type {t}", 0, f"expected {_KIND_TEXT[kind]}; value {sample!r}")
            continue
        good[name] = kind
    return good


def _check_ids(file: str, name: str, values: np.ndarray, vocab: int, rows: np.ndarray, problems: _Problems) -> None:
    bad = (values < 0) | (values >= vocab)
    if bad.any():
        i = int(np.argmax(bad))
        problems.add(
            file, name, f"id out of vocabulary [0, {vocab})", rows[i], f"value {int(values[i])}", int(bad.sum())
        )


def _check_finite(file: str, name: str, values: np.ndarray, rows: np.ndarray, problems: _Problems) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        problems.add(file, name, "NaN or infinite value", rows[i], f"value {values[i]}", int(bad.sum()))


def _record_batches(
    path: Path, good: dict[str, str], problems: _Problems
) -> Iterator[tuple[int, np.ndarray, list[tuple[str, str, pa.Array]]]]:
    """Per Parquet record batch of ``path``: (first row, (n,) row numbers, [(name, kind, column)]).

    Columns holding nulls are reported to ``problems`` and left out of the list.
    """
    file, base = str(path), 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=list(good)):
        columns = []
        for name, kind in good.items():
            col = batch.column(name)
            if col.null_count:
                i = int(np.argmax(_np(col.is_null(), bool)))
                problems.add(file, name, "null value", base + i, "nulls are not allowed", col.null_count)
            else:
                columns.append((name, kind, col))
        yield base, np.arange(base, base + batch.num_rows), columns
        base += batch.num_rows


def check_schema(
    users: str | Path,
    samples: Sequence[str | Path],
    features: FeatureSpec,
    tasks: Sequence[TaskSpec],
) -> None:
    """Validate the users table and each samples table; raise one `SchemaError` listing all problems.

    Args:
        users: the users Parquet file.
        samples: samples Parquet files (train / val / test / predict).
        features: the feature spec (columns and vocabularies).
        tasks: the task list; each task's ``label`` column must exist in every samples file that
            has labels — pass ``[]`` for unlabelled (predict) files.
    """
    problems = _Problems()
    user_ids = _check_users(Path(users), features, problems)
    for path in samples:
        _check_samples(Path(path), features, tasks, user_ids, problems)
    if problems.items:
        lines = "\n  - ".join(str(p) for p in problems.items.values())
        raise SchemaError(f"schema check failed ({len(problems.items)} problems):\n  - {lines}")
    log.info("schema check passed: %s + %d samples files", Path(users).name, len(samples))


def _check_users(path: Path, f: FeatureSpec, problems: _Problems) -> np.ndarray | None:
    file = str(path)
    if not path.is_file():
        problems.add(file, "-", "file not found", 0, str(path))
        return None
    list_cols = {"hist_item_id": _INT_LIST, "hist_ts": _INT_LIST}
    list_cols.update({f"hist_{n}": _INT_LIST for n in f.history_sparse})
    list_cols.update({f"hist_{n}": _FLOAT_LIST for n in f.history_dense})
    expected = {"user_id": _INT, **list_cols}
    expected.update(dict.fromkeys(f.user_sparse, _INT))
    expected.update(dict.fromkeys(f.user_dense, _FLOAT))
    vocab = {"user_id": f.num_users, "hist_item_id": f.num_items}
    vocab.update({f"hist_{n}": v for n, v in f.history_sparse.items()})
    vocab.update(f.user_sparse)
    good = _check_columns(path, expected, problems)
    if not good:
        return None
    all_ids: list[np.ndarray] = []
    for base, rows, columns in _record_batches(path, good, problems):
        n = len(rows)
        reference_len, reference_name = None, None
        for name, kind, col in columns:
            if kind in (_INT, _FLOAT):
                values = _np(col, np.int64 if kind == _INT else np.float64)
                if name == "user_id":
                    all_ids.append(values)
                if name in vocab:
                    _check_ids(file, name, values, vocab[name], rows, problems)
                elif kind == _FLOAT:
                    _check_finite(file, name, values, rows, problems)
                continue
            lengths = _np(pc.list_value_length(col), np.int64)
            flat = pc.list_flatten(col)
            if flat.null_count:
                i = int(np.argmax(_np(flat.is_null(), bool)))
                row = base + int(np.searchsorted(np.cumsum(lengths), i, side="right"))
                problems.add(file, name, "null list element", row, "nulls are not allowed", flat.null_count)
                continue
            if reference_len is None:
                reference_len, reference_name = lengths, name
            elif not np.array_equal(lengths, reference_len):
                i = int(np.argmax(lengths != reference_len))
                problems.add(
                    file,
                    name,
                    f"history length differs from {reference_name!r}",
                    base + i,
                    f"{lengths[i]} vs {reference_len[i]} behaviours",
                    int((lengths != reference_len).sum()),
                )
            flat_rows = base + np.repeat(np.arange(n), lengths)
            values = _np(flat, np.int64 if kind == _INT_LIST else np.float64)
            if name in vocab:
                _check_ids(file, name, values, vocab[name], flat_rows, problems)
            elif kind == _FLOAT_LIST:
                _check_finite(file, name, values, flat_rows, problems)
            if name == "hist_ts" and values.size > 1:
                starts = np.zeros(values.size, dtype=bool)
                starts[np.cumsum(lengths)[:-1][lengths[1:] > 0]] = True
                bad = (values[1:] < values[:-1]) & ~starts[1:]
                if bad.any():
                    i = int(np.argmax(bad)) + 1
                    problems.add(
                        file,
                        name,
                        "history not sorted by time",
                        flat_rows[i],
                        f"{values[i]} after {values[i - 1]}",
                        int(np.unique(flat_rows[1:][bad]).size),
                    )
    if "user_id" not in good:
        return None
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup = np.nonzero(sorted_ids[1:] == sorted_ids[:-1])[0]
    if dup.size:
        row = int(order[dup[0] + 1])
        first = int(order[dup[0]])
        problems.add(file, "user_id", "duplicate user_id", row, f"value {ids[row]} also at row {first}", int(dup.size))
    return np.unique(ids)


def _check_samples(
    path: Path, f: FeatureSpec, tasks: Sequence[TaskSpec], user_ids: np.ndarray | None, problems: _Problems
) -> None:
    file = str(path)
    if not path.is_file():
        problems.add(file, "-", "file not found", 0, str(path))
        return
    expected = {"user_id": _INT, "item_id": _INT, "ts": _INT}
    expected.update(dict.fromkeys(f.item_sparse, _INT))
    expected.update(dict.fromkeys(f.item_dense, _FLOAT))
    expected.update({t.label: _FLOAT for t in tasks})
    expected.update(dict.fromkeys(f.extra_columns, _FLOAT))
    if f.num_treatments > 0:
        expected["treatment"] = _INT
    optional = {"propensity": _FLOAT}
    if f.request_candidates > 0:
        expected["request_id"] = _INT
        names = pq.read_schema(path).names
        if "request_id" not in names:  # reported here so the message says why it is required
            del expected["request_id"]
            problems.add(
                file,
                "request_id",
                "missing column",
                0,
                f"expected integers: features.request_candidates = {f.request_candidates} needs every "
                f"sample's request id; columns: {names}",
            )
    else:
        optional["request_id"] = _INT
    good = _check_columns(path, expected, problems, optional)
    vocab = {"user_id": f.num_users, "item_id": f.num_items, **f.item_sparse}
    if f.num_treatments > 0:
        vocab["treatment"] = f.num_treatments
    binary = {t.label for t in tasks if t.kind == "binary"}
    labels = {t.label for t in tasks}
    finite = labels | set(f.item_dense) | {"propensity"}
    for base, rows, columns in _record_batches(path, good, problems):
        for name, kind, col in columns:
            values = _np(col, np.int64 if kind == _INT else np.float64)
            if name in vocab:
                _check_ids(file, name, values, vocab[name], rows, problems)
            if name in finite:
                _check_finite(file, name, values, rows, problems)
            if name in binary:
                bad = np.isfinite(values) & (values != 0) & (values != 1)
                if bad.any():
                    i = int(np.argmax(bad))
                    problems.add(
                        file, name, "binary label not in {0, 1}", base + i, f"value {values[i]}", int(bad.sum())
                    )
            if name == "propensity":
                bad = np.isfinite(values) & ((values <= 0) | (values > 1))
                if bad.any():
                    i = int(np.argmax(bad))
                    problems.add(file, name, "propensity not in (0, 1]", base + i, f"value {values[i]}", int(bad.sum()))
            if name == "user_id" and user_ids is not None:
                unknown = ~np.isin(values, user_ids)
                if unknown.any():
                    i = int(np.argmax(unknown))
                    problems.add(
                        file,
                        name,
                        "user not in the users table",
                        base + i,
                        f"user_id {values[i]}",
                        int(unknown.sum()),
                    )
