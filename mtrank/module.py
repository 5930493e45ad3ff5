"""`RankingModule`: one encoder + one multi-task head, trained on the task list.

The module says what to compute; the Trainer (from the YAML config) says where and how. The
encoder and the heads are given as factories (YAML ``class_path`` + ``init_args``) that the module
calls with what only it knows: ``encoder(features)``, then ``heads(encoder.output_dim, tasks)``.

Losses, per task (``TaskSpec.kind`` / ``TaskSpec.loss``):
    binary      BCE on the logit; the prediction is ``sigmoid(logit)``.
    mse, huber  on the raw output; the prediction is the output.
    log_mse     MSE between the output and ``log1p(label)``; the prediction is ``expm1(output)``
                (clamped at 0): the usual choice for heavy-tailed targets such as watch time.
The objective is ``sum_t weight_t * loss_t`` plus the encoder's and the heads' auxiliary losses.

Example (what the CLI builds from ``configs/quickstart.yaml``):
    >>> from functools import partial
    >>> module = RankingModule(tasks, features, encoder=partial(HSTUEncoder, dim=64), heads=partial(MMoE))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from encoders.base import EncoderOutput, SequenceEncoder
from heads.base import HeadOutput, MultiTaskHead
from mtrank.batch import Batch
from mtrank.metrics import TaskMetrics
from mtrank.spec import FeatureSpec, TaskSpec, check_tasks

EncoderFactory = Callable[[FeatureSpec], SequenceEncoder]
HeadsFactory = Callable[[int, Sequence[TaskSpec]], MultiTaskHead]


class RankingModule(L.LightningModule):
    """A multi-objective ranker: ``heads(encoder(batch))`` with per-task losses and metrics.

    Args:
        tasks: the task list (name, label column, kind, loss, weight, group).
        features: the feature spec (vocabularies, history length); shared with the data module.
        encoder: builds the sequence encoder from ``features``.
        heads: builds the multi-task head from ``(encoder.output_dim, tasks)``.
        optimizer: builds the optimiser from the parameters (default AdamW, lr 1e-3).
        lr_scheduler: builds a per-step schedule from the optimiser, or None for a constant rate.
            A schedule with a ``total_steps`` attribute left at None gets the trainer's estimate.
        aux_loss_weight: multiplier of the encoder's and heads' auxiliary losses.
    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        features: FeatureSpec,
        encoder: EncoderFactory,
        heads: HeadsFactory,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        aux_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_tasks(tasks)
        self.save_hyperparameters()
        self.tasks = list(tasks)
        self.features = features
        self.encoder = encoder(features)
        self.heads = heads(self.encoder.output_dim, self.tasks)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.aux_loss_weight = aux_loss_weight
        self.val_metrics = TaskMetrics(self.tasks, "val")
        self.test_metrics = TaskMetrics(self.tasks, "test")

    # ----------------------------------------------------------------------------- forward
    def forward(self, batch: Batch) -> tuple[EncoderOutput, HeadOutput]:
        """Encoder and heads on one batch; ``HeadOutput.logits`` holds the raw per-task outputs (B,)."""
        encoded = self.encoder(batch)
        return encoded, self.heads(encoded, batch)

    def predictions(self, head_out: HeadOutput) -> dict[str, Tensor]:
        """task -> (B,) prediction on the label's scale: a probability (binary) or a value (regression)."""
        out = {}
        for task in self.tasks:
            raw = head_out.logits[task.name].float()
            if task.kind == "binary":
                out[task.name] = torch.sigmoid(raw)
            elif task.loss == "log_mse":
                out[task.name] = torch.expm1(raw).clamp_min(0)
            else:
                out[task.name] = raw
        return out

    def losses(self, encoded: EncoderOutput, head_out: HeadOutput, batch: Batch) -> dict[str, Tensor]:
        """``loss`` (the objective) and ``loss/<task>`` for every task, plus ``loss/aux`` when present."""
        losses: dict[str, Tensor] = {}
        total = torch.zeros((), device=batch.item_id.device)
        for task in self.tasks:
            if task.label not in batch.labels:
                raise KeyError(f"task {task.name!r}: the batch has no label column {task.label!r}")
            raw = head_out.logits[task.name].float()
            label = batch.labels[task.label].float()
            if task.kind == "binary":
                loss = F.binary_cross_entropy_with_logits(raw, label)
            elif task.loss == "huber":
                loss = F.huber_loss(raw, label)
            elif task.loss == "log_mse":
                loss = F.mse_loss(raw, torch.log1p(label.clamp_min(0)))
            else:
                loss = F.mse_loss(raw, label)
            losses[f"loss/{task.name}"] = loss
            total = total + task.weight * loss
        aux = [a for a in (encoded.aux_loss, head_out.aux_loss) if a is not None]
        if aux:
            losses["loss/aux"] = torch.stack([a.float() for a in aux]).sum()
            total = total + self.aux_loss_weight * losses["loss/aux"]
        losses["loss"] = total
        return losses

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        encoded, head_out = self(batch)
        losses = self.losses(encoded, head_out, batch)
        parts = {f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}
        self.log_dict(parts, on_step=True, on_epoch=False, batch_size=batch.batch_size)
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=batch.batch_size)
        return losses["loss"]

    def _evaluate(self, batch: Batch, stage: str, metrics: TaskMetrics) -> None:
        encoded, head_out = self(batch)
        losses = self.losses(encoded, head_out, batch)
        self.log_dict(
            {f"{stage}/{k}": v for k, v in losses.items()},
            on_step=False, on_epoch=True, sync_dist=True, batch_size=batch.batch_size,
        )  # fmt: skip
        labels = {t.name: batch.labels[t.label] for t in self.tasks}
        metrics.update(self.predictions(head_out), labels, batch.user_id)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics)

    def _log_metrics(self, metrics: TaskMetrics) -> None:
        values = metrics.compute()  # synced across processes by torchmetrics
        metrics.reset()
        self.log_dict(values, sync_dist=False, rank_zero_only=False)
        first_binary = next((t.name for t in self.tasks if t.kind == "binary"), None)
        if first_binary is not None:
            self.log(f"{metrics.prefix}_auc", values[f"{metrics.prefix}/{first_binary}/auc"], prog_bar=True)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Ids and every task's prediction: ``sample_index``, ``user_id``, ``item_id``, ``<task>`` — each (B,)."""
        _, head_out = self(batch)
        out = {"sample_index": batch.sample_index, "user_id": batch.user_id, "item_id": batch.item_id}
        out.update(self.predictions(head_out))
        return out

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.lr_scheduler_factory(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
