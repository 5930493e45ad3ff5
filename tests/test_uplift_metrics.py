"""Uplift metrics: a hand-computed example, a loop-based numpy transcription of scikit-uplift's definitions,
numbers from scikit-uplift 0.5.1 itself, and the torchmetrics wrappers (accumulation, DDP states, NaN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrank.uplift_metrics import (
    PEHE,
    UpliftMetrics,
    auuc_score,
    perfect_uplift_curve,
    qini_curve,
    qini_score,
    uplift_at_k,
    uplift_curve,
)

# six samples, sorted by score, with a tie at 0.8
Y = torch.tensor([1.0, 0, 1, 1, 0, 0])
T = torch.tensor([1, 0, 1, 0, 1, 0])
U = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.2, 0.1])


def test_hand_computed_example() -> None:
    # thresholds after n = 1, 3 (the tie), 4, 5, 6 samples:
    #   n_t/y_t: 1/1, 2/2, 2/2, 3/2, 3/2     n_c/y_c: 0/0, 1/0, 2/1, 2/1, 3/1
    #   uplift (y_t/n_t - y_c/n_c) * n: 1, 3, 2, 5/6, 2      Qini y_t - y_c n_t/n_c: 1, 2, 1, 1/2, 1
    x, v = uplift_curve(Y, U, T)
    assert x.tolist() == [0, 1, 3, 4, 5, 6]
    torch.testing.assert_close(v, torch.tensor([0, 1, 3, 2, 5 / 6, 2], dtype=torch.float64))
    x, v = qini_curve(Y, U, T)
    torch.testing.assert_close(v, torch.tensor([0, 1, 2, 1, 0.5, 1], dtype=torch.float64))
    # perfect uplift curve (1 control responder, 1 treated non-responder -> summand = treatment):
    # scores 2*(y == t) + t = [3, 2, 3, 0, 1, 2] -> x [0, 2, 4, 5, 6], values [0, 2, 4, 10/3, 2]
    x, v = perfect_uplift_curve(Y, T)
    torch.testing.assert_close(v, torch.tensor([0, 2, 4, 10 / 3, 2], dtype=torch.float64))
    # AUUC: area 59/6, random line 6, perfect 43/3 -> (59/6 - 6) / (43/3 - 6) = 23/50
    assert float(auuc_score(Y, U, T)) == pytest.approx(0.46)
    # Qini: area 6.5, random line 3, perfect (scores y t - y (1 - t)) 9.5 -> 3.5 / 6.5
    assert float(qini_score(Y, U, T)) == pytest.approx(7 / 13)
    # top 3 of 6 (ties in sklift's reversed stable order: sample 2 before sample 1): treated 1, 1; control 0
    assert float(uplift_at_k(Y, U, T, k=0.5)) == 1.0
    assert float(uplift_at_k(Y, U, T, k=0.5, strategy="by_group")) == 1.0


# --------------------------------------------------------------------------- numpy reference
def _ref_curve(y, u, t, kind):
    order = np.argsort(u, kind="mergesort")[::-1]
    y, u, t = y[order], u[order], t[order]
    xs, vs = [0.0], [0.0]
    for i in range(len(u)):
        if i < len(u) - 1 and u[i] == u[i + 1]:
            continue  # not the last of a run of ties
        n_t = sum(t[: i + 1] == 1)
        n_c = i + 1 - n_t
        y_t = sum(y[: i + 1][t[: i + 1] == 1])
        y_c = sum(y[: i + 1][t[: i + 1] == 0])
        if kind == "uplift":
            value = ((y_t / n_t) if n_t else 0.0) - ((y_c / n_c) if n_c else 0.0)
            value *= i + 1
        else:
            value = y_t - (y_c * n_t / n_c if n_c else 0.0)
        xs.append(i + 1.0)
        vs.append(value)
    if vs[1] == 0 and xs[1] == 0:  # never: thresholds start at n = 1
        xs, vs = xs[1:], vs[1:]
    return np.array(xs), np.array(vs)


def _ref_area(x, v):
    return sum((x[i + 1] - x[i]) * (v[i + 1] + v[i]) / 2 for i in range(len(x) - 1))


def _ref_score(y, u, t, kind):
    x, v = _ref_curve(y, u, t, kind)
    if kind == "uplift":
        summand = y if np.sum((y == 1) & (t == 0)) > np.sum((y == 0) & (t == 1)) else t
        xp, vp = _ref_curve(y, 2 * (y == t) + summand, t, "uplift")
    else:
        xp, vp = _ref_curve(y, y * t - y * (1 - t), t, "qini")
    base = xp[-1] * vp[-1] / 2
    return (_ref_area(x, v) - base) / (_ref_area(xp, vp) - base)


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_reference_definitions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    y = rng.integers(0, 2, n).astype(float) if seed < 4 else rng.random(n) * 3  # binary, then real outcomes
    t = rng.integers(0, 2, n)
    t[:2] = [0, 1]
    u = np.round(rng.normal(size=n), 1)  # ties
    yt, ut, tt = torch.tensor(y), torch.tensor(u), torch.tensor(t)
    for kind, fn in (("uplift", uplift_curve), ("qini", qini_curve)):
        x, v = fn(yt, ut, tt)
        rx, rv = _ref_curve(y, u, t, kind)
        np.testing.assert_allclose(x.numpy(), rx)
        np.testing.assert_allclose(v.numpy(), rv, atol=1e-9)
    if seed < 4:  # the perfect curves assume binary outcomes
        assert float(auuc_score(yt, ut, tt)) == pytest.approx(_ref_score(y, u, t, "uplift"), abs=1e-9)
        assert float(qini_score(yt, ut, tt)) == pytest.approx(_ref_score(y, u, t, "qini"), abs=1e-9)


# from scikit-uplift 0.5.1: uplift_auc_score, qini_auc_score (negative_effect True / False),
# uplift_at_k(k=0.3, strategy overall / by_group) on these arrays (tied scores included)
SKLIFT_CASES = [
    (
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1],
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0],
        [-0.7, -0.1, 0.8, 1.5, -1.3, 1.5, 1.3, 0.8, 0.3, -0.3, 1.5, 2.0, 1.8, 1.3, 0.4, -1.2, -0.0, 0.7, -1.3,
         0.4, 0.4, 0.7, -1.2, -0.7, -0.4, -1.2, 1.7, -0.5, 0.3, -0.3, 1.6, 1.3, 0.6, -2.2, 0.1],
        (0.22654097738247053, 0.14265620110101712, 2.509070831129654, 0.25, 0.25),
    ),
    (
        [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0],
        [0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [-1.5, 1.2, 1.6, -1.3, -1.2, -1.8, -1.0, -3.1, -1.1, 1.3, -0.3, 0.9],
        (0.21428571428571427, 0.23829787234042552, None, 0.5, 1.0),
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(SKLIFT_CASES)))
def test_matches_scikit_uplift(case: int) -> None:
    y, t, u, (auuc, qini, qini_positive, at_k, at_k_group) = SKLIFT_CASES[case]
    y, t, u = torch.tensor(y, dtype=torch.float64), torch.tensor(t), torch.tensor(u, dtype=torch.float64)
    assert float(auuc_score(y, u, t)) == pytest.approx(auuc, abs=1e-12)
    assert float(qini_score(y, u, t)) == pytest.approx(qini, abs=1e-12)
    if qini_positive is not None:  # sklift refuses this variant when its two-segment line bends back
        assert float(qini_score(y, u, t, negative_effect=False)) == pytest.approx(qini_positive, abs=1e-12)
    assert float(uplift_at_k(y, u, t, k=0.3)) == pytest.approx(at_k, abs=1e-12)
    assert float(uplift_at_k(y, u, t, k=0.3, strategy="by_group")) == pytest.approx(at_k_group, abs=1e-12)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="both treated"):
        auuc_score(Y, U, torch.ones(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="0/1 flag"):
        auuc_score(Y, U, torch.tensor([0, 1, 2, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"\(N,\) alike"):
        auuc_score(Y, U[:5], T)
    with pytest.raises(ValueError, match="strategy"):
        uplift_at_k(Y, U, T, strategy="top")


def test_uplift_metrics_accumulates_and_gathers_by_concatenation() -> None:
    rng = np.random.default_rng(7)
    y, t, u = (torch.tensor(a) for a in (rng.integers(0, 2, 90).astype(float), rng.integers(0, 2, 90), rng.random(90)))
    metric = UpliftMetrics(k=0.3)
    for part in range(3):
        s = slice(30 * part, 30 * part + 30)
        metric.update(u[s], y[s], t[s])
    values = metric.compute()
    assert float(values["auuc"]) == pytest.approx(float(auuc_score(y, u, t)))
    assert float(values["qini"]) == pytest.approx(float(qini_score(y, u, t)))
    assert float(values["uplift_at_k"]) == pytest.approx(float(uplift_at_k(y, u, t, 0.3)))
    x, v = uplift_curve(y, u, t)
    raw = (torch.trapezoid(v, x) - x[-1] * v[-1] / 2) / 90**2
    assert float(values["auuc_raw"]) == pytest.approx(float(raw))
    # DDP: torchmetrics gathers list states with dist_reduce_fx "cat"
    assert all(metric._reductions[s] is not None for s in ("uplift", "y", "treatment"))
    assert all(isinstance(metric._defaults[s], list) for s in ("uplift", "y", "treatment"))
    metric.reset()
    metric.update(u[:5], y[:5], torch.zeros(5, dtype=torch.int64))  # one arm only: NaN, no error
    assert all(torch.isnan(v) for v in metric.compute().values())


def test_pehe() -> None:
    metric = PEHE()
    assert torch.isnan(metric.compute())
    metric.update(torch.tensor([0.1, 0.3]), torch.tensor([0.0, 0.0]))
    metric.update(torch.tensor([-0.2]), torch.tensor([0.1]))
    assert float(metric.compute()) == pytest.approx(((0.01 + 0.09 + 0.09) / 3) ** 0.5)
