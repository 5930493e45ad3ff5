"""Per-task ranking metrics: AUC, GAUC, logloss, RMSE, MAE — all `torchmetrics.Metric`s that sync under DDP.

AUC and GAUC share one exact rank-based implementation (`grouped_auc`): the Mann–Whitney U
statistic with average ranks for tied scores, computed for every group at once with sorts and
scatter-adds, no Python loop over users. GAUC is the AUC of each user's samples, averaged with
the user's sample count as weight; users whose samples are all of one class are skipped (their AUC
is undefined), as in the GAUC of Zhou et al. (DIN, KDD 2018).

Example:
    >>> m = GroupAUC()
    >>> m.update(torch.tensor([0.9, 0.1, 0.8, 0.3]), torch.tensor([1, 0, 0, 1]), torch.tensor([7, 7, 8, 8]))
    >>> float(m.compute())  # user 7: AUC 1, user 8: AUC 0, equal weights
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from mtrank.spec import TaskSpec


def grouped_auc(preds: Tensor, target: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Exact AUC of every group, with average ranks for ties.

    Args:
        preds: (N,) scores (any monotone scale: logits or probabilities).
        target: (N,) labels in {0, 1}.
        groups: (N,) integer group ids (user ids for GAUC; all equal for plain AUC).

    Returns:
        auc: (G,) float64 AUC per group present, NaN where a group has only one class.
        count: (G,) int64 number of samples per group.
    """
    n = preds.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=preds.device)
        return empty, empty.long()
    preds = preds.detach().double().reshape(-1)
    target = target.detach().double().reshape(-1)
    groups = groups.detach().reshape(-1).long()
    # sort by (group, pred): a stable sort on pred, then a stable sort on group
    order = torch.argsort(preds, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    g, p, t = groups[order], preds[order], target[order]
    position = torch.arange(n, device=preds.device)

    new_group = torch.ones(n, dtype=torch.bool, device=preds.device)
    new_group[1:] = g[1:] != g[:-1]
    group_id = torch.cumsum(new_group.long(), 0) - 1  # (N,)
    group_start = position[new_group][group_id]  # (N,) index of the group's first sample

    new_run = new_group.clone()  # a run of tied scores never crosses a group boundary
    new_run[1:] |= p[1:] != p[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    run_start = position[new_run]
    run_end = torch.cat([run_start[1:], run_start.new_tensor([n])])
    mean_rank = (run_start + run_end - 1).double() / 2 + 1  # 1-based average rank of each run
    rank = mean_rank[run_id] - group_start.double()  # (N,) rank within the group

    num_groups = int(group_id[-1]) + 1
    count = torch.bincount(group_id, minlength=num_groups)
    n_pos = torch.zeros(num_groups, dtype=torch.float64, device=preds.device).scatter_add_(0, group_id, t)
    rank_sum = torch.zeros(num_groups, dtype=torch.float64, device=preds.device).scatter_add_(0, group_id, rank * t)
    n_neg = count.double() - n_pos
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc = torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan")))
    return auc, count


class _ScoreCollector(Metric):
    """Keeps every (pred, target, group) triple; synced by concatenation across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor | None = None) -> None:
        """preds, target: (N,); groups: (N,) integer ids (ignored by plain AUC)."""
        self.preds.append(preds.detach().float().reshape(-1))
        self.target.append(target.detach().float().reshape(-1))
        if groups is None:
            groups = torch.zeros_like(target, dtype=torch.long)
        self.groups.append(groups.detach().long().reshape(-1))

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor]:
        return dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.groups)


class BinaryAUC(_ScoreCollector):
    """Exact ROC AUC over all samples (ties count half). NaN if only one class was seen."""

    def compute(self) -> Tensor:
        preds, target, _ = self._gathered()
        auc, _ = grouped_auc(preds, target, torch.zeros_like(target, dtype=torch.long))
        return auc[0].float() if auc.numel() else torch.tensor(float("nan"))


class GroupAUC(_ScoreCollector):
    """GAUC: per-group AUC weighted by group size, skipping one-class groups. NaN if none is left."""

    def compute(self) -> Tensor:
        auc, count = grouped_auc(*self._gathered())
        valid = ~torch.isnan(auc)
        if not bool(valid.any()):
            return torch.tensor(float("nan"))
        weights = count[valid].double()
        return ((auc[valid] * weights).sum() / weights.sum()).float()


class BinaryLogLoss(MeanMetric):
    """Mean binary cross-entropy of probabilities, clipped to [1e-7, 1 - 1e-7]."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """preds: (N,) probabilities; target: (N,) labels in {0, 1}."""
        p = preds.detach().double().clamp(1e-7, 1 - 1e-7)
        t = target.detach().double()
        super().update(-(t * p.log() + (1 - t) * (1 - p).log()))


class TaskMetrics(torch.nn.Module):
    """The metric set of every task, for one stage (validation, test).

    Binary tasks: ``auc``, ``gauc`` (grouped by user), ``logloss``. Regression tasks: ``rmse``,
    ``mae``. Keys of `compute` are ``<prefix>/<task>/<metric>``.
    """

    def __init__(self, tasks: Sequence[TaskSpec], prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.kinds = {t.name: t.kind for t in tasks}
        per_task = {}
        for task in tasks:
            if task.kind == "binary":
                per_task[task.name] = MetricCollection(
                    {"auc": BinaryAUC(), "gauc": GroupAUC(), "logloss": BinaryLogLoss()}, compute_groups=False
                )
            else:
                per_task[task.name] = MetricCollection(
                    {"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError()}, compute_groups=False
                )
        self.per_task = torch.nn.ModuleDict(per_task)

    def update(self, preds: dict[str, Tensor], labels: dict[str, Tensor], groups: Tensor) -> None:
        """preds: task -> (N,) probability (binary) or value (regression); labels likewise; groups: (N,)."""
        for name, collection in self.per_task.items():
            p, y = preds[name].detach().float(), labels[name].detach().float()
            if self.kinds[name] == "binary":
                collection["auc"].update(p, y)
                collection["gauc"].update(p, y, groups)
                collection["logloss"].update(p, y)
            else:
                collection.update(p, y)

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name, collection in self.per_task.items():
            for metric, value in collection.compute().items():
                out[f"{self.prefix}/{name}/{metric}"] = value
        return out

    def reset(self) -> None:
        for collection in self.per_task.values():
            collection.reset()
