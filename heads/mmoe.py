"""MMoE: Multi-gate Mixture-of-Experts (Ma et al., "Modeling Task Relationships in Multi-task Learning
with Multi-gate Mixture-of-Experts", KDD 2018).

Shared experts ``f_i`` (MLPs), one softmax gate per task ``g^k(x) = softmax(W_gk x)`` over the
experts, and one tower per task on that task's mixture:

    y_k = h^k(f^k(x)),    f^k(x) = sum_i g^k(x)_i f_i(x)

The input ``x`` is ``EncoderOutput.target`` (the candidate in its user's context); the head reads
nothing else from the batch.

Optional expert load balancing (off by default, ``balance_loss_weight=0``): `heads.balance.BalanceLoss`
on every task gate — by default the squared coefficient of variation of each gate's mean usage over
the batch, ``CV²(mean_b g^k(x_b))`` (Shazeer et al. 2017's importance loss), averaged over tasks and
times the weight. It is 0 when every expert gets the same share and grows as a gate collapses onto
few experts. ``balance_loss: load`` uses the Switch Transformer's load loss instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from encoders.base import EncoderOutput
from heads.balance import BalanceKind, BalanceLoss, importance_loss
from heads.base import ExpertSpec, GateSpec, HeadOutput, MultiTaskHead
from heads.tower import MLP, TaskTower
from mtrank.batch import Batch
from mtrank.spec import TaskSpec


def gate_balance_loss(gates: Tensor) -> Tensor:
    """(B, E) gate weights -> 0-dim ``CV²`` of the mean usage of each expert (0: perfectly balanced)."""
    return importance_loss(gates)


class MMoE(MultiTaskHead):
    """Shared experts, one softmax gate and one tower per task.

    Args:
        input_dim: width of ``EncoderOutput.target``.
        tasks: the task list (one gate and one tower each, in this order).
        num_experts: E, the number of shared experts.
        expert_dims: hidden widths of each expert MLP; an expert's output is (B, expert_dims[-1]).
        tower_dims: hidden widths of each task tower.
        dropout: dropout in the experts and towers.
        balance_loss_weight: weight of the expert balance auxiliary loss (0: off, costs nothing).
        balance_loss: its kind, ``importance``, ``load`` or ``importance+load`` (`heads.balance`).

    Output (`HeadOutput`): ``logits`` task -> (B,); ``gates`` task -> (B, E); ``experts``
    ``expert_<i>`` -> (B, expert_dims[-1]); ``aux_loss`` when ``balance_loss_weight > 0``.
    """

    def __init__(
        self,
        input_dim: int,
        tasks: Sequence[TaskSpec],
        num_experts: int = 4,
        expert_dims: Sequence[int] = (128, 64),
        tower_dims: Sequence[int] = (64,),
        dropout: float = 0.0,
        balance_loss_weight: float = 0.0,
        balance_loss: BalanceKind = "importance",
    ) -> None:
        super().__init__(input_dim, tasks)
        if num_experts < 1 or not expert_dims:
            raise ValueError(f"MMoE: need num_experts >= 1 and non-empty expert_dims, got {num_experts}, {expert_dims}")
        self.num_experts = num_experts
        self.balance = BalanceLoss(balance_loss_weight, balance_loss)
        self.experts = nn.ModuleList(MLP(input_dim, expert_dims, dropout) for _ in range(num_experts))
        # one gate and one tower per task, in task order (a ModuleList: task names may hold any character)
        self.gates = nn.ModuleList(nn.Linear(input_dim, num_experts) for _ in self.tasks)
        self.towers = nn.ModuleList(TaskTower(expert_dims[-1], tower_dims, dropout) for _ in self.tasks)
        self.expert_names = tuple(f"expert_{i}" for i in range(num_experts))
        self.expert_specs = {name: ExpertSpec("shared") for name in self.expert_names}
        self.gate_specs = {t.name: GateSpec(self.expert_names, task=t.name, group=t.group) for t in self.tasks}
        self.check_layout()

    def forward(self, x: EncoderOutput, batch: Batch) -> HeadOutput:
        """`EncoderOutput` (its ``target``, (B, input_dim)) -> per-task outputs, gates and expert activations."""
        h = x.target  # (B, D)
        experts = torch.stack([expert(h) for expert in self.experts], dim=1)  # (B, E, H)
        logits, gates = {}, {}
        for task, gate, tower in zip(self.tasks, self.gates, self.towers, strict=True):
            g = torch.softmax(gate(h).float(), dim=-1)  # (B, E)
            mixture = torch.einsum("be,beh->bh", g.to(experts.dtype), experts)  # (B, H)
            logits[task.name] = tower(mixture)  # (B,)
            gates[task.name] = g
        return HeadOutput(
            logits=logits,
            aux_loss=self.balance(gates.values()),
            gates=gates,
            experts={name: experts[:, i] for i, name in enumerate(self.expert_names)},
        )
