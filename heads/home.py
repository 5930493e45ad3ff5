"""HoME: Hierarchy of Multi-Gate Experts (Wang, Cao, Fu, Gai, Zhou, "HoME: Hierarchy of Multi-Gate
Experts for Multi-Task Learning at Kuaishou", arXiv 2408.05430, 2024).

The paper reports three failures of MMoE-style heads at Kuaishou and one fix for each:

- *expert collapse*: expert outputs on very different scales, many ReLU units dead, so gates
  cannot weigh experts fairly -> **expert normalisation + Swish**;
- *expert degradation*: a shared expert taken over by one task -> **hierarchy mask** (experts
  shared within a task group, gates that see only their branch);
- *expert underfitting*: sparse tasks ignore their own experts -> **feature gate** (each expert its
  own view of the input) and **self gate** (a gated residual path between the layers).

Each of the four parts has a switch here (``expert_norm``, ``hierarchy_mask``, ``feature_gate``,
``self_gate``); off, the head is the plain version of that part.

Notation: ``x = EncoderOutput.target`` (B, D); every expert outputs (B, H), ``H = expert_dims[-1]``;
groups are the task groups (`TaskSpec.group`, in order of first appearance); ``g(t)`` is task
``t``'s group. Every gate is ``softmax(W v)`` over the experts it may weigh, one Linear column per
expert; a mixture is ``sum_i gate_i * expert_i`` (B, H).

1. Expert (every expert, every level): ``e(v) = MLP(F(v))`` with ``F`` the feature gate (3.) and
   MLP layers ``Linear -> BatchNorm1d -> SiLU (Swish) -> dropout`` (``expert_norm=True``) or
   ``Linear -> ReLU -> dropout`` (off, as MMoE's `heads.tower.MLP`).

2. Hierarchy (``hierarchy_mask=True``), two levels:

       meta layer (level 0), on x:
         experts  meta/shared/{i}  (M_s of them),  meta/{group}/{i}  (M_g per group)
         v_group  = mix of gate meta/{group}  = softmax(W x) over [meta/shared/*, meta/{group}/*]
         v_shared = mix of gate meta/shared   = softmax(W x) over every meta expert
       task layer (level 1):
         experts  task/shared/{i} (T_s) read v_shared; task/{group}/{i} (T_g per group) read v_group;
                  task/{task}/{i} (T_t per task) read v_{g(t)}
         m_t      = mix of gate task/{task} = softmax(W v_{g(t)}) over
                    [task/shared/*, task/{g(t)}/*, task/{task}/*]

   A gate has NO column for an expert outside its branch (another group's or task's experts): the
   restriction is exact by construction, not a -inf mask, so neither the experts nor the gates of
   one group's branch see another group's gates or experts. Groups do meet where the hierarchy
   says they do: v_shared mixes every meta expert and the task/shared experts read it.
   Off (``hierarchy_mask=False``): one flat layer on x, experts ``task/shared/{i}`` (M_s + T_s of
   them) and ``task/{task}/{i}`` (T_t each); gate ``task/{task}`` over [task/shared/*, task/{task}/*];
   ``m_t`` its mixture. Group experts (``meta_group_experts``, ``task_group_experts``) do not exist.

3. Feature gate (``feature_gate=True``, the paper's Fea-LoRA): expert ``e`` reads its own view of
   its input v (B, V): ``F_e(v) = v * 2 sigmoid(v A_e B_e)``, ``A_e`` (V, r), ``B_e`` (r, V),
   ``r = feature_gate_rank``. Off: ``F_e(v) = v``.

4. Self gate (``self_gate=True``): the tower of task t reads
   ``r_t = m_t + sigmoid(W_t v) * v`` (B, H), an element-wise gated identity path from the layer
   below: ``v = v_{g(t)}`` in the hierarchy; ``v = P x`` (P: Linear D -> H, one for all tasks) in
   flat mode. Off: ``r_t = m_t``. Then ``y_t = tower_t(r_t)`` (`heads.tower.TaskTower`).

Choices the paper leaves open, and why:

- Normalisation: BatchNorm1d after the Linear of EVERY expert layer (the Linear has no bias: the
  norm's shift replaces it), then Swish = SiLU (beta 1). BatchNorm puts all experts' outputs on one
  scale per unit, which is what the gates need; Swish has no dead zone. At inference (eval mode)
  BatchNorm uses its running statistics, the standard behaviour: a candidate's score must not
  depend on which other candidates share its batch (requests differ in size and mix, a batch may
  hold one candidate), and must be deterministic. In training it uses the batch's statistics, per
  device under DDP unless the Trainer has ``sync_batchnorm: true``; a training batch of one sample
  is refused by BatchNorm.
- Gate activation: softmax (as `heads.mmoe.MMoE` and `heads.ple.PLE`). Rows sum to 1, so a mixture
  is a convex combination of normalised experts and keeps their scale, gate weights are comparable
  across gates, and the balance losses and monitors (`heads.balance`) assume it.
- Gate inputs: the meta gates read x; task gates read v_{g(t)}, the representation their task's
  own experts read (each level's gates see what its experts see, as in PLE).
- Groups of one task still get their group experts (the layout does not change shape when a task
  joins a group); the meta/shared gate exists even with a single group. Group names are only
  checked in hierarchy mode (they name experts and gates only there): ``shared`` and task names
  are refused (they would collide with the shared / task experts' and gates' names).
- Flat mode keeps the number of shared experts (M_s + T_s) so the switch compares like with like.
- Feature gate: one (A, B) pair per expert (its own view), at every level, no bias, ``B = 0`` at
  init so the gate starts exactly at 1 (the head starts as the same network without it, LoRA
  style); the factor 2 centres sigmoid's range (0, 2) on 1, so it can damp or amplify.
- Self gate: a per-task element-wise gate (H units, not a scalar), Linear with bias at PyTorch's
  default init (about 0.5 open at start); in flat mode x goes through a projection to H first,
  since D and H differ in general.
- Expert sizes: every expert uses ``expert_dims`` (its input width is its level's: D or H).
- Balance loss (optional, ``balance_loss_weight > 0``): `heads.balance.BalanceLoss` averaged over
  every gate with more than one expert (meta gates included).
- Counts: ``meta_shared_experts`` and ``task_shared_experts`` >= 1 (every gate then weighs at least
  one expert); group and task expert counts may be 0 (ablations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from heads.balance import BalanceKind, BalanceLoss
from heads.base import ExpertSpec, GateSpec, task_groups
from heads.ple import ExpertGraphHead, check_counts, refuse_task_named_shared
from heads.tower import MLP, TaskTower
from mtrank.spec import TaskSpec


class FeatureGate(nn.Module):
    """Fea-LoRA: ``v -> v * 2 sigmoid(v A B)``, a low-rank element-wise gate on an expert's input.

    Args:
        dim: V, the width of the input (B, V).
        rank: r, the inner width of ``A`` (V, r) and ``B`` (r, V). ``B`` starts at 0, so the gate is
            exactly 1 (the identity) at init.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # A
        self.up = nn.Linear(rank, dim, bias=False)  # B
        nn.init.zeros_(self.up.weight)

    def gate(self, v: Tensor) -> Tensor:
        """(B, V) -> (B, V) gate values in (0, 2)."""
        return 2 * torch.sigmoid(self.up(self.down(v)))

    def forward(self, v: Tensor) -> Tensor:
        """(B, V) -> (B, V) gated input."""
        return v * self.gate(v)


class HoMEExpert(nn.Module):
    """One HoME expert: an optional `FeatureGate` on its input, then an MLP.

    Args:
        input_dim: width of the input (B, input_dim).
        hidden_dims: widths of the layers; the output is (B, hidden_dims[-1]).
        dropout: dropout after each activation.
        norm: ``Linear -> BatchNorm1d -> SiLU`` per layer (True) or ``Linear -> ReLU`` (False).
        feature_gate_rank: rank of the feature gate; 0: no feature gate (``feature_gate`` is None).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        dropout: float = 0.0,
        norm: bool = True,
        feature_gate_rank: int = 0,
    ) -> None:
        super().__init__()
        self.feature_gate = FeatureGate(input_dim, feature_gate_rank) if feature_gate_rank > 0 else None
        if norm:
            layers: list[nn.Module] = []
            width = input_dim
            for out in hidden_dims:
                layers += [nn.Linear(width, out, bias=False), nn.BatchNorm1d(out), nn.SiLU()]
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
                width = out
            self.mlp: nn.Module = nn.Sequential(*layers)
        else:
            self.mlp = MLP(input_dim, hidden_dims, dropout)
        self.output_dim = hidden_dims[-1]

    def forward(self, v: Tensor) -> Tensor:
        """(B, input_dim) -> (B, output_dim)."""
        if self.feature_gate is not None:
            v = self.feature_gate(v)
        return self.mlp(v)


class SelfGate(nn.Module):
    """Gated identity path: ``(m, v) -> m + sigmoid(W v) * v``, element-wise.

    Args:
        dim: H, the width of ``m`` and ``v`` (B, H).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, m: Tensor, v: Tensor) -> Tensor:
        """(B, H) mixture, (B, H) lower-layer representation -> (B, H)."""
        return m + torch.sigmoid(self.proj(v)) * v


class HoME(ExpertGraphHead):
    """Hierarchy of Multi-Gate Experts: meta (group) and task expert layers with four switchable parts.

    Args:
        input_dim: D, width of ``EncoderOutput.target``.
        tasks: the task list (one gate and tower each, in this order); ``TaskSpec.group`` groups them.
        meta_shared_experts: M_s, meta-layer shared experts (>= 1).
        meta_group_experts: M_g, meta-layer experts per group (>= 0; unused in flat mode).
        task_shared_experts: T_s, task-layer shared experts (>= 1).
        task_group_experts: T_g, task-layer experts per group (>= 0; unused in flat mode).
        task_experts: T_t, experts per task (>= 0).
        expert_dims: hidden widths of every expert; an expert's output is (B, expert_dims[-1]).
        tower_dims: hidden widths of each task tower.
        dropout: dropout in the experts and towers.
        expert_norm: BatchNorm1d + Swish in the experts (False: ReLU MLP experts).
        hierarchy_mask: meta + task layers by task group (False: one flat layer of shared and task experts).
        feature_gate: a per-expert Fea-LoRA input gate.
        feature_gate_rank: its rank (>= 1 when ``feature_gate``).
        self_gate: the gated residual path into each task's tower input.
        balance_loss_weight: weight of the expert balance auxiliary loss over all gates (0: off).
        balance_loss: its kind, ``importance``, ``load`` or ``importance+load`` (`heads.balance`).

    Output (`HeadOutput`): ``logits`` task -> (B,); ``gates`` ``meta/{group}``, ``meta/shared``,
    ``task/{task}`` -> (B, E_g) (flat: ``task/{task}`` only); ``experts`` ``meta/shared/{i}``,
    ``meta/{group}/{i}``, ``task/shared/{i}``, ``task/{group}/{i}``, ``task/{task}/{i}`` ->
    (B, expert_dims[-1]); ``aux_loss`` when ``balance_loss_weight > 0``.
    """

    def __init__(
        self,
        input_dim: int,
        tasks: Sequence[TaskSpec],
        meta_shared_experts: int = 2,
        meta_group_experts: int = 1,
        task_shared_experts: int = 1,
        task_group_experts: int = 1,
        task_experts: int = 1,
        expert_dims: Sequence[int] = (128, 64),
        tower_dims: Sequence[int] = (64,),
        dropout: float = 0.0,
        expert_norm: bool = True,
        hierarchy_mask: bool = True,
        feature_gate: bool = True,
        feature_gate_rank: int = 16,
        self_gate: bool = True,
        balance_loss_weight: float = 0.0,
        balance_loss: BalanceKind = "importance",
    ) -> None:
        super().__init__(input_dim, tasks, BalanceLoss(balance_loss_weight, balance_loss))
        check_counts(
            "HoME",
            [("meta_shared_experts", meta_shared_experts, 1), ("meta_group_experts", meta_group_experts, 0),
             ("task_shared_experts", task_shared_experts, 1), ("task_group_experts", task_group_experts, 0),
             ("task_experts", task_experts, 0), ("len(expert_dims)", len(expert_dims), 1)]
            + ([("feature_gate_rank", feature_gate_rank, 1)] if feature_gate else []),
        )  # fmt: skip
        refuse_task_named_shared("HoME", self.tasks)
        if hierarchy_mask:
            self._check_groups()
        self.expert_norm = expert_norm
        self.hierarchy_mask = hierarchy_mask
        self.feature_gate = feature_gate
        self.self_gate = self_gate
        self.hidden_dim = hidden = expert_dims[-1]
        rank = feature_gate_rank if feature_gate else 0

        def expert(width: int) -> HoMEExpert:
            return HoMEExpert(width, expert_dims, dropout, norm=expert_norm, feature_gate_rank=rank)

        self.task_gate_source: dict[str, str | None] = {}  # task -> the gate whose mixture its layer reads
        if hierarchy_mask:
            groups = task_groups(self.tasks)
            meta_shared = tuple(f"meta/shared/{i}" for i in range(meta_shared_experts))
            meta_group = {g: tuple(f"meta/{g}/{i}" for i in range(meta_group_experts)) for g in groups}
            for name in meta_shared:
                self.add_expert(name, expert(input_dim), ExpertSpec("shared", level=0))
            for g, names in meta_group.items():
                for name in names:
                    self.add_expert(name, expert(input_dim), ExpertSpec("group", owner=g, level=0))
            for g in groups:
                self.add_gate(f"meta/{g}", input_dim, GateSpec(meta_shared + meta_group[g], group=g, level=0))
            every_meta = meta_shared + tuple(name for names in meta_group.values() for name in names)
            self.add_gate("meta/shared", input_dim, GateSpec(every_meta, level=0))

            task_shared = tuple(f"task/shared/{i}" for i in range(task_shared_experts))
            task_group = {g: tuple(f"task/{g}/{i}" for i in range(task_group_experts)) for g in groups}
            for name in task_shared:
                self.add_expert(name, expert(hidden), ExpertSpec("shared", level=1), "meta/shared")
            for g, names in task_group.items():
                for name in names:
                    self.add_expert(name, expert(hidden), ExpertSpec("group", owner=g, level=1), f"meta/{g}")
            for task in self.tasks:
                for i in range(task_experts):
                    spec = ExpertSpec("task", owner=task.name, level=1)
                    self.add_expert(f"task/{task.name}/{i}", expert(hidden), spec, f"meta/{task.group}")
            for task in self.tasks:
                own = tuple(f"task/{task.name}/{i}" for i in range(task_experts))
                spec = GateSpec(task_shared + task_group[task.group] + own, task=task.name, group=task.group, level=1)
                self.add_gate(f"task/{task.name}", hidden, spec, f"meta/{task.group}")
                self.task_gate_source[task.name] = f"meta/{task.group}"
            self.residual = None
        else:
            shared = tuple(f"task/shared/{i}" for i in range(meta_shared_experts + task_shared_experts))
            for name in shared:
                self.add_expert(name, expert(input_dim), ExpertSpec("shared", level=0))
            for task in self.tasks:
                for i in range(task_experts):
                    spec = ExpertSpec("task", owner=task.name, level=0)
                    self.add_expert(f"task/{task.name}/{i}", expert(input_dim), spec)
            for task in self.tasks:
                own = tuple(f"task/{task.name}/{i}" for i in range(task_experts))
                self.add_gate(f"task/{task.name}", input_dim, GateSpec(shared + own, task=task.name, group=task.group))
                self.task_gate_source[task.name] = None
            # the flat self gate's lower-layer representation: x projected to H
            self.residual = nn.Linear(input_dim, hidden) if self_gate else None
        self.self_gates = nn.ModuleList(SelfGate(hidden) for _ in self.tasks) if self_gate else None
        self.towers.extend(TaskTower(hidden, tower_dims, dropout) for _ in self.tasks)
        self.balanced_gates = tuple(name for name, spec in self.gate_specs.items() if len(spec.experts) > 1)
        self.check_layout()

    def _check_groups(self) -> None:
        """Refuse group names that would collide with the shared or a task's experts and gates."""
        names = {t.name for t in self.tasks}
        for i, task in enumerate(self.tasks):
            if not task.group or task.group == "shared" or task.group in names:
                raise ValueError(
                    f"HoME: model.tasks[{i}].group {task.group!r} is not allowed with hierarchy_mask: a group "
                    "name must be non-empty, not 'shared' and not a task name (it names experts and gates)"
                )

    def represent(self, h: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """(B, input_dim) -> (task -> (B, H) tower input ``r_t``, gates, experts)."""
        mixtures, gates, experts = self.route(h)
        reps: dict[str, Tensor] = {}
        lower = self.residual(h) if self.residual is not None else None  # flat mode: P x, (B, H)
        for i, task in enumerate(self.tasks):
            m = mixtures[f"task/{task.name}"]
            if self.self_gates is not None:
                source = self.task_gate_source[task.name]
                v = lower if source is None else mixtures[source]
                m = self.self_gates[i](m, v)
            reps[task.name] = m
        return reps, gates, experts
