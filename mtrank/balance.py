"""Expert balance monitoring: how a multi-task head's gates use its experts, and what the experts output.

Everything is read from a head's `HeadOutput.gates` / `HeadOutput.experts` and given meaning by its
layout, `MultiTaskHead.gate_specs` (gate -> `GateSpec`: its experts in column order, the task it feeds
or None) and `MultiTaskHead.expert_specs` (expert -> `ExpertSpec`: shared / group / task, owner,
level). Nothing depends on the head's class, so MMoE, PLE and HoME (multi-level gates such as
``meta/engagement``, ``task/click``, ``l0/shared``) are monitored alike.

Shapes: a gate gives ``(B, E_g)`` weights over the ``E_g`` experts of its `GateSpec` (rows sum to 1
for softmax gates; leading dimensions beyond the first are flattened into samples); an expert gives
``(B, H)`` activations (any shape: all its elements count).

The statistics, over the ``N`` samples (gate rows) / elements seen since the last `reset`:

Per gate ``g`` with weights ``w`` (N, E):
    ``mean_weights``  (E,) ``mean_n w[n, e]``: the gate mass each expert receives, in `GateSpec` order.
    ``entropy``       ``mean_n H(w[n]) / log(E)`` with ``H(p) = -sum_e p_e log p_e`` (``0 log 0 = 0``):
                      1 when every sample spreads its weight evenly, 0 when every sample routes to one
                      expert (defined 0 when ``E == 1``). Per-sample routing sharpness.
    ``usage_cv``      ``std(mean_weights) / mean(mean_weights)`` (population std): 0 when the experts
                      get equal mass over the data, up to ``sqrt(E - 1)`` when one expert takes all.
                      Low entropy with low cv is healthy specialisation (each sample picks one expert,
                      different samples pick different ones); a high cv is **gate collapse**.
    ``hist``          (bins,) counts of the N*E weights in ``bins`` equal bins over [0, 1]
                      (bin ``i`` = ``[i/bins, (i+1)/bins)``, the last one closed; values clamped to [0, 1]).

Per expert with activations ``a`` (M elements):
    ``zero_frac``     fraction of ``|a| <= zero_eps``. HoME's **expert collapse**: ReLU experts whose
                      outputs are mostly zero (and whose output scale differs wildly from the others':
                      ``mean``, ``std``) contribute little whatever their gate weight.
    ``mean``, ``std`` over all elements (population std).

Per expert that several consumers share (``degradation``), HoME's **expert degradation** (a shared
expert taken over by one task):
    The sharers are the *tasks* whose task gates (``GateSpec.task`` not None) see the expert, when
    there are at least 2 such tasks; the mass of a task is the sum, over its task gates that see the
    expert, of that gate's mean weight on it. Otherwise, when at least 2 non-task gates (``task=None``,
    e.g. HoME's ``meta/<group>`` gates) see it, the sharers are those *gates*, each with its mean weight
    on the expert. ``top_share = max mass / sum of masses`` and ``top`` names the heaviest sharer
    (``by`` says whether it is a task or a gate): ``1 / #sharers`` = evenly shared, 1.0 = occupied by
    one sharer. Experts with fewer than 2 sharers (e.g. task-specific experts) have no entry.

Per task, from its task gate (the one feeding its tower; the highest-level one if it has several):
    ``own_mass``      gate mass on the task's own experts (``ExpertSpec(kind="task", owner=<task>)``),
    ``shared_mass``   gate mass on everything else the gate sees (shared and group experts, and other
                      tasks' experts in layouts that expose them).
    ``sparse``        whether the task is sparse (few positives). HoME's **expert under-fitting**: a sparse
                      task's gate puts nearly all its mass on shared experts (``own_mass`` near 0), so
                      its own experts never learn. ``positive_rate`` is the measured label mean of
                      binary tasks (labels > 0.5), when labels were given.

``matrix``: the (gates x experts) table behind the heatmap: rows = task gates (in task order), then the
other gates (in ``gate_specs`` order); columns = all experts in ``expert_specs`` order; each cell the
gate's mean weight on the expert, NaN where the gate cannot see it.

`BalanceAccumulator` keeps *sums* only (a flat dict of float64 tensors of fixed shapes), so updates on
many batches give exactly the statistics of their concatenation, and the states of several processes
add up (`BalanceAccumulator.sync` packs them into one tensor for one all-reduce).
`ExpertBalanceMonitor` is the Lightning callback that feeds it from a forward hook and logs the results
(see its docstring for the keys). `read_offline_wandb_history` decodes an offline W&B run's history.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from torch import Tensor

from heads.base import ExpertSpec, GateSpec

log = logging.getLogger(__name__)

__all__ = [
    "BalanceAccumulator",
    "BalanceStats",
    "ExpertBalanceMonitor",
    "ExpertStats",
    "GateStats",
    "ShareStats",
    "TaskStats",
    "read_offline_wandb_history",
    "render_heatmap",
]


# ==================================================================================== statistics
@dataclass
class GateStats:
    """One gate's statistics (see the module docstring).

    Attributes:
        experts: the experts it weighs, in column order.
        task, group, level: from its `GateSpec`.
        samples: rows seen.
        mean_weights: (E,) mean weight on each expert, in ``experts`` order.
        entropy: mean normalised entropy in [0, 1].
        usage_cv: coefficient of variation of ``mean_weights``.
        hist: (bins,) weight counts over [0, 1].
    """

    experts: list[str]
    task: str | None
    group: str | None
    level: int
    samples: int
    mean_weights: list[float]
    entropy: float
    usage_cv: float
    hist: list[int]


@dataclass
class ExpertStats:
    """One expert's activation statistics.

    Attributes:
        kind, owner, level: from its `ExpertSpec`.
        elements: activations seen.
        zero_frac: fraction with ``|a| <= zero_eps``.
        mean, std: over all elements (population std).
    """

    kind: str
    owner: str | None
    level: int
    elements: int
    zero_frac: float
    mean: float
    std: float


@dataclass
class ShareStats:
    """How an expert's gate mass splits over its sharers (degradation).

    Attributes:
        by: ``task`` (sharers are tasks) or ``gate`` (sharers are non-task gates).
        masses: sharer -> its gate mass on the expert.
        top: the heaviest sharer.
        top_share: its share of the summed mass (``1/len(masses)``: even; 1.0: one sharer takes all).
    """

    by: str
    masses: dict[str, float]
    top: str
    top_share: float


@dataclass
class TaskStats:
    """A task gate's split between the task's own experts and the rest (under-fitting).

    Attributes:
        gate: the task gate read.
        own_experts: the task's own experts that gate sees.
        own_mass: its mass on them.
        shared_mass: its mass on every other expert it sees.
        positive_rate: measured label mean (binary tasks with labels given), else None.
        sparse: whether the task counts as sparse, None when unknown.
    """

    gate: str
    own_experts: list[str]
    own_mass: float
    shared_mass: float
    positive_rate: float | None
    sparse: bool | None


@dataclass
class BalanceStats:
    """All statistics of one accumulation (see the module docstring); plain floats, lists and dicts.

    Attributes:
        gates: gate -> `GateStats`.
        experts: expert -> `ExpertStats`.
        degradation: expert -> `ShareStats`, for experts with >= 2 sharers.
        tasks: task -> `TaskStats`, for tasks with a task gate.
        matrix: (rows x cols) mean gate weights, NaN where the gate cannot see the expert.
        matrix_rows: the gates, task gates first (task order), then the others.
        matrix_cols: the experts, in ``expert_specs`` order.
        bin_edges: (bins + 1,) edges of the gate weight histograms.
        zero_eps: the threshold of ``zero_frac``.
    """

    gates: dict[str, GateStats]
    experts: dict[str, ExpertStats]
    degradation: dict[str, ShareStats]
    tasks: dict[str, TaskStats]
    matrix: list[list[float]]
    matrix_rows: list[str]
    matrix_cols: list[str]
    bin_edges: list[float]
    zero_eps: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (strict JSON: NaN and infinities become None)."""
        return _finite_or_none(dataclasses.asdict(self))

    def rows(self) -> list[tuple[str, str, str, float | str]]:
        """Long format ``(kind, name, stat, value)``: every scalar, plus ``hist/<i>`` counts and ``top`` names.

        ``kind`` is ``gate``, ``expert`` or ``task``; the logged scalars are `scalars` (a subset).
        """
        out: list[tuple[str, str, str, float | str]] = []
        for name, g in self.gates.items():
            out += [("gate", name, "entropy", g.entropy), ("gate", name, "usage_cv", g.usage_cv)]
            out += [("gate", name, f"weight/{e}", w) for e, w in zip(g.experts, g.mean_weights, strict=True)]
            out += [("gate", name, f"hist/{i}", float(c)) for i, c in enumerate(g.hist)]
        for name, x in self.experts.items():
            out += [("expert", name, "zero_frac", x.zero_frac), ("expert", name, "mean", x.mean)]
            out.append(("expert", name, "std", x.std))
            if name in self.degradation:
                share = self.degradation[name]
                out += [("expert", name, "top_share", share.top_share), ("expert", name, "top", share.top)]
        for name, t in self.tasks.items():
            out += [("task", name, "own_mass", t.own_mass), ("task", name, "shared_mass", t.shared_mass)]
            if t.positive_rate is not None:
                out.append(("task", name, "positive_rate", t.positive_rate))
            if t.sparse is not None:
                out.append(("task", name, "sparse", float(t.sparse)))
        return out

    def scalars(self, prefix: str) -> dict[str, float]:
        """``<prefix>/<kind>/<name>/<stat>`` -> value for every finite numeric stat (no histograms, no names)."""
        return {
            f"{prefix}/{kind}/{name}/{stat}": float(value)
            for kind, name, stat, value in self.rows()
            if not isinstance(value, str) and not stat.startswith("hist/") and math.isfinite(value)
        }


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


class BalanceAccumulator:
    """Sums behind `BalanceStats`, updated batch by batch; mergeable across batches and processes.

    The state (`state`) is a flat dict of 1-D tensors of fixed shapes, zero after `reset`; every entry
    is a sum, so adding the states of two accumulators (`merge`, or an all-reduce with ``sum``) gives
    the state of one accumulator updated with both streams. Float64, except on MPS (float32). The
    state follows the device of the tensors given to `update`.

    Args:
        gate_specs: gate name -> `GateSpec` (the head's ``gate_specs``); must not be empty.
        expert_specs: expert name -> `ExpertSpec` (the head's ``expert_specs``).
        zero_eps: an activation with ``|a| <= zero_eps`` counts as zero.
        bins: bins of the gate weight histograms over [0, 1].
        tasks: task names in the order of the heatmap's rows (default: order of first appearance
            among the task gates).
        label_names: tasks whose labels `update` may count (positive rates); fixed so that every
            process holds the same state keys.
    """

    def __init__(
        self,
        gate_specs: Mapping[str, GateSpec],
        expert_specs: Mapping[str, ExpertSpec],
        zero_eps: float = 1e-3,
        bins: int = 20,
        *,
        tasks: Sequence[str] | None = None,
        label_names: Sequence[str] = (),
    ) -> None:
        if not gate_specs:
            raise ValueError("BalanceAccumulator: gate_specs is empty; there is nothing to monitor")
        if bins < 1:
            raise ValueError(f"BalanceAccumulator: bins must be >= 1, got {bins}")
        if zero_eps < 0:
            raise ValueError(f"BalanceAccumulator: zero_eps must be >= 0, got {zero_eps}")
        for gate, spec in gate_specs.items():
            unknown = [e for e in spec.experts if e not in expert_specs]
            if unknown:
                raise ValueError(f"BalanceAccumulator: gate {gate!r} names unknown experts {unknown}")
        self.gate_specs = dict(gate_specs)
        self.expert_specs = dict(expert_specs)
        self.zero_eps = float(zero_eps)
        self.bins = int(bins)
        self.label_names = list(label_names)
        appearance = list(dict.fromkeys(s.task for s in self.gate_specs.values() if s.task is not None))
        given = list(tasks) if tasks is not None else []
        self.task_order = given + [t for t in appearance if t not in given]
        self._shapes: dict[str, int] = {}
        for gate, spec in self.gate_specs.items():
            self._shapes |= {
                f"gate/{gate}/samples": 1,
                f"gate/{gate}/weight_sum": len(spec.experts),
                f"gate/{gate}/entropy_sum": 1,
                f"gate/{gate}/hist": self.bins,
            }
        for expert in self.expert_specs:
            for stat in ("elements", "zeros", "sum", "sq_sum"):
                self._shapes[f"expert/{expert}/{stat}"] = 1
        for task in self.label_names:
            self._shapes[f"label/{task}/count"] = 1
            self._shapes[f"label/{task}/positive"] = 1
        self._device = torch.device("cpu")
        self._state: dict[str, Tensor] = {}
        self.reset()

    # ------------------------------------------------------------------------------ state
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self._device.type == "mps" else torch.float64

    def reset(self) -> None:
        """Zero every sum (keeps the device)."""
        self._state = {k: torch.zeros(n, dtype=self.dtype, device=self._device) for k, n in self._shapes.items()}

    def to(self, device: torch.device | str) -> BalanceAccumulator:
        """Move the state to ``device`` (in place); returns self."""
        device = torch.device(device)
        if device != self._device:
            self._device = device
            self._state = {k: v.to(device=device, dtype=self.dtype) for k, v in self._state.items()}
        return self

    def state(self) -> dict[str, Tensor]:
        """The flat state: key -> 1-D tensor of sums (copies)."""
        return {k: v.clone() for k, v in self._state.items()}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the state by ``state`` (same keys and shapes as `state` gives)."""
        self._check(state)
        self._state = {k: state[k].detach().to(device=self._device, dtype=self.dtype).clone() for k in self._shapes}

    def merge(self, other: BalanceAccumulator | Mapping[str, Tensor]) -> None:
        """Add another accumulator's state (or a state dict) into this one."""
        state = other.state() if isinstance(other, BalanceAccumulator) else other
        self._check(state)
        for k in self._shapes:
            self._state[k] += state[k].detach().to(device=self._device, dtype=self.dtype)

    def flat(self) -> Tensor:
        """The whole state as one 1-D tensor (keys in a fixed order); see `load_flat`."""
        return torch.cat([self._state[k] for k in self._shapes])

    def load_flat(self, flat: Tensor) -> None:
        """Set the state from a tensor `flat` gave (e.g. after summing it across processes)."""
        total = sum(self._shapes.values())
        if flat.numel() != total:
            raise ValueError(f"BalanceAccumulator.load_flat: expected {total} values, got {flat.numel()}")
        parts = torch.split(flat.detach().to(device=self._device, dtype=self.dtype), list(self._shapes.values()))
        self._state = {k: p.clone() for k, p in zip(self._shapes, parts, strict=True)}

    def sync(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Replace the state by its sum over processes with one collective, e.g.
        ``acc.sync(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))``; every process must call it."""
        self.load_flat(reduce_sum(self.flat()))

    def _check(self, state: Mapping[str, Tensor]) -> None:
        missing = [k for k in self._shapes if k not in state]
        if missing:
            raise KeyError(f"BalanceAccumulator: state lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        bad = [k for k, n in self._shapes.items() if state[k].numel() != n]
        if bad:
            raise ValueError(f"BalanceAccumulator: state entries of the wrong size: {bad[:5]}")

    # ------------------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self,
        gates: Mapping[str, Tensor] | None = None,
        experts: Mapping[str, Tensor] | None = None,
        labels: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Add one batch.

        Args:
            gates: gate name -> (B, E_g) weights (leading dims flattened); gates of ``gate_specs`` absent
                here are left alone, a gate not in ``gate_specs`` is an error.
            experts: expert name -> (B, H) activations (any shape); unknown experts are an error.
            labels: task name (of ``label_names``) -> (B,) labels, counted for positive rates.
        """
        tensors = [*(gates or {}).values(), *(experts or {}).values(), *(labels or {}).values()]
        if not tensors:
            return
        self.to(tensors[0].device)
        dtype, s = self.dtype, self._state
        for gate, w in (gates or {}).items():
            spec = self.gate_specs.get(gate)
            if spec is None:
                raise KeyError(f"BalanceAccumulator: gate {gate!r} is not in gate_specs {list(self.gate_specs)}")
            num = len(spec.experts)
            if w.shape[-1] != num:
                raise ValueError(f"BalanceAccumulator: gate {gate!r} has {w.shape[-1]} columns, its spec {num}")
            w = w.detach().reshape(-1, num).to(device=self._device, dtype=dtype)
            s[f"gate/{gate}/samples"] += w.shape[0]
            s[f"gate/{gate}/weight_sum"] += w.sum(dim=0)
            if num > 1:
                s[f"gate/{gate}/entropy_sum"] += (
                    (-torch.xlogy(w, w).sum(dim=-1) / math.log(num)).clamp(0.0, 1.0).sum()
                )  # rounding: rows sum to 1 ± ulp
            index = (w * self.bins).floor().clamp(0, self.bins - 1).long().flatten()
            s[f"gate/{gate}/hist"] += torch.bincount(index, minlength=self.bins).to(dtype)
        for expert, a in (experts or {}).items():
            if expert not in self.expert_specs:
                raise KeyError(f"BalanceAccumulator: expert {expert!r} is not in expert_specs")
            a = a.detach().reshape(-1).to(device=self._device, dtype=dtype)
            s[f"expert/{expert}/elements"] += a.numel()
            s[f"expert/{expert}/zeros"] += (a.abs() <= self.zero_eps).sum().to(dtype)
            s[f"expert/{expert}/sum"] += a.sum()
            s[f"expert/{expert}/sq_sum"] += a.square().sum()
        for task, y in (labels or {}).items():
            if task not in self.label_names:
                raise KeyError(f"BalanceAccumulator: labels of {task!r} given, label_names are {self.label_names}")
            y = y.detach().reshape(-1).to(self._device)
            s[f"label/{task}/count"] += y.numel()
            s[f"label/{task}/positive"] += (y.float() > 0.5).sum().to(dtype)

    # ------------------------------------------------------------------------------ compute
    def positive_rates(self) -> dict[str, float | None]:
        """Task (of ``label_names``) -> measured positive rate, None when no label was counted."""
        out: dict[str, float | None] = {}
        for task in self.label_names:
            count = float(self._state[f"label/{task}/count"].item())
            out[task] = float(self._state[f"label/{task}/positive"].item()) / count if count else None
        return out

    def compute(self, sparse: Mapping[str, bool | None] | None = None) -> BalanceStats:
        """The statistics of everything added since the last `reset`.

        Args:
            sparse: task -> whether it is sparse (None: unknown), copied into `TaskStats.sparse`.
        """
        s = {k: v.detach().cpu().double() for k, v in self._state.items()}
        nan = float("nan")
        gates: dict[str, GateStats] = {}
        mean_w: dict[str, dict[str, float]] = {}
        for gate, spec in self.gate_specs.items():
            n = float(s[f"gate/{gate}/samples"].item())
            means = (s[f"gate/{gate}/weight_sum"] / n).tolist() if n else [nan] * len(spec.experts)
            entropy = float(s[f"gate/{gate}/entropy_sum"].item()) / n if n else nan
            gates[gate] = GateStats(
                experts=list(spec.experts),
                task=spec.task,
                group=spec.group,
                level=spec.level,
                samples=int(n),
                mean_weights=means,
                entropy=entropy,
                usage_cv=_cv(means) if n else nan,
                hist=[int(c) for c in s[f"gate/{gate}/hist"].tolist()],
            )
            mean_w[gate] = dict(zip(spec.experts, means, strict=True))

        experts: dict[str, ExpertStats] = {}
        for expert, spec in self.expert_specs.items():
            m = float(s[f"expert/{expert}/elements"].item())
            mean = float(s[f"expert/{expert}/sum"].item()) / m if m else nan
            var = max(float(s[f"expert/{expert}/sq_sum"].item()) / m - mean * mean, 0.0) if m else nan
            experts[expert] = ExpertStats(
                kind=spec.kind,
                owner=spec.owner,
                level=spec.level,
                elements=int(m),
                zero_frac=float(s[f"expert/{expert}/zeros"].item()) / m if m else nan,
                mean=mean,
                std=math.sqrt(var),
            )

        degradation: dict[str, ShareStats] = {}
        for expert in self.expert_specs:
            task_mass: dict[str, float] = {}
            gate_mass: dict[str, float] = {}
            for gate, spec in self.gate_specs.items():
                if expert not in spec.experts:
                    continue
                if spec.task is not None:
                    task_mass[spec.task] = task_mass.get(spec.task, 0.0) + mean_w[gate][expert]
                else:
                    gate_mass[gate] = mean_w[gate][expert]
            if len(task_mass) >= 2:
                degradation[expert] = _share("task", task_mass)
            elif len(gate_mass) >= 2:
                degradation[expert] = _share("gate", gate_mass)

        rates = self.positive_rates()
        tasks: dict[str, TaskStats] = {}
        for task in self.task_order:
            candidates = [
                (spec.level, i, g) for i, (g, spec) in enumerate(self.gate_specs.items()) if spec.task == task
            ]
            if not candidates:
                continue
            gate = max(candidates)[2]
            spec = self.gate_specs[gate]
            own = [
                e for e in spec.experts if self.expert_specs[e].kind == "task" and self.expert_specs[e].owner == task
            ]
            tasks[task] = TaskStats(
                gate=gate,
                own_experts=own,
                own_mass=sum(mean_w[gate][e] for e in own),
                shared_mass=sum(mean_w[gate][e] for e in spec.experts if e not in own),
                positive_rate=rates.get(task),
                sparse=(sparse or {}).get(task),
            )

        rows = self.matrix_rows()
        cols = list(self.expert_specs)
        matrix = [[mean_w[g].get(e, nan) for e in cols] for g in rows]
        return BalanceStats(
            gates=gates,
            experts=experts,
            degradation=degradation,
            tasks=tasks,
            matrix=matrix,
            matrix_rows=rows,
            matrix_cols=cols,
            bin_edges=[i / self.bins for i in range(self.bins + 1)],
            zero_eps=self.zero_eps,
        )

    def matrix_rows(self) -> list[str]:
        """Heatmap rows: task gates in task order (gate order within a task), then the other gates."""
        order = {t: i for i, t in enumerate(self.task_order)}
        task_gates = [g for g, spec in self.gate_specs.items() if spec.task is not None]
        task_gates.sort(key=lambda g: order[self.gate_specs[g].task])  # stable: gate order within a task
        return task_gates + [g for g, spec in self.gate_specs.items() if spec.task is None]


def _cv(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    if mean <= 0:
        return float("nan")
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / mean


def _share(by: str, masses: dict[str, float]) -> ShareStats:
    total = sum(masses.values())
    top = max(masses, key=lambda k: masses[k])
    return ShareStats(by=by, masses=masses, top=top, top_share=masses[top] / total if total > 0 else float("nan"))


# ==================================================================================== heatmap
_COLORMAP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # dark -> bright
_NAN_COLOR = (170, 170, 170)


def _color(value: float, vmax: float) -> tuple[int, int, int]:
    if not math.isfinite(value):
        return _NAN_COLOR
    x = min(max(value / vmax, 0.0), 1.0) * (len(_COLORMAP) - 1)
    i = min(int(x), len(_COLORMAP) - 2)
    f = x - i
    lo, hi = _COLORMAP[i], _COLORMAP[i + 1]
    return tuple(round(a + (b - a) * f) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def render_heatmap(
    matrix: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], vmax: float | None = None
) -> Any:
    """A PIL RGB image of ``matrix`` (rows x cols): one coloured cell per value (dark = 0, bright = ``vmax``,
    default the largest finite value), its value written in it, NaN cells grey, row labels on the left,
    column labels rotated on top, a colour bar at the bottom. Uses pillow's default font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    finite = [v for row in matrix for v in row if math.isfinite(v)]
    vmax = vmax if vmax is not None and vmax > 0 else max([*finite, 1e-12])
    pad = 6
    cell_w = max(size("0.00")[0], max((size(c)[1] for c in cols), default=0)) + 12
    cell_h = max(size("0.00")[1], max((size(r)[1] for r in rows), default=0)) + 10
    left = max((size(r)[0] for r in rows), default=0) + 2 * pad
    top = max((size(c)[0] for c in cols), default=0) + 2 * pad
    bar_h = 14 + size("0")[1] + 2 * pad
    bar_w = max(cell_w * len(cols), 120)
    width = left + bar_w + pad
    height = top + cell_h * len(rows) + bar_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for j, col in enumerate(cols):  # rotated column labels
        w, h = size(col)
        label = Image.new("L", (w + 2, h + 4), 0)
        ImageDraw.Draw(label).text((1 - probe.textbbox((0, 0), col, font=font)[0], 1), col, fill=255, font=font)
        label = label.rotate(90, expand=True)
        x = left + j * cell_w + (cell_w - label.width) // 2
        image.paste((0, 0, 0), (x, top - pad - label.height), label)
    for i, row in enumerate(rows):
        y = top + i * cell_h
        draw.text((pad, y + (cell_h - size(row)[1]) // 2 - 1), row, fill="black", font=font)
        for j, value in enumerate(matrix[i]):
            x = left + j * cell_w
            color = _color(value, vmax)
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=color, outline="white")
            if math.isfinite(value):
                text = f"{value:.2f}"
                luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
                tw, th = size(text)
                draw.text(
                    (x + (cell_w - tw) // 2, y + (cell_h - th) // 2 - 1),
                    text,
                    fill="black" if luminance > 128 else "white",
                    font=font,
                )
    y0 = top + cell_h * len(rows) + pad
    for k in range(bar_w):
        draw.line([left + k, y0, left + k, y0 + 10], fill=_color(vmax * k / max(bar_w - 1, 1), vmax))
    draw.text((left, y0 + 12), "0", fill="black", font=font)
    draw.text((left + bar_w - size(f"{vmax:.2f}")[0], y0 + 12), f"{vmax:.2f}", fill="black", font=font)
    return image


# ==================================================================================== offline W&B
_LOG_BLOCK = 32768
_LOG_HEADER = 7  # checksum uint32, length uint16, type uint8
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> list[bytes]:
    """The raw protobuf records of a ``run-*.wandb`` transaction log (W&B's leveldb-log format).

    File: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of records
    ``<IHB`` (crc32 of type byte + data, length, type) + data; a record too long for its block is split
    into FIRST / MIDDLE* / LAST pieces; a block tail shorter than a header is zero padding. A record
    cut short at the end of the file (a run still being written) is dropped.
    """
    data = path.read_bytes()
    if len(data) < _LOG_HEADER or data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (no ':W&B' header)")
    magic, version = struct.unpack_from("<HB", data, 4)
    if magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: unknown W&B log header (magic {magic:#x}, version {version})")
    crc = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}
    records: list[bytes] = []
    pending: bytearray | None = None
    pos = _LOG_HEADER
    while pos < len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < _LOG_HEADER:
            pos += left
            continue
        if pos + _LOG_HEADER > len(data):
            break
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0 and checksum == 0:  # zero padding (pre-allocated tail)
            pos += left
            continue
        chunk = data[pos + _LOG_HEADER : pos + _LOG_HEADER + length]
        if len(chunk) < length:
            break  # truncated tail
        if kind not in crc or zlib.crc32(chunk, crc[kind]) != checksum:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += _LOG_HEADER + length
        if kind == _FULL:
            records.append(bytes(chunk))
        elif kind == _FIRST:
            pending = bytearray(chunk)
        elif pending is not None:
            pending += chunk
            if kind == _LAST:
                records.append(bytes(pending))
                pending = None
    return records


def read_offline_wandb_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """History rows of an offline W&B run, decoded from its ``run-*.wandb`` file (no network, no API).

    Args:
        run_dir: an ``offline-run-*`` (or ``run-*``) folder, or the ``.wandb`` file itself.

    Returns:
        One dict per ``run.log`` row, in order: key -> JSON-decoded value (``_step``, ``_runtime``,
        ``_timestamp``, Lightning's ``trainer/global_step`` and the logged keys). Media and histograms are
        dicts with a ``_type`` (``image-file``, ``table-file``, ``histogram``); keys logged with slashes
        (``balance/val/heatmap``) stay whole. Works with wandb 0.31 (whose Python package no longer ships
        a reader): the file is W&B's leveldb-log of `wandb.proto.wandb_internal_pb2.Record` messages.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(run_dir)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"{path}: no run-*.wandb file")
        path = files[0]
    rows: list[dict[str, Any]] = []
    for raw in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            value = json.loads(item.value_json)
            target = row
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
        rows.append(row)
    return rows


# ==================================================================================== callback
class ExpertBalanceMonitor(L.Callback):
    """Logs expert balance statistics (`BalanceStats`) of the model's multi-task head.

    No code in the heads: in `setup` it registers a forward hook on ``pl_module.heads`` (removed in
    `teardown`) that feeds the head's `HeadOutput.gates` / ``experts`` (detached) into a
    `BalanceAccumulator`, but only when wanted:

    - training: the first batch of every optimiser step with ``global_step % every_n_steps == 0``
      (statistics of that batch, summed over processes), logged under ``balance/train/...`` at step
      ``global_step`` (before the update);
    - validation: every batch, accumulated over the epoch, summed over processes and logged under
      ``balance/val/...`` at the epoch's end at step ``global_step``; the sanity check is skipped.

    Scalars go to every logger (``logger.log_metrics(..., step=global_step)``, rank zero), with keys
    (``<s>`` = ``train`` or ``val``)::

        balance/<s>/gate/<gate>/entropy | usage_cv | weight/<expert>
        balance/<s>/expert/<expert>/zero_frac | mean | std | top_share
        balance/<s>/task/<task>/own_mass | shared_mass | positive_rate | sparse

    (``top_share`` for experts with >= 2 sharers; ``positive_rate`` for binary tasks; ``sparse`` 0/1
    when known.) W&B loggers also get, in the same row: ``balance/val/heatmap`` (an image of the gates x
    experts matrix), ``balance/val/gate_weights`` (a table: gate, expert, weight) and, with
    ``log_histograms``, ``balance/<s>/hist/<gate>`` (gate weight histograms). At the end of fit (and of a
    stand-alone ``validate``) rank zero writes ``<output_dir>/expert_balance.json`` (every record:
    stage, step, epoch, stats; plus ``last_val``) and ``expert_balance.csv`` (stage, step, epoch, kind,
    name, stat, value).

    Args:
        every_n_steps: training steps between two captured batches.
        zero_eps: an activation with ``|a| <= zero_eps`` counts as zero.
        bins: bins of the gate weight histograms over [0, 1].
        sparse_tasks: the tasks to treat as sparse; None: a binary task is sparse when its positive
            rate on the validation labels is below ``sparse_rate`` (unknown before the first validation).
        sparse_rate: that threshold.
        output_dir: folder of the JSON/CSV files (default ``trainer.log_dir``, else ``default_root_dir``).
        log_histograms: log the W&B gate weight histograms (validation and training).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        zero_eps: float = 1e-3,
        bins: int = 20,
        sparse_tasks: list[str] | None = None,
        sparse_rate: float = 0.05,
        output_dir: str | None = None,
        log_histograms: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"ExpertBalanceMonitor.every_n_steps must be >= 1, got {every_n_steps}")
        if bins < 1:
            raise ValueError(f"ExpertBalanceMonitor.bins must be >= 1, got {bins}")
        if not 0 < sparse_rate <= 1:
            raise ValueError(f"ExpertBalanceMonitor.sparse_rate must be in (0, 1], got {sparse_rate}")
        self.every_n_steps = every_n_steps
        self.zero_eps = zero_eps
        self.bins = bins
        self.sparse_tasks = list(sparse_tasks) if sparse_tasks is not None else None
        self.sparse_rate = sparse_rate
        self.output_dir = output_dir
        self.log_histograms = log_histograms
        self.history: list[tuple[str, int, int, BalanceStats]] = []  # (stage, step, epoch, stats), rank zero
        self._accs: dict[str, BalanceAccumulator] = {}
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._mode: str | None = None
        self._train_step = -1
        self._tasks: list[str] = []
        self._labels: dict[str, str] = {}  # binary task -> label column
        self._val_rates: dict[str, float | None] = {}

    # ------------------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        heads = getattr(pl_module, "heads", None)
        if not isinstance(heads, torch.nn.Module):
            raise TypeError(f"ExpertBalanceMonitor: {type(pl_module).__name__} has no `heads` module to monitor")
        gate_specs = getattr(heads, "gate_specs", None)
        if not gate_specs:
            raise ValueError(
                f"ExpertBalanceMonitor: head {type(heads).__name__} has no gates (empty gate_specs); "
                "it cannot be monitored: remove the callback or use a gated head (MMoE, PLE, HoME)"
            )
        tasks = list(getattr(pl_module, "tasks", []))
        self._tasks = [t.name for t in tasks]
        if self.sparse_tasks is not None:
            unknown = [t for t in self.sparse_tasks if t not in self._tasks]
            if unknown:
                raise ValueError(f"ExpertBalanceMonitor.sparse_tasks: unknown tasks {unknown}; tasks are {self._tasks}")
        self._labels = {t.name: t.label for t in tasks if t.kind == "binary"}
        self._accs = {
            stage_: BalanceAccumulator(
                gate_specs,
                heads.expert_specs,
                self.zero_eps,
                self.bins,
                tasks=self._tasks,
                label_names=list(self._labels),
            )
            for stage_ in ("train", "val")
        }
        if self._hook is not None:
            self._hook.remove()
        self._hook = heads.register_forward_hook(self._capture)
        self._mode = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._mode = None

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._mode is None:
            return
        self._accs[self._mode].update(getattr(output, "gates", None), getattr(output, "experts", None))

    def _count_labels(self, stage: str, batch: Any) -> None:
        labels = getattr(batch, "labels", None) or {}
        self._accs[stage].update(labels={t: labels[col] for t, col in self._labels.items() if col in labels})

    # ------------------------------------------------------------------------------ training
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._train_step:
            self._train_step = step
            self._accs["train"].reset()
            self._mode = "train"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._mode != "train":
            return
        self._mode = None
        self._count_labels("train", batch)
        self._finish(trainer, pl_module, "train", self._train_step)

    # ------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._accs["val"].reset()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self._mode = "val"

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._mode == "val":
            self._mode = None
            self._count_labels("val", batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val", trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write_outputs(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_outputs(trainer)

    # ------------------------------------------------------------------------------ results
    def _sparse(self, rates: Mapping[str, float | None]) -> dict[str, bool | None]:
        if self.sparse_tasks is not None:
            return {t: t in self.sparse_tasks for t in self._tasks}
        return {t: (rates.get(t) < self.sparse_rate if rates.get(t) is not None else None) for t in self._labels} | {
            t: False for t in self._tasks if t not in self._labels
        }

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, step: int) -> None:
        acc = self._accs[stage]
        if trainer.world_size > 1:
            acc.to(pl_module.device)
            acc.sync(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        if stage == "val":
            self._val_rates = acc.positive_rates()
        stats = acc.compute(sparse=self._sparse(self._val_rates))
        if not trainer.is_global_zero:
            return
        self.history.append((stage, int(step), int(trainer.current_epoch), stats))
        scalars = stats.scalars(f"balance/{stage}")
        media: dict[str, Any] | None = None
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger):
                if media is None:
                    media = self._wandb_media(stage, stats)
                logger.log_metrics({**scalars, **media}, step=step)
            else:
                logger.log_metrics(scalars, step=step)
            logger.save()

    def _wandb_media(self, stage: str, stats: BalanceStats) -> dict[str, Any]:
        import numpy as np
        import wandb

        media: dict[str, Any] = {}
        if stage == "val":
            image = render_heatmap(stats.matrix, stats.matrix_rows, stats.matrix_cols)
            media["balance/val/heatmap"] = wandb.Image(image, caption="mean gate weight: gates x experts")
            cells = [
                [gate, expert, value]
                for gate, row in zip(stats.matrix_rows, stats.matrix, strict=True)
                for expert, value in zip(stats.matrix_cols, row, strict=True)
                if math.isfinite(value)
            ]
            media["balance/val/gate_weights"] = wandb.Table(columns=["gate", "expert", "weight"], data=cells)
        if self.log_histograms:
            edges = np.asarray(stats.bin_edges)
            for gate, g in stats.gates.items():
                if g.samples:
                    media[f"balance/{stage}/hist/{gate}"] = wandb.Histogram(np_histogram=(np.asarray(g.hist), edges))
        return media

    def _write_outputs(self, trainer: L.Trainer) -> None:
        out_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir: on every rank
        if not trainer.is_global_zero or not self.history:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        records = [
            {"stage": st, "step": sp, "epoch": ep, "stats": stats.to_dict()} for st, sp, ep, stats in self.history
        ]
        summary = {
            "every_n_steps": self.every_n_steps,
            "zero_eps": self.zero_eps,
            "bins": self.bins,
            "sparse_tasks": self.sparse_tasks,
            "sparse_rate": self.sparse_rate,
            "records": records,
            "last_val": next((r["stats"] for r in reversed(records) if r["stage"] == "val"), None),
        }
        (out_dir / "expert_balance.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
        with (out_dir / "expert_balance.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["stage", "step", "epoch", "kind", "name", "stat", "value"])
            for stage, step, epoch, stats in self.history:
                writer.writerows([stage, step, epoch, *row] for row in stats.rows())
        log.info("wrote expert balance statistics (%d records) to %s", len(self.history), out_dir)
