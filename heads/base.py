"""The head interface: task heads turn an `EncoderOutput` into one logit (or value) per task.

A head is built from the encoder's output width and the task list. Besides its outputs it
exposes its gate weights and expert activations (`HeadOutput.gates`, `HeadOutput.experts`)
so that monitoring callbacks (expert balance) read them without reaching into the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from encoders.base import EncoderOutput
from mtrank.batch import Batch
from mtrank.spec import TaskSpec


@dataclass
class HeadOutput:
    """What a multi-task head gives.

    Attributes:
        logits: task name -> (B,) logit (binary tasks) or prediction (regression tasks).
        aux_loss: a scalar auxiliary loss (0-dim) added to the objective, or None.
        gates: gate name (a task name for MMoE) -> (B, E) gate weights over the experts it sees.
        experts: expert name -> (B, H) expert output activations (for balance monitoring).
    """

    logits: dict[str, Tensor]
    aux_loss: Tensor | None = None
    gates: dict[str, Tensor] = field(default_factory=dict)
    experts: dict[str, Tensor] = field(default_factory=dict)


class MultiTaskHead(nn.Module):
    """Base class of heads: ``__init__(input_dim, tasks, ...)``, ``forward(x, batch) -> HeadOutput``."""

    def __init__(self, input_dim: int, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.tasks = list(tasks)

    def forward(self, x: EncoderOutput, batch: Batch) -> HeadOutput:  # pragma: no cover - interface
        raise NotImplementedError
