"""The head interface: task heads turn an `EncoderOutput` into one logit (or value) per task.

A head is built from the encoder's output width and the task list. Besides its outputs it
exposes its gate weights and expert activations (`HeadOutput.gates`, `HeadOutput.experts`) and,
once, the layout that gives them meaning: which experts each gate weighs, in which column order,
and whom each expert belongs to (`MultiTaskHead.gate_specs`, `MultiTaskHead.expert_specs`).
Monitoring callbacks (`mtrank.balance.ExpertBalanceMonitor`) read these without reaching into the
head's modules, so a new head is monitored as soon as it fills the two dicts.

Branches (`Branch`) are the optional parts beside the task heads, each switched on or off in YAML
(``model.fatigue``, ``model.uplift``): built like a head from ``(input_dim, tasks, features)``, run on
the same `EncoderOutput` and `Batch`, and giving a `BranchOutput`. A branch at ``position="encoder"``
(the fatigue branch) runs before the heads and may hand them an enriched `EncoderOutput`; a branch at
``position="head"`` (the uplift branch) runs beside them. A branch adds its own losses (`Branch.loss`)
and, optionally, its own validation metrics (`Branch.metrics`). A switched-off branch is ``None``:
no parameters, no compute.

Naming: an expert is named ``<level>/<owner>/<i>`` (``shared``, a group name or a task name as the
owner) or, in single-level heads, ``expert_<i>``; a gate is named after what it feeds (a task name
in single-level heads, ``<level>/<task-or-group>`` in hierarchies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from encoders.base import EncoderOutput
from mtrank.batch import Batch
from mtrank.spec import FeatureSpec, TaskSpec

ExpertKind = Literal["shared", "group", "task"]


@dataclass(frozen=True)
class ExpertSpec:
    """Who an expert belongs to.

    Attributes:
        kind: ``shared`` (every task may use it), ``group`` (the tasks of one task group) or
            ``task`` (one task's own expert).
        owner: the group name (``kind="group"``) or task name (``kind="task"``); None when shared.
        level: its layer in the head's hierarchy (0: the one that reads the encoder output).
    """

    kind: ExpertKind = "shared"
    owner: str | None = None
    level: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("shared", "group", "task"):
            raise ValueError(f"ExpertSpec.kind must be 'shared', 'group' or 'task', got {self.kind!r}")
        if (self.kind == "shared") != (self.owner is None):
            raise ValueError(
                f"ExpertSpec: a {self.kind} expert needs owner={'None' if self.kind == 'shared' else 'a name'}"
            )


@dataclass(frozen=True)
class GateSpec:
    """What one gate weighs.

    Attributes:
        experts: names of the experts it mixes, in the order of the gate's columns.
        task: the task whose tower reads this gate's mixture, or None for a gate that feeds a
            group or the shared path of the next level.
        group: the task group this gate serves (a group gate's group, a task gate's task group).
        level: its layer in the head's hierarchy.
    """

    experts: tuple[str, ...]
    task: str | None = None
    group: str | None = None
    level: int = 0


@dataclass
class HeadOutput:
    """What a multi-task head gives.

    Attributes:
        logits: task name -> (B,) logit (binary tasks) or prediction (regression tasks).
        aux_loss: a scalar auxiliary loss (0-dim) added to the objective, or None.
        gates: gate name -> (B, E_g) gate weights over the ``E_g`` experts of its `GateSpec`
            (rows sum to 1 for softmax gates).
        experts: expert name -> (B, H) expert output activations (for balance monitoring).
        branches: branch name (``fatigue``, ``uplift``) -> its `BranchOutput`, for the branches
            that ran (filled by `mtrank.module.RankingModule`, not by the head).
    """

    logits: dict[str, Tensor]
    aux_loss: Tensor | None = None
    gates: dict[str, Tensor] = field(default_factory=dict)
    experts: dict[str, Tensor] = field(default_factory=dict)
    branches: dict[str, BranchOutput] = field(default_factory=dict)


class MultiTaskHead(nn.Module):
    """Base class of heads: ``__init__(input_dim, tasks, ...)``, ``forward(x, batch) -> HeadOutput``.

    Subclasses with gates fill ``gate_specs`` (gate name -> `GateSpec`) and ``expert_specs``
    (expert name -> `ExpertSpec`) in ``__init__`` and call `check_layout` at its end.
    """

    def __init__(self, input_dim: int, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.tasks = list(tasks)
        self.gate_specs: dict[str, GateSpec] = {}
        self.expert_specs: dict[str, ExpertSpec] = {}

    def check_layout(self) -> None:
        """Refuse a gate that names an unknown expert or a task outside the task list."""
        names = {t.name for t in self.tasks}
        for gate, spec in self.gate_specs.items():
            unknown = [e for e in spec.experts if e not in self.expert_specs]
            if unknown:
                raise ValueError(f"{type(self).__name__}: gate {gate!r} names unknown experts {unknown}")
            if spec.task is not None and spec.task not in names:
                raise ValueError(f"{type(self).__name__}: gate {gate!r} serves unknown task {spec.task!r}")

    def forward(self, x: EncoderOutput, batch: Batch) -> HeadOutput:  # pragma: no cover - interface
        raise NotImplementedError


BranchPosition = Literal["encoder", "head"]


@dataclass
class BranchOutput:
    """What a branch gives.

    Attributes:
        encoded: the `EncoderOutput` the task heads read instead of the encoder's (a branch at
            ``position="encoder"``), or None (unchanged).
        outputs: name -> (B, ...) per-sample outputs (written by ``predict`` as columns
            ``<branch>_<name>[_<j>]``; read by the branch's metrics).
        state: name -> tensors the branch's `Branch.loss` needs (never written out).
    """

    encoded: EncoderOutput | None = None
    outputs: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)


class BranchMetrics(nn.Module):
    """A branch's validation/test metric set: ``update(out, batch)``, ``compute() -> {key: 0-dim}``, ``reset()``.

    Keys of `compute` are relative (``auuc``); the module logs them as ``<stage>/<branch>/<key>``.
    """

    def update(self, out: BranchOutput, batch: Batch) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Branch(nn.Module):
    """Base class of branches: ``__init__(input_dim, tasks, features, ..., user_dim)``, ``forward(x, batch)``.

    ``input_dim`` is the width of ``EncoderOutput.target``, ``user_dim`` that of ``EncoderOutput.user``
    (the module passes it as a keyword, from `encoders.base.SequenceEncoder.user_dim`).

    Attributes:
        position: ``encoder`` (runs between the encoder and the heads; may return an enriched
            `EncoderOutput` in `BranchOutput.encoded`) or ``head`` (runs beside the heads).
        requires: the `Batch` fields it reads beyond the history and candidate (``treatment``,
            ``request_item_id``, ...); documentation, checked by the branch itself with a clear message.
    """

    position: BranchPosition = "head"
    requires: tuple[str, ...] = ()

    def __init__(
        self, input_dim: int, tasks: Sequence[TaskSpec], features: FeatureSpec, user_dim: int | None = None
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.user_dim = user_dim
        self.tasks = list(tasks)
        self.features = features

    def forward(self, x: EncoderOutput, batch: Batch) -> BranchOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, out: BranchOutput, batch: Batch) -> dict[str, Tensor]:
        """Name -> 0-dim weighted loss added to the objective (logged as ``loss/<name>``); default none."""
        return {}

    def metrics(self) -> BranchMetrics | None:
        """A fresh metric set for one evaluation stage, or None (the default: no metrics of its own)."""
        return None


def task_groups(tasks: Sequence[TaskSpec]) -> dict[str, list[TaskSpec]]:
    """Task group name -> its tasks, groups in order of first appearance in the task list."""
    groups: dict[str, list[TaskSpec]] = {}
    for task in tasks:
        groups.setdefault(task.group, []).append(task)
    return groups
