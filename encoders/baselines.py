"""Baseline encoders for the ranking quality table: what the sequence encoders (HSTU, LONGER, ULTRA-HSTU) must beat.

- `NoHistoryEncoder`: the non-sequential baseline. It never reads the behaviour history: the candidate
  item's tokens and the user features go through an MLP, with an elementwise product of the candidate
  and the projected user vector in its input (the factorisation-machine-like interaction term such a
  baseline normally has). It measures how much of the quality comes from the history at all.
- `MeanPoolEncoder`: the average-pooled history model (YouTube-DNN style, Covington et al., RecSys 2016).
  The history tokens are averaged over the valid positions, with no order, recency or attention to the
  candidate, then `TargetMLP` combines ``[pooled, candidate, user, pooled ⊙ candidate]``. It measures how
  much of the quality comes from *modelling* the sequence rather than from merely seeing it.

Both build their tokens with the shared `FeatureEmbeddings` (the same tables and initialisation as the
sequence encoders), so a comparison isolates the sequence model, not the features.

Choices:

- ``NoHistoryEncoder.user`` is the bias-free projection ``W u`` (B, dim) of the user features, the same vector
  that enters the product term, so branches that read ``EncoderOutput.user`` (e.g. `heads.uplift.CDUM` with
  ``use_encoder_user``) work; ``sequence`` and ``mask`` are None (there is no history state).
- ``MeanPoolEncoder`` divides the sum of the history tokens (0 at padding) by ``max(history_len, 1)``: the
  mean of the valid positions, the zero vector for an empty history (never NaN), and independent of the
  batch's padding width.
- ``dropout`` is applied in the output MLP only (between its layers), as in `TargetMLP`.

Example:
    >>> encoder = MeanPoolEncoder(features, dim=64)
    >>> out = encoder(batch)      # out.target (B, 64), out.user (B, 64) the mean history token
    >>> out = NoHistoryEncoder(features, dim=64, hidden_dims=(128,))(batch)   # out.target (B, 64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from encoders.base import EncoderOutput, SequenceEncoder, TargetMLP
from encoders.embeddings import FeatureEmbeddings
from mtrank.batch import Batch
from mtrank.spec import FeatureSpec


def _check_settings(owner: str, dim: int, output_dim: int, user_dim: int | None, dropout: float) -> None:
    """ValueError naming the setting when a width is not positive or ``dropout`` is outside ``[0, 1)``."""
    for name, value in (("dim", dim), ("output_dim", output_dim), ("user_dim", user_dim)):
        if value is not None and value <= 0:
            raise ValueError(f"{owner}: {name} must be positive, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")


class NoHistoryEncoder(SequenceEncoder):
    """The non-sequential baseline: an MLP over the candidate item and the user features; the history is ignored.

    ``target = MLP([e_c, u, e_c ⊙ W u])`` with ``e_c`` (B, D) the candidate token (item id + item features),
    ``u`` (B, D_u) the user features (user id + static user features) and ``W`` (D_u -> D) a bias-free
    projection. The MLP is ``Linear -> SiLU -> Dropout`` per hidden width, then ``Linear`` to ``output_dim``.

    Args:
        features: the feature spec (vocabularies; ``max_len`` is not used: the history is never read).
        dim: D, the width of the candidate token and of the projected user vector.
        hidden_dims: widths of the MLP's hidden layers (empty: one linear layer).
        dropout: after each hidden layer of the MLP.
        output_dim: width of ``EncoderOutput.target``.
        user_dim: width of the user features (default ``dim``).

    Output (`EncoderOutput`): ``target`` (B, output_dim); ``user`` (B, D) the projected user features
    ``W u``; ``sequence`` and ``mask`` None.
    """

    def __init__(
        self,
        features: FeatureSpec,
        dim: int = 64,
        hidden_dims: Sequence[int] = (128,),
        dropout: float = 0.0,
        output_dim: int = 64,
        user_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_settings("NoHistoryEncoder", dim, output_dim, user_dim, dropout)
        hidden_dims = list(hidden_dims)
        if any(h <= 0 for h in hidden_dims):
            raise ValueError(f"NoHistoryEncoder: hidden_dims must all be positive, got {hidden_dims}")
        self.features = features
        self.dim = dim
        self.output_dim = output_dim

        self.embeddings = FeatureEmbeddings(features, dim, user_dim)
        self.user_projection = nn.Linear(self.embeddings.user_dim, dim, bias=False)
        layers: list[nn.Module] = []
        width = 2 * dim + self.embeddings.user_dim  # [e_c, u, e_c ⊙ W u]
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.SiLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, output_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, batch: Batch) -> EncoderOutput:
        """`Batch` -> `EncoderOutput` (see the class docstring for the shapes); reads no history field."""
        e_c = self.embeddings.candidate_tokens(batch)  # (B, D)
        u = self.embeddings.user_features(batch).to(e_c.dtype)  # (B, D_u)
        user = self.user_projection(u)  # (B, D)
        target = self.mlp(torch.cat([e_c, u, e_c * user], dim=-1))  # (B, output_dim)
        return EncoderOutput(target=target, user=user, sequence=None, mask=None)


class MeanPoolEncoder(SequenceEncoder):
    """The average-pooled history baseline (YouTube-DNN style): the mean valid history token, then `TargetMLP`.

    ``h = sum_i x_i / max(history_len, 1)`` over the history tokens ``x`` (B, L, D) (item + side channels,
    0 at padding), then ``target = TargetMLP(h, e_c, u)`` with ``e_c`` (B, D) the candidate token and ``u``
    (B, D_u) the user features: ``[h, e_c, u, h ⊙ e_c]`` -> (B, output_dim).

    Args:
        features: the feature spec (vocabularies and ``max_len``).
        dim: D, the token width.
        dropout: between the two layers of the target MLP.
        output_dim: width of ``EncoderOutput.target``.
        user_dim: width of the user features (default ``dim``).

    Output (`EncoderOutput`): ``target`` (B, output_dim); ``user`` (B, D) the mean history token ``h``
    (0 for an empty history); ``sequence`` (B, L, D) the history tokens (0 at padding); ``mask`` (B, L)
    valid history positions.
    """

    def __init__(
        self,
        features: FeatureSpec,
        dim: int = 64,
        dropout: float = 0.0,
        output_dim: int = 64,
        user_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_settings("MeanPoolEncoder", dim, output_dim, user_dim, dropout)
        self.features = features
        self.dim = dim
        self.output_dim = output_dim
        self.max_len = features.max_len

        self.embeddings = FeatureEmbeddings(features, dim, user_dim)
        self.target_mlp = TargetMLP(dim, self.embeddings.user_dim, output_dim, dropout)

    def forward(self, batch: Batch) -> EncoderOutput:
        """`Batch` -> `EncoderOutput` (see the class docstring for the shapes)."""
        L = batch.history_item_id.shape[1]
        if self.max_len < L:
            raise ValueError(f"MeanPoolEncoder: the batch's history width {L} exceeds features.max_len={self.max_len}")
        history_mask = batch.history_mask()  # (B, L)
        tokens = self.embeddings.history_tokens(batch)  # (B, L, D), 0 at padding
        count = batch.history_len.clamp(min=1).unsqueeze(-1).to(tokens.dtype)  # (B, 1)
        pooled = tokens.sum(dim=1) / count  # (B, D): 0 for an empty history
        e_c = self.embeddings.candidate_tokens(batch)  # (B, D)
        u = self.embeddings.user_features(batch)  # (B, D_u)
        target = self.target_mlp(pooled, e_c, u)  # (B, output_dim)
        return EncoderOutput(target=target, user=pooled, sequence=tokens, mask=history_mask)
