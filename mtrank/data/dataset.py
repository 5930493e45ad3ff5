"""Samples + histories -> `Batch`: the loader's hot path, and the rank-aware batch sampler.

`HistoryDataset` reads a samples table (one row per impression) and a `UserStore`. At load time
it computes, vectorised, every sample's user row and the flat position range of its history:
the newest ``max_len`` behaviours strictly before the sample's ``ts``. ``dataset[indices]`` then
builds a whole `Batch` for an array of sample indices in one go:

- each history channel is one row-wise gather from a sliding-window view (``(N - L + 1, L)``,
  strides ``(1, 1)`` elements) over the flat, memory-mapped channel: row ``b`` is the contiguous
  slice ``flat[start_b : start_b + L]``, copied with ``torch.index_select`` straight into the
  output tensor; positions at and after ``history_len[b]`` (the user's later behaviours, or the
  next user's) are then zeroed with one mask shared by all channels;
- inside a DataLoader worker the outputs are allocated in one shared-memory block, so handing
  the batch to the main process copies nothing;
- tensors keep the stored dtype (ints int32 when lossless), no per-sample Python.

Request candidates (``features.request_candidates = C > 0``): at load time the samples are
stable-sorted by ``request_id`` (`_request_index`: the (N,) int64 sort order and the sorted ids,
cached as ``.npy`` next to the column cache and memory-mapped like the columns, so workers and DDP
ranks share one copy); a batch then finds each sample's request with two binary searches and
gathers its candidates (itself first, then the request's other rows in table order, ``C`` at most)
from the table, never from the batch.

`ShardedBatchSampler` runs in the main process and yields whole index batches (``np.ndarray``);
give the DataLoader ``batch_size=None`` and ``sampler=<the sampler>`` (`make_loader` does), so
workers take whole batches and never duplicate samples.

Stochastic lengths (training only, `mtrank.data.lengths`): ``dataset[CutBatch(indices, cut_len)]``
keeps only each sample's newest ``cut_len[b]`` behaviours (still left-aligned), and the batch's
padded width shrinks to its longest history rounded up to a multiple of 8 (`padded_width`).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from mtrank.batch import Batch
from mtrank.data.store import ColumnCache, UserStore
from mtrank.spec import FeatureSpec

log = logging.getLogger(__name__)

_ALIGN = 64  # bytes; alignment of each tensor inside a batch's shared block
WIDTH_MULTIPLE = 8  # padded history width of a cut batch: a multiple of this (or max_len)


class CutBatch(NamedTuple):
    """One batch of sample rows with the history length to keep for each (stochastic lengths).

    Attributes:
        indices: (b,) int64 sample rows.
        cut_len: (b,) int64 number of newest behaviours to keep per sample (a history no longer
            than that is kept whole).
    """

    indices: np.ndarray
    cut_len: np.ndarray


def padded_width(longest: int, max_len: int) -> int:
    """History width of a cut batch: ``longest`` rounded up to a multiple of 8, at least 8, at most ``max_len``."""
    rounded = -(-max(int(longest), 1) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    return min(int(max_len), rounded)


class HistoryDataset(Dataset):
    """A samples table joined with its users' time-sliced histories; indexed by arrays of rows.

    Args:
        samples: the samples Parquet file (``user_id``, ``item_id``, ``ts``, item features, labels, ...).
        store: the users' `UserStore`.
        features: the feature spec (``max_len`` is the padded history width ``L``).
        labels: label columns to read (each task's ``TaskSpec.label``); may be empty (predict).
        cache_dir: override of the column cache folder (see `mtrank.data.store`).
        shared_memory: allocate batches in shared memory inside DataLoader workers (default True).

    ``dataset[indices]`` with an int array of sample rows (B,) returns a `Batch` of B samples; an
    int returns a batch of one; a `CutBatch` returns the batch with cut histories (`get_batch`).
    """

    def __init__(
        self,
        samples: str | Path,
        store: UserStore,
        features: FeatureSpec,
        labels: Sequence[str] = (),
        cache_dir: str | Path | None = None,
        shared_memory: bool = True,
    ) -> None:
        self.path = Path(samples)
        self.store = store
        self.features = features
        self.labels = list(labels)
        self.cache_dir = cache_dir
        self.shared_memory = shared_memory
        self.max_len = features.max_len
        self._open_columns()
        rows = store.rows_of(np.asarray(self.user_id))
        ends = store.history_end(rows, np.asarray(self.ts))
        begins = np.asarray(store.offsets)[rows]
        self.history_len = np.minimum(ends - begins, self.max_len).astype(np.int64)
        self.history_start = ends - self.history_len
        self.user_row = rows
        self._windows: dict[str, torch.Tensor | None] = {}
        log.info(
            "%s: %d samples, mean history length %.1f (max_len %d)",
            self.path.name,
            len(self),
            float(self.history_len.mean()) if len(self) else 0.0,
            self.max_len,
        )

    def _open_columns(self) -> None:
        f = self.features
        cache = ColumnCache(self.path, self.cache_dir)
        self.user_id = cache.scalar("user_id", "int")
        self.item_id = cache.scalar("item_id", "int")
        self.ts = cache.scalar("ts", "int64")
        self.item_sparse = {name: cache.scalar(name, "int") for name in f.item_sparse}
        self.item_dense = {name: cache.scalar(name, "float") for name in f.item_dense}
        self.label_columns = {name: cache.scalar(name, "float") for name in self.labels}
        self.extras = {name: cache.scalar(name, "float") for name in f.extra_columns}
        self.treatment = cache.scalar("treatment", "int64") if f.num_treatments > 0 else None
        self.propensity = cache.scalar("propensity", "float") if cache.has("propensity") else None
        self.request_id = cache.scalar("request_id", "int64") if cache.has("request_id") else None
        self._cache = cache
        self._request_order: np.ndarray | None = None
        self._request_sorted: np.ndarray | None = None
        if f.request_candidates > 0:
            if self.request_id is None:
                raise KeyError(
                    f"{self.path}: missing column 'request_id', needed by features.request_candidates = "
                    f"{f.request_candidates} (columns: {cache.column_names})"
                )
            self._request_order, self._request_sorted = _request_index(cache, self.request_id)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("user_id", "item_id", "ts", "item_sparse", "item_dense", "label_columns", "extras"):
            state.pop(key, None)
        for key in ("treatment", "propensity", "request_id", "_cache", "_request_order", "_request_sorted"):
            state.pop(key, None)
        state["_windows"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_columns()

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def column(self, name: str) -> np.ndarray:
        """(num_samples,) a column of the samples table by row (memory-mapped; ints narrowest, floats float32).

        For attaching ids to predictions: ``dataset.column("user_id")[batch.sample_index]``.
        """
        if name in ("ts", "request_id", "treatment"):
            kind = "int64"
        elif name in self.labels or name in self.features.item_dense or name in self.extras or name == "propensity":
            kind = "float"
        else:
            kind = "int"
        return self._cache.scalar(name, kind)

    def __getitem__(self, indices: Any) -> Batch:
        return self.get_batch(indices)

    def get_batch(self, indices: Any, shared: bool | None = None, cut_len: Any = None) -> Batch:
        """The `Batch` of the samples at ``indices`` ((B,) ints).

        Args:
            indices: sample rows, (B,) int array / list / tensor, or one int; or a `CutBatch`
                (its ``cut_len`` is then used).
            shared: allocate the tensors in shared memory; default: inside a DataLoader worker
                (when ``shared_memory``), so passing the batch to the main process copies nothing.
            cut_len: (B,) ints >= 0, optional: keep only the newest ``cut_len[b]`` behaviours of
                sample ``b`` (``history_len[b] = min(full length, cut_len[b])``, left-aligned as
                always) and pad the histories to ``padded_width(max(history_len), max_len)``
                instead of ``max_len``. None: full histories, width ``max_len``.
        """
        if isinstance(indices, CutBatch):
            if cut_len is not None:
                raise ValueError("cut_len given twice: as an argument and inside the CutBatch")
            indices, cut_len = indices
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.ndim != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {idx.shape}")
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"{self.path.name}: sample index out of range [0, {n})")
        idx = np.where(idx < 0, idx + n, idx)
        if shared is None:
            shared = self.shared_memory and get_worker_info() is not None
        B, L = idx.shape[0], self.max_len
        s = self.store
        kept = None
        if cut_len is not None:
            if isinstance(cut_len, torch.Tensor):
                cut_len = cut_len.numpy()
            cut = np.atleast_1d(np.asarray(cut_len, dtype=np.int64))
            if cut.shape != idx.shape:
                raise ValueError(f"cut_len has shape {cut.shape}, indices {idx.shape}")
            if cut.size and cut.min() < 0:
                raise ValueError("cut_len must be >= 0")
            kept = np.minimum(self.history_len[idx], cut)
            L = padded_width(int(kept.max()) if B else 0, self.max_len)

        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            "sample_index": ((B,), np.dtype(np.int64)),
            "user_id": ((B,), self.user_id.dtype),
            "item_id": ((B,), self.item_id.dtype),
            "ts": ((B,), np.dtype(np.int64)),
            "history_len": ((B,), np.dtype(np.int64)),
            "history_item_id": ((B, L), s.item_id.dtype),
            "history_ts": ((B, L), np.dtype(np.int64)),
        }
        specs.update({f"hs.{k}": ((B, L), v.dtype) for k, v in s.history_sparse.items()})
        specs.update({f"hd.{k}": ((B, L), np.dtype(np.float32)) for k in s.history_dense})
        specs.update({f"is.{k}": ((B,), v.dtype) for k, v in self.item_sparse.items()})
        specs.update({f"id.{k}": ((B,), np.dtype(np.float32)) for k in self.item_dense})
        specs.update({f"us.{k}": ((B,), v.dtype) for k, v in s.user_sparse.items()})
        specs.update({f"ud.{k}": ((B,), np.dtype(np.float32)) for k in s.user_dense})
        specs.update({f"lb.{k}": ((B,), np.dtype(np.float32)) for k in self.label_columns})
        specs.update({f"ex.{k}": ((B,), np.dtype(np.float32)) for k in self.extras})
        for key, col in (
            ("treatment", self.treatment),
            ("propensity", self.propensity),
            ("request_id", self.request_id),
        ):
            if col is not None:
                specs[key] = ((B,), col.dtype)
        C = self.features.request_candidates
        if C > 0:
            specs["request_len"] = ((B,), np.dtype(np.int64))
            specs["request_item_id"] = ((B, C), self.item_id.dtype)
            specs.update({f"rs.{k}": ((B, C), v.dtype) for k, v in self.item_sparse.items()})
            specs.update({f"rd.{k}": ((B, C), np.dtype(np.float32)) for k in self.item_dense})
        out = _allocate(specs, shared)
        arr = {k: t.numpy() for k, t in out.items()}

        arr["sample_index"][:] = idx
        lengths = arr["history_len"]
        if kept is None:
            np.take(self.history_len, idx, out=lengths)
            starts = self.history_start[idx]
        else:  # keep the newest `kept` behaviours: the window starts (full length - kept) later
            lengths[:] = kept
            starts = self.history_start[idx] + (self.history_len[idx] - kept)
        rows = self.user_row[idx]
        scalar_sources = {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "ts": self.ts,
            "treatment": self.treatment,
            "propensity": self.propensity,
            "request_id": self.request_id,
        }
        for prefix, group in (("is.", self.item_sparse), ("id.", self.item_dense)):
            scalar_sources.update({prefix + k: v for k, v in group.items()})
        for prefix, group in (("lb.", self.label_columns), ("ex.", self.extras)):
            scalar_sources.update({prefix + k: v for k, v in group.items()})
        for key, col in scalar_sources.items():
            if col is not None:
                np.take(col, idx, out=arr[key])
        for prefix, group in (("us.", s.user_sparse), ("ud.", s.user_dense)):
            for k, v in group.items():
                np.take(v, rows, out=arr[prefix + k])

        if C > 0:
            self._fill_requests(idx, arr, C)

        pad = np.arange(L, dtype=np.int64)[None, :] >= lengths[:, None] if B and lengths.min() < L else None
        channels = {"history_item_id": s.item_id, "history_ts": s.ts}
        channels.update({f"hs.{k}": v for k, v in s.history_sparse.items()})
        channels.update({f"hd.{k}": v for k, v in s.history_dense.items()})
        for key, flat in channels.items():
            self._gather_windows(key, flat, starts, out[key], arr[key], L)
            if pad is not None:
                np.copyto(arr[key], 0, where=pad)

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}

        return Batch(
            sample_index=out["sample_index"],
            user_id=out["user_id"],
            item_id=out["item_id"],
            ts=out["ts"],
            history_len=out["history_len"],
            history_item_id=out["history_item_id"],
            history_ts=out["history_ts"],
            history_sparse=group("hs."),
            history_dense=group("hd."),
            item_sparse=group("is."),
            item_dense=group("id."),
            user_sparse=group("us."),
            user_dense=group("ud."),
            labels=group("lb."),
            treatment=out.get("treatment"),
            propensity=out.get("propensity"),
            request_id=out.get("request_id"),
            extras=group("ex."),
            request_len=out.get("request_len"),
            request_item_id=out.get("request_item_id"),
            request_sparse=group("rs."),
            request_dense=group("rd."),
        )

    def _fill_requests(self, idx: np.ndarray, arr: dict[str, np.ndarray], C: int) -> None:
        """Fill ``request_len`` and the (B, C) request-candidate outputs of ``arr`` for samples ``idx``.

        Row ``b``: position 0 is ``idx[b]``; then the other rows sharing its ``request_id``, in
        table order (the stable sort keeps it), up to ``C`` in all; 0 after ``request_len[b]``.
        """
        order, sorted_ids = self._request_order, self._request_sorted
        if order is None or sorted_ids is None:
            raise RuntimeError(f"{self.path.name}: features.request_candidates was 0 when the dataset was opened")
        B, N = idx.shape[0], order.shape[0]
        rid = arr["request_id"]
        begin = np.searchsorted(sorted_ids, rid, side="left").astype(np.int64, copy=False)
        end = np.searchsorted(sorted_ids, rid, side="right").astype(np.int64, copy=False)
        lengths = arr["request_len"]
        np.minimum(end - begin, C, out=lengths)  # the request holds the sample itself, so >= 1
        members = np.repeat(idx[:, None], C, axis=1)  # (B, C) sample rows; invalid slots stay idx[b]
        if C > 1 and B:
            # the request's first C rows in table order hold at least C - 1 rows other than idx[b]
            positions = begin[:, None] + np.arange(C, dtype=np.int64)[None, :]
            inside = positions < end[:, None]
            rows = np.take(order, np.minimum(positions, N - 1))
            other = inside & (rows != idx[:, None])
            slot = np.cumsum(other, axis=1)  # 1-based slot of each other row
            keep = other & (slot < C)
            members[np.nonzero(keep)[0], slot[keep]] = rows[keep]
        pad = np.arange(C, dtype=np.int64)[None, :] >= lengths[:, None]
        columns = {"request_item_id": self.item_id}
        columns.update({f"rs.{k}": v for k, v in self.item_sparse.items()})
        columns.update({f"rd.{k}": v for k, v in self.item_dense.items()})
        for key, col in columns.items():
            np.take(col, members, out=arr[key])
            np.copyto(arr[key], 0, where=pad)

    def _gather_windows(
        self, key: str, flat: np.ndarray, starts: np.ndarray, out: torch.Tensor, out_np: np.ndarray, width: int
    ) -> None:
        """out[b, :] = flat[starts[b] : starts[b] + width] (positions past the end of ``flat`` read as 0)."""
        L, N = width, flat.shape[0]
        if starts.size == 0:
            return
        windows = self._window_view(key, flat, L)
        tail = starts > N - L
        if windows is not None:
            starts_t = torch.from_numpy(np.minimum(starts, N - L))
            torch.index_select(windows, 0, starts_t, out=out)
        if tail.any():
            if N == 0:
                out_np[tail] = 0
            else:
                positions = starts[tail, None] + np.arange(L, dtype=np.int64)[None, :]
                values = np.take(flat, np.minimum(positions, N - 1))
                values[positions >= N] = 0
                out_np[tail] = values

    def _window_view(self, key: str, flat: np.ndarray, width: int) -> torch.Tensor | None:
        """(N - L + 1, L) overlapping windows (L = ``width``) over ``flat``, sharing its memory (None if N < L)."""
        cache_key = key if width == self.max_len else f"{key}@{width}"
        if cache_key not in self._windows:
            L, N = width, flat.shape[0]
            if N < L:
                self._windows[cache_key] = None
            else:
                with warnings.catch_warnings():  # read-only memory map: we only ever read from it
                    warnings.simplefilter("ignore", UserWarning)
                    base = torch.from_numpy(flat)
                self._windows[cache_key] = base.as_strided((N - L + 1, L), (1, 1))
        return self._windows[cache_key]


def _request_index(cache: ColumnCache, request_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted ids): the stable argsort of ``request_id`` and ``request_id[order]``, both (N,) int64.

    Rows of one request are ``order[lo:hi]`` (table order) where ``sorted ids[lo:hi]`` equal its
    id. Cached as ``request_id.order.npy`` / ``request_id.sorted.npy`` in the column cache folder
    (written to a temporary name and renamed, so concurrent processes race safely) and returned
    memory-mapped; computed in memory when the folder cannot be written.
    """
    n = request_id.shape[0]
    targets = {"order": cache.dir / "request_id.order.npy", "sorted": cache.dir / "request_id.sorted.npy"}
    try:
        loaded = {k: np.load(t, mmap_mode="r") for k, t in targets.items()}
        if all(a.shape == (n,) and a.dtype == np.int64 for a in loaded.values()):
            return loaded["order"], loaded["sorted"]
    except (OSError, ValueError):
        pass
    ids = np.asarray(request_id, dtype=np.int64)
    order = np.argsort(ids, kind="stable").astype(np.int64, copy=False)
    arrays = {"order": order, "sorted": ids[order]}
    del ids
    try:
        cache.dir.mkdir(parents=True, exist_ok=True)
        for key, target in targets.items():
            tmp = target.with_name(f"{target.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex}.npy")
            try:
                np.save(tmp, arrays[key])
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return np.load(targets["order"], mmap_mode="r"), np.load(targets["sorted"], mmap_mode="r")
    except OSError as error:
        log.warning("%s: cannot cache the request index (%s); keeping it in memory", cache.path.name, error)
        return arrays["order"], arrays["sorted"]


def _allocate(specs: dict[str, tuple[tuple[int, ...], np.dtype]], shared: bool) -> dict[str, torch.Tensor]:
    """Empty tensors for ``specs``; with ``shared``, views into one shared-memory block."""
    if not shared:
        return {k: torch.empty(shape, dtype=_torch_dtype(dt)) for k, (shape, dt) in specs.items()}
    layout, total = {}, 0
    for key, (shape, dt) in specs.items():
        total = -(-total // _ALIGN) * _ALIGN
        layout[key] = total
        total += math.prod(shape) * dt.itemsize
    storage = torch.UntypedStorage._new_shared(max(total, 1))
    out = {}
    for key, (shape, dt) in specs.items():
        dtype = _torch_dtype(dt)
        strides = tuple(int(x) for x in np.cumprod((1, *shape[:0:-1]))[::-1]) if shape else ()
        out[key] = torch.empty(0, dtype=dtype).set_(storage, layout[key] // dt.itemsize, shape, strides)
    return out


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dt)).dtype


class ShardedBatchSampler(Sampler[np.ndarray]):
    """Yields this rank's index batches ((b,) int64 arrays) of one epoch; shuffles per (seed, epoch).

    Every epoch the sample rows ``0..num_samples-1`` are permuted (when ``shuffle``) with a
    generator seeded by ``(seed, epoch)`` — identical on every rank — then cut into ``world_size``
    contiguous shards whose sizes differ by at most one. Each rank splits its shard into the same
    number of batches, ``ceil(ceil(num_samples / world_size) / batch_size)``, of near-equal size
    (at most ``batch_size``). So the union over ranks is every sample exactly once, no rank pads
    with duplicates, and every rank runs the same number of steps (DDP never hangs); batch sizes
    differ by a little instead.

    Args:
        num_samples: dataset length.
        batch_size: the largest batch.
        shuffle: permute per epoch (training) or keep table order (evaluation).
        seed: base seed of the permutation.
        rank, world_size: override; default from `torch.distributed` when initialised, else 0 and 1.

    Use with ``DataLoader(dataset, batch_size=None, sampler=sampler)``; Lightning calls `set_epoch`.
    `state_dict` records the epoch and the batches handed out so far in it (with DataLoader
    workers this runs ahead of the training step by the prefetched batches).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self._rank = rank
        self._world_size = world_size
        self.epoch = 0
        self.batches_consumed = 0
        self._resume_from = 0

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def __len__(self) -> int:
        per_rank = -(-self.num_samples // self.world_size)
        return -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        if epoch != self.epoch:
            self._resume_from = 0
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, in order."""
        world, rank = self.world_size, self.rank
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples, dtype=np.int64)
        lo = rank * self.num_samples // world
        hi = (rank + 1) * self.num_samples // world
        return [b.astype(np.int64, copy=False) for b in np.array_split(order[lo:hi], len(self))]

    def __iter__(self):
        start, self._resume_from = self._resume_from, 0
        self.batches_consumed = start
        for batch in self.batches()[start:]:
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_consumed", "seed"}``."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration runs epoch ``state["epoch"]`` from batch ``state["batches_consumed"]``."""
        if "seed" in state and state["seed"] != self.seed:
            log.warning("sampler state has seed %s, this sampler %s; keeping %s", state["seed"], self.seed, self.seed)
        self.epoch = int(state["epoch"])
        self.batches_consumed = self._resume_from = int(state["batches_consumed"])


def _pass_through(batch: Batch) -> Batch:
    return batch


class PrefetchDataLoader(DataLoader):
    """A DataLoader whose single-process batches are built ``prefetch`` ahead by a background thread.

    Building a `Batch` is numpy and torch copies that release the GIL, so one thread overlaps it with
    the training step, without the cost of handing batches between processes (on a 2-core machine
    that hand-off costs more than building the batch: ``scripts/bench_loader.py``). Order and
    content are those of the plain loader. With ``num_workers > 0`` or ``prefetch == 0`` it is a
    plain DataLoader.

    Args:
        prefetch: batches built ahead of the consumer (0: build in the consumer's thread).
        *args, **kwargs: DataLoader's.
    """

    def __init__(self, *args: Any, prefetch: int = 2, **kwargs: Any) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        super().__init__(*args, **kwargs)
        self.prefetch = prefetch

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        if self.num_workers > 0 or self.prefetch == 0:
            return iterator
        return _ThreadPrefetcher(iterator, self.prefetch)


class _ThreadPrefetcher:
    """Iterates ``source`` in a daemon thread, ``depth`` items ahead; re-raises its errors here.

    The thread holds the queue and the stop flag, never this object, so an abandoned iterator
    (``limit_train_batches``, an exception in the step) is collected and its ``__del__`` stops the
    thread instead of leaving it parked on a full queue.
    """

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self._length = len(source) if hasattr(source, "__len__") else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_prefetch, args=(source, self._queue, self._stop), name="mtrank-prefetch", daemon=True
        )
        _LIVE_THREADS[self._thread] = self._stop
        self._thread.start()

    def __iter__(self) -> _ThreadPrefetcher:
        return self

    def __next__(self) -> Any:
        item, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if item is _DONE:
            self.close()
            raise StopIteration
        return item

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("the underlying iterator has no length")
        return self._length

    def close(self) -> None:
        """Stops the thread."""
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


_DONE = object()
#: running prefetch threads -> their stop flags (a thread removes itself when it ends)
_LIVE_THREADS: dict[threading.Thread, threading.Event] = {}


@atexit.register
def stop_prefetch_threads(timeout: float = 10.0) -> int:
    """Stop every running prefetch thread and wait for it (at most ``timeout`` seconds each); returns how many
    were still alive afterwards. Runs at interpreter exit: a daemon thread still building a batch in C++ code
    when Python finalises is torn down mid-call, which aborts the process ("terminate called without an active
    exception", exit code -6) after training has finished, e.g. when ``max_steps`` ends an epoch early."""
    for thread, stop in list(_LIVE_THREADS.items()):
        stop.set()
        thread.join(timeout)
    return sum(thread.is_alive() for thread in list(_LIVE_THREADS))


def _prefetch(source: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
    """Puts ``(item, None)`` for each item of ``source``, then ``(_DONE, error or None)``, until ``stop``."""

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not put((item, None)):
                return
        put((_DONE, None))
    except BaseException as error:  # handed to the consumer, raised there
        put((_DONE, error))
    finally:
        _LIVE_THREADS.pop(threading.current_thread(), None)


def make_loader(
    dataset: HistoryDataset,
    sampler: ShardedBatchSampler,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    prefetch: int = 2,
) -> DataLoader:
    """A DataLoader that takes whole index batches from ``sampler`` and returns `Batch` objects.

    With ``num_workers == 0`` a background thread builds ``prefetch`` batches ahead (`PrefetchDataLoader`).
    """
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        kwargs["prefetch_factor"] = prefetch_factor or 2
    return PrefetchDataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_pass_through,
        pin_memory=pin_memory,
        prefetch=prefetch,
        **kwargs,
    )
