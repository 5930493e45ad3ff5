"""Uplift metrics: uplift and Qini curves, AUUC, Qini coefficient, uplift@k, PEHE — scikit-uplift's definitions.

Every function follows ``sklift.metrics`` (scikit-uplift 0.5.1) exactly, in torch and float64, for a
binary treatment flag (1 treated, 0 control), an outcome ``y`` (binary or real) and predicted uplift
scores; `UpliftMetrics` and `PEHE` are `torchmetrics.Metric`s whose states torchmetrics gathers
across processes under DDP, so a multi-GPU validation reports the metric of the whole set.

Curves. Sort by uplift descending; at the last index of every run of tied scores (a threshold)
take the cumulative counts ``n_t``, ``n_c`` and outcome sums ``y_t``, ``y_c`` of each arm:

    uplift curve:  (y_t / n_t - y_c / n_c) * (n_t + n_c)     (0/0 read as 0)
    Qini curve:    y_t - y_c * n_t / n_c                     (0 where n_c = 0)

with ``x = n_t + n_c``; both start at (0, 0). Areas by the trapezoidal rule.

Scores. ``auuc_score`` (sklift ``uplift_auc_score``) and ``qini_score`` (``qini_auc_score``) are the
area between the model's curve and the random line (from (0, 0) to the curve's end), divided by the
same area of the perfect model's curve: 1 perfect, 0 random, negative worse than random.
``uplift_at_k`` is the treated minus the control outcome rate among the top ``k`` fraction by score.

Example:
    >>> y, t = torch.tensor([1.0, 0, 1, 1, 0, 0]), torch.tensor([1, 0, 1, 0, 1, 0])
    >>> round(float(auuc_score(y, torch.tensor([0.9, 0.8, 0.8, 0.3, 0.2, 0.1]), t)), 4)
    0.46
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def _check(y: Tensor, uplift: Tensor, treatment: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not (y.shape == uplift.shape == treatment.shape) or y.dim() != 1:
        raise ValueError(f"uplift metrics: y, uplift and treatment must be (N,) alike, got {y.shape}, "
                         f"{uplift.shape}, {treatment.shape}")  # fmt: skip
    t = treatment.detach().reshape(-1).long()
    if bool(((t != 0) & (t != 1)).any()):
        raise ValueError("uplift metrics: treatment must be a 0/1 flag (1 treated, 0 control)")
    if int(t.sum()) in (0, t.numel()):
        raise ValueError("uplift metrics: need both treated (1) and control (0) samples")
    return y.detach().double().reshape(-1), uplift.detach().double().reshape(-1), t


def _descending(uplift: Tensor) -> Tensor:
    """sklift's order: a stable ascending sort, reversed (so ties come in reverse input order)."""
    return torch.argsort(uplift, stable=True).flip(0)


def _cumulative(y: Tensor, uplift: Tensor, t: Tensor) -> tuple[Tensor, ...]:
    """At each threshold: (n_all, n_t, n_c, y_t, y_c), float64."""
    order = _descending(uplift)
    y, u, t = y[order], uplift[order], t[order].double()
    distinct = torch.nonzero(u[1:] != u[:-1]).reshape(-1)
    last = torch.tensor([u.numel() - 1], device=u.device)
    idx = torch.cat([distinct, last])
    n_t = torch.cumsum(t, 0)[idx]
    y_t = torch.cumsum(y * t, 0)[idx]
    y_c = torch.cumsum(y * (1 - t), 0)[idx]
    n_all = (idx + 1).double()
    return n_all, n_t, n_all - n_t, y_t, y_c


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _start_at_zero(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if x.numel() == 0 or v[0] != 0 or x[0] != 0:
        zero = torch.zeros(1, dtype=x.dtype, device=x.device)
        x, v = torch.cat([zero, x]), torch.cat([zero, v])
    return x, v


def uplift_curve(y: Tensor, uplift: Tensor, treatment: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) outcomes, scores, 0/1 treatment -> (x, values) of the uplift curve, float64, from (0, 0)."""
    n_all, n_t, n_c, y_t, y_c = _cumulative(*_check(y, uplift, treatment))
    return _start_at_zero(n_all, (_safe_div(y_t, n_t) - _safe_div(y_c, n_c)) * n_all)


def qini_curve(y: Tensor, uplift: Tensor, treatment: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) outcomes, scores, 0/1 treatment -> (x, values) of the Qini curve, float64, from (0, 0)."""
    n_all, n_t, n_c, y_t, y_c = _cumulative(*_check(y, uplift, treatment))
    return _start_at_zero(n_all, y_t - y_c * _safe_div(n_t, n_c))


def perfect_uplift_curve(y: Tensor, treatment: Tensor) -> tuple[Tensor, Tensor]:
    """The uplift curve of sklift's ideal ordering (treated responders first, control responders last)."""
    yd, t = y.double(), treatment.long()
    control_responders = int(((yd == 1) & (t == 0)).sum())
    treated_non_responders = int(((yd == 0) & (t == 1)).sum())
    summand = yd if control_responders > treated_non_responders else t.double()
    return uplift_curve(y, 2 * (yd == t.double()).double() + summand, treatment)


def perfect_qini_curve(y: Tensor, treatment: Tensor, negative_effect: bool = True) -> tuple[Tensor, Tensor]:
    """The Qini curve of the ideal ordering; without negative effects, sklift's two-segment line."""
    yd, t = y.double(), treatment.double()
    if negative_effect:
        return qini_curve(y, yd * t - yd * (1 - t), treatment)
    n = float(yd.numel())
    ratio = float(yd[t == 1].sum() - (t == 1).sum() * yd[t == 0].sum() / (t == 0).sum())
    return torch.tensor([0.0, ratio, n], dtype=torch.float64), torch.tensor([0.0, ratio, ratio], dtype=torch.float64)


def _area(x: Tensor, v: Tensor) -> Tensor:
    return torch.trapezoid(v, x)


def _normalised(curve: tuple[Tensor, Tensor], perfect: tuple[Tensor, Tensor]) -> Tensor:
    x_p, v_p = perfect
    baseline = _area(torch.stack([x_p[0] * 0, x_p[-1]]), torch.stack([v_p[0] * 0, v_p[-1]]))
    return (_area(*curve) - baseline) / (_area(*perfect) - baseline)


def auuc_score(y: Tensor, uplift: Tensor, treatment: Tensor) -> Tensor:
    """0-dim normalised area under the uplift curve (sklift ``uplift_auc_score``)."""
    return _normalised(uplift_curve(y, uplift, treatment), perfect_uplift_curve(y, treatment))


def qini_score(y: Tensor, uplift: Tensor, treatment: Tensor, negative_effect: bool = True) -> Tensor:
    """0-dim Qini coefficient: normalised area under the Qini curve (sklift ``qini_auc_score``)."""
    return _normalised(qini_curve(y, uplift, treatment), perfect_qini_curve(y, treatment, negative_effect))


def uplift_at_k(
    y: Tensor, uplift: Tensor, treatment: Tensor, k: float = 0.3, strategy: Literal["overall", "by_group"] = "overall"
) -> Tensor:
    """0-dim treated minus control outcome rate in the top ``k`` fraction by score (sklift ``uplift_at_k``).

    ``overall``: the top ``int(N k)`` samples of all; ``by_group``: the top ``int(N_t k)`` treated and
    the top ``int(N_c k)`` control samples separately. NaN when an arm has no sample in the top.
    """
    y, uplift, t = _check(y, uplift, treatment)
    if not 0 < k <= 1:
        raise ValueError(f"uplift_at_k: k must be in (0, 1], got {k}")
    order = _descending(uplift)
    y, t = y[order], t[order]
    if strategy == "overall":
        top = int(y.numel() * k)
        yt, tt = y[:top], t[:top]
        treated, control = yt[tt == 1], yt[tt == 0]
    elif strategy == "by_group":
        treated = y[t == 1][: int(int((t == 1).sum()) * k)]
        control = y[t == 0][: int(int((t == 0).sum()) * k)]
    else:
        raise ValueError(f"uplift_at_k: strategy must be 'overall' or 'by_group', got {strategy!r}")
    return treated.mean() - control.mean()  # mean of an empty tensor is NaN


class UpliftMetrics(Metric):
    """AUUC, Qini coefficient and uplift@k of predicted uplift against observed outcomes.

    ``update(uplift (N,), y (N,), treatment (N,) 0/1)``; states are concatenated (gathered across
    processes under DDP). ``compute`` gives ``auuc``, ``qini`` (normalised, sklift), ``uplift_at_k``
    (overall strategy) and ``auuc_raw`` / ``qini_raw``: the area between the curve and the random line
    divided by N², comparable across data sizes. NaN everywhere when an arm is missing.

    Args:
        k: the fraction of ``uplift_at_k``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, k: float = 0.3, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.k = k
        self.add_state("uplift", default=[], dist_reduce_fx="cat")
        self.add_state("y", default=[], dist_reduce_fx="cat")
        self.add_state("treatment", default=[], dist_reduce_fx="cat")

    def update(self, uplift: Tensor, y: Tensor, treatment: Tensor) -> None:  # type: ignore[override]
        self.uplift.append(uplift.detach().double().reshape(-1))
        self.y.append(y.detach().double().reshape(-1))
        self.treatment.append(treatment.detach().long().reshape(-1))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        keys = ("auuc", "qini", "uplift_at_k", "auuc_raw", "qini_raw")
        nan = {k: torch.tensor(float("nan"), dtype=torch.float64, device=self.device) for k in keys}
        if not self.uplift:
            return nan
        u, y, t = dim_zero_cat(self.uplift), dim_zero_cat(self.y), dim_zero_cat(self.treatment)
        if int(t.sum()) in (0, t.numel()):
            return nan
        n2 = float(t.numel()) ** 2
        out = {
            "auuc": auuc_score(y, u, t),
            "qini": qini_score(y, u, t),
            "uplift_at_k": uplift_at_k(y, u, t, self.k),
        }
        for name, curve in (("auuc_raw", uplift_curve(y, u, t)), ("qini_raw", qini_curve(y, u, t))):
            x, v = curve
            out[name] = (_area(x, v) - 0.5 * x[-1] * v[-1]) / n2
        return out


class PEHE(Metric):
    """sqrt(mean((predicted - true)²)): the precision in estimating heterogeneous effects (sum states, DDP-safe).

    ``update(predicted (N,), true (N,))``; NaN before any update.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_sq", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, true: Tensor) -> None:  # type: ignore[override]
        diff = predicted.detach().double().reshape(-1) - true.detach().double().reshape(-1)
        self.sum_sq += diff.square().sum()
        self.count += diff.numel()

    def compute(self) -> Tensor:  # type: ignore[override]
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.sum_sq.device)
        return (self.sum_sq / self.count).sqrt()
