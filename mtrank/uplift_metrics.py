"""Uplift metrics: uplift and Qini curves, AUUC, Qini coefficient, uplift@k and PEHE, in torch.

The curve functions and scores follow scikit-uplift 0.5.1 (``sklift.metrics``) exactly: samples are
sorted by predicted uplift, descending (numpy's stable ascending sort, reversed, so tied scores come
in reverse input order as in sklift); the curves have one point at the end of each run of tied scores
and start at (0, 0). With cumulative counts ``n_t``, ``n_c`` and outcome sums ``y_t``, ``y_c`` of the
treated and control samples above a threshold:

* uplift curve: ``(y_t / n_t - y_c / n_c) * (n_t + n_c)`` (a rate with a zero count reads as 0);
* Qini curve: ``y_t - y_c * n_t / n_c`` (0 for the control term while ``n_c`` is 0).

`auuc_score` and `qini_score` are the areas (trapezoidal rule) between the curve and the random line
from (0, 0) to the curve's end, divided by the same area of the perfect curve. `UpliftMetrics` gathers
all scores (synced by concatenation under DDP) and reports both of them, uplift@k and the raw areas.

Outcomes may be real-valued for the curves, `uplift_at_k` and the Qini score (sklift accepts binary
outcomes only); the perfect uplift curve, hence `auuc_score`, is defined for outcomes in {0, 1} only.

Example:
    >>> y = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0])
    >>> uplift = torch.tensor([0.9, 0.8, 0.7, 0.7, 0.5, 0.4, 0.3, 0.1])
    >>> treatment = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    >>> qini_curve(y, uplift, treatment)[1].tolist()  # one point per distinct score, plus the origin
    [0.0, 1.0, 1.0, 1.0, 0.5, 1.0, 0.6666666666666667, 1.0]
    >>> round(float(auuc_score(y, uplift, treatment)), 6)  # 4 / 15.75
    0.253968
"""

from __future__ import annotations

import numbers
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

ArrayLike = Tensor | list | tuple


def _check_inputs(y: ArrayLike, uplift: ArrayLike | None, treatment: ArrayLike) -> tuple[Tensor, Tensor, Tensor]:
    """Validates shapes and arms; returns flat float64 (y, uplift, treatment). ``uplift=None`` gives zeros."""
    y = torch.as_tensor(y).detach()
    treatment = torch.as_tensor(treatment, device=y.device).detach()
    uplift = torch.zeros_like(y, dtype=torch.float64) if uplift is None else torch.as_tensor(uplift).detach()
    if not (y.shape == uplift.shape == treatment.shape):
        raise ValueError(
            f"y, uplift and treatment must have the same shape, got {tuple(y.shape)}, {tuple(uplift.shape)} "
            f"and {tuple(treatment.shape)}"
        )
    y, uplift, treatment = (a.reshape(-1).to(device=y.device, dtype=torch.float64) for a in (y, uplift, treatment))
    if bool(((treatment != 0) & (treatment != 1)).any()):
        raise ValueError("treatment must hold only 0 (control) and 1 (treated)")
    if not bool((treatment == 1).any()):
        raise ValueError("no treated samples (treatment == 1): uplift metrics need both arms")
    if not bool((treatment == 0).any()):
        raise ValueError("no control samples (treatment == 0): uplift metrics need both arms")
    return y, uplift, treatment


def _descending(uplift: Tensor) -> Tensor:
    """sklift's order: ``np.argsort(uplift, kind="mergesort")[::-1]`` (ties in reverse input order)."""
    return torch.argsort(uplift, stable=True).flip(0)


def _cumulative_at_thresholds(y: Tensor, uplift: Tensor, treatment: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(n_all, n_t, y_t, y_c) at the last index of each run of tied scores, in descending score order."""
    order = _descending(uplift)
    y, uplift, treatment = y[order], uplift[order], treatment[order]
    # np.where(np.diff(uplift)): a nonzero (or NaN, as inf - inf) difference starts a new run
    distinct = torch.nonzero(uplift[1:] - uplift[:-1] != 0).reshape(-1)
    thresholds = torch.cat([distinct, distinct.new_tensor([uplift.numel() - 1])])
    n_t = torch.cumsum(treatment, 0)[thresholds]
    y_t = torch.cumsum(y * (treatment == 1), 0)[thresholds]
    y_c = torch.cumsum(y * (treatment == 0), 0)[thresholds]
    n_all = (thresholds + 1).double()
    return n_all, n_t, y_t, y_c


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den is 0 (``np.divide(..., out=zeros, where=den != 0)``)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _from_origin(x: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    zero = x.new_zeros(1)
    return torch.cat([zero, x]), torch.cat([zero, values])


def _curves(y: Tensor, uplift: Tensor, treatment: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x, uplift-curve values, Qini-curve values (checked inputs), both curves from (0, 0)."""
    n_all, n_t, y_t, y_c = _cumulative_at_thresholds(y, uplift, treatment)
    n_c = n_all - n_t
    uplift_values = (_safe_divide(y_t, n_t) - _safe_divide(y_c, n_c)) * n_all
    qini_values = y_t - y_c * _safe_divide(n_t, n_c)
    x, uplift_values = _from_origin(n_all, uplift_values)
    _, qini_values = _from_origin(n_all, qini_values)
    return x, uplift_values, qini_values


def uplift_curve(y: ArrayLike, uplift: ArrayLike, treatment: ArrayLike) -> tuple[Tensor, Tensor]:
    """Uplift curve, as ``sklift.metrics.uplift_curve``.

    Args:
        y: (N,) outcomes (binary or real).
        uplift: (N,) predicted uplift scores.
        treatment: (N,) 1 for treated, 0 for control; both arms must be present.

    Returns:
        x: (P + 1,) float64 number of samples targeted at each threshold (0 first).
        values: (P + 1,) float64 ``(y_t / n_t - y_c / n_c) * (n_t + n_c)`` at each threshold (0 first).

    Raises:
        ValueError: different shapes, treatment not in {0, 1}, or no treated or no control sample.
    """
    x, values, _ = _curves(*_check_inputs(y, uplift, treatment))
    return x, values


def qini_curve(y: ArrayLike, uplift: ArrayLike, treatment: ArrayLike) -> tuple[Tensor, Tensor]:
    """Qini curve, as ``sklift.metrics.qini_curve``; arguments and errors as `uplift_curve`.

    Returns:
        x: (P + 1,) float64 number of samples targeted at each threshold (0 first).
        values: (P + 1,) float64 ``y_t - y_c * n_t / n_c`` at each threshold (0 first).
    """
    x, _, values = _curves(*_check_inputs(y, uplift, treatment))
    return x, values


def _perfect_uplift_scores(y: Tensor, treatment: Tensor) -> Tensor:
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("the perfect uplift curve (and auuc_score) is defined for binary outcomes (0/1) only")
    control_responders = int(((y == 1) & (treatment == 0)).sum())
    treated_non_responders = int(((y == 0) & (treatment == 1)).sum())
    summand = y if control_responders > treated_non_responders else treatment
    return 2 * (y == treatment).double() + summand


def perfect_uplift_curve(y: ArrayLike, treatment: ArrayLike) -> tuple[Tensor, Tensor]:
    """The best possible uplift curve, as ``sklift.metrics.perfect_uplift_curve``.

    The uplift curve of the ordering: treated responders, control non-responders, then control
    responders before treated non-responders if there are more of them (else the other way round).

    Args:
        y: (N,) binary outcomes.
        treatment: (N,) 1 for treated, 0 for control.

    Returns:
        x, values: as `uplift_curve`.

    Raises:
        ValueError: as `uplift_curve`, or an outcome outside {0, 1}.
    """
    y, _, treatment = _check_inputs(y, None, treatment)
    x, values, _ = _curves(y, _perfect_uplift_scores(y, treatment), treatment)
    return x, values


def _perfect_qini(y: Tensor, treatment: Tensor, negative_effect: bool) -> tuple[Tensor, Tensor]:
    if not isinstance(negative_effect, bool):
        raise TypeError(f"negative_effect must be a bool, got {type(negative_effect)}")
    if negative_effect:
        x, _, values = _curves(y, y * treatment - y * (1 - treatment), treatment)
        return x, values
    treated, control = treatment == 1, treatment == 0
    ratio_random = y[treated].sum() - treated.sum() * y[control].sum() / control.sum()
    zero, n = ratio_random.new_zeros(()), ratio_random.new_tensor(float(y.numel()))
    return torch.stack([zero, ratio_random, n]), torch.stack([zero, ratio_random, ratio_random])


def perfect_qini_curve(y: ArrayLike, treatment: ArrayLike, negative_effect: bool = True) -> tuple[Tensor, Tensor]:
    """The best possible Qini curve, as ``sklift.metrics.perfect_qini_curve``.

    With ``negative_effect``: the Qini curve of the scores ``y * t - y * (1 - t)`` (treated responders
    first, control responders last). Without: the three points (0, 0), (r, r), (N, r), r being the
    curve's end value ``y_t - n_t * y_c / n_c`` (sklift's definition, x and value in mixed units).

    Args:
        y: (N,) outcomes (sklift allows binary only; real values use the same formulas).
        treatment: (N,) 1 for treated, 0 for control.
        negative_effect: whether the perfect ordering may show a negative effect (control responders last).

    Returns:
        x, values: float64 points of the curve, from (0, 0).
    """
    y, _, treatment = _check_inputs(y, None, treatment)
    return _perfect_qini(y, treatment, negative_effect)


def _trapezoid(x: Tensor, values: Tensor) -> Tensor:
    """``sklearn.metrics.auc``: trapezoidal area; x must be monotonic (a decreasing x gives a positive area)."""
    dx = x[1:] - x[:-1]
    direction = 1.0
    if bool((dx < 0).any()):
        if not bool((dx <= 0).all()):
            raise ValueError(f"x is neither increasing nor decreasing: {x.tolist()}")
        direction = -1.0
    return direction * (dx * (values[1:] + values[:-1]) / 2.0).sum()


def _normalised_area(x: Tensor, values: Tensor, x_perfect: Tensor, values_perfect: Tensor) -> tuple[Tensor, Tensor]:
    """(score, area above random): sklift's ratio of areas between curve and the random line."""
    zero = x_perfect.new_zeros(())
    baseline = _trapezoid(torch.stack([zero, x_perfect[-1]]), torch.stack([zero, values_perfect[-1]]))
    actual = _trapezoid(x, values) - baseline
    perfect = _trapezoid(x_perfect, values_perfect) - baseline
    return actual / perfect, actual


def auuc_score(y: ArrayLike, uplift: ArrayLike, treatment: ArrayLike) -> Tensor:
    """Normalised area under the uplift curve, as ``sklift.metrics.uplift_auc_score``.

    ``(area(uplift curve) - area(random)) / (area(perfect uplift curve) - area(random))``, the random
    line joining (0, 0) to the end of the curve. NaN when the perfect curve has no area above it (e.g.
    no responder at all; sklift refuses such an outcome vector).

    Args:
        y: (N,) binary outcomes.
        uplift: (N,) predicted uplift scores.
        treatment: (N,) 1 for treated, 0 for control.

    Returns:
        () float64 score, 1 for the perfect ordering, about 0 for a random one.

    Raises:
        ValueError: as `uplift_curve`, or an outcome outside {0, 1}.
    """
    y, uplift, treatment = _check_inputs(y, uplift, treatment)
    x, values, _ = _curves(y, uplift, treatment)
    x_perfect, values_perfect, _ = _curves(y, _perfect_uplift_scores(y, treatment), treatment)
    return _normalised_area(x, values, x_perfect, values_perfect)[0]


def qini_score(y: ArrayLike, uplift: ArrayLike, treatment: ArrayLike, negative_effect: bool = True) -> Tensor:
    """Qini coefficient: normalised area under the Qini curve, as ``sklift.metrics.qini_auc_score``.

    Args:
        y: (N,) outcomes (binary in sklift; real values use the same formulas).
        uplift: (N,) predicted uplift scores.
        treatment: (N,) 1 for treated, 0 for control.
        negative_effect: passed to `perfect_qini_curve`.

    Returns:
        () float64 score.

    Raises:
        ValueError: as `uplift_curve`.
    """
    y, uplift, treatment = _check_inputs(y, uplift, treatment)
    x, _, values = _curves(y, uplift, treatment)
    x_perfect, values_perfect = _perfect_qini(y, treatment, negative_effect)
    return _normalised_area(x, values, x_perfect, values_perfect)[0]


def _uplift_at_k(
    y: Tensor, uplift: Tensor, treatment: Tensor, k: float | int, strategy: Literal["overall", "by_group"]
) -> Tensor:
    if strategy not in ("overall", "by_group"):
        raise ValueError(f"strategy must be 'overall' or 'by_group', got {strategy!r}")
    n = y.numel()
    is_int = isinstance(k, numbers.Integral) and not isinstance(k, bool)
    if not is_int and not (isinstance(k, numbers.Real) and not isinstance(k, bool)):
        raise ValueError(f"k must be a float in (0, 1) or an int in (0, {n}), got {k!r}")
    if (is_int and not 0 < k < n) or (not is_int and not 0 < k < 1):
        raise ValueError(
            f"k={k} should be either a positive int smaller than the number of samples {n} or a float in (0, 1)"
        )
    order = _descending(uplift)
    y, treatment = y[order], treatment[order]
    if strategy == "overall":
        top = int(k) if is_int else int(n * k)
        y_top, t_top = y[:top], treatment[:top]
        y_treated, y_control = y_top[t_top == 1], y_top[t_top == 0]
    else:
        y_treated, y_control = y[treatment == 1], y[treatment == 0]
        n_treated = int(k) if is_int else int(y_treated.numel() * k)
        n_control = int(k) if is_int else int(y_control.numel() * k)
        if n_treated > y_treated.numel() or n_control > y_control.numel():
            raise ValueError(
                f"k={k} is larger than the treated ({y_treated.numel()}) or control ({y_control.numel()}) group"
            )
        y_treated, y_control = y_treated[:n_treated], y_control[:n_control]
    # mean of an empty selection is NaN, as numpy's
    return y_treated.sum() / y_treated.numel() - y_control.sum() / y_control.numel()


def uplift_at_k(
    y: ArrayLike,
    uplift: ArrayLike,
    treatment: ArrayLike,
    k: float | int = 0.3,
    strategy: Literal["overall", "by_group"] = "overall",
) -> Tensor:
    """Uplift among the top-k samples by predicted uplift, as ``sklift.metrics.uplift_at_k``.

    ``overall``: mean outcome of the treated minus that of the control samples among the first
    ``int(N * k)`` samples. ``by_group``: mean outcome of the first ``int(N_t * k)`` treated minus that of
    the first ``int(N_c * k)`` control samples. An int k is a number of samples (in each arm for
    ``by_group``). NaN when an arm has no sample in the selection.

    Args:
        y: (N,) outcomes (binary or real).
        uplift: (N,) predicted uplift scores.
        treatment: (N,) 1 for treated, 0 for control.
        k: float in (0, 1) (a fraction) or int in (0, N) (a count).
        strategy: ``"overall"`` or ``"by_group"``.

    Returns:
        () float64 uplift.

    Raises:
        ValueError: as `uplift_curve`, a k out of range, or an unknown strategy.
    """
    return _uplift_at_k(*_check_inputs(y, uplift, treatment), k, strategy)


class UpliftMetrics(Metric):
    """AUUC, Qini coefficient, uplift@k and the raw areas over every sample seen; synced by concatenation.

    `compute` returns ``auuc`` (`auuc_score`), ``qini`` (`qini_score`, negative_effect=True),
    ``uplift_at_k`` (`uplift_at_k` with this metric's k and strategy), and ``auuc_raw``, ``qini_raw``:
    the areas between the curve and the random line divided by N² — the area with x as the fraction
    of samples targeted and the curve per sample, so they do not grow with N. All values are NaN if
    only one arm (or nothing) was seen; ``auuc`` is NaN too if an outcome is not in {0, 1}.

    The curves (so ``auuc``, ``qini`` and the raw areas) do not depend on the order of the samples;
    ``uplift_at_k`` does when the top-k cut splits a run of tied scores (sklift takes tied samples in
    reverse input order), so under DDP it may differ slightly from one process on the same data.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: float = 0.3, strategy: Literal["overall", "by_group"] = "overall", **kwargs: object) -> None:
        super().__init__(**kwargs)
        if strategy not in ("overall", "by_group"):
            raise ValueError(f"strategy must be 'overall' or 'by_group', got {strategy!r}")
        self.k = k
        self.strategy = strategy
        self.add_state("uplift", default=[], dist_reduce_fx="cat")
        self.add_state("y", default=[], dist_reduce_fx="cat")
        self.add_state("treatment", default=[], dist_reduce_fx="cat")

    def update(self, uplift: Tensor, y: Tensor, treatment: Tensor) -> None:
        """uplift: (N,) predicted uplift; y: (N,) outcomes; treatment: (N,) int, 1 treated / 0 control."""
        if not (uplift.numel() == y.numel() == treatment.numel()):
            raise ValueError(
                f"uplift, y and treatment sizes differ: {uplift.numel()}, {y.numel()}, {treatment.numel()}"
            )
        self.uplift.append(uplift.detach().float().reshape(-1))
        self.y.append(y.detach().float().reshape(-1))
        self.treatment.append(treatment.detach().long().reshape(-1))

    def compute(self) -> dict[str, Tensor]:
        keys = ("auuc", "qini", "uplift_at_k", "auuc_raw", "qini_raw")
        nan = torch.tensor(float("nan"), device=self.device)
        if not isinstance(self.uplift, Tensor) and len(self.uplift) == 0:
            return dict.fromkeys(keys, nan)
        uplift, y, treatment = dim_zero_cat(self.uplift), dim_zero_cat(self.y), dim_zero_cat(self.treatment)
        if not (bool((treatment == 1).any()) and bool((treatment == 0).any())):
            return dict.fromkeys(keys, nan)
        y, uplift, treatment = _check_inputs(y, uplift, treatment)
        n2 = float(y.numel()) ** 2
        x, uplift_values, qini_values = _curves(y, uplift, treatment)
        x_qini, values_qini = _perfect_qini(y, treatment, True)
        qini, qini_raw = _normalised_area(x, qini_values, x_qini, values_qini)
        if bool(((y == 0) | (y == 1)).all()):
            x_perfect, values_perfect, _ = _curves(y, _perfect_uplift_scores(y, treatment), treatment)
            auuc, auuc_raw = _normalised_area(x, uplift_values, x_perfect, values_perfect)
        else:  # no perfect uplift curve: the raw area uses the curve's own end point
            auuc = nan.double()
            auuc_raw = _normalised_area(x, uplift_values, x, uplift_values)[1]
        at_k = _uplift_at_k(y, uplift, treatment, self.k, self.strategy)
        out = {"auuc": auuc, "qini": qini, "uplift_at_k": at_k, "auuc_raw": auuc_raw / n2, "qini_raw": qini_raw / n2}
        return {key: value.float() for key, value in out.items()}


class PEHE(Metric):
    """Precision in estimating heterogeneous effects: sqrt(mean((predicted - true effect)²)). NaN if empty."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_squared_error", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds: (N,) predicted treatment effect; target: (N,) true effect (known in simulated data)."""
        if preds.numel() != target.numel():
            raise ValueError(f"preds and target sizes differ: {preds.numel()}, {target.numel()}")
        diff = preds.detach().double().reshape(-1) - target.detach().double().reshape(-1)
        self.sum_squared_error += (diff * diff).sum()
        self.count += diff.numel()

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            return torch.tensor(float("nan"), device=self.device)
        return (self.sum_squared_error / self.count).sqrt().float()
