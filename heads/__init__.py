"""Multi-task heads behind one interface (`MultiTaskHead`): `MMoE`, `PLE`, `HoME`, and their parts; the
branches beside them (`Branch`): `FRec` (fatigue) and `CDUM` (uplift)."""

from heads.balance import BalanceLoss, importance_loss, load_loss
from heads.base import Branch, BranchMetrics, BranchOutput, ExpertSpec, GateSpec, HeadOutput, MultiTaskHead, task_groups
from heads.fatigue import FatigueGRU, FRec
from heads.home import FeatureGate, HoME, HoMEExpert, SelfGate
from heads.mmoe import MMoE, gate_balance_loss
from heads.ple import PLE, ExpertGraphHead
from heads.tower import MLP, TaskTower
from heads.uplift import CDUM

__all__ = [
    "CDUM",
    "MLP",
    "PLE",
    "BalanceLoss",
    "Branch",
    "BranchMetrics",
    "BranchOutput",
    "ExpertGraphHead",
    "ExpertSpec",
    "FRec",
    "FatigueGRU",
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
