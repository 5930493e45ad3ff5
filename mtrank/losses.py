"""Per-task losses and predictions: one definition shared by the task heads and the branches.

A task's raw model output (a logit for a binary task, a value for a regression task) becomes a
loss against its label and a prediction on the label's scale:

    kind / loss          loss (per sample)                       prediction
    binary               BCE on the logit                        sigmoid(raw)
    regression mse       (raw - label)²                          raw
    regression huber     Huber(raw - label), delta 1             raw
    regression log_mse   (raw - log1p(label))²                   expm1(raw), clamped at 0

``log_mse`` is the usual choice for heavy-tailed targets such as watch time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtrank.spec import TaskSpec


def task_loss(task: TaskSpec, raw: Tensor, label: Tensor, weight: Tensor | None = None) -> Tensor:
    """0-dim mean loss of ``raw`` (N,) against ``label`` (N,), in float32.

    Args:
        task: decides the loss (see the module docstring).
        raw: (N,) raw outputs (logits or values).
        label: (N,) labels.
        weight: (N,) non-negative sample weights, optional: the loss is then ``sum(w l) / sum(w)``
            (a self-normalised weighted mean; 0 when every weight is 0).
    """
    raw, label = raw.float(), label.float()
    if task.kind == "binary":
        per = F.binary_cross_entropy_with_logits(raw, label, reduction="none")
    elif task.loss == "huber":
        per = F.huber_loss(raw, label, reduction="none")
    elif task.loss == "log_mse":
        per = (raw - torch.log1p(label.clamp_min(0))).square()
    else:
        per = (raw - label).square()
    if weight is None:
        return per.mean()
    weight = weight.float()
    return (weight * per).sum() / weight.sum().clamp_min(1e-12)


def task_prediction(task: TaskSpec, raw: Tensor) -> Tensor:
    """(...) raw outputs -> (...) predictions on the label's scale, float32: a probability or a value."""
    raw = raw.float()
    if task.kind == "binary":
        return torch.sigmoid(raw)
    if task.loss == "log_mse":
        return torch.expm1(raw).clamp_min(0)
    return raw
