"""PLE: Progressive Layered Extraction (Tang et al., "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

PLE stacks ``L`` extraction levels (each one a CGC, Customized Gate Control). Level ``l`` has
``S`` shared experts ``E^l_s`` and, per task ``t``, ``K`` task experts ``E^l_t``, all MLPs with
output width ``H = expert_dims[-1]``. Every task keeps its own path ``p^l_t`` through the levels and
one shared path ``s^l`` runs beside them:

    level 0:      p^0_t = s^0 = x                                   x = EncoderOutput.target, (B, D)
    task gate:    g^l_t = softmax(W^l_t p^l_t)                      (B, K + S)
                  p^{l+1}_t = sum_i g^l_t,i [E^l_t(p^l_t), E^l_s(s^l)]_i          (B, H)
    shared gate:  g^l_s = softmax(W^l_s s^l)                        (B, T K + S), l < L - 1 only
                  s^{l+1} = sum_i g^l_s,i [E^l_1(p^l_1), ..., E^l_T(p^l_T), E^l_s(s^l)]_i
    towers:       y_t = tower_t(p^L_t)

Task experts read their task's path, shared experts the shared path. The last level has no shared
gate: nothing reads its mixture. ``num_levels=1`` is CGC; ``num_task_experts=0`` is a stack of
MMoE layers (each task gate then weighs the shared experts only).

Names (`heads.base`): experts ``l{l}/shared/{i}`` (kind ``shared``) and ``l{l}/{task}/{i}`` (kind
``task``, owner the task); gates ``l{l}/{task}`` (columns: the task's experts, then the shared
experts) and ``l{l}/shared`` (columns: every task's experts in task order, then the shared ones).
A task named ``shared`` would collide with the shared experts' names and is refused.

Optional expert load balancing (off by default): `heads.balance.BalanceLoss` over the task gates of
every level (the shared gates only feed the next level's shared path and are left free).

This module also holds `ExpertGraphHead`, the small engine PLE and `heads.home.HoME` share: experts
and softmax gates in levels, each reading the head's input or one gate's mixture, evaluated in the
order they were added. Every gate is a Linear with exactly one output column per expert it may
weigh, so an expert outside a gate's list has no column, not a masked one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from encoders.base import EncoderOutput
from heads.balance import BalanceKind, BalanceLoss
from heads.base import ExpertSpec, GateSpec, HeadOutput, MultiTaskHead
from heads.tower import MLP, TaskTower
from mtrank.batch import Batch
from mtrank.spec import TaskSpec


class ExpertGraphHead(MultiTaskHead):
    """Experts and softmax gates in levels; each reads the head input or one gate's mixture.

    Subclasses call `add_expert` and `add_gate` in evaluation order (an expert after the gate whose
    mixture it reads, a gate after its experts), build ``self.towers`` (one `TaskTower` per task,
    in task order), implement `represent` and call `check_layout`. `route` evaluates the graph;
    the inherited `forward` runs the towers and the balance loss over ``self.balanced_gates``.
    """

    def __init__(self, input_dim: int, tasks: Sequence[TaskSpec], balance: BalanceLoss) -> None:
        super().__init__(input_dim, tasks)
        self.balance = balance
        self.balance_loss_weight = balance.weight
        # ModuleLists with parallel name lists: names may hold any character ("/", ".")
        self.expert_modules = nn.ModuleList()
        self.gate_modules = nn.ModuleList()
        self.towers = nn.ModuleList()
        self.expert_sources: dict[str, str | None] = {}  # expert -> the gate whose mixture it reads (None: input)
        self.gate_sources: dict[str, str | None] = {}  # gate -> the gate whose mixture it reads (None: input)
        self.balanced_gates: tuple[str, ...] = ()  # gates the balance loss covers
        self._index: dict[str, int] = {}  # expert or gate name -> its position in its ModuleList
        self._order: list[tuple[str, str]] = []  # ("expert" | "gate", name) in evaluation order

    def add_expert(self, name: str, module: nn.Module, spec: ExpertSpec, source: str | None = None) -> None:
        """Add expert ``name`` (a module (B, in) -> (B, H)) reading the head input or gate ``source``'s mixture."""
        if name in self.expert_specs:
            raise ValueError(f"{type(self).__name__}: duplicate expert name {name!r} (two tasks with one name?)")
        if source is not None and source not in self.gate_specs:
            raise ValueError(f"{type(self).__name__}: expert {name!r} reads gate {source!r}, not added before it")
        self._index[name] = len(self.expert_modules)
        self.expert_modules.append(module)
        self.expert_specs[name] = spec
        self.expert_sources[name] = source
        self._order.append(("expert", name))

    def add_gate(self, name: str, input_dim: int, spec: GateSpec, source: str | None = None) -> None:
        """Add softmax gate ``name``: a Linear (B, input_dim) -> (B, len(spec.experts)) on the input or ``source``."""
        if name in self.gate_specs:
            raise ValueError(f"{type(self).__name__}: duplicate gate name {name!r} (two tasks with one name?)")
        missing = [e for e in spec.experts if e not in self.expert_specs]
        if missing or not spec.experts:
            raise ValueError(f"{type(self).__name__}: gate {name!r} weighs no experts or experts not added: {missing}")
        if source is not None and source not in self.gate_specs:
            raise ValueError(f"{type(self).__name__}: gate {name!r} reads gate {source!r}, not added before it")
        self._index[name] = len(self.gate_modules)
        self.gate_modules.append(nn.Linear(input_dim, len(spec.experts)))
        self.gate_specs[name] = spec
        self.gate_sources[name] = source
        self._order.append(("gate", name))

    def expert(self, name: str) -> nn.Module:
        """The module of expert ``name``."""
        return self.expert_modules[self._index[name]]

    def gate(self, name: str) -> nn.Linear:
        """The Linear of gate ``name`` (its softmax is taken in `route`)."""
        return self.gate_modules[self._index[name]]

    def route(self, h: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """(B, input_dim) input -> (mixtures, gates, experts), each a dict by name.

        mixtures: gate -> (B, H) weighted sum of its experts' outputs; gates: gate -> (B, E_g)
        float32 softmax weights in `GateSpec` column order; experts: expert -> (B, H) output.
        """
        mixtures: dict[str, Tensor] = {}
        gates: dict[str, Tensor] = {}
        experts: dict[str, Tensor] = {}
        for kind, name in self._order:
            if kind == "expert":
                source = self.expert_sources[name]
                experts[name] = self.expert_modules[self._index[name]](h if source is None else mixtures[source])
                continue
            source = self.gate_sources[name]
            g = torch.softmax(
                self.gate_modules[self._index[name]](h if source is None else mixtures[source]).float(), -1
            )
            stacked = torch.stack([experts[e] for e in self.gate_specs[name].experts], dim=1)  # (B, E_g, H)
            mixtures[name] = torch.einsum("be,beh->bh", g.to(stacked.dtype), stacked)
            gates[name] = g
        return mixtures, gates, experts

    def represent(
        self, h: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:  # pragma: no cover
        """(B, input_dim) -> (task -> (B, H) tower input, gates, experts)."""
        raise NotImplementedError

    def forward(self, x: EncoderOutput, batch: Batch) -> HeadOutput:
        """`EncoderOutput` (its ``target``, (B, input_dim)) -> per-task outputs, gates and expert activations."""
        reps, gates, experts = self.represent(x.target)
        logits = {task.name: tower(reps[task.name]) for task, tower in zip(self.tasks, self.towers, strict=True)}
        return HeadOutput(
            logits=logits,
            aux_loss=self.balance(gates[name] for name in self.balanced_gates),
            gates=gates,
            experts=experts,
        )


def check_counts(head: str, counts: Iterable[tuple[str, int, int]]) -> None:
    """Refuse ``(setting, value, minimum)`` triples whose value is below the minimum, naming the setting."""
    for setting, value, minimum in counts:
        if value < minimum:
            raise ValueError(f"{head}: {setting} must be >= {minimum}, got {value}")


def refuse_task_named_shared(head: str, tasks: Sequence[TaskSpec]) -> None:
    """Refuse a task named ``shared``: its experts and gates would take the shared ones' names."""
    for i, task in enumerate(tasks):
        if task.name == "shared":
            raise ValueError(
                f"{head}: model.tasks[{i}].name 'shared' is reserved (it names the shared experts and gates); "
                "rename the task"
            )


class PLE(ExpertGraphHead):
    """Progressive Layered Extraction: ``num_levels`` CGC levels of shared and task experts.

    Args:
        input_dim: width of ``EncoderOutput.target``.
        tasks: the task list (one path, gate per level and tower each, in this order).
        num_levels: L, the number of extraction levels (1: CGC).
        num_shared_experts: S, shared experts per level (>= 1).
        num_task_experts: K, experts per task per level (>= 0; 0: stacked MMoE layers).
        expert_dims: hidden widths of each expert MLP; an expert's output is (B, expert_dims[-1]).
        tower_dims: hidden widths of each task tower.
        dropout: dropout in the experts and towers.
        balance_loss_weight: weight of the expert balance auxiliary loss over the task gates (0: off).
        balance_loss: its kind, ``importance``, ``load`` or ``importance+load`` (`heads.balance`).

    Output (`HeadOutput`): ``logits`` task -> (B,); ``gates`` ``l{l}/{task}`` -> (B, K + S) and
    ``l{l}/shared`` (l < L - 1) -> (B, T K + S); ``experts`` ``l{l}/shared/{i}``, ``l{l}/{task}/{i}``
    -> (B, expert_dims[-1]); ``aux_loss`` when ``balance_loss_weight > 0``.
    """

    def __init__(
        self,
        input_dim: int,
        tasks: Sequence[TaskSpec],
        num_levels: int = 2,
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        expert_dims: Sequence[int] = (128, 64),
        tower_dims: Sequence[int] = (64,),
        dropout: float = 0.0,
        balance_loss_weight: float = 0.0,
        balance_loss: BalanceKind = "importance",
    ) -> None:
        super().__init__(input_dim, tasks, BalanceLoss(balance_loss_weight, balance_loss))
        check_counts(
            "PLE",
            [("num_levels", num_levels, 1), ("num_shared_experts", num_shared_experts, 1),
             ("num_task_experts", num_task_experts, 0), ("len(expert_dims)", len(expert_dims), 1)],
        )  # fmt: skip
        refuse_task_named_shared("PLE", self.tasks)
        self.num_levels = num_levels
        self.num_shared_experts = num_shared_experts
        self.num_task_experts = num_task_experts
        hidden = expert_dims[-1]
        for level in range(num_levels):
            width = input_dim if level == 0 else hidden
            prev = f"l{level - 1}"
            shared = tuple(f"l{level}/shared/{i}" for i in range(num_shared_experts))
            for name in shared:
                source = None if level == 0 else f"{prev}/shared"
                self.add_expert(name, MLP(width, expert_dims, dropout), ExpertSpec("shared", level=level), source)
            own: dict[str, tuple[str, ...]] = {}
            for task in self.tasks:
                own[task.name] = tuple(f"l{level}/{task.name}/{i}" for i in range(num_task_experts))
                for name in own[task.name]:
                    spec = ExpertSpec("task", owner=task.name, level=level)
                    source = None if level == 0 else f"{prev}/{task.name}"
                    self.add_expert(name, MLP(width, expert_dims, dropout), spec, source)
            for task in self.tasks:
                spec = GateSpec(own[task.name] + shared, task=task.name, group=task.group, level=level)
                self.add_gate(f"l{level}/{task.name}", width, spec, None if level == 0 else f"{prev}/{task.name}")
            if level < num_levels - 1:  # the last level's shared mixture would feed nothing
                every = tuple(name for task in self.tasks for name in own[task.name]) + shared
                source = None if level == 0 else f"{prev}/shared"
                self.add_gate(f"l{level}/shared", width, GateSpec(every, level=level), source)
        self.towers.extend(TaskTower(hidden, tower_dims, dropout) for _ in self.tasks)
        self.balanced_gates = tuple(name for name, spec in self.gate_specs.items() if spec.task is not None)
        self.check_layout()

    def represent(self, h: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """(B, input_dim) -> (task -> (B, H) last-level task mixture, gates, experts)."""
        mixtures, gates, experts = self.route(h)
        last = self.num_levels - 1
        return {t.name: mixtures[f"l{last}/{t.name}"] for t in self.tasks}, gates, experts
