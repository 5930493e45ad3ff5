"""Multi-task heads behind one interface (`MultiTaskHead`): `MMoE`, `PLE`, `HoME`, and their parts."""

from heads.balance import BalanceLoss, importance_loss, load_loss
from heads.base import ExpertSpec, GateSpec, HeadOutput, MultiTaskHead, task_groups
from heads.home import FeatureGate, HoME, HoMEExpert, SelfGate
from heads.mmoe import MMoE, gate_balance_loss
from heads.ple import PLE, ExpertGraphHead
from heads.tower import MLP, TaskTower

__all__ = [
    "MLP",
    "PLE",
    "BalanceLoss",
    "ExpertGraphHead",
    "ExpertSpec",
    "FeatureGate",
    "GateSpec",
    "HeadOutput",
    "HoME",
    "HoMEExpert",
    "MMoE",
    "MultiTaskHead",
    "SelfGate",
    "TaskTower",
    "gate_balance_loss",
    "importance_loss",
    "load_loss",
    "task_groups",
]
