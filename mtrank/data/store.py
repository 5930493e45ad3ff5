"""User history store: the users table as flat, memory-mapped CSR arrays shared by every process.

The users table (``users.parquet``) holds one row per user with list columns sorted by time
(``hist_item_id``, ``hist_ts``, ``hist_<name>``) and scalar static features. `UserStore` turns it
into one flat value array per channel plus one ``offsets`` array (user row ``r`` owns positions
``[offsets[r], offsets[r + 1])``) and memory-maps them, so the operating system's page cache holds
one copy for the main process and all DataLoader workers.

Cache: every column is converted once to an ``.npy`` file under
``<parquet dir>/.mtrank_cache/<file name>.<size>.<mtime_ns>/`` (or ``cache_dir``; or the temp dir
when the data folder is read-only), so a changed source file gets a fresh cache (old cache
folders are not deleted automatically). Files are written to a temporary name and renamed, so concurrent
processes (DDP ranks) can race safely. Integer columns keep the narrowest lossless dtype (int32 when
every value fits, else int64; time columns are always int64), float columns become float32.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrank.spec import FeatureSpec

log = logging.getLogger(__name__)

_READ_ROWS = 65_536  # rows per Parquet record batch while converting
_COPY_CHUNK = 1 << 24  # elements per chunk when narrowing int64 -> int32
_INT32 = np.iinfo(np.int32)


class ColumnCache:
    """Columns of one Parquet file converted once to memory-mapped ``.npy`` files.

    Args:
        path: the Parquet file.
        cache_dir: where the cache lives; default ``<path's folder>/.mtrank_cache``.
    """

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        stat = self.path.stat()
        key = f"{self.path.name}.{stat.st_size}.{stat.st_mtime_ns}"
        if cache_dir is not None:
            root = Path(cache_dir)
        elif os.access(self.path.parent, os.W_OK):
            root = self.path.parent / ".mtrank_cache"
        else:  # read-only data folder: a per-source folder in the temp dir
            root = Path(tempfile.gettempdir()) / "mtrank_cache"
            key = f"{hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:12]}.{key}"
            log.info("%s is read-only; caching columns under %s", self.path.parent, root)
        self.dir = root / key
        self._schema = pq.read_schema(self.path)

    @property
    def column_names(self) -> list[str]:
        """Names of the Parquet file's columns."""
        return list(self._schema.names)

    def has(self, name: str) -> bool:
        """Whether the Parquet file has column ``name``."""
        return name in self._schema.names

    def num_rows(self) -> int:
        """Number of rows of the Parquet file."""
        return pq.ParquetFile(self.path).metadata.num_rows

    def scalar(self, name: str, kind: str) -> np.ndarray:
        """(rows,) read-only memory-mapped array of a scalar column.

        ``kind``: ``int`` (narrowest lossless of int32/int64), ``int64`` or ``float`` (float32).
        """
        target = self.dir / f"{name}.{kind}.npy"
        if not target.exists():
            self._require(name)
            self._convert(name, kind, target, is_list=False)
        return np.load(target, mmap_mode="r")

    def list_column(self, name: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """A list column as ``(values, offsets)``: (total,) values and (rows + 1,) int64 offsets, memory-mapped."""
        values_path = self.dir / f"{name}.{kind}.values.npy"
        offsets_path = self.dir / f"{name}.{kind}.offsets.npy"
        if not (values_path.exists() and offsets_path.exists()):
            self._require(name)
            self._convert(name, kind, values_path, is_list=True, offsets_target=offsets_path)
        return np.load(values_path, mmap_mode="r"), np.load(offsets_path, mmap_mode="r")

    def _require(self, name: str) -> None:
        if name not in self._schema.names:
            raise KeyError(f"{self.path}: missing column {name!r} (columns: {self._schema.names})")

    def _convert(
        self, name: str, kind: str, target: Path, *, is_list: bool, offsets_target: Path | None = None
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
        raw_path = target.with_name(target.name + tag + ".raw")
        lengths: list[np.ndarray] = []
        lo, hi, total = None, None, 0
        is_float = kind == "float"
        raw_dtype = np.float32 if is_float else np.int64
        parquet = pq.ParquetFile(self.path)
        try:
            with open(raw_path, "wb") as raw:
                for record_batch in parquet.iter_batches(batch_size=_READ_ROWS, columns=[name]):
                    column = record_batch.column(0)
                    if column.null_count:
                        raise ValueError(f"{self.path}: column {name!r} has null values")
                    if is_list:
                        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
                            raise TypeError(f"{self.path}: column {name!r} must be a list column, got {column.type}")
                        lengths.append(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64))
                        column = pc.list_flatten(column)
                        if column.null_count:
                            raise ValueError(f"{self.path}: column {name!r} has null list elements")
                    values = _to_numpy(column, raw_dtype, f"{self.path}: column {name!r}")
                    if values.size and not is_float:
                        lo = int(values.min()) if lo is None else min(lo, int(values.min()))
                        hi = int(values.max()) if hi is None else max(hi, int(values.max()))
                    total += values.size
                    raw.write(values.tobytes())
            final_dtype = raw_dtype
            if kind == "int" and (lo is None or (lo >= _INT32.min and hi <= _INT32.max)):
                final_dtype = np.int32
            tmp_target = target.with_name(target.name + tag + ".npy")
            out = np.lib.format.open_memmap(tmp_target, mode="w+", dtype=final_dtype, shape=(total,))
            if total:
                source = np.memmap(raw_path, dtype=raw_dtype, mode="r", shape=(total,))
                for start in range(0, total, _COPY_CHUNK):
                    out[start : start + _COPY_CHUNK] = source[start : start + _COPY_CHUNK]
                del source
            out.flush()
            del out
            if offsets_target is not None:
                offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
                if lengths:
                    np.cumsum(np.concatenate(lengths), out=offsets[1:])
                tmp_offsets = offsets_target.with_name(offsets_target.name + tag + ".npy")
                np.save(tmp_offsets, offsets)
                os.replace(tmp_offsets, offsets_target)
            os.replace(tmp_target, target)
            log.debug("cached %s:%s -> %s (%d values, %s)", self.path.name, name, target, total, final_dtype)
        finally:
            for leftover in self.dir.glob(f"*{tag}*"):
                leftover.unlink(missing_ok=True)


def _to_numpy(array: pa.Array, dtype: type, where: str) -> np.ndarray:
    """A flat Arrow array as a numpy array of ``dtype``; clear error for non-numeric types."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    t = array.type
    if pa.types.is_dictionary(t):
        array = array.dictionary_decode()
        t = array.type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    if not numeric:
        raise TypeError(f"{where}: expected numbers, got {t}")
    if np.issubdtype(dtype, np.integer) and pa.types.is_floating(t):
        raise TypeError(f"{where}: expected integers, got {t}")
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=dtype)


class UserStore:
    """The users table as memory-mapped CSR arrays: one flat array per history channel + offsets.

    Args:
        path: the users Parquet file.
        features: which channels and static features to load (``hist_item_id`` and ``hist_ts``
            always; ``hist_<name>`` for ``history_sparse``/``history_dense``; ``user_sparse``/``user_dense``).
        cache_dir: override of the cache folder (see the module docstring).

    Attributes:
        num_rows: number of users (rows of the table).
        user_ids: (U,) user ids in table order.
        offsets: (U + 1,) int64; user row ``r``'s behaviours are ``[offsets[r], offsets[r + 1])``.
        item_id: (N,) int32/int64 flat behaviour item ids; ``N = offsets[-1]``.
        ts: (N,) int64 flat behaviour times, ascending within each user.
        history_sparse: name -> (N,) int32/int64 flat side channel.
        history_dense: name -> (N,) float32 flat side channel.
        user_sparse: name -> (U,) int static feature by row; user_dense: name -> (U,) float32.

    Pickling keeps only the paths: a worker started with ``spawn`` re-opens the memory maps.
    """

    def __init__(self, path: str | Path, features: FeatureSpec, cache_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.features = features
        self.cache_dir = cache_dir
        self._open()

    def _open(self) -> None:
        cache = ColumnCache(self.path, self.cache_dir)
        f = self.features
        self.user_ids = cache.scalar("user_id", "int")
        self.num_rows = int(self.user_ids.shape[0])
        self.ts, self.offsets = cache.list_column("hist_ts", "int64")
        self.item_id = self._channel(cache, "hist_item_id", "int")
        self.history_sparse = {name: self._channel(cache, f"hist_{name}", "int") for name in f.history_sparse}
        self.history_dense = {name: self._channel(cache, f"hist_{name}", "float") for name in f.history_dense}
        self.user_sparse = {name: cache.scalar(name, "int") for name in f.user_sparse}
        self.user_dense = {name: cache.scalar(name, "float") for name in f.user_dense}
        order = np.argsort(self.user_ids, kind="stable")
        self._sorted_ids = np.asarray(self.user_ids)[order]
        self._sorted_rows = order
        if self.num_rows > 1 and np.any(self._sorted_ids[1:] == self._sorted_ids[:-1]):
            dup = self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]][0]
            raise ValueError(f"{self.path}: column 'user_id': duplicate user_id {dup}")
        log.info("user store %s: %d users, %d behaviours", self.path, self.num_rows, self.num_behaviours)

    def _channel(self, cache: ColumnCache, name: str, kind: str) -> np.ndarray:
        values, offsets = cache.list_column(name, kind)
        if offsets.shape != self.offsets.shape or not np.array_equal(offsets, self.offsets):
            bad = (
                np.nonzero(np.diff(offsets) != np.diff(self.offsets))[0] if offsets.shape == self.offsets.shape else []
            )
            row = int(bad[0]) if len(bad) else 0
            raise ValueError(
                f"{self.path}: column {name!r}: list lengths differ from 'hist_ts' (first at row {row}, "
                f"user_id {int(self.user_ids[row]) if self.num_rows else '?'})"
            )
        return values

    def __getstate__(self) -> dict:
        return {"path": self.path, "features": self.features, "cache_dir": self.cache_dir}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    @property
    def num_behaviours(self) -> int:
        """Total number of behaviours N over all users."""
        return int(self.offsets[-1])

    def rows_of(self, user_ids: np.ndarray) -> np.ndarray:
        """(n,) int64 row of each user id; raises `KeyError` naming the first unknown id."""
        user_ids = np.asarray(user_ids)
        pos = np.searchsorted(self._sorted_ids, user_ids)
        pos_clipped = np.minimum(pos, max(self.num_rows - 1, 0))
        known = (pos < self.num_rows) & (self._sorted_ids[pos_clipped] == user_ids) if self.num_rows else pos < 0
        if not np.all(known):
            first = int(np.nonzero(~known)[0][0])
            raise KeyError(
                f"{self.path}: user_id {int(user_ids[first])} (sample row {first}) is not in the users table; "
                f"{int((~known).sum())} samples have unknown users"
            )
        return self._sorted_rows[pos_clipped].astype(np.int64)

    def history_end(self, rows: np.ndarray, ts: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
        """(n,) int64 flat position one past the last behaviour of user row ``rows[i]`` strictly before ``ts[i]``.

        Vectorised: samples are grouped by user row; for each chunk of users (at most ``chunk``
        behaviours) one composite key ``local_row * K + (t - t_min)`` is searched with
        `np.searchsorted`. When ``K`` would overflow int64 the times are first rank-compressed.
        """
        rows = np.asarray(rows, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        ends = np.empty(rows.shape[0], dtype=np.int64)
        if rows.size == 0:
            return ends
        order = np.argsort(rows, kind="stable")
        rows_sorted = rows[order]
        ts_sorted = ts[order]
        offsets = np.asarray(self.offsets)
        r0 = 0
        while r0 < self.num_rows:
            r1 = int(np.searchsorted(offsets, offsets[r0] + chunk, side="right")) - 1
            r1 = min(max(r1, r0 + 1), self.num_rows)
            s0, s1 = np.searchsorted(rows_sorted, [r0, r1])
            if s1 > s0:
                ends[order[s0:s1]] = self._ends_in_chunk(r0, r1, rows_sorted[s0:s1], ts_sorted[s0:s1])
            r0 = r1
        return ends

    def _ends_in_chunk(self, r0: int, r1: int, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        a, b = int(self.offsets[r0]), int(self.offsets[r1])
        seg = np.asarray(self.ts[a:b], dtype=np.int64)
        local = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(np.asarray(self.offsets[r0 : r1 + 1])))
        if seg.size == 0:
            return np.full(rows.shape[0], a, dtype=np.int64)
        t_min, t_max = int(min(seg.min(), ts.min())), int(max(seg.max(), ts.max()))
        span = t_max - t_min + 1
        if (r1 - r0) * span >= 2**62:  # rank-compress the times so the key fits in int64
            uniq = np.unique(np.concatenate([seg, ts]))
            seg = np.searchsorted(uniq, seg)
            ts = np.searchsorted(uniq, ts)
            t_min, span = 0, len(uniq) + 1
        key = local * span + (seg - t_min)
        if key.size > 1 and np.any(key[1:] < key[:-1]):
            bad = int(np.nonzero(key[1:] < key[:-1])[0][0]) + 1
            row = r0 + int(local[bad])
            raise ValueError(
                f"{self.path}: column 'hist_ts': history of user_id {int(self.user_ids[row])} (row {row}) "
                "is not sorted by time"
            )
        query = (rows - r0) * span + (ts - t_min)
        return a + np.searchsorted(key, query, side="left")
