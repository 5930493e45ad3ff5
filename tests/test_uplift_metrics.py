"""Uplift metrics: a worked example, a loop-based numpy transcription of scikit-uplift 0.5.1, and
numbers computed once with the real scikit-uplift (which is not a dependency of the project)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.utilities import dim_zero_cat, dim_zero_sum

from mtrank.uplift_metrics import (
    PEHE,
    UpliftMetrics,
    auuc_score,
    perfect_qini_curve,
    perfect_uplift_curve,
    qini_curve,
    qini_score,
    uplift_at_k,
    uplift_curve,
)

# The worked example. Sorted by score (already in order); 0.7 is tied between a treated and a control sample.
#   index   0    1    2    3    4    5    6    7
#   score  0.9  0.8  0.7  0.7  0.5  0.4  0.3  0.1
#   t       1    0    1    0    1    0    1    0
#   y       1    0    1    1    0    0    0    0
Y = [1, 0, 1, 1, 0, 0, 0, 0]
U = [0.9, 0.8, 0.7, 0.7, 0.5, 0.4, 0.3, 0.1]
T = [1, 0, 1, 0, 1, 0, 1, 0]

# A second fixed set for the scikit-uplift numbers: 16 samples, three ties of three and two ties of two.
Y2 = [1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0]
U2 = [0.30, -0.10, 0.30, 0.05, 0.20, 0.30, -0.20, 0.00, 0.05, 0.20, -0.10, 0.10, 0.00, 0.40, 0.05, -0.30]
T2 = [1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1]


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_worked_example() -> None:
    # Thresholds at the end of each run of tied scores: sorted positions 0, 1, 3 (the tie), 4, 5, 6, 7.
    #   position  n_t n_c y_t y_c   uplift (y_t/n_t - y_c/n_c)*(n_t+n_c)   qini y_t - y_c*n_t/n_c
    #   (start)    0   0   0   0    0                                      0
    #   0          1   0   1   0    (1 - 0) * 1   = 1                      1 - 0       = 1
    #   1          1   1   1   0    (1 - 0) * 2   = 2                      1 - 0       = 1
    #   3          2   2   2   1    (1 - 1/2) * 4 = 2                      2 - 1*2/2   = 1
    #   4          3   2   2   1    (2/3 - 1/2) * 5 = 5/6                  2 - 1*3/2   = 1/2
    #   5          3   3   2   1    (2/3 - 1/3) * 6 = 2                    2 - 1*3/3   = 1
    #   6          4   3   2   1    (1/2 - 1/3) * 7 = 7/6                  2 - 1*4/3   = 2/3
    #   7          4   4   2   1    (1/2 - 1/4) * 8 = 2                    2 - 1*4/4   = 1
    x, values = uplift_curve(Y, U, T)
    torch.testing.assert_close(x, f64([0, 1, 2, 4, 5, 6, 7, 8]))
    torch.testing.assert_close(values, f64([0, 1, 2, 2, 5 / 6, 2, 7 / 6, 2]))
    x, values = qini_curve(Y, U, T)
    torch.testing.assert_close(x, f64([0, 1, 2, 4, 5, 6, 7, 8]))
    torch.testing.assert_close(values, f64([0, 1, 1, 1, 1 / 2, 1, 2 / 3, 1]))

    # Uplift area: 0.5 + 1.5 + 4 + 17/12 + 17/12 + 19/12 + 19/12 = 12; random line (0,0)-(8,2): 8. Above it: 4.
    # Perfect uplift curve: 1 control responder, 2 treated non-responders, so the scores 2*(y == t) + t rank
    # treated responders (3), control non-responders (2), treated non-responders (1), control responders (0):
    #   x 0 2 5 7 8 / values 0, (1-0)*2 = 2, (1-0)*5 = 5, (1/2-0)*7 = 3.5, (1/2-1/4)*8 = 2
    #   area 2 + 10.5 + 8.5 + 2.75 = 23.75; above random 15.75. AUUC = 4 / 15.75 = 16/63.
    x, values = perfect_uplift_curve(Y, T)
    torch.testing.assert_close(x, f64([0, 2, 5, 7, 8]))
    torch.testing.assert_close(values, f64([0, 2, 5, 3.5, 2]))
    assert float(auuc_score(Y, U, T)) == pytest.approx(16 / 63, abs=1e-12)

    # Qini area: 0.5 + 1 + 2 + 0.75 + 0.75 + 5/6 + 5/6 = 20/3; random line (0,0)-(8,1): 4. Above it: 8/3.
    # Perfect Qini (negative effect): scores y*t - y*(1-t) = 1 for treated responders, -1 for the control
    # responder, 0 for the rest: x 0 2 7 8 / values 0, 2, 2, 2 - 1*4/4 = 1; area 2 + 10 + 1.5 = 13.5; above 9.5.
    x, values = perfect_qini_curve(Y, T)
    torch.testing.assert_close(x, f64([0, 2, 7, 8]))
    torch.testing.assert_close(values, f64([0, 2, 2, 1]))
    assert float(qini_score(Y, U, T)) == pytest.approx((8 / 3) / 9.5, abs=1e-12)  # 16/57
    # Without negative effect: r = 2 - 4*1/4 = 1, points (0,0) (1,1) (8,1): area 7.5, above random 3.5.
    x, values = perfect_qini_curve(Y, T, negative_effect=False)
    torch.testing.assert_close(x, f64([0, 1, 8]))
    torch.testing.assert_close(values, f64([0, 1, 1]))
    assert float(qini_score(Y, U, T, negative_effect=False)) == pytest.approx((8 / 3) / 3.5, abs=1e-12)  # 16/21

    # uplift@k, overall. k=0.3: int(2.4) = 2 samples, indices 0 (t, y=1) and 1 (c, y=0): 1 - 0 = 1.
    # k=0.375: 3 samples, and the tie is split. sklift's order is a stable ascending sort reversed, so within
    # the tie index 3 (control, y=1) comes before index 2: treated {0} -> 1, control {1, 3} -> 1/2; 1/2.
    assert float(uplift_at_k(Y, U, T, k=0.3)) == 1.0
    assert float(uplift_at_k(Y, U, T, k=0.375)) == 0.5
    assert float(uplift_at_k(Y, U, T, k=3)) == 0.5  # an int k is a number of samples
    # by_group, k=0.5: int(4*0.5) = 2 of each arm. Treated in order 0, 2, 4, 6 -> y 1, 1: 1.
    # Control in order 1, 3, 5, 7 -> y 0, 1: 1/2. Uplift 1/2.
    assert float(uplift_at_k(Y, U, T, k=0.5, strategy="by_group")) == 0.5

    # UpliftMetrics: raw areas above random divided by N^2 = 64: 4/64 and (8/3)/64.
    metric = UpliftMetrics(k=0.375)
    metric.update(torch.tensor(U), torch.tensor(Y), torch.tensor(T))
    out = metric.compute()
    assert float(out["auuc"]) == pytest.approx(16 / 63, rel=1e-6)
    assert float(out["qini"]) == pytest.approx(16 / 57, rel=1e-6)
    assert float(out["uplift_at_k"]) == pytest.approx(0.5, rel=1e-6)
    assert float(out["auuc_raw"]) == pytest.approx(4 / 64, rel=1e-6)
    assert float(out["qini_raw"]) == pytest.approx((8 / 3) / 64, rel=1e-6)


# --- a loop-based numpy transcription of sklift.metrics 0.5.1 -------------------------------------------------------


def ref_order(uplift: np.ndarray) -> list[int]:
    """np.argsort(uplift, kind="mergesort")[::-1]: a stable ascending sort, reversed."""
    return list(reversed(sorted(range(len(uplift)), key=lambda i: uplift[i])))


def ref_curves(y: np.ndarray, uplift: np.ndarray, t: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """x, uplift-curve values and qini-curve values, with the (0, 0) point sklift prepends."""
    order = ref_order(uplift)
    xs, ups, qinis = [0.0], [0.0], [0.0]
    n_t = n_c = 0
    y_t = y_c = 0.0
    for pos, i in enumerate(order):
        if t[i] == 1:
            n_t += 1
            y_t += float(y[i])
        else:
            n_c += 1
            y_c += float(y[i])
        if pos == len(order) - 1 or uplift[order[pos + 1]] != uplift[i]:  # last index of a run of ties
            rate_t = y_t / n_t if n_t else 0.0
            rate_c = y_c / n_c if n_c else 0.0
            xs.append(float(n_t + n_c))
            ups.append((rate_t - rate_c) * (n_t + n_c))
            qinis.append(y_t - y_c * (n_t / n_c if n_c else 0.0))
    return xs, ups, qinis


def ref_trapezoid(x: list[float], v: list[float]) -> float:
    return sum((x[i + 1] - x[i]) * (v[i + 1] + v[i]) / 2 for i in range(len(x) - 1))


def ref_perfect_uplift(y: np.ndarray, t: np.ndarray) -> tuple[list[float], list[float]]:
    control_responders = sum(1 for a, b in zip(y, t, strict=True) if a == 1 and b == 0)
    treated_non_responders = sum(1 for a, b in zip(y, t, strict=True) if a == 0 and b == 1)
    summand = y if control_responders > treated_non_responders else t
    scores = np.array([2.0 * (y[i] == t[i]) + summand[i] for i in range(len(y))])
    x, ups, _ = ref_curves(y, scores, t)
    return x, ups


def ref_perfect_qini(y: np.ndarray, t: np.ndarray, negative_effect: bool) -> tuple[list[float], list[float]]:
    if negative_effect:
        x, _, qinis = ref_curves(y, np.array([y[i] * t[i] - y[i] * (1 - t[i]) for i in range(len(y))]), t)
        return x, qinis
    treated = [float(y[i]) for i in range(len(y)) if t[i] == 1]
    control = [float(y[i]) for i in range(len(y)) if t[i] == 0]
    r = sum(treated) - len(treated) * sum(control) / len(control)
    return [0.0, r, float(len(y))], [0.0, r, r]


def ref_score(x: list[float], v: list[float], xp: list[float], vp: list[float]) -> float:
    baseline = xp[-1] * vp[-1] / 2
    return (ref_trapezoid(x, v) - baseline) / (ref_trapezoid(xp, vp) - baseline)


def ref_uplift_at_k(y: np.ndarray, uplift: np.ndarray, t: np.ndarray, k: float, strategy: str) -> float:
    order = ref_order(uplift)
    if strategy == "overall":
        top = order[: int(len(y) * k)]
        treated = [float(y[i]) for i in top if t[i] == 1]
        control = [float(y[i]) for i in top if t[i] == 0]
    else:
        treated = [float(y[i]) for i in order if t[i] == 1]
        control = [float(y[i]) for i in order if t[i] == 0]
        treated, control = treated[: int(len(treated) * k)], control[: int(len(control) * k)]
    mean_t = sum(treated) / len(treated) if treated else math.nan
    mean_c = sum(control) / len(control) if control else math.nan
    return mean_t - mean_c


def assert_matches(got: torch.Tensor, expected: float) -> None:
    if math.isnan(expected):
        assert math.isnan(float(got))
    else:
        assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def random_case(seed: int, continuous: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    t = rng.integers(0, 2, n)
    t[:2] = [0, 1]  # both arms
    uplift = rng.integers(-4, 5, n) / 4.0 if seed % 2 else rng.normal(size=n).round(1)  # ties either way
    if continuous:
        y = np.where(rng.random(n) < 0.3, 0.0, rng.exponential(2.0, n))
    else:
        y = rng.integers(0, 2, n)
        y[2:4] = [0, 1]
    return y, uplift, t


@pytest.mark.parametrize(("seed", "continuous"), [(s, False) for s in range(8)] + [(100, True), (101, True)])
def test_matches_reference_transcription(seed: int, continuous: bool) -> None:
    y, uplift, t = random_case(seed, continuous)
    y_, u_, t_ = torch.from_numpy(y), torch.from_numpy(uplift), torch.from_numpy(t)
    x_ref, up_ref, qini_ref = ref_curves(y, uplift, t)
    assert len(x_ref) < len(y) + 1 or seed % 2 == 0  # quarter-step scores do tie
    for (x, values), expected in ((uplift_curve(y_, u_, t_), up_ref), (qini_curve(y_, u_, t_), qini_ref)):
        np.testing.assert_allclose(x.numpy(), x_ref, rtol=0, atol=0)
        np.testing.assert_allclose(values.numpy(), expected, rtol=1e-9, atol=1e-9)
    for negative_effect in (True, False):
        xp, vp = ref_perfect_qini(y, t, negative_effect)
        x, values = perfect_qini_curve(y_, t_, negative_effect=negative_effect)
        np.testing.assert_allclose(x.numpy(), xp, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(values.numpy(), vp, rtol=1e-9, atol=1e-9)
        if all(xp[i + 1] >= xp[i] for i in range(len(xp) - 1)):  # sklearn's auc refuses a non-monotonic x, and so do we
            assert_matches(qini_score(y_, u_, t_, negative_effect=negative_effect), ref_score(x_ref, qini_ref, xp, vp))
    for k in (0.2, 0.3, 0.5, 0.9):
        for strategy in ("overall", "by_group"):
            assert_matches(uplift_at_k(y_, u_, t_, k=k, strategy=strategy), ref_uplift_at_k(y, uplift, t, k, strategy))
    if continuous:
        with pytest.raises(ValueError, match="binary outcomes"):
            auuc_score(y_, u_, t_)
    else:
        xp, vp = ref_perfect_uplift(y, t)
        x, values = perfect_uplift_curve(y_, t_)
        np.testing.assert_allclose(x.numpy(), xp, rtol=0, atol=0)
        np.testing.assert_allclose(values.numpy(), vp, rtol=1e-9, atol=1e-9)
        assert_matches(auuc_score(y_, u_, t_), ref_score(x_ref, up_ref, xp, vp))


# Computed once with scikit-uplift 0.5.1 (numpy 2.4.6, scikit-learn 1.9.1) in a separate venv:
#   uplift_auc_score(y, u, t), qini_auc_score(y, u, t), qini_auc_score(y, u, t, negative_effect=False),
#   uplift_at_k(y, u, t, strategy, k=k) for k in (0.3, 0.375, 0.5) and both strategies.
SKLIFT_0_5_1 = [
    (
        (Y, U, T),
        0.25396825396825395,
        0.28070175438596484,
        0.7619047619047618,
        {
            (0.3, "overall"): 1.0,
            (0.3, "by_group"): 1.0,
            (0.375, "overall"): 0.5,
            (0.375, "by_group"): 1.0,
            (0.5, "overall"): 0.5,
            (0.5, "by_group"): 0.5,
        },
    ),
    (
        (Y2, U2, T2),
        0.2869706136560068,
        0.29344978165938873,
        12.71351351351352,
        {
            (0.3, "overall"): 0.3333333333333333,
            (0.3, "by_group"): -0.5,
            (0.375, "overall"): 0.6,
            (0.375, "by_group"): -0.16666666666666669,
            (0.5, "overall"): -0.06666666666666665,
            (0.5, "by_group"): -0.16666666666666663,
        },
    ),
]


@pytest.mark.parametrize(("data", "auuc", "qini", "qini_no_negative", "at_k"), SKLIFT_0_5_1)
def test_matches_scikit_uplift(
    data: tuple[list, list, list], auuc: float, qini: float, qini_no_negative: float, at_k: dict
) -> None:
    y, u, t = data
    assert float(auuc_score(y, u, t)) == pytest.approx(auuc, rel=1e-12)
    assert float(qini_score(y, u, t)) == pytest.approx(qini, rel=1e-12)
    assert float(qini_score(y, u, t, negative_effect=False)) == pytest.approx(qini_no_negative, rel=1e-12)
    for (k, strategy), expected in at_k.items():
        assert float(uplift_at_k(y, u, t, k=k, strategy=strategy)) == pytest.approx(expected, rel=1e-12)


def test_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        uplift_curve([1, 0, 1], [0.1, 0.2], [1, 0, 1])
    with pytest.raises(ValueError, match="no treated"):
        qini_score([1, 0, 1], [0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="no control"):
        auuc_score([1, 0, 1], [0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="no treated"):
        uplift_curve([], [], [])
    with pytest.raises(ValueError, match="0 \\(control\\) and 1"):
        uplift_curve([1, 0, 1], [0.1, 0.2, 0.3], [1, 0, 2])
    with pytest.raises(ValueError, match="k="):
        uplift_at_k(Y, U, T, k=1.0)
    with pytest.raises(ValueError, match="k="):
        uplift_at_k(Y, U, T, k=8)
    with pytest.raises(ValueError, match="strategy"):
        uplift_at_k(Y, U, T, strategy="top")
    with pytest.raises(TypeError, match="bool"):
        qini_score(Y, U, T, negative_effect=1)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_uplift_metrics_accumulates_like_the_functions() -> None:
    g = torch.Generator().manual_seed(0)
    n = 300
    uplift = torch.randint(-8, 9, (n,), generator=g).float() / 8  # many ties
    treatment = torch.randint(0, 2, (n,), generator=g)
    y = (torch.rand(n, generator=g) < 0.3 + 0.2 * treatment * (uplift > 0)).long()
    metric = UpliftMetrics(k=0.25)
    for chunk in torch.arange(n).split([70, 130, 100]):
        metric.update(uplift[chunk], y[chunk], treatment[chunk])
    out = metric.compute()
    assert set(out) == {"auuc", "qini", "uplift_at_k", "auuc_raw", "qini_raw"}
    assert float(out["auuc"]) == pytest.approx(float(auuc_score(y, uplift, treatment)), rel=1e-6)
    assert float(out["qini"]) == pytest.approx(float(qini_score(y, uplift, treatment)), rel=1e-6)
    assert float(out["uplift_at_k"]) == pytest.approx(float(uplift_at_k(y, uplift, treatment, k=0.25)), rel=1e-6)
    # the raw areas are the numerators of the scores, over N^2
    x, values = uplift_curve(y, uplift, treatment)
    raw = float(torch.trapezoid(values, x) - x[-1] * values[-1] / 2) / n**2
    assert float(out["auuc_raw"]) == pytest.approx(raw, rel=1e-6)
    x, values = qini_curve(y, uplift, treatment)
    raw = float(torch.trapezoid(values, x) - x[-1] * values[-1] / 2) / n**2
    assert float(out["qini_raw"]) == pytest.approx(raw, rel=1e-6)

    # two "ranks" merged through the cat reductions (merge_state puts the incoming state first)
    first, second = UpliftMetrics(k=0.25), UpliftMetrics(k=0.25)
    first.update(uplift[:120], y[:120], treatment[:120])
    second.update(uplift[120:], y[120:], treatment[120:])
    second.merge_state(first)  # samples in the original order: every value is the same
    for key, value in second.compute().items():
        assert float(value) == pytest.approx(float(out[key]), rel=1e-6)
    second.reset()
    second.update(uplift[120:], y[120:], treatment[120:])
    first.merge_state(second)  # the halves swapped: the curves (so their areas) do not depend on the order...
    swapped = first.compute()
    for key in ("auuc", "qini", "auuc_raw", "qini_raw"):
        assert float(swapped[key]) == pytest.approx(float(out[key]), rel=1e-6)
    # ...but uplift@k does when the cut splits a run of tied scores: sklift takes ties in reverse input order
    assert float(swapped["uplift_at_k"]) == pytest.approx(
        float(uplift_at_k(y.roll(-120), uplift.roll(-120), treatment.roll(-120), k=0.25)), rel=1e-6
    )

    metric.reset()
    assert all(math.isnan(float(v)) for v in metric.compute().values())  # empty


def test_uplift_metrics_raw_areas_do_not_grow_with_n() -> None:
    small, double = UpliftMetrics(), UpliftMetrics()
    small.update(torch.tensor(U), torch.tensor(Y), torch.tensor(T))
    double.update(torch.tensor(U + U), torch.tensor(Y + Y), torch.tensor(T + T))  # every sample twice
    a, b = small.compute(), double.compute()
    for key in ("auuc", "qini", "auuc_raw", "qini_raw"):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6)


def test_uplift_metrics_nan_and_real_outcomes() -> None:
    metric = UpliftMetrics()
    metric.update(torch.tensor([0.3, 0.1]), torch.tensor([1, 0]), torch.tensor([1, 1]))  # treated only
    assert all(math.isnan(float(v)) for v in metric.compute().values())
    metric.update(torch.tensor([0.2]), torch.tensor([0]), torch.tensor([0]))  # now a control sample too
    assert not math.isnan(float(metric.compute()["qini"]))

    real = UpliftMetrics(k=0.5)
    real.update(torch.tensor(U2), torch.tensor(Y2) * 2.5, torch.tensor(T2))  # outcomes 0 / 2.5
    out = real.compute()
    assert math.isnan(float(out["auuc"]))  # no perfect uplift curve for non-binary outcomes
    y2 = torch.tensor(Y2) * 2.5
    assert float(out["qini"]) == pytest.approx(float(qini_score(y2, U2, T2)), rel=1e-6)
    assert float(out["uplift_at_k"]) == pytest.approx(float(uplift_at_k(y2, U2, T2, k=0.5)), rel=1e-6)
    binary = UpliftMetrics()
    binary.update(torch.tensor(U2), torch.tensor(Y2), torch.tensor(T2))
    # the uplift curve is linear in the outcome: outcomes times 2.5, raw area times 2.5
    assert float(out["auuc_raw"]) == pytest.approx(2.5 * float(binary.compute()["auuc_raw"]), rel=1e-6)


def test_uplift_metrics_states_gather_by_concatenation() -> None:
    metric = UpliftMetrics()
    for name in ("uplift", "y", "treatment"):
        assert metric._defaults[name] == []
        assert metric._reductions[name] is dim_zero_cat
    metric.update(torch.tensor(U), torch.tensor(Y), torch.tensor(T))
    assert isinstance(metric.uplift, list) and len(metric.uplift) == 1


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_pehe() -> None:
    metric = PEHE()
    assert math.isnan(float(metric.compute()))
    # errors 1, 0, -2 and 0.5: mean square (1 + 0 + 4 + 0.25) / 4 = 1.3125
    metric.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 5.0]))
    metric.update(torch.tensor([0.5]), torch.tensor([0.0]))
    assert float(metric.compute()) == pytest.approx(math.sqrt(1.3125), rel=1e-6)
    for name in ("sum_squared_error", "count"):
        assert metric._reductions[name] is dim_zero_sum
