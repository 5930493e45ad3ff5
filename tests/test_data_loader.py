"""The loader's hot path: leak-free time-sliced histories, sharding, workers, dtypes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtrank.batch import Batch
from mtrank.data.dataset import HistoryDataset, ShardedBatchSampler, make_loader
from mtrank.data.store import UserStore
from mtrank.spec import FeatureSpec


def _reference(users: pa.Table, samples: pa.Table, max_len: int) -> dict[str, list[np.ndarray]]:
    """Brute force: per sample, each channel's newest ``max_len`` behaviours strictly before ts."""
    by_user = {}
    cols = [c for c in users.column_names if c.startswith("hist_")]
    py = users.to_pydict()
    for r, uid in enumerate(py["user_id"]):
        by_user[uid] = {c: np.asarray(py[c][r]) for c in cols}
    out: dict[str, list[np.ndarray]] = {c: [] for c in cols}
    for uid, ts in zip(samples.column("user_id").to_pylist(), samples.column("ts").to_pylist(), strict=True):
        h = by_user[uid]
        keep = np.nonzero(h["hist_ts"] < ts)[0][-max_len:]
        for c in cols:
            out[c].append(h[c][keep])
    return out


def _assert_matches(batch: Batch, ref: dict[str, list[np.ndarray]], rows: np.ndarray) -> None:
    channels = {"hist_item_id": batch.history_item_id, "hist_ts": batch.history_ts}
    channels.update({f"hist_{k}": v for k, v in batch.history_sparse.items()})
    channels.update({f"hist_{k}": v for k, v in batch.history_dense.items()})
    lengths = batch.history_len.numpy()
    for name, tensor in channels.items():
        values = tensor.numpy()
        for b, row in enumerate(rows):
            expected = ref[name][row]
            assert lengths[b] == len(expected), (name, row)
            np.testing.assert_array_equal(values[b, : lengths[b]], expected.astype(values.dtype), err_msg=name)
            assert not values[b, lengths[b] :].any(), f"{name}: padding of sample {row} is not zero"
    valid = batch.history_mask()
    assert bool((batch.history_ts < batch.ts[:, None])[valid].all()), "history at or after the sample's ts"


@pytest.mark.parametrize("max_len", [8, 32, 1000])
def test_every_sample_history_is_strictly_before_and_newest(small_synth, max_len: int) -> None:
    config, paths = small_synth
    features = config.features()
    features.max_len = max_len
    store = UserStore(paths["users"], features)
    ds = HistoryDataset(paths["val"], store, features, ["click", "watch_time"])
    ref = _reference(pq.read_table(paths["users"]), pq.read_table(paths["val"]), max_len)
    rows = np.arange(len(ds))
    batch = ds[rows]
    assert batch.history_item_id.shape == (len(ds), max_len)
    _assert_matches(batch, ref, rows)
    if max_len == 8:
        assert (batch.history_len == 8).float().mean() > 0.9  # truncation exercised
    if max_len == 1000:
        assert (batch.history_len < 1000).all()  # padding exercised everywhere


def test_batch_dtypes_and_fields(small_synth) -> None:
    config, paths = small_synth
    features = config.features()
    store = UserStore(paths["users"], features)
    labels = [t.label for t in config.tasks()]
    ds = HistoryDataset(paths["train"], store, features, labels)
    batch = ds[np.array([5, 0, 17, 3])]
    assert batch.sample_index.tolist() == [5, 0, 17, 3]
    assert batch.sample_index.dtype == torch.int64
    assert batch.user_id.dtype == torch.int32 and batch.item_id.dtype == torch.int32  # narrowest lossless
    assert batch.history_item_id.dtype == torch.int32
    assert batch.ts.dtype == torch.int64 and batch.history_ts.dtype == torch.int64
    assert batch.history_len.dtype == torch.int64
    assert set(batch.labels) == set(labels)
    assert all(v.dtype == torch.float32 for v in batch.labels.values())
    assert batch.history_dense["watch"].dtype == torch.float32
    assert set(batch.item_sparse) == {"category"} and set(batch.item_dense) == {"duration"}
    assert set(batch.user_sparse) == {"segment"} and set(batch.user_dense) == {"activity"}
    assert batch.treatment is not None and batch.treatment.dtype == torch.int64
    assert batch.propensity is not None and batch.request_id is not None
    assert set(batch.extras) == {"true_effect"}
    table = pq.read_table(paths["train"]).take([5, 0, 17, 3])
    np.testing.assert_array_equal(batch.user_id.numpy(), table.column("user_id").to_numpy())
    np.testing.assert_array_equal(batch.labels["click"].numpy(), table.column("click").to_numpy())
    np.testing.assert_array_equal(ds.column("request_id")[[5, 0, 17, 3]], table.column("request_id").to_numpy())
    users = pq.read_table(paths["users"])
    segment = dict(zip(users.column("user_id").to_pylist(), users.column("segment").to_pylist(), strict=True))
    assert batch.user_sparse["segment"].tolist() == [segment[u] for u in batch.user_id.tolist()]
    empty = ds[np.zeros(0, dtype=np.int64)]
    assert empty.batch_size == 0 and empty.history_item_id.shape == (0, features.max_len)
    one = ds[7]
    assert one.batch_size == 1 and one.sample_index.tolist() == [7]


def test_shared_memory_batches_and_pickling_match(small_synth) -> None:
    config, paths = small_synth
    features = config.features()
    ds = HistoryDataset(paths["test"], UserStore(paths["users"], features), features, ["click"])
    idx = np.random.default_rng(0).permutation(len(ds))[:50]
    plain, shared = ds.get_batch(idx, shared=False), ds.get_batch(idx, shared=True)
    assert shared.history_item_id.is_shared()
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets: re-opened memory maps
    for other in (shared, clone[idx]):
        for a, b in zip(_tensors(plain), _tensors(other), strict=True):
            assert torch.equal(a, b)


def _tensors(batch: Batch) -> list[torch.Tensor]:
    out = []
    for value in vars(batch).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            out.extend(value[k] for k in sorted(value))
    return out


def _write_tables(tmp_path: Path, users: dict, samples: dict) -> tuple[Path, Path]:
    up, sp = tmp_path / "users.parquet", tmp_path / "samples.parquet"
    pq.write_table(pa.table(users), up)
    pq.write_table(pa.table(samples), sp)
    return up, sp


def test_edge_cases_ties_empty_unsorted_users_and_wide_ids(tmp_path: Path) -> None:
    big = 2**40  # forces int64 item ids
    users = {
        "user_id": pa.array([900, 5, 77], pa.int64()),  # not sorted, sparse ids
        "hist_item_id": pa.array([[1, big, 3], [], [4, 5, 6, 7]], pa.list_(pa.int64())),
        "hist_ts": pa.array([[10, 20, 20], [], [1, 2, 3, 4]], pa.list_(pa.int64())),
    }
    samples = {
        "user_id": pa.array([900, 900, 900, 5, 77, 77, 77], pa.int64()),
        "item_id": pa.array([1, 2, 3, 4, 5, 6, 7], pa.int64()),
        "ts": pa.array([20, 21, 5, 100, 4, 100, 1], pa.int64()),
    }
    up, sp = _write_tables(tmp_path, users, samples)
    features = FeatureSpec(num_users=1000, num_items=big + 1, max_len=3)
    ds = HistoryDataset(sp, UserStore(up, features), features)
    batch = ds[np.arange(7)]
    assert batch.history_item_id.dtype == torch.int64
    assert batch.history_len.tolist() == [1, 3, 0, 0, 3, 3, 0]
    expected = [[1, 0, 0], [1, big, 3], [0, 0, 0], [0, 0, 0], [4, 5, 6], [5, 6, 7], [0, 0, 0]]
    assert batch.history_item_id.tolist() == expected  # ts == sample ts is excluded (ties at 20)
    assert batch.history_ts.tolist()[1] == [10, 20, 20]


def test_history_end_chunking_and_huge_time_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n_users, per = 50, 20
    base = np.sort(rng.integers(0, 2**62, (n_users, per)), axis=1)  # huge range: key overflow -> rank compression
    users = {
        "user_id": pa.array(np.arange(n_users)),
        "hist_item_id": pa.array(list(rng.integers(0, 10, (n_users, per))), pa.list_(pa.int64())),
        "hist_ts": pa.array(list(base), pa.list_(pa.int64())),
    }
    s_users = rng.integers(0, n_users, 300)
    s_ts = np.where(rng.random(300) < 0.5, base[s_users, rng.integers(0, per, 300)], rng.integers(0, 2**62, 300))
    samples = {"user_id": pa.array(s_users), "item_id": pa.array(np.zeros(300, np.int64)), "ts": pa.array(s_ts)}
    up, _ = _write_tables(tmp_path, users, samples)
    store = UserStore(up, FeatureSpec(num_users=n_users, num_items=10))
    rows = store.rows_of(s_users)
    expected = np.array(
        [u * per + np.searchsorted(base[u], t, side="left") for u, t in zip(s_users, s_ts, strict=True)]
    )
    np.testing.assert_array_equal(store.history_end(rows, s_ts), expected)
    np.testing.assert_array_equal(store.history_end(rows, s_ts, chunk=7), expected)
    with pytest.raises(KeyError, match="user_id 12345"):
        store.rows_of(np.array([1, 12345]))


def _epoch_batches(n: int, bs: int, world: int, epoch: int, seed: int = 0, shuffle: bool = True) -> list[list]:
    out = []
    for rank in range(world):
        sampler = ShardedBatchSampler(n, bs, shuffle=shuffle, seed=seed, rank=rank, world_size=world)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 100, 1001])
@pytest.mark.parametrize("bs", [1, 16, 512])
def test_sampler_covers_every_sample_once_with_equal_batch_counts(world: int, n: int, bs: int) -> None:
    for shuffle in (True, False):
        per_rank = _epoch_batches(n, bs, world, epoch=1, shuffle=shuffle)
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1, f"ranks have different batch counts {counts}"
        assert counts.pop() == len(ShardedBatchSampler(n, bs, rank=0, world_size=world))
        everything = np.concatenate([b for batches in per_rank for b in batches])
        assert sorted(everything.tolist()) == list(range(n))
        sizes = [len(b) for batches in per_rank for b in batches]
        assert max(sizes) <= bs
        if n >= world * bs:
            assert min(sizes) >= bs // 2  # near-equal, no tiny stragglers


def test_sampler_deterministic_per_epoch_and_resumable() -> None:
    a = _epoch_batches(1000, 64, 2, epoch=3, seed=7)
    b = _epoch_batches(1000, 64, 2, epoch=3, seed=7)
    c = _epoch_batches(1000, 64, 2, epoch=4, seed=7)
    flat = [np.concatenate(x[0]) for x in (a, b, c)]
    assert np.array_equal(flat[0], flat[1]) and not np.array_equal(flat[0], flat[2])
    assert not np.array_equal(np.concatenate(_epoch_batches(1000, 64, 2, epoch=3, seed=8)[0]), flat[0])

    sampler = ShardedBatchSampler(1000, 64, shuffle=True, seed=7, rank=1, world_size=2)
    sampler.set_epoch(3)
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["batches_consumed"] == 3
    resumed = ShardedBatchSampler(1000, 64, shuffle=True, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    full = a[1]
    assert all(np.array_equal(x, y) for x, y in zip(first + rest, full, strict=True))
    assert len(list(resumed)) == len(full)  # the next epoch starts from the beginning again


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dataloader_workers_yield_every_sample_once(small_synth, world: int) -> None:
    config, paths = small_synth
    features = config.features()
    ds = HistoryDataset(paths["val"], UserStore(paths["users"], features), features, ["click"])
    seen, counts = [], set()
    for rank in range(world):
        sampler = ShardedBatchSampler(len(ds), 97, shuffle=True, seed=1, rank=rank, world_size=world)
        workers = 2 if rank == 0 else rank - 1  # several worker counts: 2, 0, 1
        loader = make_loader(ds, sampler, num_workers=workers, persistent_workers=False)
        batches = list(loader)
        counts.add(len(batches))
        for batch in batches:
            assert isinstance(batch, Batch)
            seen.append(batch.sample_index.numpy())
            lengths = batch.history_len
            assert bool((batch.history_item_id[batch.history_mask().logical_not()] == 0).all())
            assert int(lengths.max()) <= features.max_len
    assert len(counts) == 1
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(ds)))


def test_cache_follows_source_file_changes(tmp_path: Path) -> None:
    users = {
        "user_id": pa.array([0, 1]),
        "hist_item_id": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
        "hist_ts": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
    }
    samples = {"user_id": pa.array([0]), "item_id": pa.array([0]), "ts": pa.array([9])}
    up, _ = _write_tables(tmp_path, users, samples)
    features = FeatureSpec(num_users=2, num_items=10)
    assert UserStore(up, features).item_id.tolist() == [1, 2, 3]
    cache_dirs = list((tmp_path / ".mtrank_cache").iterdir())
    assert len(cache_dirs) == 1 and any(p.suffix == ".npy" for p in cache_dirs[0].iterdir())
    users["hist_item_id"] = pa.array([[7, 8], [9]], pa.list_(pa.int64()))
    pq.write_table(pa.table(users), up)
    assert UserStore(up, features).item_id.tolist() == [7, 8, 9]
    users["hist_category"] = pa.array([[1], [2]], pa.list_(pa.int64()))  # lengths differ from hist_ts
    pq.write_table(pa.table(users), up)
    with pytest.raises(ValueError, match="hist_category"):
        UserStore(up, FeatureSpec(num_users=2, num_items=10, history_sparse={"category": 3}))


def test_prefetch_thread_gives_the_plain_loaders_batches_and_stops_cleanly(small_synth) -> None:
    config, paths = small_synth
    features = config.features()
    ds = HistoryDataset(paths["val"], UserStore(paths["users"], features), features, ["click"])

    def batches(prefetch: int) -> list[Batch]:
        sampler = ShardedBatchSampler(len(ds), 64, shuffle=True, seed=3)
        return list(make_loader(ds, sampler, num_workers=0, prefetch=prefetch))

    plain, threaded = batches(0), batches(3)
    assert len(plain) == len(threaded) > 2
    for a, b in zip(plain, threaded, strict=True):
        assert torch.equal(a.sample_index, b.sample_index)
        assert torch.equal(a.history_item_id, b.history_item_id) and torch.equal(a.labels["click"], b.labels["click"])

    # an abandoned epoch (limit_train_batches, an exception in the step) leaves no thread blocked
    loader = make_loader(ds, ShardedBatchSampler(len(ds), 16), num_workers=0, prefetch=1)
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    iterator._thread.join(timeout=5)
    assert not iterator._thread.is_alive()
    iterator = iter(loader)
    next(iterator)
    thread = iterator._thread
    del iterator  # dropped without close(): collected, and the thread stops
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_prefetch_thread_raises_the_loaders_error_in_the_consumer(small_synth) -> None:
    config, paths = small_synth
    features = config.features()
    ds = HistoryDataset(paths["val"], UserStore(paths["users"], features), features, ["click"])
    sampler = [np.array([0, 1]), np.array([len(ds) + 5])]  # the second batch is out of range
    loader = make_loader(ds, sampler, num_workers=0, prefetch=2)  # type: ignore[arg-type]
    iterator = iter(loader)
    assert next(iterator).batch_size == 2
    with pytest.raises(IndexError, match="out of range"):
        next(iterator)


def test_prefetch_threads_are_stopped_and_joined_at_exit() -> None:
    """An abandoned prefetching iterator (max_steps ends the epoch early) leaves a thread building batches;
    the exit handler stops and joins it, so the interpreter never tears it down inside C++ code."""
    import time

    from mtrank.data.dataset import _LIVE_THREADS, _ThreadPrefetcher, stop_prefetch_threads

    def endless():
        while True:
            time.sleep(0.001)
            yield torch.ones(4).sum()

    prefetcher = _ThreadPrefetcher(endless(), depth=2)
    assert next(prefetcher) == 4
    thread = prefetcher._thread
    assert thread.is_alive() and thread in _LIVE_THREADS
    assert stop_prefetch_threads(timeout=5) == 0
    assert not thread.is_alive() and thread not in _LIVE_THREADS


def test_a_script_that_abandons_a_prefetcher_exits_cleanly(tmp_path: Path) -> None:
    """Without the exit handler this script aborts (exit code -6, "terminate called without an active
    exception"): the thread is inside a matrix product when Python finalises."""
    import os
    import subprocess
    import sys

    script = tmp_path / "abandon.py"
    script.write_text(
        "import time, torch\n"
        "from mtrank.data.dataset import _ThreadPrefetcher\n"
        "def endless():\n"
        "    while True:\n"
        "        yield torch.randn(1024, 1024) @ torch.randn(1024, 1024)\n"  # the thread stays busy in C++
        "p = _ThreadPrefetcher(endless(), depth=1000)\n"
        "next(p)\n"
        "time.sleep(0.05)\n"
        "print('done')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
