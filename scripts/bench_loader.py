"""Loader throughput: samples/s of fully built `Batch` objects at history lengths 256 and 1024.

    python scripts/bench_loader.py --out results.json

Generates (once) a synthetic data set with long histories (``--history-mean`` behaviours per
user before the sample window), then measures on the train split with random batches:

- ``numpy gather (baseline)``: one process, a plain fancy-index gather
  ``flat[start[:, None] + arange(L)]`` of the same history channels + masking, numpy arrays only;
- ``dataset[idx] (in process)``: `HistoryDataset.__getitem__`, one process, `Batch` of tensors
  (``padded rows only``: drawn from samples with fewer than L behaviours, so every row is masked);
- ``DataLoader, workers=K``: `make_loader` with K workers (0 = main process), as in training;
  with 0 workers, ``no prefetch`` builds each batch when asked and ``prefetch thread`` has a
  background thread build 2 ahead (the default);
- ``..., N ms step``: the same while the consumer spends N ms per batch waiting (``--step-ms``, a
  GPU step as the host sees it): how much of the loading the training loop still waits for.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from mtrank.data.dataset import HistoryDataset, ShardedBatchSampler, make_loader
from mtrank.data.store import UserStore
from mtrank.data.synth import SynthConfig, generate, load_config


def _rate(fn, batch_size: int, seconds: float, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += fn()
    return done / (time.perf_counter() - start) if done else 0.0


def _baseline(ds: HistoryDataset, batch_size: int, seconds: float, rng: np.random.Generator) -> float:
    store, L = ds.store, ds.max_len
    flats = [store.item_id, store.ts, *store.history_sparse.values(), *store.history_dense.values()]
    flats = [np.concatenate([np.asarray(f), np.zeros(L, dtype=f.dtype)]) for f in flats]  # padded copies
    arange = np.arange(L)

    def step() -> int:
        idx = rng.integers(0, len(ds), batch_size)
        start, length = ds.history_start[idx], ds.history_len[idx]
        positions = start[:, None] + arange
        pad = arange[None, :] >= length[:, None]
        for flat in flats:
            window = flat[positions]
            window[pad] = 0
        return batch_size

    return _rate(step, batch_size, seconds)


def _in_process(
    ds: HistoryDataset, batch_size: int, seconds: float, rng: np.random.Generator, pool: np.ndarray | None = None
) -> float:
    pool = np.arange(len(ds)) if pool is None else pool

    def step() -> int:
        return ds[pool[rng.integers(0, len(pool), batch_size)]].batch_size

    return _rate(step, batch_size, seconds)


def _loader(
    ds: HistoryDataset, batch_size: int, seconds: float, workers: int, prefetch: int = 2, step_ms: float = 0.0
) -> float:
    sampler = ShardedBatchSampler(len(ds), batch_size, shuffle=True, seed=0, rank=0, world_size=1)
    loader = make_loader(
        ds, sampler, num_workers=workers, persistent_workers=True if workers else None, prefetch=prefetch
    )
    state = {"it": iter(loader), "epoch": 0}

    def step() -> int:
        try:
            batch = next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            sampler.set_epoch(state["epoch"])
            state["it"] = iter(loader)
            batch = next(state["it"])
        if step_ms:
            time.sleep(step_ms / 1000)  # the host waiting on a GPU step: the GIL is free meanwhile
        return batch.batch_size

    rate = _rate(step, batch_size, seconds, warmup=max(2, 2 * workers))
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="/tmp/mtrank_bench_data")
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--step-ms", type=float, default=4.0, help="simulated training step per batch (0: off)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per cell")
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--history-mean", type=float, default=3000.0)
    parser.add_argument("--samples-per-user", type=float, default=100.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    config = SynthConfig(
        num_users=args.users,
        num_items=20_000,
        num_categories=50,
        history_mean=args.history_mean,
        samples_per_user=args.samples_per_user,
        max_len=1024,
        chunk_users=100,
    )
    if load_config(args.data_dir) != config:
        t0 = time.perf_counter()
        generate(config, args.data_dir)
        print(f"generated {args.data_dir} in {time.perf_counter() - t0:.1f}s")
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "batch_size": args.batch_size,
        "rows": [],
    }
    rng = np.random.default_rng(0)
    for L in args.lengths:
        features = config.features()
        features.max_len = L
        store = UserStore(Path(args.data_dir) / "users.parquet", features)
        ds = HistoryDataset(Path(args.data_dir) / "train.parquet", store, features, [t.label for t in config.tasks()])
        full = float((ds.history_len == L).mean())
        cells = {"numpy gather (baseline)": lambda ds=ds: _baseline(ds, args.batch_size, args.seconds, rng)}
        cells["dataset[idx] (in process)"] = lambda ds=ds: _in_process(ds, args.batch_size, args.seconds, rng)
        partial = np.nonzero(ds.history_len < L)[0]
        if len(partial) >= 100:  # every row needs its padding zeroed
            cells["dataset[idx], padded rows only"] = lambda ds=ds, p=partial: _in_process(
                ds, args.batch_size, args.seconds, rng, p
            )
        for w in args.workers:
            if w == 0:
                cells["DataLoader, workers=0, no prefetch"] = lambda ds=ds: _loader(
                    ds, args.batch_size, args.seconds, 0, prefetch=0
                )
                cells["DataLoader, workers=0, prefetch thread"] = lambda ds=ds: _loader(
                    ds, args.batch_size, args.seconds, 0
                )
            else:
                cells[f"DataLoader, workers={w}"] = lambda w=w, ds=ds: _loader(ds, args.batch_size, args.seconds, w)
        if args.step_ms:
            step = args.step_ms
            for label, w, prefetch in (("no prefetch", 0, 0), ("prefetch thread", 0, 2), ("2 workers", 2, 2)):
                cells[f"{label}, {step:g} ms step"] = lambda w=w, p=prefetch, ds=ds, step=step: _loader(
                    ds, args.batch_size, args.seconds, w, prefetch=p, step_ms=step
                )
        for name, fn in cells.items():
            rate = fn()
            row = {"history_len": L, "mode": name, "samples_per_s": round(rate), "full_history_fraction": full}
            results["rows"].append(row)
            print(f"L={L:5d}  {name:38s} {rate:12,.0f} samples/s", flush=True)
    print()
    print(f"| history L | mode | samples/s |  (batch {args.batch_size}, {os.cpu_count()} CPUs)")
    print("|---:|---|---:|")
    for row in results["rows"]:
        print(f"| {row['history_len']} | {row['mode']} | {row['samples_per_s']:,} |")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
