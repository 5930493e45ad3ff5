"""MMoE head: shapes, gates, balance loss; every head (MMoE, PLE, HoME) learns a planted two-task signal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from encoders.base import EncoderOutput
from heads import PLE, HoME, MMoE, TaskTower, gate_balance_loss
from mtrank.batch import Batch
from mtrank.spec import TaskSpec

TASKS = [TaskSpec(name="click"), TaskSpec(name="watch.time", kind="regression")]


def make_batch(B: int) -> Batch:
    """A minimal `Batch` (heads read nothing from it but must accept it)."""
    zeros = torch.zeros(B, dtype=torch.int64)
    return Batch(
        sample_index=torch.arange(B),
        user_id=zeros,
        item_id=zeros,
        ts=zeros,
        history_len=zeros,
        history_item_id=torch.zeros(B, 0, dtype=torch.int64),
        history_ts=torch.zeros(B, 0, dtype=torch.int64),
    )


def test_mmoe_shapes_and_gates() -> None:
    torch.manual_seed(0)
    head = MMoE(16, TASKS, num_experts=3, expert_dims=(32, 8), tower_dims=(8,))
    out = head(EncoderOutput(target=torch.randn(5, 16)), make_batch(5))
    assert set(out.logits) == {"click", "watch.time"}
    assert all(v.shape == (5,) for v in out.logits.values())
    assert set(out.gates) == {"click", "watch.time"}
    for g in out.gates.values():
        assert g.shape == (5, 3) and torch.all(g >= 0)
        assert torch.allclose(g.sum(-1), torch.ones(5))
    assert set(out.experts) == {"expert_0", "expert_1", "expert_2"}
    assert all(e.shape == (5, 8) for e in out.experts.values())
    assert out.aux_loss is None


def test_balance_loss() -> None:
    assert gate_balance_loss(torch.full((4, 3), 1 / 3)).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = F.one_hot(torch.zeros(4, dtype=torch.int64), 3).float()
    assert gate_balance_loss(collapsed).item() == pytest.approx(2.0)  # var [1,0,0] = 2/9, mean² = 1/9
    head = MMoE(8, TASKS, num_experts=3, balance_loss_weight=0.5)
    out = head(EncoderOutput(target=torch.randn(6, 8)), make_batch(6))
    assert out.aux_loss is not None and out.aux_loss.dim() == 0 and out.aux_loss >= 0
    out.aux_loss.backward()
    assert head.gates[0].weight.grad.abs().sum() > 0


def test_task_tower_output() -> None:
    assert TaskTower(8, ())(torch.randn(3, 8)).shape == (3,)
    assert TaskTower(8, (16, 4), dropout=0.1)(torch.randn(3, 8)).shape == (3,)


PLANTED_HEADS = {
    "mmoe": lambda dim, tasks: MMoE(dim, tasks, num_experts=4, expert_dims=(32,), tower_dims=(16,)),
    "ple": lambda dim, tasks: PLE(dim, tasks, expert_dims=(32,), tower_dims=(16,)),
    "home": lambda dim, tasks: HoME(dim, tasks, feature_gate_rank=4, expert_dims=(32,), tower_dims=(16,)),
}


@pytest.mark.parametrize("kind", list(PLANTED_HEADS))
def test_head_learns_planted_two_task_signal(kind: str) -> None:
    """click = 1[x0 + x1 > 0], watch = 2 x2 - x3 (unrelated tasks, two groups): both losses drop."""
    torch.manual_seed(0)
    B, D = 256, 8
    tasks = [TaskSpec(name="click", group="a"), TaskSpec(name="watch", kind="regression", group="b")]
    head = PLANTED_HEADS[kind](D, tasks)
    optim = torch.optim.Adam(head.parameters(), lr=1e-2)

    def losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = head(EncoderOutput(target=x), make_batch(x.shape[0]))
        click = F.binary_cross_entropy_with_logits(out.logits["click"], (x[:, 0] + x[:, 1] > 0).float())
        watch = F.mse_loss(out.logits["watch"], 2 * x[:, 2] - x[:, 3])
        return click, watch

    x_eval = torch.randn(1024, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        click0, watch0 = losses(x_eval)
    for _ in range(300):
        click, watch = losses(torch.randn(B, D))
        optim.zero_grad()
        (click + watch).backward()
        optim.step()
    head.eval()
    with torch.no_grad():
        click1, watch1 = losses(x_eval)
    assert click1 < 0.25 < 0.6 < click0  # chance is ln 2 ≈ 0.69
    assert watch1 < 0.1 * watch0
