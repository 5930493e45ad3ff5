"""`FeatureEmbeddings`: the lookup tables every encoder (HSTU, LONGER, ULTRA-HSTU) builds its tokens from.

One module turns the id and float columns of a `Batch` into three kinds of vectors:

- ``history_tokens``: (B, L, D) one token per history position: the item id embedding plus the
  embedding of every integer side channel (``features.history_sparse``, e.g. category, action) plus
  a linear projection of the float side channels (``features.history_dense``, e.g. watch time).
  Summing the action into the item's token is the "action-item merged token" of ULTRA-HSTU; the
  original HSTU interleaves item and action tokens, which doubles the length for the same content.
- ``candidate_tokens``: (B, D) the candidate (target) item: the same item id table as the history,
  so the candidate and the behaviours live in one space and attention can compare them, plus the
  candidate's features (``features.item_sparse`` tables and a projection of ``features.item_dense``).
- ``user_features``: (B, D_u) the user id embedding plus static user features.

Choices (the papers leave these open):

- Ids are ``[0, V)`` and 0 is a real id (the batch pads with 0 but marks padding with
  ``history_len``), so no ``padding_idx``: padded positions are zeroed with the history mask.
- A feature named both in ``history_sparse`` and ``item_sparse`` with the same vocabulary (e.g.
  ``category``) uses **one** table for both, for the same reason the item id table is shared.
  Otherwise each feature has its own table.
- Float features go through ``symlog(x) = sign(x) * log1p(|x|)`` (``log1p`` for non-negative
  values such as watch time or duration: heavy tails are compressed, 0 stays 0) and one bias-free
  linear layer per group (so a padded position, all zeros, stays zero).
- Tables are initialised ``N(0, 1/D)`` so that a token's norm is about 1 whatever ``D``.

Example:
    >>> emb = FeatureEmbeddings(features, dim=64)
    >>> tokens = emb.history_tokens(batch)     # (B, L, 64)
    >>> target = emb.candidate_tokens(batch)   # (B, 64)
    >>> user = emb.user_features(batch)        # (B, 64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtrank.batch import Batch
from mtrank.spec import FeatureSpec


def symlog(x: Tensor) -> Tensor:
    """``sign(x) * log1p(|x|)``, elementwise: ``log1p`` on non-negative values, odd and monotone overall."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


class FeatureEmbeddings(nn.Module):
    """Embedding tables and dense projections for the item, history, candidate and user columns.

    Args:
        features: the feature spec; sizes every table.
        dim: D, the width of history and candidate tokens.
        user_dim: D_u, the width of `user_features` (default: ``dim``).

    Attributes:
        item: (num_items, D) item id table, shared by history and candidate.
        history_sparse: name -> (V, D) table of each integer history channel.
        history_dense: (C_h -> D) projection of the float history channels, or None.
        item_sparse: name -> (V, D) table of each integer candidate feature not sharing a history table.
        item_dense: (C_i -> D) projection of the float candidate features, or None.
        user: (num_users, D_u) user id table.
        user_sparse: name -> (V, D_u) table of each integer user feature.
        user_dense: (C_u -> D_u) projection of the float user features, or None.
    """

    def __init__(self, features: FeatureSpec, dim: int, user_dim: int | None = None) -> None:
        super().__init__()
        self.features = features
        self.dim = dim
        self.user_dim = user_dim or dim
        self.item = nn.Embedding(features.num_items, dim)
        self.history_sparse = nn.ModuleDict({n: nn.Embedding(v, dim) for n, v in features.history_sparse.items()})
        self.history_dense = _projection(len(features.history_dense), dim)
        # candidate features sharing a history table (same name, same vocabulary) look up that table
        self.shared_item_sparse = sorted(
            n for n, v in features.item_sparse.items() if features.history_sparse.get(n) == v
        )
        self.item_sparse = nn.ModuleDict(
            {n: nn.Embedding(v, dim) for n, v in features.item_sparse.items() if n not in self.shared_item_sparse}
        )
        self.item_dense = _projection(len(features.item_dense), dim)
        self.user = nn.Embedding(features.num_users, self.user_dim)
        self.user_sparse = nn.ModuleDict({n: nn.Embedding(v, self.user_dim) for n, v in features.user_sparse.items()})
        self.user_dense = _projection(len(features.user_dense), self.user_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Tables ``N(0, 1/width)``; dense projections ``N(0, 1/(16 · width · inputs))``.

        symlog of counts and seconds is typically 1 to 6, so the smaller projection init keeps a
        dense feature's share of a token at init about that of one embedding. PyTorch's default
        (uniform ±1 for one input) made dense features about 20× larger than the id embeddings,
        drowning the category and action signal after the first LayerNorm.
        """
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.embedding_dim))
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1.0 / (4 * math.sqrt(module.out_features * module.in_features)))

    def item_tokens(self, item_id: Tensor) -> Tensor:
        """(...) int item ids -> (..., D) item id embeddings (the table shared by history and candidate)."""
        return self.item(item_id)

    def history_tokens(self, batch: Batch) -> Tensor:
        """(B, L, D) item + side-channel embedding of each history position; exactly 0 at padding."""
        x = self.item(batch.history_item_id)  # (B, L, D)
        for name, table in self.history_sparse.items():
            x = x + table(batch.history_sparse[name])
        if self.history_dense is not None:
            dense = torch.stack([batch.history_dense[n] for n in self.features.history_dense], dim=-1)  # (B, L, C)
            x = x + project_dense(self.history_dense, dense)
        return x * batch.history_mask().unsqueeze(-1).to(x.dtype)

    def candidate_tokens(self, batch: Batch) -> Tensor:
        """(B, D) candidate item id embedding + candidate item features."""
        x = self.item(batch.item_id)  # (B, D)
        for name in self.shared_item_sparse:
            x = x + self.history_sparse[name](batch.item_sparse[name])
        return add_features(
            x, self.item_sparse, batch.item_sparse, self.item_dense, batch.item_dense, self.features.item_dense
        )

    def user_features(self, batch: Batch) -> Tensor:
        """(B, D_u) user id embedding + static user features."""
        x = self.user(batch.user_id)  # (B, D_u)
        return add_features(
            x, self.user_sparse, batch.user_sparse, self.user_dense, batch.user_dense, self.features.user_dense
        )


def add_features(
    x: Tensor,
    tables: nn.ModuleDict,
    sparse: dict[str, Tensor],
    projection: nn.Linear | None,
    dense: dict[str, Tensor],
    dense_names: Sequence[str],
) -> Tensor:
    """``x`` (..., D) + the embedding of every sparse feature in ``tables`` (looked up in ``sparse`` by name)
    + ``projection`` of the symlog of the ``dense_names`` columns of ``dense`` (each (...)) when given."""
    for name, table in tables.items():
        x = x + table(sparse[name])
    if projection is not None:
        values = torch.stack([dense[n] for n in dense_names], dim=-1)  # (..., C)
        x = x + project_dense(projection, values)
    return x


def project_dense(projection: nn.Linear, values: Tensor) -> Tensor:
    """(..., C) raw dense values -> (..., D) ``projection(symlog(values))``: symlog in float32 (inputs may
    arrive in bf16 or as counts), then cast to the projection's weight dtype (bf16 when the weights are, as
    under DeepSpeed's bf16 or ``bf16-true``; a no-op under autocast, whose weights stay float32)."""
    return projection(symlog(values.float()).to(projection.weight.dtype))


def _projection(in_features: int, out_features: int) -> nn.Linear | None:
    """Bias-free projection of ``in_features`` float channels, or None when there are none."""
    return nn.Linear(in_features, out_features, bias=False) if in_features else None
