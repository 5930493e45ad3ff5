"""Recent same-feature exposure: how often a user saw the target's kind of item just before.

``recent_exposure(batch, "category", 3600)`` counts, per sample, the history behaviours in the hour
before the impression whose ``hist_category`` equals the candidate's ``category`` — the signal of
user fatigue (FRec, SIGIR 2024). `ExposureSlice` names such a slice of the evaluation data; the
`mtrank.module.RankingModule` reports every task's metrics on it (``val/exposed/<task>/auc`` ...), so
models with and without the fatigue branch are compared where fatigue matters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mtrank.batch import Batch


def recent_exposure(batch: Batch, feature: str = "category", window_s: int = 3600) -> Tensor:
    """(B,) int64 history behaviours in ``[ts - window_s, ts)`` sharing the candidate's ``feature`` value.

    Args:
        batch: needs ``history_sparse[feature]`` and ``item_sparse[feature]``.
        feature: a feature that is both a history channel and an item feature (``category``).
        window_s: the window, in the ``ts`` unit (seconds by default).
    """
    if feature not in batch.history_sparse or feature not in batch.item_sparse:
        raise KeyError(
            f"recent exposure: {feature!r} must be both a history channel (features.history_sparse) "
            "and an item feature (features.item_sparse)"
        )
    same = batch.history_sparse[feature] == batch.item_sparse[feature][:, None]  # (B, L)
    recent = batch.history_ts >= (batch.ts - window_s)[:, None]
    return (same & recent & batch.history_mask()).sum(dim=1)


@dataclass
class ExposureSlice:
    """The evaluation slice of samples with high recent same-feature exposure.

    Args:
        feature: the feature compared between the history and the candidate (``category``).
        window_s: the look-back window in the ``ts`` unit (seconds by default).
        min_count: a sample is in the slice when `recent_exposure` >= this.
    """

    feature: str = "category"
    window_s: int = 3600
    min_count: int = 3

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.min_count < 1:
            raise ValueError(
                f"model.exposure_slice: window_s must be > 0 and min_count >= 1, got {self.window_s}, {self.min_count}"
            )

    def mask(self, batch: Batch) -> Tensor:
        """(B,) bool: the samples in the slice."""
        return recent_exposure(batch, self.feature, self.window_s) >= self.min_count
