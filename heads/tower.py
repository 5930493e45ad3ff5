"""Task towers: the small MLPs that turn a (mixed) representation into one output per task.

`MLP` is the plain building block (Linear -> activation -> dropout per hidden layer) used by the
MMoE experts and by `TaskTower`, which ends in one linear unit: a logit for a binary task, a value
for a regression task.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Sequential):
    """``input_dim -> hidden_dims[0] -> ... -> hidden_dims[-1]``, each Linear followed by ReLU and dropout.

    Args:
        input_dim: width of the input (..., input_dim).
        hidden_dims: widths of the layers; the output is (..., hidden_dims[-1]) (or the input if empty).
        dropout: dropout after each activation.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [nn.Linear(input_dim, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            input_dim = width
        super().__init__(*layers)
        self.output_dim = input_dim


class TaskTower(nn.Module):
    """One task's tower: an `MLP` then a single linear output unit.

    Args:
        input_dim: width of the input (B, input_dim).
        hidden_dims: widths of the hidden layers (may be empty: a linear output on the input).
        dropout: dropout after each hidden layer.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(input_dim, hidden_dims, dropout)
        self.out = nn.Linear(self.mlp.output_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, input_dim) -> (B,) logit (binary task) or value (regression task)."""
        return self.out(self.mlp(x)).squeeze(-1)
