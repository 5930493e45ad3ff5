"""The encoder interface: what every sequence encoder (HSTU, LONGER, ULTRA-HSTU) takes and gives.

An encoder turns a `Batch` into an `EncoderOutput`. It owns the feature embeddings
(`encoders.embeddings.FeatureEmbeddings`) and never reads Parquet. Heads see only the
`EncoderOutput` and the batch fields they declare they need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtrank.batch import Batch


@dataclass
class EncoderOutput:
    """What an encoder hands to the heads.

    Attributes:
        target: (B, output_dim) the candidate item's representation in the user's context
            (target-aware sequence summary, candidate embedding and user features together):
            the input of the task heads.
        user: (B, D) a candidate-free summary of the user's history (the newest valid state), or None.
        sequence: (B, L, D) the last layer's state at every history position (0 at padding), or None.
        mask: (B, L) bool valid history positions, or None.
        aux_loss: a scalar loss the encoder adds to the objective (0-dim tensor), or None.
    """

    target: Tensor
    user: Tensor | None = None
    sequence: Tensor | None = None
    mask: Tensor | None = None
    aux_loss: Tensor | None = None


class SequenceEncoder(nn.Module):
    """Base class of encoders: subclasses set `output_dim` (and `dim`) and implement `forward`.

    ``user_dim`` is the width of ``EncoderOutput.user``: the encoder's model width ``dim``.
    """

    output_dim: int
    dim: int

    @property
    def user_dim(self) -> int:
        """Width of ``EncoderOutput.user`` (B, user_dim)."""
        return self.dim

    def forward(self, batch: Batch) -> EncoderOutput:  # pragma: no cover - interface
        raise NotImplementedError


class TargetMLP(nn.Sequential):
    """The encoders' output MLP: ``[h_c, e_c, u, h_c ⊙ e_c] -> (B, output_dim)``.

    ``h_c`` (B, D) is the candidate's final state, ``e_c`` (B, D) its embedding and ``u`` (B, D_u) the
    user features; the product lets the heads see candidate–context agreement directly.

    Args:
        dim: D.
        user_dim: D_u.
        output_dim: the output width (the encoder's ``output_dim``).
        dropout: dropout between the two layers.
    """

    def __init__(self, dim: int, user_dim: int, output_dim: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(3 * dim + user_dim, 2 * output_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * output_dim, output_dim),
        )

    def forward(self, h_c: Tensor, e_c: Tensor, u: Tensor) -> Tensor:  # type: ignore[override]
        """(B, D), (B, D), (B, D_u) -> (B, output_dim), in ``h_c``'s dtype."""
        e_c, u = e_c.to(h_c.dtype), u.to(h_c.dtype)
        return super().forward(torch.cat([h_c, e_c, u, h_c * e_c], dim=-1))
