"""Request-level candidates: each sample carries the other impressions of its request (CDUM)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtrank.batch import Batch
from mtrank.data.dataset import CutBatch, HistoryDataset, ShardedBatchSampler, make_loader
from mtrank.data.schema import SchemaError, check_schema
from mtrank.data.store import UserStore
from mtrank.data.synth import random_batch
from mtrank.spec import FeatureSpec, TaskSpec

C = 3
BIG = 2**40  # a request id that needs int64
# row -> request id. Requests: 10 -> rows 0, 3, 5 (size 3); 20 -> row 1 (size 1); 30 -> rows 2, 6
# (size 2); BIG -> rows 4, 7, 8, 9, 10 (size 5 > C); -7 -> rows 11, 12 (size 2, negative id).
# No request's rows are adjacent except 7, 8, 9, 10.
REQUEST_ID = [10, 20, 30, 10, BIG, 10, 30, BIG, BIG, BIG, BIG, -7, -7]
N = len(REQUEST_ID)
# row -> [row itself, then its request's other rows in table order][:C]
EXPECTED_ROWS = {
    0: [0, 3, 5],
    1: [1],
    2: [2, 6],
    3: [3, 0, 5],
    4: [4, 7, 8],
    5: [5, 0, 3],
    6: [6, 2],
    7: [7, 4, 8],
    8: [8, 4, 7],
    9: [9, 4, 7],
    10: [10, 4, 7],
    11: [11, 12],
    12: [12, 11],
}


def _features(request_candidates: int = C) -> FeatureSpec:
    return FeatureSpec(
        num_users=3,
        num_items=200,
        max_len=4,
        item_sparse={"category": 5},
        item_dense=["duration"],
        request_candidates=request_candidates,
    )


def _item(row: int) -> int:
    return 100 + row


def _category(row: int) -> int:
    return (row * 3 + 1) % 5


def _duration(row: int) -> float:
    return 1.5 * row + 0.25


def _samples(with_request_id: bool = True) -> dict[str, pa.Array]:
    rows = range(N)
    table = {
        "user_id": pa.array([r % 3 for r in rows], pa.int64()),
        "item_id": pa.array([_item(r) for r in rows], pa.int64()),
        "ts": pa.array([50 + r for r in rows], pa.int64()),
        "category": pa.array([_category(r) for r in rows], pa.int32()),
        "duration": pa.array([_duration(r) for r in rows], pa.float32()),
        "click": pa.array([r % 2 for r in rows], pa.int8()),
    }
    if with_request_id:
        table["request_id"] = pa.array(REQUEST_ID, pa.int64())
    return table


def _write(tmp_path: Path, with_request_id: bool = True) -> tuple[Path, Path]:
    users = {
        "user_id": pa.array([0, 1, 2], pa.int64()),
        "hist_item_id": pa.array([[1, 2], [3], []], pa.list_(pa.int64())),
        "hist_ts": pa.array([[1, 2], [3], []], pa.list_(pa.int64())),
    }
    up, sp = tmp_path / "users.parquet", tmp_path / "samples.parquet"
    pq.write_table(pa.table(users), up)
    pq.write_table(pa.table(_samples(with_request_id)), sp)
    return up, sp


def _dataset(tmp_path: Path, request_candidates: int = C, **kwargs) -> HistoryDataset:
    up, sp = _write(tmp_path)
    features = _features(request_candidates)
    return HistoryDataset(sp, UserStore(up, features), features, ["click"], **kwargs)


def _expected(rows: list[int], width: int = C) -> dict[str, np.ndarray]:
    """The request fields the batch of sample ``rows`` must hold, from `EXPECTED_ROWS`."""
    out = {
        "len": np.array([len(EXPECTED_ROWS[r]) for r in rows], np.int64),
        "item": np.zeros((len(rows), width), np.int64),
        "category": np.zeros((len(rows), width), np.int64),
        "duration": np.zeros((len(rows), width), np.float32),
    }
    for b, r in enumerate(rows):
        for c, member in enumerate(EXPECTED_ROWS[r]):
            out["item"][b, c] = _item(member)
            out["category"][b, c] = _category(member)
            out["duration"][b, c] = _duration(member)
    return out


def _check(batch: Batch, rows: list[int]) -> None:
    expected = _expected(rows)
    assert batch.request_len is not None and batch.request_item_id is not None
    assert batch.request_len.dtype == torch.int64 and batch.request_len.shape == (len(rows),)
    assert batch.request_item_id.shape == (len(rows), C)
    assert set(batch.request_sparse) == {"category"} and set(batch.request_dense) == {"duration"}
    assert batch.request_dense["duration"].dtype == torch.float32
    np.testing.assert_array_equal(batch.request_len.numpy(), expected["len"])
    np.testing.assert_array_equal(batch.request_item_id.numpy(), expected["item"])
    np.testing.assert_array_equal(batch.request_sparse["category"].numpy(), expected["category"])
    np.testing.assert_array_equal(batch.request_dense["duration"].numpy(), expected["duration"])
    # position 0 is the sample itself
    assert torch.equal(batch.request_item_id[:, 0], batch.item_id)
    assert torch.equal(batch.request_sparse["category"][:, 0], batch.item_sparse["category"])
    assert torch.equal(batch.request_dense["duration"][:, 0], batch.item_dense["duration"])
    mask = batch.request_mask()
    assert mask.dtype == torch.bool and mask.shape == (len(rows), C)
    assert bool(mask[:, 0].all())
    np.testing.assert_array_equal(mask.sum(1).numpy(), expected["len"])


def test_reference_table_is_what_the_spec_says() -> None:
    """`EXPECTED_ROWS` written by hand agrees with the rule: self, then request mates in row order."""
    for row, members in EXPECTED_ROWS.items():
        mates = [r for r in range(N) if REQUEST_ID[r] == REQUEST_ID[row] and r != row]
        assert members == [row, *mates][:C]


def test_every_sample_gets_its_requests_candidates(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    rows = list(range(N))
    _check(ds[np.array(rows)], rows)
    assert ds[np.arange(N)].request_item_id.dtype == torch.int32  # narrowest lossless, like item_id


@pytest.mark.parametrize(
    "rows",
    [
        [8, 1],  # 8's request mates 4 and 7 are not in the batch
        [3],  # a batch of one: its mates 0 and 5 come from the table
        [10, 9, 6, 12],  # request larger than C; 6 without 2
        [5, 0, 3],  # the whole request in the batch, shuffled
        [11, 11, 4],  # repeated indices
    ],
)
def test_candidates_do_not_depend_on_the_batch(tmp_path: Path, rows: list[int]) -> None:
    ds = _dataset(tmp_path)
    batch = ds[np.array(rows)]
    _check(batch, rows)
    for b, row in enumerate(rows):  # each row alone gives the same candidates
        alone = ds[row]
        assert torch.equal(alone.request_item_id[0], batch.request_item_id[b])
        assert torch.equal(alone.request_len[0], batch.request_len[b])


def test_explicit_values(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    batch = ds[np.array([8, 1, 6])]
    assert batch.request_len.tolist() == [3, 1, 2]
    assert batch.request_item_id.tolist() == [[108, 104, 107], [101, 0, 0], [106, 102, 0]]
    assert batch.request_sparse["category"].tolist() == [[0, 3, 2], [4, 0, 0], [4, 2, 0]]
    assert batch.request_dense["duration"].tolist() == [[12.25, 6.25, 10.75], [1.75, 0.0, 0.0], [9.25, 3.25, 0.0]]
    assert batch.request_id.tolist() == [BIG, 20, 30]


@pytest.mark.parametrize("width", [1, 2, 6])
def test_other_widths(tmp_path: Path, width: int) -> None:
    ds = _dataset(tmp_path, request_candidates=width)
    batch = ds[np.arange(N)]
    assert batch.request_item_id.shape == (N, width)
    for row in range(N):
        mates = [r for r in range(N) if REQUEST_ID[r] == REQUEST_ID[row] and r != row]
        members = [row, *mates][:width]
        assert batch.request_len[row] == len(members)
        assert batch.request_item_id[row].tolist() == [_item(m) for m in members] + [0] * (width - len(members))


def test_empty_batch_and_cut_batch(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    empty = ds[np.zeros(0, np.int64)]
    assert empty.request_item_id.shape == (0, C) and empty.request_len.shape == (0,)
    rows = [4, 2, 11]
    cut = ds[CutBatch(np.array(rows), np.array([0, 1, 0]))]
    _check(cut, rows)


def test_nothing_changes_without_request_candidates(tmp_path: Path) -> None:
    with_requests = _dataset(tmp_path)
    plain = HistoryDataset(with_requests.path, with_requests.store, _features(0), ["click"])
    assert plain._request_order is None and plain._request_sorted is None
    rows = np.array([8, 1, 6, 0])
    a, b = plain[rows], with_requests[rows]
    assert a.request_len is None and a.request_item_id is None
    assert a.request_sparse == {} and a.request_dense == {}
    with pytest.raises(ValueError, match="request_candidates"):
        a.request_mask()
    request_fields = {"request_len", "request_item_id", "request_sparse", "request_dense"}
    for name, value in vars(a).items():
        if name in request_fields:
            continue
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        elif isinstance(value, dict):
            assert value.keys() == other.keys() and all(torch.equal(value[k], other[k]) for k in value), name
        else:
            assert value is other is None, name


def test_no_index_built_or_read_without_request_candidates(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, request_candidates=0)
    assert ds._request_order is None
    assert not list(ds._cache.dir.glob("request_id.order*"))
    assert list(ds._cache.dir.glob("request_id.int64.npy"))  # the optional column is read as before


def test_index_is_cached_memory_mapped_and_reused(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    assert isinstance(ds._request_order, np.memmap) and isinstance(ds._request_sorted, np.memmap)
    assert ds._request_order.dtype == np.int64 and ds._request_order.shape == (N,)
    np.testing.assert_array_equal(ds._request_order, np.argsort(np.array(REQUEST_ID), kind="stable"))
    np.testing.assert_array_equal(ds._request_sorted, np.sort(np.array(REQUEST_ID)))
    again = HistoryDataset(ds.path, ds.store, ds.features, ["click"])
    np.testing.assert_array_equal(again._request_order, ds._request_order)
    _check(again[np.arange(N)], list(range(N)))


def test_index_kept_in_memory_when_the_cache_cannot_be_written(tmp_path: Path, monkeypatch) -> None:
    up, sp = _write(tmp_path)
    features = _features()
    store = UserStore(up, features)

    def refuse(*args, **kwargs):
        raise OSError("read-only")

    monkeypatch.setattr(np, "save", refuse)
    ds = HistoryDataset(sp, store, features, ["click"])
    assert not isinstance(ds._request_order, np.memmap)
    _check(ds[np.arange(N)], list(range(N)))
    clone = pickle.loads(pickle.dumps(ds))
    _check(clone[np.arange(N)], list(range(N)))


def test_pickled_dataset_and_shared_memory_match(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    rows = np.array([9, 2, 5, 1, 12])
    plain = ds.get_batch(rows, shared=False)
    shared = ds.get_batch(rows, shared=True)
    assert shared.request_item_id.is_shared() and shared.request_sparse["category"].is_shared()
    state = ds.__getstate__()
    assert "_request_order" not in state and "_request_sorted" not in state  # re-opened, not pickled
    clone = pickle.loads(pickle.dumps(ds))
    for other in (shared, clone[rows]):
        _assert_batches_equal(plain, other)


def test_dataloader_worker_batches_equal_in_process_batches(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    sampler = ShardedBatchSampler(len(ds), 4, shuffle=True, seed=3)
    loader = make_loader(ds, sampler, num_workers=1, persistent_workers=False)
    seen = []
    for batch in loader:
        assert batch.request_item_id.is_shared()  # built in the worker's shared block
        rows = batch.sample_index.tolist()
        seen.extend(rows)
        _assert_batches_equal(ds.get_batch(batch.sample_index, shared=False), batch)
        _check(batch, rows)
    assert sorted(seen) == list(range(N))


def test_batch_to_and_pin_map_request_fields(tmp_path: Path) -> None:
    batch = _dataset(tmp_path)[np.arange(5)]
    moved = batch.to("cpu")
    _assert_batches_equal(batch, moved)
    from mtrank.batch import _map_tensors

    cloned = _map_tensors(batch, lambda t: t.clone())
    assert cloned.request_item_id is not batch.request_item_id
    assert cloned.request_sparse["category"] is not batch.request_sparse["category"]
    assert cloned.treatment is None
    _assert_batches_equal(batch, cloned)


def test_dataset_refuses_a_table_without_request_id(tmp_path: Path) -> None:
    up, sp = _write(tmp_path, with_request_id=False)
    features = _features()
    with pytest.raises(KeyError, match=r"samples\.parquet: missing column 'request_id'.*request_candidates"):
        HistoryDataset(sp, UserStore(up, features), features, ["click"])


def test_schema_requires_request_id_when_candidates_are_asked_for(tmp_path: Path) -> None:
    tasks = [TaskSpec("click")]
    up, sp = _write(tmp_path, with_request_id=False)
    check_schema(up, [sp], _features(0), tasks)  # optional without request candidates
    with pytest.raises(SchemaError) as info:
        check_schema(up, [sp], _features(), tasks)
    message = str(info.value)
    line = next((x for x in message.splitlines() if "samples.parquet: column 'request_id'" in x), None)
    assert line is not None, message
    assert "missing column" in line and "features.request_candidates" in line, message
    assert "1 problems" in message, message
    up, sp = _write(tmp_path, with_request_id=True)
    check_schema(up, [sp], _features(), tasks)


def test_schema_checks_request_id_type_when_required(tmp_path: Path) -> None:
    up, sp = _write(tmp_path)
    samples = _samples()
    samples["request_id"] = pa.array([str(r) for r in REQUEST_ID])
    pq.write_table(pa.table(samples), sp)
    with pytest.raises(SchemaError, match=r"column 'request_id': wrong type"):
        check_schema(up, [sp], _features(), [TaskSpec("click")])


def test_feature_spec_validates_request_candidates() -> None:
    assert _features(0).request_candidates == 0
    with pytest.raises(ValueError, match=r"features\.request_candidates"):
        _features(-1)


def test_random_batch_request_layout() -> None:
    features = _features(4)
    batch = random_batch(features, [3, 0, 5, 1, 2, 4], seed=7)
    B = batch.batch_size
    assert batch.request_len.shape == (B,) and batch.request_len.dtype == torch.int64
    assert int(batch.request_len.min()) >= 1 and int(batch.request_len.max()) <= 4
    assert batch.request_item_id.shape == (B, 4)
    assert set(batch.request_sparse) == {"category"} and set(batch.request_dense) == {"duration"}
    mask = batch.request_mask()
    assert torch.equal(batch.request_item_id[:, 0], batch.item_id)
    assert torch.equal(batch.request_sparse["category"][:, 0], batch.item_sparse["category"])
    assert torch.equal(batch.request_dense["duration"][:, 0], batch.item_dense["duration"])
    for t in (batch.request_item_id, batch.request_sparse["category"], batch.request_dense["duration"]):
        assert not t[~mask].any()
    assert int(batch.request_item_id.max()) < features.num_items
    assert int(batch.request_sparse["category"].max()) < 5
    assert batch.request_dense["duration"].dtype == torch.float32
    plain = random_batch(_features(0), [3, 0, 5, 1, 2, 4], seed=7)
    assert plain.request_len is None and plain.request_item_id is None and plain.request_sparse == {}
    assert torch.equal(plain.item_id, batch.item_id) and torch.equal(plain.history_item_id, batch.history_item_id)
    assert torch.equal(plain.user_id, batch.user_id)


def _assert_batches_equal(a: Batch, b: Batch) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        elif isinstance(value, dict):
            assert value.keys() == other.keys(), name
            assert all(torch.equal(value[k], other[k]) for k in value), name
        else:
            assert value is None and other is None, name


def test_synthetic_set_matches_brute_force(small_synth) -> None:
    config, paths = small_synth
    features = config.features()
    features.request_candidates = 3
    ds = HistoryDataset(paths["val"], UserStore(paths["users"], features), features, ["click"])
    request = pq.read_table(paths["val"], columns=["request_id"]).column("request_id").to_numpy()
    item = pq.read_table(paths["val"], columns=["item_id"]).column("item_id").to_numpy()
    rows = np.random.default_rng(0).choice(len(ds), 300, replace=False)
    batch = ds[rows]
    assert int(batch.request_len.max()) == 3 and int(batch.request_len.min()) == 1
    for b, row in enumerate(rows):
        members = [row, *np.nonzero((request == request[row]) & (np.arange(len(ds)) != row))[0]][:3]
        assert batch.request_len[b] == len(members)
        assert batch.request_item_id[b].tolist() == [int(item[m]) for m in members] + [0] * (3 - len(members))
