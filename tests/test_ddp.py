"""Real Lightning DDP on the CPU (2 gloo processes): every training sample is seen once per epoch
across ranks with equal batch counts, and per-task validation metrics equal a single-process run."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from helpers import quiet_trainer

from encoders import HSTUEncoder
from heads import MMoE
from mtrank.batch import Batch
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.synth import SynthConfig
from mtrank.module import RankingModule

SYNTH = SynthConfig(num_users=80, num_items=60, history_mean=20, samples_per_user=25, max_len=16, seed=5)


class RecordTrainBatches(L.Callback):
    """Writes, per rank, the sample indices of every training batch to ``<dir>/rank<k>.npz``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: list[np.ndarray] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Batch, idx: int) -> None:
        self.seen.append(batch.sample_index.cpu().numpy().copy())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        np.savez(Path(self.out_dir) / f"rank{trainer.global_rank}.npz", *self.seen)


def build(tmp_path: Path) -> tuple[RankingModule, RankingDataModule]:
    L.seed_everything(0)
    data = RankingDataModule(str(tmp_path / "data"), synth=SYNTH, batch_size=64, num_workers=0)
    model = RankingModule(
        SYNTH.tasks(), SYNTH.features(), encoder=partial(HSTUEncoder, dim=16, num_heads=1), heads=partial(MMoE)
    )
    return model, data


def trainer(tmp_path: Path, devices: int, **kwargs: object) -> L.Trainer:
    return quiet_trainer(devices, default_root_dir=str(tmp_path), **kwargs)


@pytest.mark.slow
def test_ddp_shards_training_once_and_validation_matches_one_process(tmp_path: Path) -> None:
    model, data = build(tmp_path)
    data.prepare_data()
    trainer(tmp_path, 2, max_epochs=1, limit_val_batches=0, callbacks=[RecordTrainBatches(str(tmp_path))]).fit(
        model, datamodule=data
    )
    per_rank = [list(np.load(tmp_path / f"rank{r}.npz").values()) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # equal batch counts: DDP never waits on a missing batch
    seen = np.concatenate([b for batches in per_rank for b in batches])
    data.setup("fit")
    assert np.array_equal(np.sort(seen), np.arange(len(data.dataset("train"))))  # each sample exactly once

    # the weights trained under DDP came back to this process: validate them on 2 processes and on 1
    two = trainer(tmp_path, 2).validate(model, datamodule=data, verbose=False)[0]
    one = trainer(tmp_path, 1).validate(model, datamodule=data, verbose=False)[0]
    keys = [k for k in one if k.split("/")[-1] in ("auc", "gauc", "logloss", "rmse", "mae")]
    assert len(keys) == 4 * 3 + 2
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


@pytest.mark.slow
def test_ddp_with_both_branches_trains_and_gathers_their_metrics(tmp_path: Path) -> None:
    """FRec + CDUM under 2-process DDP: every parameter gets a gradient (DDP would fail otherwise), and
    the uplift metrics (AUUC, Qini, PEHE: cat/sum states) and the exposure slice equal one process."""
    from heads import CDUM, FRec
    from mtrank.exposure import ExposureSlice

    L.seed_everything(0)
    features = SYNTH.features()
    features.request_candidates = 4
    data = RankingDataModule(str(tmp_path / "data"), features=features, synth=SYNTH, batch_size=64, num_workers=0)
    model = RankingModule(
        SYNTH.tasks(),
        features,
        encoder=partial(HSTUEncoder, dim=16, num_heads=1),
        heads=partial(MMoE),
        fatigue=partial(FRec, recent=8),
        uplift=partial(CDUM),
        exposure_slice=ExposureSlice(min_count=2),
    )
    data.prepare_data()
    trainer(tmp_path, 2, max_epochs=1, limit_val_batches=0).fit(model, datamodule=data)
    two = trainer(tmp_path, 2).validate(model, datamodule=data, verbose=False)[0]
    one = trainer(tmp_path, 1).validate(model, datamodule=data, verbose=False)[0]
    keys = ["val/uplift/auuc", "val/uplift/qini", "val/uplift/pehe", "val/uplift/auc", "val/exposed/click/auc"]
    keys += ["val/exposed/fraction"]
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
