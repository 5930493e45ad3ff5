"""Multi-task heads: `MMoE` (shared experts, one softmax gate per task) and `TaskTower`."""

from heads.base import HeadOutput, MultiTaskHead
from heads.mmoe import MMoE, gate_balance_loss
from heads.tower import MLP, TaskTower

__all__ = ["MLP", "HeadOutput", "MMoE", "MultiTaskHead", "TaskTower", "gate_balance_loss"]
