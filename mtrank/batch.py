"""`Batch`: the one typed structure that flows from the loader to every encoder and head.

Format decision (documented here, relied on everywhere): histories are **padded and
left-aligned**. Row ``b`` holds the user's newest ``history_len[b]`` behaviours strictly
before ``ts[b]`` in positions ``[0, history_len[b])``, oldest first, newest at
``history_len[b] - 1``; positions at and after ``history_len[b]`` hold 0 and must be masked
(`Batch.history_mask`). Jagged kernels get values + offsets from `Batch.history_offsets` and
`Batch.jagged`. Padded + lengths was chosen because it batches with one gather in the loader,
moves to the device as a few dense tensors, and turns into jagged form with one mask.

Request candidates (``FeatureSpec.request_candidates = C > 0``): row ``b`` also carries the
candidate set of its request, the samples of its samples table sharing its ``request_id``. Position
0 is the sample itself, then the other samples of the request in samples-table row order, ``C`` in
all at most; ``request_len[b]`` (>= 1) counts the valid positions and the rest hold 0 and must be
masked (`Batch.request_mask`). The set comes from the whole table, never from the batch: it is the
same whichever samples share the batch. With ``C == 0`` the request fields are None / empty.

Shapes: ``B`` samples, ``L`` = the padded history width (at most ``FeatureSpec.max_len``), ``C`` =
``FeatureSpec.request_candidates``.
Integer columns keep the narrowest lossless dtype of the stored data (int32 or int64): embedding
layers accept both.

Lightning moves a `Batch` to the device through ``apply_to_collection`` (dataclasses are
collections); `Batch.to` does the same by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """A batch of impressions with their users' histories.

    Attributes:
        sample_index: (B,) int64 row of each sample in its samples table.
        user_id: (B,) int user ids.
        item_id: (B,) int candidate (target) item ids.
        ts: (B,) int64 impression times (the samples table's ``ts`` unit, seconds by default).
        history_len: (B,) int64 number of valid history positions, in ``[0, L]``.
        history_item_id: (B, L) int item ids of the history, left-aligned, 0 after ``history_len``.
        history_ts: (B, L) int64 behaviour times, all < ``ts[b]`` where valid, 0 after ``history_len``.
        history_sparse: name -> (B, L) int side channel (``hist_<name>``), 0-padded.
        history_dense: name -> (B, L) float32 side channel, 0-padded.
        item_sparse: name -> (B,) int candidate item feature.
        item_dense: name -> (B,) float32 candidate item feature.
        user_sparse: name -> (B,) int static user feature.
        user_dense: name -> (B,) float32 static user feature.
        labels: label column -> (B,) float32 label.
        treatment: (B,) int64 treatment arm, when the data has one and it is asked for.
        propensity: (B,) float32 probability of the observed treatment, when given.
        request_id: (B,) int64 request id (samples of one request share it), when given.
        extras: column -> (B,) float32 evaluation-only columns (never model input).
        request_len: (B,) int64 number of valid request candidates, in ``[1, C]`` (the sample
            itself always counts), when ``FeatureSpec.request_candidates > 0``; else None.
        request_item_id: (B, C) int item ids of the request's candidates: position 0 is the
            sample's own ``item_id``, then the request's other samples in table row order; 0 at
            and after ``request_len``. None when not asked for.
        request_sparse: name -> (B, C) int candidate item feature, one per ``item_sparse`` column,
            same layout (position 0 equals ``item_sparse[name]``), 0-padded.
        request_dense: name -> (B, C) float32 candidate item feature, one per ``item_dense``
            column, same layout, 0-padded.
    """

    sample_index: Tensor
    user_id: Tensor
    item_id: Tensor
    ts: Tensor
    history_len: Tensor
    history_item_id: Tensor
    history_ts: Tensor
    history_sparse: dict[str, Tensor] = field(default_factory=dict)
    history_dense: dict[str, Tensor] = field(default_factory=dict)
    item_sparse: dict[str, Tensor] = field(default_factory=dict)
    item_dense: dict[str, Tensor] = field(default_factory=dict)
    user_sparse: dict[str, Tensor] = field(default_factory=dict)
    user_dense: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    treatment: Tensor | None = None
    propensity: Tensor | None = None
    request_id: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    request_len: Tensor | None = None
    request_item_id: Tensor | None = None
    request_sparse: dict[str, Tensor] = field(default_factory=dict)
    request_dense: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.item_id.shape[0])

    @property
    def max_len(self) -> int:
        """L, the padded history width."""
        return int(self.history_item_id.shape[1])

    def history_mask(self) -> Tensor:
        """(B, L) bool, True at valid history positions."""
        positions = torch.arange(self.max_len, device=self.history_len.device)
        return positions[None, :] < self.history_len[:, None]

    def request_mask(self) -> Tensor:
        """(B, C) bool, True at valid request-candidate positions (position 0 always)."""
        if self.request_len is None or self.request_item_id is None:
            raise ValueError("this batch has no request candidates (FeatureSpec.request_candidates is 0)")
        positions = torch.arange(self.request_item_id.shape[1], device=self.request_len.device)
        return positions[None, :] < self.request_len[:, None]

    def history_offsets(self) -> Tensor:
        """(B + 1,) int64 offsets of each row's history in the jagged (concatenated) form."""
        offsets = torch.zeros(self.batch_size + 1, dtype=torch.int64, device=self.history_len.device)
        torch.cumsum(self.history_len.to(torch.int64), dim=0, out=offsets[1:])
        return offsets

    def jagged(self, padded: Tensor) -> Tensor:
        """(B, L, ...) padded history tensor -> (sum(history_len), ...) jagged values, row-major."""
        return padded[self.history_mask()]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor moved to ``device``."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy with every tensor in pinned memory (called by the DataLoader's pin-memory thread)."""
        return _map_tensors(self, lambda t: t.pin_memory())


def _map_tensors(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = fn(value)
        elif isinstance(value, dict):
            changes[f.name] = {k: fn(v) for k, v in value.items()}
    return dataclasses.replace(batch, **changes)
