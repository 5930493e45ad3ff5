"""`RankingModule`: one encoder + one multi-task head, trained on the task list.

The module says what to compute; the Trainer (from the YAML config) says where and how. The
encoder and the heads are given as factories (YAML ``class_path`` + ``init_args``) that the module
calls with what only it knows: ``encoder(features)``, then ``heads(encoder.output_dim, tasks)``.

Losses, per task (``TaskSpec.kind`` / ``TaskSpec.loss``):
    binary      BCE on the logit; the prediction is ``sigmoid(logit)``.
    mse, huber  on the raw output; the prediction is the output.
    log_mse     MSE between the output and ``log1p(label)``; the prediction is ``expm1(output)``
                (clamped at 0): the usual choice for heavy-tailed targets such as watch time.
The objective is ``sum_t weight_t * loss_t`` plus the encoder's and the heads' auxiliary losses
plus the branches' own losses (``loss/uplift``, ``loss/fatigue_cl``, already weighted).

Branches (`heads.base.Branch`), each switched on by giving its factory in YAML and off by leaving it
out (``null``: no parameters, no compute):
    fatigue   (`heads.fatigue.FRec`) runs between the encoder and the heads and hands them a
              fatigue-aware `EncoderOutput`;
    uplift    (`heads.uplift.CDUM`) runs beside the heads on the same `EncoderOutput`.
Both are built as ``factory(encoder.output_dim, tasks, features, user_dim=encoder.user_dim)``; their
per-sample outputs land in ``HeadOutput.branches`` and in ``predict``'s output (``uplift_effect_t1``, ...),
their metrics under ``<stage>/<branch>/...``.

Example (what the CLI builds from ``configs/quickstart.yaml``):
    >>> from functools import partial
    >>> module = RankingModule(tasks, features, encoder=partial(HSTUEncoder, dim=64), heads=partial(MMoE))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from encoders.base import EncoderOutput, SequenceEncoder
from heads.base import Branch, BranchOutput, HeadOutput, MultiTaskHead
from mtrank.batch import Batch
from mtrank.exposure import ExposureSlice
from mtrank.losses import task_loss, task_prediction
from mtrank.metrics import TaskMetrics
from mtrank.precision import keep_batch_exact
from mtrank.resume import load_rng_states, save_rng_states
from mtrank.spec import FeatureSpec, TaskSpec, check_tasks
from mtrank.strategies import prepare_strategy

EncoderFactory = Callable[[FeatureSpec], SequenceEncoder]
HeadsFactory = Callable[[int, Sequence[TaskSpec]], MultiTaskHead]
BranchFactory = Callable[[int, Sequence[TaskSpec], FeatureSpec], Branch]
BRANCHES = {"fatigue": "encoder", "uplift": "head"}  # name -> position (`Branch.position`), in the order they run


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
        fatigue: builds the fatigue branch (`heads.fatigue.FRec`), or None (off).
        uplift: builds the uplift branch (`heads.uplift.CDUM`), or None (off).
        exposure_slice: report every task's metrics also on the samples with high recent
            same-category exposure (``<stage>/exposed/<task>/...``, `mtrank.exposure`), or None.
        predict_cache: in ``predict``, score the rows of one request (same ``request_id``, user and ``ts``)
            with the user's sequence encoded once (`mtrank.serve.score_rows_by_request`) when the data has a
            ``request_id`` column, the encoder has a cached path (HSTU, LONGER) and
            ``features.request_candidates`` is 0; the predictions are those of the plain forward.
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
        fatigue: BranchFactory | None = None,
        uplift: BranchFactory | None = None,
        exposure_slice: ExposureSlice | None = None,
        predict_cache: bool = True,
    ) -> None:
        super().__init__()
        check_tasks(tasks)
        self.save_hyperparameters()
        self.tasks = list(tasks)
        self.features = features
        self.encoder = encoder(features)
        self.heads = heads(self.encoder.output_dim, self.tasks)
        factories = {"fatigue": fatigue, "uplift": uplift}
        for name in BRANCHES:  # an attribute each; None when off (no parameters)
            factory = factories[name]
            branch = None
            if factory is not None:
                branch = factory(self.encoder.output_dim, self.tasks, features, user_dim=self.encoder.user_dim)
                expected = BRANCHES[name]
                if branch.position != expected:
                    raise ValueError(
                        f"model.{name}: {type(branch).__name__} runs at {branch.position!r}, not {expected!r}"
                    )
            setattr(self, name, branch)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.aux_loss_weight = aux_loss_weight
        self.exposure_slice = exposure_slice
        self.predict_cache = predict_cache
        self.val_metrics = TaskMetrics(self.tasks, "val")
        self.test_metrics = TaskMetrics(self.tasks, "test")
        self.exposed_metrics = torch.nn.ModuleDict(
            {s: TaskMetrics(self.tasks, f"{s}/exposed") for s in ("val", "test")} if exposure_slice else {}
        )
        self.exposed_fraction = torch.nn.ModuleDict(
            {s: MeanMetric() for s in ("val", "test")} if exposure_slice else {}
        )
        self.branch_metrics = torch.nn.ModuleDict(
            {
                stage: torch.nn.ModuleDict(
                    {name: m for name, branch in self.branches().items() if (m := branch.metrics()) is not None}
                )
                for stage in ("val", "test")
            }
        )

    def branches(self) -> dict[str, Branch]:
        """The branches that are on, by name, in the order they run."""
        return {name: b for name in BRANCHES if (b := getattr(self, name, None)) is not None}

    # ----------------------------------------------------------------------------- forward
    def forward(self, batch: Batch) -> tuple[EncoderOutput, HeadOutput]:
        """Encoder, branches and heads on one batch.

        Returns the `EncoderOutput` the heads read (the fatigue branch's, when on) and the
        `HeadOutput`: ``logits`` the raw per-task outputs (B,), ``branches`` each branch's output.
        """
        return self.heads_and_branches(self.encoder(batch), batch)

    def heads_and_branches(self, encoded: EncoderOutput, batch: Batch) -> tuple[EncoderOutput, HeadOutput]:
        """What `forward` does after the encoder: the fatigue branch, the heads, the uplift branch, in that order.

        Also the cached serving paths' second half (`mtrank.serve`), on an `EncoderOutput` they computed.
        """
        outputs: dict[str, BranchOutput] = {}
        if self.fatigue is not None:
            outputs["fatigue"] = self.fatigue(encoded, batch)
            if outputs["fatigue"].encoded is not None:
                encoded = outputs["fatigue"].encoded
        head_out = self.heads(encoded, batch)
        if self.uplift is not None:
            outputs["uplift"] = self.uplift(encoded, batch)
        head_out.branches = outputs
        return encoded, head_out

    def predictions(self, head_out: HeadOutput) -> dict[str, Tensor]:
        """task -> (B,) prediction on the label's scale: a probability (binary) or a value (regression)."""
        return {task.name: task_prediction(task, head_out.logits[task.name]) for task in self.tasks}

    def losses(self, encoded: EncoderOutput, head_out: HeadOutput, batch: Batch) -> dict[str, Tensor]:
        """``loss`` (the objective) and ``loss/<task>`` for every task, plus ``loss/aux`` when present."""
        losses: dict[str, Tensor] = {}
        total = torch.zeros((), device=batch.item_id.device)
        for task in self.tasks:
            if task.label not in batch.labels:
                raise KeyError(f"task {task.name!r}: the batch has no label column {task.label!r}")
            loss = task_loss(task, head_out.logits[task.name], batch.labels[task.label])
            losses[f"loss/{task.name}"] = loss
            total = total + task.weight * loss
        aux = [a for a in (encoded.aux_loss, head_out.aux_loss) if a is not None]
        if aux:
            losses["loss/aux"] = torch.stack([a.float() for a in aux]).sum()
            total = total + self.aux_loss_weight * losses["loss/aux"]
        branches = self.branches()
        for name, out in head_out.branches.items():
            for key, value in branches[name].loss(out, batch).items():
                losses[f"loss/{key}"] = value
                total = total + value
        losses["loss"] = total
        return losses

    # ----------------------------------------------------------------------------- steps
    def setup(self, stage: str) -> None:
        """Keep labels, propensities and extras exact under precisions that cast the batch (DeepSpeed's,
        ``bf16-true``): `mtrank.precision.keep_batch_exact` on the trainer's precision plugin; complete a
        DeepSpeed strategy's config (`mtrank.strategies.prepare_strategy`) before the strategy starts."""
        keep_batch_exact(self.trainer.precision_plugin)
        prepare_strategy(self.trainer)

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
        predictions = self.predictions(head_out)
        metrics.update(predictions, labels, batch.user_id)
        if self.exposure_slice is not None:
            keep = self.exposure_slice.mask(batch)
            self.exposed_fraction[stage].update(keep.float())
            self.exposed_metrics[stage].update(
                {k: v[keep] for k, v in predictions.items()},
                {k: v[keep] for k, v in labels.items()},
                batch.user_id[keep],
            )
        for name, branch_metrics in self.branch_metrics[stage].items():
            branch_metrics.update(head_out.branches[name], batch)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def _log_metrics(self, metrics: TaskMetrics, stage: str) -> None:
        values = metrics.compute()  # synced across processes by torchmetrics
        metrics.reset()
        self.log_dict(values, sync_dist=False, rank_zero_only=False)
        first_binary = next((t.name for t in self.tasks if t.kind == "binary"), None)
        if first_binary is not None:
            self.log(f"{metrics.prefix}_auc", values[f"{metrics.prefix}/{first_binary}/auc"], prog_bar=True)
        if self.exposure_slice is not None:
            values = self.exposed_metrics[stage].compute()
            values[f"{stage}/exposed/fraction"] = self.exposed_fraction[stage].compute()
            self.exposed_metrics[stage].reset()
            self.exposed_fraction[stage].reset()
            self.log_dict(values, sync_dist=False, rank_zero_only=False)
        for name, branch_metrics in self.branch_metrics[stage].items():
            values = {f"{stage}/{name}/{k}": v for k, v in branch_metrics.compute().items()}
            branch_metrics.reset()
            self.log_dict(values, sync_dist=False, rank_zero_only=False)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Ids, every task's prediction and the branches' outputs, each (B,).

        Keys: ``sample_index``, ``user_id``, ``item_id``, ``<task>``, ``<branch>_<output>`` (for example
        ``uplift_response_t0``, ``uplift_effect_t1``).
        """
        out = {"sample_index": batch.sample_index, "user_id": batch.user_id, "item_id": batch.item_id}
        if self._predicts_by_request(batch):
            from mtrank.serve import CandidateScorer, score_rows_by_request

            scorer = CandidateScorer(self, microbatch=max(1024, batch.batch_size), branch_outputs=True)
            out.update(score_rows_by_request(scorer, batch))
            return out
        _, head_out = self(batch)
        out.update(self.predictions(head_out))
        for name, branch_out in head_out.branches.items():
            out.update({f"{name}_{key}": value.float() for key, value in branch_out.outputs.items()})
        return out

    def _predicts_by_request(self, batch: Batch) -> bool:
        """Whether `predict_step` scores this batch request by request (see ``predict_cache``)."""
        if not self.predict_cache or batch.request_id is None or self.features.request_candidates > 0:
            return False
        from mtrank.serve import scoring_path

        return type(self).forward is RankingModule.forward and scoring_path(self.encoder) != "reencode"

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.lr_scheduler_factory(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every rank's global RNG states (`mtrank.resume`): a resumed fit draws the same dropout masks."""
        save_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's global RNG states when ``fit`` resumes from ``checkpoint`` (`mtrank.resume`)."""
        load_rng_states(self._trainer, checkpoint)
