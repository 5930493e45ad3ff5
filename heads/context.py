"""Shared parts of the branches (`heads.uplift.CDUM`, `heads.fatigue.FRec`): their own small item
embeddings and the recent-history window.

A branch owns its tables rather than borrowing the encoder's: it works with any encoder, its width
is its own (small: 16-64), and switching it off removes them. `ItemEmbeddings` builds only what it is
asked for, so under DDP no parameter goes unused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from encoders.embeddings import add_features
from mtrank.batch import Batch
from mtrank.spec import FeatureSpec


class ItemEmbeddings(nn.Module):
    """Item id + item feature embeddings of one width, for the candidate, its request mates and the history.

    An item's vector is its id embedding plus the embedding of each name in ``sparse`` (an
    ``item_sparse`` column; history positions read the ``hist_<name>`` channel, which must then exist
    with the same vocabulary) plus, for candidates and request mates only, a projection of the
    ``item_dense`` columns when ``dense`` is True (the history has no item dense columns).

    Args:
        features: the feature spec (vocabularies, column names).
        dim: d, the width.
        sparse: item_sparse names to add (default: every one that the history also has).
        dense: project the item_dense columns into candidate and request vectors.
        owner: the setting's owner for error messages (``model.uplift``).
    """

    def __init__(
        self,
        features: FeatureSpec,
        dim: int,
        sparse: Sequence[str] | None = None,
        dense: bool = True,
        owner: str = "branch",
    ) -> None:
        super().__init__()
        if sparse is None:
            sparse = [n for n, v in features.item_sparse.items() if features.history_sparse.get(n) == v]
        for name in sparse:
            if name not in features.item_sparse:
                raise ValueError(f"{owner}: item feature {name!r} is not in model.features.item_sparse")
        self.features = features
        self.dim = dim
        self.sparse_names = list(sparse)
        self.item = nn.Embedding(features.num_items, dim)
        self.sparse = nn.ModuleDict({n: nn.Embedding(features.item_sparse[n], dim) for n in self.sparse_names})
        self.dense = nn.Linear(len(features.item_dense), dim, bias=False) if dense and features.item_dense else None
        for table in [self.item, *self.sparse.values()]:
            nn.init.normal_(table.weight, std=1.0 / math.sqrt(dim))
        if self.dense is not None:
            nn.init.normal_(self.dense.weight, std=1.0 / (4 * math.sqrt(dim * len(features.item_dense))))

    def _embed(self, item_id: Tensor, sparse: dict[str, Tensor], dense: dict[str, Tensor] | None) -> Tensor:
        projection = self.dense if dense is not None else None
        return add_features(self.item(item_id), self.sparse, sparse, projection, dense or {}, self.features.item_dense)

    def candidate(self, batch: Batch) -> Tensor:
        """(B, d) the candidate item."""
        return self._embed(batch.item_id, batch.item_sparse, batch.item_dense)

    def request(self, batch: Batch) -> Tensor:
        """(B, C, d) the request's candidates (`Batch.request_item_id`), 0 past ``request_len``."""
        if batch.request_item_id is None:
            raise ValueError(
                "the batch has no request candidates: set model.features.request_candidates > 0 "
                "(the samples tables then need a request_id column)"
            )
        x = self._embed(batch.request_item_id, batch.request_sparse, batch.request_dense)
        return x * batch.request_mask().unsqueeze(-1).to(x.dtype)

    def history(self, batch: Batch, index: Tensor, mask: Tensor) -> Tensor:
        """(B, R, d) history positions ``index`` (B, R): item id + shared sparse channels; 0 where ``mask`` is False."""
        item = batch.history_item_id.gather(1, index)
        sparse = {n: batch.history_sparse[n].gather(1, index) for n in self.sparse_names}
        x = self._embed(item, sparse, None)
        return x * mask.unsqueeze(-1).to(x.dtype)


def check_history_channels(features: FeatureSpec, names: Sequence[str], owner: str) -> None:
    """Refuse item features that have no history channel of the same vocabulary (a clear message)."""
    for name in names:
        if features.history_sparse.get(name) != features.item_sparse.get(name):
            raise ValueError(
                f"{owner}: {name!r} must be both a history channel (model.features.history_sparse) and an item "
                f"feature (model.features.item_sparse) with one vocabulary; got "
                f"{features.history_sparse.get(name)} and {features.item_sparse.get(name)}"
            )


def recent_window(batch: Batch, size: int) -> tuple[Tensor, Tensor]:
    """The newest ``size`` history positions of every row, oldest first.

    Returns:
        index: (B, R) int64 positions into the (B, L) history, ``R = min(size, L)``; row ``b``'s
            valid steps are ``0 .. n_b - 1`` with ``n_b = min(history_len[b], R)``, the newest at
            ``n_b - 1``; padded steps point at position 0.
        mask: (B, R) bool, True at valid steps.
    """
    R = min(size, batch.max_len)
    lengths = batch.history_len.to(torch.int64)
    n = lengths.clamp(max=R)
    steps = torch.arange(R, device=lengths.device)
    mask = steps[None, :] < n[:, None]
    index = (lengths - n)[:, None] + steps[None, :]
    return torch.where(mask, index, torch.zeros_like(index)), mask
