"""Metrics: exact AUC/GAUC against a brute-force pairwise count, and DDP sync with 2 gloo processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtrank.metrics import BinaryAUC, BinaryLogLoss, GroupAUC, TaskMetrics, grouped_auc
from mtrank.spec import TaskSpec


def pairwise_auc(p: torch.Tensor, t: torch.Tensor) -> float:
    pos, neg = p[t == 1].double(), p[t == 0].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    d = pos[:, None] - neg[None, :]
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def test_grouped_auc_matches_pairwise_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 6, (400,), generator=g).float()  # many ties
    target = torch.randint(0, 2, (400,), generator=g)
    groups = torch.randint(0, 25, (400,), generator=g) * 7 - 30  # arbitrary, negative ids too
    auc, count = grouped_auc(preds, target, groups)
    expected = [pairwise_auc(preds[groups == k], target[groups == k]) for k in groups.unique()]
    torch.testing.assert_close(auc, torch.tensor(expected, dtype=torch.float64), equal_nan=True)
    assert count.tolist() == [int((groups == k).sum()) for k in groups.unique()]


def test_gauc_weights_by_count_and_skips_one_class_users() -> None:
    m = GroupAUC()
    # user 1: AUC 1 over 4 samples; user 2: AUC 0 over 2 samples; user 3: only positives (skipped)
    m.update(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 1, 1]))
    m.update(torch.tensor([0.1, 0.9]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    m.update(torch.tensor([0.5, 0.6, 0.7]), torch.tensor([1, 1, 1]), torch.tensor([3, 3, 3]))
    assert float(m.compute()) == pytest.approx(4 / 6)


def test_auc_and_logloss_values() -> None:
    auc = BinaryAUC()
    auc.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert float(auc.compute()) == pytest.approx(0.75)
    ll = BinaryLogLoss()
    ll.update(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
    assert float(ll.compute()) == pytest.approx(0.693147, abs=1e-5)


def test_task_metrics_keys() -> None:
    tasks = [TaskSpec("click"), TaskSpec("watch_time", kind="regression")]
    m = TaskMetrics(tasks, "val")
    p = torch.tensor([0.2, 0.7, 0.6, 0.1])
    m.update({"click": p, "watch_time": p * 10}, {"click": torch.tensor([0, 1, 1, 0]), "watch_time": p * 10},
             torch.tensor([1, 1, 2, 2]))  # fmt: skip
    out = m.compute()
    assert set(out) == {"val/click/auc", "val/click/gauc", "val/click/logloss", "val/watch_time/rmse",
                        "val/watch_time/mae"}  # fmt: skip
    assert float(out["val/click/auc"]) == 1.0 and float(out["val/watch_time/rmse"]) == 0.0


def _data(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 60, (n,), generator=g)
    target = torch.randint(0, 2, (n,), generator=g).float()
    preds = (target * 0.3 + torch.rand(n, generator=g)).clamp(0, 1)
    return preds, target, groups


def _ddp_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        preds, target, groups = _data()
        # uneven shards: rank 0 takes the first 600 rows, rank 1 the rest, in two updates each
        lo, hi = (0, 600) if rank == 0 else (600, 1000)
        metrics = TaskMetrics([TaskSpec("click")], "val")
        mid = (lo + hi) // 2
        for a, b in ((lo, mid), (mid, hi)):
            metrics.update({"click": preds[a:b]}, {"click": target[a:b]}, groups[a:b])
        values = {k: float(v) for k, v in metrics.compute().items()}
        out[rank] = values
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_two_gloo_processes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
    preds, target, groups = _data()
    single = TaskMetrics([TaskSpec("click")], "val")
    single.update({"click": preds}, {"click": target}, groups)
    expected = {k: float(v) for k, v in single.compute().items()}
    for rank in (0, 1):
        for key, value in expected.items():
            assert out[rank][key] == pytest.approx(value, abs=1e-6), (rank, key)


def test_wandb_logger_is_offline_by_default(tmp_path: Path) -> None:
    from mtrank.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), mode=None)  # an explicit null from a config stays offline
    assert logger._wandb_init["mode"] == "offline"
    with pytest.raises(ValueError, match="offline"):
        WandbLogger(save_dir=str(tmp_path), mode="online")
    assert WandbLogger(save_dir=str(tmp_path), offline=False)._wandb_init.get("mode") != "offline"
