"""RankingDataModule: synth preparation, setup, loaders, and a Lightning smoke run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mtrank.batch import Batch
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.schema import SchemaError
from mtrank.data.synth import SynthConfig

TINY = {"num_users": 60, "num_items": 50, "history_mean": 20, "samples_per_user": 30, "max_len": 16, "seed": 2}


def test_prepare_generates_reuses_and_regenerates(tmp_path: Path) -> None:
    config = SynthConfig(**TINY)
    dm = RankingDataModule(str(tmp_path), synth=config, num_workers=0, batch_size=64)
    dm.prepare_data()
    users = tmp_path / "users.parquet"
    stamp = users.stat().st_mtime_ns
    RankingDataModule(str(tmp_path), synth=SynthConfig(**TINY), num_workers=0).prepare_data()
    assert users.stat().st_mtime_ns == stamp  # same config: reused
    other = SynthConfig(**{**TINY, "seed": 9})
    RankingDataModule(str(tmp_path), synth=other, num_workers=0).prepare_data()
    assert users.stat().st_mtime_ns != stamp  # other config: regenerated


def test_setup_and_loaders(tmp_path: Path) -> None:
    config = SynthConfig(**TINY)
    dm = RankingDataModule(
        str(tmp_path),
        features=config.features(),
        tasks=config.tasks(),
        synth=config,
        num_workers=0,
        batch_size=64,
        eval_batch_size=100,
    )
    dm.prepare_data()
    dm.setup("fit")
    train = dm.train_dataloader()
    batches = list(train)
    assert all(isinstance(b, Batch) for b in batches)
    assert sum(b.batch_size for b in batches) == len(dm.dataset("train"))
    assert max(b.batch_size for b in batches) <= 64
    assert set(batches[0].labels) == {t.label for t in config.tasks()}
    assert all(v.dtype == torch.float32 for v in batches[0].labels.values())
    val = list(dm.val_dataloader())
    assert np.array_equal(np.concatenate([b.sample_index.numpy() for b in val]), np.arange(len(dm.dataset("val"))))
    dm.setup("predict")
    predicted = list(dm.predict_dataloader())
    assert sum(b.batch_size for b in predicted) == pq.ParquetFile(tmp_path / "test.parquet").metadata.num_rows
    ids = dm.sample_columns("predict", ["user_id", "request_id", "ts"])
    first = predicted[0]
    np.testing.assert_array_equal(ids["user_id"][first.sample_index.numpy()], first.user_id.numpy())


def test_features_required_and_schema_checked(tmp_path: Path) -> None:
    config = SynthConfig(**TINY)
    dm = RankingDataModule(str(tmp_path), synth=config, tasks=config.tasks(), num_workers=0)
    dm.synth = None
    with pytest.raises(ValueError, match=r"data\.features is not set"):
        dm.setup("fit")
    features = config.features()
    features.num_items = 10  # the data has item ids up to 49
    dm = RankingDataModule(str(tmp_path), features=features, tasks=config.tasks(), synth=config, num_workers=0)
    dm.prepare_data()
    with pytest.raises(SchemaError, match="item_id"):
        dm.setup("fit")


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)
        self.out = torch.nn.Linear(4, 1)
        self.seen: list[np.ndarray] = []
        self.epochs: list[int] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.sample_index.numpy().copy())
        h = (self.emb(batch.history_item_id) * batch.history_mask()[..., None]).sum(1)
        logit = self.out(h + self.emb(batch.item_id)).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, batch.labels["click"])

    def on_train_epoch_start(self) -> None:
        self.epochs.append(self.trainer.train_dataloader.sampler.epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_two_epochs_with_workers(tmp_path: Path) -> None:
    config = SynthConfig(**TINY)
    dm = RankingDataModule(
        str(tmp_path), features=config.features(), tasks=config.tasks(), synth=config, num_workers=1, batch_size=256
    )
    model = _Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    n = len(dm.dataset("train"))
    per_epoch = len(model.seen) // 2
    first = np.concatenate(model.seen[:per_epoch])
    second = np.concatenate(model.seen[per_epoch:])
    assert sorted(first.tolist()) == list(range(n)) and sorted(second.tolist()) == list(range(n))
    assert not np.array_equal(first, second)  # Lightning called set_epoch: a new shuffle
    assert model.epochs == [0, 1]
