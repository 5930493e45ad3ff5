"""Callbacks: cross-cutting work kept out of the model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


class ParquetPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` outputs to Parquet: one row per sample, ids and every task's prediction.

    Each process writes ``<stem>.rank<k>.parquet`` when there are several, or ``path`` itself when
    there is one. Rows are sorted by ``sample_index`` (the sample's row in its samples table).

    Args:
        path: the output file, e.g. ``runs/predictions.parquet``.
    """

    def __init__(self, path: str = "runs/predictions.parquet") -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            log.warning("predict produced no batches; %s not written", self.path)
            return
        columns = {key: torch.cat([b[key].detach().cpu() for b in batches]).numpy() for key in batches[0]}
        order = columns["sample_index"].argsort(kind="stable")
        table = pa.table({key: value[order] for key, value in columns.items()})
        path = self.path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        log.info("wrote %d predictions to %s", table.num_rows, path)


class ThroughputMonitor(L.Callback):
    """Logs training throughput: ``perf/train_samples_per_s`` every ``every_n_steps`` optimiser steps
    (samples of all processes, over the steps since the last log) and ``perf/epoch_train_samples_per_s``
    at each epoch's end. Time spent in validation is left out of both.

    Args:
        every_n_steps: steps between two logged rates.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"ThroughputMonitor.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._window = _Stopwatch()
        self._epoch = _Stopwatch()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window.restart()
        self._epoch.restart()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        samples = getattr(batch, "batch_size", 0) * trainer.world_size
        self._window.samples += samples
        self._epoch.samples += samples
        if trainer.global_step % self.every_n_steps == 0 and self._window.samples:
            _synchronize(pl_module)
            pl_module.log("perf/train_samples_per_s", self._window.rate(), on_step=True, on_epoch=False)
            self._window.restart()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            _synchronize(pl_module)
            self._window.pause()
            self._epoch.pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self._window.resume()
            self._epoch.resume()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _synchronize(pl_module)
        if self._epoch.samples:
            rate = self._epoch.rate()
            pl_module.log("perf/epoch_train_samples_per_s", rate, on_step=False, on_epoch=True)
            log.info("epoch %d: %.0f training samples/s", trainer.current_epoch, rate)


class _Stopwatch:
    """Seconds and samples counted while running; pausable."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.samples, self.elapsed, self.started = 0, 0.0, time.perf_counter()

    def pause(self) -> None:
        if self.started is not None:
            self.elapsed += time.perf_counter() - self.started
            self.started = None

    def resume(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def rate(self) -> float:
        running = time.perf_counter() - self.started if self.started is not None else 0.0
        return self.samples / max(self.elapsed + running, 1e-9)


def _synchronize(pl_module: L.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
