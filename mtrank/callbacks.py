"""Callbacks: cross-cutting work kept out of the model."""

from __future__ import annotations

import logging
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
