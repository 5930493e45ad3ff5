"""Expert balance regularisers: auxiliary losses that push a gate to spread its weight over its experts.

Two classic forms, on a gate's (B, E) weights ``g`` (rows sum to 1):

``importance``  Shazeer et al. 2017 ("Outrageously Large Neural Networks"): the squared coefficient
                of variation of each expert's importance, the gate mass it receives over the batch,
                ``CV²(sum_b g_b)``. 0 when every expert gets the same mass; ``E - 1`` when one gets all.
``load``        Fedus et al. 2021 (Switch Transformer): ``E * sum_e f_e * P_e`` where ``f_e`` is the
                fraction of samples whose largest weight is on expert ``e`` (no gradient) and ``P_e``
                the mean weight on ``e``. 1 when both are uniform; up to ``E`` when one expert takes all.
                It penalises the routing (argmax) imbalance that importance alone misses.

`BalanceLoss` applies one (or both) to every gate named in its call, averages over gates and scales
by its weight. A head owns one; weight 0 (the default everywhere) turns it off at no cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

BalanceKind = Literal["importance", "load", "importance+load"]


def importance_loss(gates: Tensor) -> Tensor:
    """(B, E) gate weights -> 0-dim ``CV²`` of the per-expert gate mass (0: perfectly balanced)."""
    usage = gates.float().mean(dim=0)  # (E,)
    return usage.var(unbiased=False) / usage.mean().square().clamp(min=1e-10)


def load_loss(gates: Tensor) -> Tensor:
    """(B, E) gate weights -> 0-dim Switch load loss ``E * sum_e f_e P_e`` (1 when uniform)."""
    g = gates.float()
    num_experts = g.shape[-1]
    routed = torch.nn.functional.one_hot(g.argmax(dim=-1), num_experts).float().mean(dim=0)  # f_e, (E,)
    return num_experts * (routed.detach() * g.mean(dim=0)).sum()


class BalanceLoss:
    """A weighted expert balance loss over several gates.

    Args:
        weight: its weight in the objective (0: off).
        kind: ``importance``, ``load`` or ``importance+load`` (their sum).
    """

    def __init__(self, weight: float = 0.0, kind: BalanceKind = "importance") -> None:
        if weight < 0:
            raise ValueError(f"balance_loss_weight must be >= 0, got {weight}")
        if kind not in ("importance", "load", "importance+load"):
            raise ValueError(f"balance_loss must be 'importance', 'load' or 'importance+load', got {kind!r}")
        self.weight = weight
        self.kind = kind

    @property
    def active(self) -> bool:
        return self.weight > 0

    def __call__(self, gates: Iterable[Tensor]) -> Tensor | None:
        """Gates, each (B, E_g) -> the weighted 0-dim loss averaged over gates, or None when off.

        Gates over a single expert are skipped (nothing to balance).
        """
        if not self.active:
            return None
        terms = []
        for g in gates:
            if g.shape[-1] < 2:
                continue
            term = torch.zeros((), device=g.device)
            if "importance" in self.kind:
                term = term + importance_loss(g)
            if "load" in self.kind:
                term = term + load_loss(g)
            terms.append(term)
        if not terms:
            return None
        return self.weight * torch.stack(terms).mean()
