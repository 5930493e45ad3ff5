"""What the real-data converters share: streaming readers, input checks, id maps and `write_dataset`.

A converter (`mtrank.data.prepare.movielens`, `mtrank.data.prepare.kuairand`) reads its source files
in chunks, maps raw ids to dense ids (`IdMap`) and hands `write_dataset` an iterable of *event*
chunks: one row per behaviour, with columns

- ``user_id``, ``item_id``: dense ids in ``[0, num_users)`` / ``[0, num_items)``;
- ``ts``: int64 seconds (the samples' and histories' time);
- ``order`` (optional): a finer int64 sort key among events of one user in one second (for
  example milliseconds); without it, events of equal ``ts`` keep their input order;
- the layout's history channels, sample columns and sample flag (`Layout`).

Every event is a behaviour in its user's history (the users table holds the whole timeline; the
loader attaches to a sample only the behaviours strictly before its ``ts``, so no history holds
the future), and every event flagged as a sample is also a row of one samples table. The split is
global in time: the first ``train_fraction`` of the samples in time order go to ``train``, the next
``val_fraction`` to ``val``, the rest to ``test``; each cut is a point in time, so all samples of
one second fall on one side (the fractions reached are in the summary).

Memory is bounded by one partition, not by the input: pass 1 streams the chunks into
``ceil(rows / partition_rows)`` Parquet partitions by ``user_id mod P``; pass 2 reads only their
``ts`` columns into a fixed-size histogram to place the cuts (to within 1/2^20 of the time span);
pass 3 loads one partition at a time, sorts it by user and time and appends its users and samples
to the output files. Id maps and per-user static features (one entry per distinct id) are held in
memory.

Output folder: ``users.parquet``, ``train.parquet``, ``val.parquet``, ``test.parquet`` (the
`mtrank.data` format), ``user_ids.parquet`` / ``item_ids.parquet`` (dense id -> raw id), and
``prepare.json`` (the feature spec and task list to put in a config, the cuts, the summary),
written last: its presence means the set is complete.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtrank.spec import FeatureSpec, TaskSpec

log = logging.getLogger(__name__)

CHUNK_ROWS = 1 << 20  # rows per chunk read from a source file
HIST_BINS = 1 << 20  # bins of the time histogram that places the split cuts
SPLITS = ("train", "val", "test")
SUMMARY_FILE = "prepare.json"
PERCENTILES = (5, 25, 50, 75, 95, 99, 100)


class PrepareError(ValueError):
    """The source data cannot be converted; the message names the file, column and row at fault."""


# ----------------------------------------------------------------------------------------------- reading


def iter_chunks(
    path: Path,
    columns: Sequence[str] | None = None,
    *,
    delimiter: str = ",",
    column_names: Sequence[str] | None = None,
    column_types: dict[str, pa.DataType] | None = None,
    encoding: str = "utf8",
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[int, pa.Table]]:
    """Stream a Parquet or delimited text file as (first row, table) chunks of about ``chunk_rows`` rows.

    Parquet is recognised by the ``.parquet`` suffix (any compression); everything else is read as
    text with ``delimiter``: with a header line unless ``column_names`` is given. ``columns``
    selects columns (all when None); a missing one raises `PrepareError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: no such file")
    if ".parquet" in path.name:
        file = pq.ParquetFile(path)
        require_columns(path, file.schema_arrow.names, columns or [])
        base = 0
        for batch in file.iter_batches(batch_size=chunk_rows, columns=list(columns) if columns else None):
            yield base, pa.Table.from_batches([batch])
            base += batch.num_rows
        return
    read = pacsv.ReadOptions(
        column_names=list(column_names) if column_names else None,
        encoding=encoding,
        block_size=max(1 << 20, chunk_rows * 64),
    )
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False)
    convert = pacsv.ConvertOptions(
        include_columns=list(columns) if columns else None, column_types=column_types or None
    )
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, pa.ArrowKeyError) as err:
        names = column_names or _header(path, delimiter, encoding)
        missing = [c for c in columns or [] if c not in names]
        if missing:
            raise PrepareError(f"{path}: missing columns {missing}; columns: {list(names)}") from err
        raise PrepareError(f"{path}: cannot be read as {delimiter!r}-delimited text: {err}") from err
    base = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as err:
            raise PrepareError(f"{path}: unreadable line after row {base}: {err}") from err
        yield base, pa.Table.from_batches([batch])
        base += batch.num_rows


def _header(path: Path, delimiter: str, encoding: str) -> list[str]:
    with open(path, encoding=encoding, errors="replace") as f:
        return f.readline().rstrip("\r\n").split(delimiter)


def require_columns(path: Path, names: Sequence[str], needed: Iterable[str]) -> None:
    """Raise `PrepareError` listing the columns of ``needed`` missing from ``names`` (the file's)."""
    missing = [c for c in needed if c not in names]
    if missing:
        raise PrepareError(f"{path}: missing columns {missing}; columns: {list(names)}")


def column(path: Path, table: pa.Table, name: str, base: int, kind: str = "int") -> np.ndarray:
    """Column ``name`` of a chunk as numpy: ``int`` (int64) or ``float`` (float64), checked.

    Raises `PrepareError` naming the file, column and first offending row (``base`` + row in the
    chunk) for nulls, values of another type, and NaN/inf floats.
    """
    if name not in table.column_names:
        raise PrepareError(f"{path}: missing column {name!r}; columns: {table.column_names}")
    col = table.column(name)
    if col.null_count:
        row = int(np.argmax(np.asarray(col.is_null().to_numpy(zero_copy_only=False))))
        raise PrepareError(f"{path}: column {name!r}: empty value at row {base + row} ({col.null_count} in this chunk)")
    t = col.type
    if kind == "int":
        if pa.types.is_floating(t):
            values = col.to_numpy()
            frac = values != np.floor(values)
            if frac.any():
                row = int(np.argmax(frac))
                raise PrepareError(
                    f"{path}: column {name!r}: expected integers, got {values[row].item()!r} at row {base + row}"
                )
            return values.astype(np.int64)
        if not (pa.types.is_integer(t) or pa.types.is_boolean(t)):
            raise PrepareError(f"{path}: column {name!r}: expected integers, got {t} (value {col[0].as_py()!r})")
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise PrepareError(f"{path}: column {name!r}: expected numbers, got {t} (value {col[0].as_py()!r})")
    values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise PrepareError(f"{path}: column {name!r}: NaN or infinite value at row {base + row}")
    return values


def check_range(path: Path, name: str, values: np.ndarray, base: int, low: float, high: float) -> None:
    """Raise `PrepareError` when a value of column ``name`` lies outside ``[low, high]`` (first offending row)."""
    bad = (values < low) | (values > high)
    if bad.any():
        row = int(np.argmax(bad))
        raise PrepareError(
            f"{path}: column {name!r}: value {values[row].item()!r} at row {base + row} outside [{low}, {high}] "
            f"({int(bad.sum())} rows in this chunk)"
        )


def sorted_unique_ids(path: Path, raw: np.ndarray, name: str, what: str) -> np.ndarray:
    """The stable order that sorts the (V,) ids ``raw`` of a features file (column ``name``, file order).

    An id that appears twice raises `PrepareError` naming both rows; ``what`` names the id in the message.
    """
    order = np.argsort(raw, kind="stable")
    dup = np.flatnonzero(np.diff(raw[order]) == 0)
    if dup.size:
        row, first = int(order[dup[0] + 1]), int(order[dup[0]])
        raise PrepareError(
            f"{path}: column {name!r}: {what} {int(raw[row])} at row {row} also at row {first} "
            f"({what} {int(raw[row])} appears more than once; ids must be unique)"
        )
    return order


class IdMap:
    """Raw ids (any integers) <-> dense ids ``0 .. V-1`` in sorted raw order.

    Args:
        raw: (V,) distinct raw ids, sorted ascending.
        what: the id's name in error messages (``user_id``, ``video_id``).
    """

    def __init__(self, raw: np.ndarray, what: str) -> None:
        self.raw = np.asarray(raw, dtype=np.int64)
        self.what = what
        if self.raw.size and (np.diff(self.raw) <= 0).any():
            raise ValueError("IdMap: raw ids must be distinct and sorted")

    def __len__(self) -> int:
        return int(self.raw.size)

    @classmethod
    def collect(cls, chunks: Iterable[tuple[int, np.ndarray]], what: str) -> IdMap:
        """The distinct raw ids of a stream of (first row, ids) chunks (memory: about the distinct ids).

        Each chunk's distinct ids wait in a list that is merged into the set only when it outgrows it,
        so the cost stays about linear in the rows, not quadratic in the chunks.
        """
        seen = np.zeros(0, dtype=np.int64)
        pending: list[np.ndarray] = []
        size = 0
        for _, ids in chunks:
            pending.append(np.unique(np.asarray(ids, dtype=np.int64)))
            size += pending[-1].size
            if size > max(seen.size, 1 << 20):
                seen, pending, size = np.unique(np.concatenate([seen, *pending])), [], 0
        return cls(np.unique(np.concatenate([seen, *pending])), what)

    def dense(self, raw: np.ndarray, path: Path, base: int, column: str | None = None) -> np.ndarray:
        """(n,) raw ids read from ``path`` (rows from ``base``) -> (n,) dense int64 ids; unknown ids raise."""
        index = np.searchsorted(self.raw, raw)
        known = index < self.raw.size
        known[known] = self.raw[index[known]] == raw[known]
        if not known.all():
            row = int(np.argmin(known))
            raise PrepareError(
                f"{path}: column {column or self.what!r}: {self.what} {int(raw[row])} at row {base + row} is not "
                f"among the {len(self)} known ids ({int((~known).sum())} rows in this chunk)"
            )
        return index.astype(np.int64)

    def write(self, path: Path, dense_name: str, raw_name: str) -> None:
        """Write the map as Parquet: ``dense_name`` (0..V-1) and ``raw_name``."""
        pq.write_table(pa.table({dense_name: np.arange(len(self), dtype=np.int64), raw_name: self.raw}), path)


# ----------------------------------------------------------------------------------------------- writing


@dataclass
class Layout:
    """Where the columns of the event chunks go.

    Args:
        history_sparse: event column -> vocabulary: integer history channels (``hist_<name>`` of the users table).
        history_dense: event columns written as float history channels.
        sample_columns: event columns copied to the samples tables (labels, item features, treatment, ...).
        sample_flag: a boolean event column: only events with it set become samples (None: every event).
    """

    history_sparse: dict[str, int] = field(default_factory=dict)
    history_dense: list[str] = field(default_factory=list)
    sample_columns: list[str] = field(default_factory=list)
    sample_flag: str | None = None

    def event_columns(self, has_order: bool) -> list[str]:
        """The event columns read from the partitions."""
        names = ["user_id", "item_id", "ts", *(["order"] if has_order else [])]
        names += [*self.history_sparse, *self.history_dense, *self.sample_columns]
        names += [self.sample_flag] if self.sample_flag else []
        return list(dict.fromkeys(names))


@dataclass
class Split:
    """Global time split: the earliest ``train`` fraction of samples trains, the next ``val`` validates."""

    train: float = 0.8
    val: float = 0.1

    def __post_init__(self) -> None:
        if not (0 < self.train < 1 and 0 <= self.val < 1 and self.train + self.val < 1):
            raise ValueError(
                f"split: train fraction {self.train} and val fraction {self.val} must be positive with a sum below 1 "
                "(the rest is the test split)"
            )


def write_dataset(
    events: Iterable[pa.Table],
    out: Path,
    *,
    layout: Layout,
    users: pa.Table,
    num_items: int,
    features: FeatureSpec,
    tasks: Sequence[TaskSpec],
    split: Split,
    num_rows: int,
    partition_rows: int = 4_000_000,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the users and samples tables of a stream of events (see the module docstring); return the summary.

    Args:
        events: event chunks (dense ids, ``ts`` in seconds).
        out: the output folder (created; existing output files are replaced).
        layout: which event columns are history channels, sample columns and the sample flag.
        users: one row per dense user id ``0 .. U-1`` in that order: ``user_id`` and the static user features.
        num_items: the item vocabulary.
        features: the feature spec of the result (written to ``prepare.json`` for a config;
            ``max_len`` there is the 95th percentile of sample history lengths rounded up to a power of 2).
        tasks: the task list (positives per binary task and means of regression targets are summarised).
        split: the time split.
        num_rows: about how many events come (sizes the partitions).
        partition_rows: events per partition (bounds memory: about 100 bytes per event and column).
        source: what was read (files, options), copied into ``prepare.json``.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    num_users = users.num_rows
    if users.column_names[0] != "user_id" or not np.array_equal(
        users.column("user_id").to_numpy(), np.arange(num_users)
    ):
        raise ValueError("write_dataset: users must start with user_id 0 .. U-1 in order")
    parts_dir = out / ".partitions"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir()
    num_parts = max(1, math.ceil(num_rows / max(1, partition_rows)))
    try:
        has_order, t_min, t_max = _partition(events, parts_dir, num_parts, layout)
        cuts = _cuts(parts_dir, num_parts, layout, split, t_min, t_max)
        summary = _write_tables(parts_dir, num_parts, out, layout, users, num_items, tasks, cuts, has_order)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    lengths = summary.pop("_lengths")
    pct = _percentiles(lengths)
    summary["history_len_percentiles"] = pct
    spec = asdict(features)
    spec["max_len"] = int(2 ** math.ceil(math.log2(max(8, pct["p95"]))))
    record = {
        "source": source or {},
        "split": {"train_fraction": split.train, "val_fraction": split.val, "cuts_ts": cuts},
        "features": spec,
        "tasks": [asdict(t) for t in tasks],
        "summary": summary,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(record, indent=2))
    return record


def _partition(events: Iterable[pa.Table], parts_dir: Path, num_parts: int, layout: Layout) -> tuple[bool, int, int]:
    """Pass 1: events -> ``num_parts`` Parquet files by ``user_id mod P``; returns (has order, min ts, max ts)."""
    writers: list[pq.ParquetWriter | None] = [None] * num_parts
    schema: pa.Schema | None = None
    t_min, t_max, rows = np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0
    try:
        for chunk in events:
            if schema is None:
                has_order = "order" in chunk.column_names
                names = layout.event_columns(has_order)
                missing = [n for n in names if n not in chunk.column_names]
                if missing:
                    raise ValueError(f"write_dataset: the event chunks lack columns {missing}")
                schema = chunk.select(names).schema
            chunk = chunk.select(schema.names).cast(schema)
            if chunk.num_rows == 0:
                continue
            ts = chunk.column("ts").to_numpy()
            t_min, t_max, rows = min(t_min, int(ts.min())), max(t_max, int(ts.max())), rows + chunk.num_rows
            part = chunk.column("user_id").to_numpy() % num_parts
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(num_parts + 1))
            for p in range(num_parts):
                if bounds[p] == bounds[p + 1]:
                    continue
                if writers[p] is None:
                    writers[p] = pq.ParquetWriter(parts_dir / f"{p}.parquet", schema)
                writers[p].write_table(chunk.take(order[bounds[p] : bounds[p + 1]]))
    finally:
        for w in writers:
            if w is not None:
                w.close()
    if schema is None or rows == 0:
        raise PrepareError("the source holds no events")
    return "order" in schema.names, t_min, t_max


def _cuts(parts_dir: Path, num_parts: int, layout: Layout, split: Split, t_min: int, t_max: int) -> list[int]:
    """Pass 2: [train end, val end] in seconds: samples with ``ts < cut`` are before it."""
    width = max(1, math.ceil((t_max - t_min + 1) / HIST_BINS))
    bins = (t_max - t_min) // width + 1
    counts = np.zeros(bins, dtype=np.int64)
    cols = ["ts", *([layout.sample_flag] if layout.sample_flag else [])]
    for p in range(num_parts):
        path = parts_dir / f"{p}.parquet"
        if not path.exists():
            continue
        table = pq.read_table(path, columns=cols)
        ts = table.column("ts").to_numpy()
        if layout.sample_flag:
            ts = ts[np.asarray(table.column(layout.sample_flag).to_numpy(zero_copy_only=False), dtype=bool)]
        counts += np.bincount((ts - t_min) // width, minlength=bins)
    total = int(counts.sum())
    if total == 0:
        raise PrepareError("the source holds no samples (every event is history only)")
    cum = np.concatenate([[0], np.cumsum(counts)])  # cum[k]: samples before edge k
    edges = t_min + width * np.arange(bins + 1)
    cuts = []
    for fraction in (split.train, split.train + split.val):
        k = int(np.argmin(np.abs(cum - fraction * total)))  # the edge nearest to the wanted fraction
        cuts.append(int(edges[k]))
    return cuts


def _write_tables(
    parts_dir: Path,
    num_parts: int,
    out: Path,
    layout: Layout,
    users: pa.Table,
    num_items: int,
    tasks: Sequence[TaskSpec],
    cuts: list[int],
    has_order: bool,
) -> dict[str, Any]:
    """Pass 3: each partition -> its users' rows and its samples, appended to the output files."""
    num_users = users.num_rows
    user_writer: pq.ParquetWriter | None = None
    sample_writers: dict[str, pq.ParquetWriter] = {}
    stats = {s: _SplitStats(num_users, num_items, tasks) for s in SPLITS}
    lengths = np.zeros(1, dtype=np.int64)
    events = 0
    sample_cols = ["user_id", "item_id", "ts", *[c for c in layout.sample_columns if c not in ("user_id", "item_id")]]
    try:
        for p in range(num_parts):
            path = parts_dir / f"{p}.parquet"
            table = pq.read_table(path) if path.exists() else None
            ids = np.arange(p, num_users, num_parts)
            if table is None or table.num_rows == 0:
                user_rows = _user_rows(users, ids, np.zeros(ids.size + 1, np.int64), None, layout)
            else:
                user = table.column("user_id").to_numpy()
                ts = table.column("ts").to_numpy()
                fine = table.column("order").to_numpy() if has_order else np.arange(table.num_rows)
                order = np.lexsort((fine, ts, user))
                table = table.take(order)
                user, ts = user[order], ts[order]
                events += table.num_rows
                counts = np.bincount(user, minlength=num_users)[ids]
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
                user_rows = _user_rows(users, ids, offsets, table, layout)
                # behaviours strictly before each event: the index of its user's first event of the same second
                # minus the index of its user's first event (events of one second are not before each other)
                key = user.astype(np.int64) * (int(ts.max()) - int(ts.min()) + 2) + (ts - int(ts.min()))
                before = np.searchsorted(key, key, side="left") - np.searchsorted(user, user, side="left")
                flag = (
                    np.asarray(table.column(layout.sample_flag).to_numpy(zero_copy_only=False), dtype=bool)
                    if layout.sample_flag
                    else np.ones(table.num_rows, dtype=bool)
                )
                lengths = _add_counts(lengths, np.bincount(before[flag]))
                which = np.searchsorted(np.asarray(cuts), ts, side="right")  # 0 train, 1 val, 2 test
                for s, name in enumerate(SPLITS):
                    rows = np.flatnonzero(flag & (which == s))
                    if rows.size == 0:
                        continue
                    samples = table.take(rows).select(sample_cols)
                    if name not in sample_writers:
                        sample_writers[name] = pq.ParquetWriter(out / f"{name}.parquet", samples.schema)
                    sample_writers[name].write_table(samples)
                    stats[name].add(samples)
            if user_writer is None:
                user_writer = pq.ParquetWriter(out / "users.parquet", user_rows.schema)
            user_writer.write_table(user_rows.cast(user_writer.schema))
        for name in SPLITS:  # a split without samples still gets a (empty) file with the right columns
            if name not in sample_writers:
                schema = pq.read_schema(parts_dir / f"{_first_part(parts_dir, num_parts)}.parquet")
                empty = schema.empty_table().select(sample_cols)
                sample_writers[name] = pq.ParquetWriter(out / f"{name}.parquet", empty.schema)
                log.warning("the %s split holds no samples", name)
    finally:
        if user_writer is not None:
            user_writer.close()
        for w in sample_writers.values():
            w.close()
    return {
        "users": num_users,
        "items": num_items,
        "events": events,
        "splits": {name: stats[name].summary() for name in SPLITS},
        "_lengths": lengths,
    }


def _first_part(parts_dir: Path, num_parts: int) -> int:
    return next(p for p in range(num_parts) if (parts_dir / f"{p}.parquet").exists())


def _user_rows(
    users: pa.Table, ids: np.ndarray, offsets: np.ndarray, events: pa.Table | None, layout: Layout
) -> pa.Table:
    """The users-table rows of dense users ``ids``: static features and the history list columns."""
    static = users.take(ids)
    off = pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets)
    list_type = pa.list_ if off.type == pa.int32() else pa.large_list

    def lists(name: str, dtype: pa.DataType) -> pa.Array:
        values = events.column(name).combine_chunks().cast(dtype) if events is not None else pa.array([], dtype)
        cls = pa.ListArray if list_type is pa.list_ else pa.LargeListArray
        return cls.from_arrays(off, values)

    cols = {
        "user_id": static.column("user_id"),
        "hist_item_id": lists("item_id", pa.int64()),
        "hist_ts": lists("ts", pa.int64()),
    }
    for name in layout.history_sparse:
        cols[f"hist_{name}"] = lists(name, pa.int64())
    for name in layout.history_dense:
        cols[f"hist_{name}"] = lists(name, pa.float32())
    for name in static.column_names[1:]:
        cols[name] = static.column(name)
    return pa.table(cols)


def _add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(a.size, b.size)
    return np.pad(a, (0, n - a.size)) + np.pad(b, (0, n - b.size))


def _percentiles(counts: np.ndarray) -> dict[str, int]:
    """Percentiles (``p5`` ... ``p100``) of a distribution given as counts per value."""
    total = int(counts.sum())
    if total == 0:
        return {f"p{q}": 0 for q in PERCENTILES}
    cum = np.cumsum(counts)
    return {f"p{q}": int(np.searchsorted(cum, math.ceil(q / 100 * total))) for q in PERCENTILES}


class _SplitStats:
    """Samples, users, items, positives per binary task and mean per regression task of one split."""

    def __init__(self, num_users: int, num_items: int, tasks: Sequence[TaskSpec]) -> None:
        self.users = np.zeros(num_users, dtype=bool)
        self.items = np.zeros(num_items, dtype=bool)
        self.tasks = list(tasks)
        self.samples = 0
        self.sums = {t.name: 0.0 for t in tasks}
        self.ts_range = [None, None]

    def add(self, samples: pa.Table) -> None:
        self.samples += samples.num_rows
        self.users[samples.column("user_id").to_numpy()] = True
        self.items[samples.column("item_id").to_numpy()] = True
        for t in self.tasks:
            self.sums[t.name] += float(np.sum(samples.column(t.label).to_numpy(zero_copy_only=False), dtype=np.float64))
        ts = samples.column("ts").to_numpy()
        lo, hi = self.ts_range
        self.ts_range = [
            int(ts.min()) if lo is None else min(lo, int(ts.min())),
            int(ts.max()) if hi is None else max(hi, int(ts.max())),
        ]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples, "users": int(self.users.sum()), "items": int(self.items.sum())}
        n = max(1, self.samples)
        out["positives"] = {t.name: round(self.sums[t.name]) for t in self.tasks if t.kind == "binary"}
        out["positive_rate"] = {t.name: round(self.sums[t.name] / n, 4) for t in self.tasks if t.kind == "binary"}
        out["mean"] = {t.name: round(self.sums[t.name] / n, 4) for t in self.tasks if t.kind == "regression"}
        out["ts_range"] = self.ts_range
        return out


def format_summary(record: dict[str, Any]) -> str:
    """``prepare.json``'s record as the text the converters print: sizes, splits, positives, history lengths,
    and the ``features:`` block to paste into a config."""
    import yaml

    s = record["summary"]
    lines = [f"users {s['users']:,}, items {s['items']:,}, events {s['events']:,} ({record['seconds']} s)"]
    cuts = record["split"]["cuts_ts"]
    lines.append(f"time cuts (ts, seconds): train < {cuts[0]} <= val < {cuts[1]} <= test")
    for name, split in s["splits"].items():
        pos = ", ".join(f"{k} {v:,} ({split['positive_rate'][k]:.1%})" for k, v in split["positives"].items())
        means = ", ".join(f"{k} mean {v:g}" for k, v in split["mean"].items())
        lines.append(
            f"{name:>5}: {split['samples']:,} samples, {split['users']:,} users, {split['items']:,} items; "
            f"positives: {pos}" + (f"; {means}" if means else "")
        )
    pct = ", ".join(f"{k} {v}" for k, v in s["history_len_percentiles"].items())
    lines.append(f"history length per sample (behaviours before it): {pct}")
    lines.append("features (for a config's model.features):")
    lines.append(yaml.safe_dump({"features": record["features"]}, sort_keys=False).rstrip())
    return "\n".join(lines)
