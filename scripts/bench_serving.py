"""Serving throughput: candidates scored per second with the cached user encoding (`mtrank.serve.CandidateScorer`)
against re-encoding the history once per candidate (``naive=True``), and latency per request (p50 / p99).

Goal: at C = 1000 candidates per request, the cached path scores >= 20x as many candidates per second as
re-encoding.

On a GPU, from the repository root:

    python scripts/bench_serving.py --device cuda --dtype bfloat16 --out bench_serving.json
    # the same, spelled out (these are the defaults on a machine with CUDA):
    python scripts/bench_serving.py --device cuda --dtype bfloat16 --encoders HSTU LONGER --history 1024 8192 \\
        --candidates 100 1000 --dim 64 --layers 2 --heads 2 --requests 20 --warmup 2 --microbatch 1024 \\
        --max-seconds 120 --seed 0 --out bench_serving.json

On the CPU re-encoding 1000 candidates at 8k behaviours takes far too long per request: time the baseline on
the first K candidates of each request (``--naive-candidates K``) and bound every path's time
(``--max-seconds``), e.g.

    python scripts/bench_serving.py --device cpu --threads 2 --requests 10 --warmup 1 --naive-candidates 2 \\
        --microbatch 128 --max-seconds 60 --out bench_serving_cpu.json

(``--microbatch 128`` bounds LONGER's cached path on the CPU: at 8k behaviours each candidate's 513 queries attend
to 2049 keys, 1 GiB of float32 scores per 128 pairs; HSTU's prefix is still encoded once per request.) On 2 busy
CPU cores this takes roughly 15-25 minutes, most of it HSTU at 8k (one full encode there is ~20-40 s).

CPU smoke test:

    python scripts/bench_serving.py --device cpu --history 16 --candidates 4 8 --dim 16 --requests 2 \\
        --warmup 1 --out /tmp/s.json

**Models.** A `RankingModule` with random weights (``--seed``) per encoder and history length: the ``model:``
section of ``configs/quickstart.yaml`` (HSTU: `encoders.HSTUEncoder`) or ``configs/longer.yaml`` (LONGER:
`encoders.LongerEncoder`): their five tasks (click, like, follow, long_view, watch_time), features and MMoE
heads, with ``features.max_len`` = the history length, the encoder's ``dim`` / ``num_layers`` / ``num_heads``
from ``--dim`` / ``--layers`` / ``--heads`` and LONGER's long-sequence settings of ``scripts/compare_encoders.py``'s
`long_sequence_settings` (token merge K = 4, ``max(8, L // 16)`` recent queries). Eval mode (no dropout).

**Requests.** One user per request (B = 1), every history full: ``history_len`` = the history length
(`mtrank.data.synth.random_batch`), and C random candidates (item id, category, duration). ``--warmup``
untimed requests, then up to ``--requests`` timed ones, all distinct, made before timing and moved to the device.

**Paths**, each timed on the same requests:

- ``cached``: `CandidateScorer(module, microbatch=--microbatch)` (the ``hstu_prefix`` / ``longer_cache`` path:
  the history encoded once per request) on all C candidates;
- ``naive``: `CandidateScorer(module, microbatch=--naive-microbatch, naive=True)`: the request expanded to one
  row per (user, candidate) pair and the whole module run on it, i.e. C full encodes. With
  ``--naive-candidates K`` < C only the request's first K candidates are scored: its candidates/s is then a
  rate measured on K candidates per request (stated in the table and the JSON, ``naive_candidates``), and its
  latency is not reported (it would be an extrapolation); with K = C (the default) both are measured. The
  re-encoding cost per candidate does not depend on C, so the rate on K candidates is that of C.

Timing: ``time.perf_counter`` around each ``score`` call (one request), between ``torch.cuda.synchronize`` calls
on CUDA, under ``torch.autocast(bfloat16)`` with ``--dtype bfloat16``. A path stops taking new requests, warm-up
ones included, once its requests have taken ``--max-seconds`` (at least one timed request always runs); the
number of timed requests is reported.

**Correctness first.** Once per (encoder, history, C), before timing, both paths score one request (the first
warm-up request) and the max abs difference of every task's scores on the candidates both scored (the first K) is
recorded (``max_abs_diff``, per task in ``max_abs_diff_by_task``). It must be at most ``--tolerance`` (default
1e-3 in float32, 5e-2 in bfloat16) times ``max(1, max |naive score|)``; otherwise the row is reported as
``scores disagree``, is not timed (a benchmark of a wrong fast path is worthless) and the exit status is 1.

Columns: ``cand/s`` candidates scored per second (candidates scored / seconds of the timed requests);
``p50 ms`` / ``p99 ms`` latency per request (linear interpolation between the sorted times; with few requests
p99 is about the slowest one); ``n`` timed requests; ``K`` candidates per request the naive path scored;
``speed-up`` cached cand/s over naive cand/s; ``max Δ`` the agreement check (max abs difference); ``peak MiB``
per path: on CUDA ``torch.cuda.max_memory_allocated`` (reset before the path: weights, requests and the path's
activations), on the CPU the process's peak resident set size while the path ran (``VmHWM`` of
``/proc/self/status``, reset through ``/proc/self/clear_refs`` before the path; where that is unavailable,
``getrusage`` max RSS since the process started); the JSON also holds the peak minus the memory in use before
the path (``*_peak_delta_mib``). A cell that runs out of memory is reported as such; any other error is reported
with its message and makes the exit status 1.

Prints one table (both paths side by side) and the goal check, and writes JSON (``--out``, rewritten after
every row): device name, torch version, threads, dtype, settings, rows, goals.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import math
import os
import platform
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_encoders import long_sequence_settings

from mtrank.batch import Batch
from mtrank.data.synth import random_batch
from mtrank.module import RankingModule
from mtrank.serve import Candidates, CandidateScorer
from mtrank.spec import FeatureSpec, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"HSTU": "quickstart.yaml", "LONGER": "longer.yaml"}
GOAL_C = 1000
GOAL_SPEEDUP = 20.0
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}

Request = tuple[Batch, Candidates]


# ----------------------------------------------------------------------------- model and requests


def model_config(encoder: str, history: int, args: argparse.Namespace) -> dict[str, Any]:
    """The ``model:`` section of ``encoder``'s config for histories of ``history`` behaviours."""
    model = copy.deepcopy(yaml.safe_load((ROOT / "configs" / CONFIGS[encoder]).read_text())["model"])
    model["features"]["max_len"] = history
    init_args = model["encoder"].setdefault("init_args", {})
    init_args.update(dim=args.dim, num_layers=args.layers, num_heads=args.heads)
    init_args.update(long_sequence_settings(history)[encoder])
    return model


def load_class(class_path: str) -> Callable[..., Any]:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_module(model: dict[str, Any]) -> RankingModule:
    """The `RankingModule` of a ``model:`` section (tasks, features, encoder, heads; the optimiser is not needed)."""
    tasks = [TaskSpec(**t) for t in model["tasks"]]
    features = FeatureSpec(**model["features"])
    encoder = partial(load_class(model["encoder"]["class_path"]), **model["encoder"].get("init_args", {}))
    heads = partial(load_class(model["heads"]["class_path"]), **model["heads"].get("init_args", {}))
    return RankingModule(tasks, features, encoder=encoder, heads=heads)


def make_requests(features: FeatureSpec, history: int, count: int, num_candidates: int, seed: int) -> list[Request]:
    """``count`` distinct requests of one user each, a full history of ``history`` behaviours, C random candidates."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        request = random_batch(features, [history], seed=seed * 100_003 + i)
        item_id = torch.randint(0, features.num_items, (1, num_candidates), generator=g)
        sparse = {n: torch.randint(0, v, (1, num_candidates), generator=g) for n, v in features.item_sparse.items()}
        dense = {n: torch.rand(1, num_candidates, generator=g) * 60 for n in features.item_dense}
        requests.append((request, Candidates(item_id, sparse, dense)))
    return requests


def first_candidates(candidates: Candidates, k: int) -> Candidates:
    """The first ``k`` candidates of every request."""
    return Candidates(
        candidates.item_id[:, :k],
        {n: t[:, :k] for n, t in candidates.item_sparse.items()},
        {n: t[:, :k] for n, t in candidates.item_dense.items()},
        None if candidates.mask is None else candidates.mask[:, :k],
    )


# ----------------------------------------------------------------------------- measuring


class Memory:
    """Peak memory of one path: CUDA ``max_memory_allocated``, or the CPU process's peak RSS (VmHWM, reset per path
    where ``/proc/self/clear_refs`` allows it, else ``getrusage`` max RSS since the process started)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.resettable = not self.cuda and _reset_hwm()
        if self.cuda:
            self.kind = "cuda max_memory_allocated, reset per path"
        elif self.resettable:
            self.kind = "peak RSS (VmHWM), reset per path"
        else:
            self.kind = "process max RSS (getrusage) since start, not reset"
        self._before = 0.0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            if self.resettable:
                _reset_hwm()
            self._before = _proc_status_kib("VmRSS") / 1024 if self.resettable else _maxrss_mib()

    def peak(self) -> tuple[float, float]:
        """(peak MiB, peak minus the memory in use at `start`, MiB)."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.resettable:
            peak = _proc_status_kib("VmHWM") / 1024
        else:
            peak = _maxrss_mib()
        return peak, peak - self._before


def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_hwm() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux: ``5`` to ``/proc/self/clear_refs``); False if
    that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status_kib("VmHWM")
    except OSError:
        return False
    return True


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, linear interpolation between the sorted values (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_path(
    score: Callable[[Request], Any],
    warmup: list[Request],
    timed: list[Request],
    max_seconds: float,
    sync: Callable[[], None],
) -> tuple[list[float], int]:
    """Warm up, then time ``score`` per request; (milliseconds per timed request, warm-up requests run).

    Warm-up and timed requests each stop once they have taken ``max_seconds`` (at least one timed request runs).
    """

    def calls(requests: list[Request]) -> Iterator[float]:
        spent = 0.0
        for request in requests:
            sync()
            start = time.perf_counter()
            score(request)
            sync()
            seconds = time.perf_counter() - start
            yield seconds
            spent += seconds
            if spent >= max_seconds:
                return

    warmed = sum(1 for _ in calls(warmup))
    return [s * 1e3 for s in calls(timed)], warmed


def agreement(cached: dict[str, torch.Tensor], naive: dict[str, torch.Tensor], k: int) -> dict[str, float]:
    """Per task: max abs difference on the first ``k`` candidates, and the naive scores' max abs value."""
    diffs = {task: (cached[task][:, :k].double() - naive[task].double()).abs().max().item() for task in naive}
    scale = max(naive[task].double().abs().max().item() for task in naive)
    return {"max_abs_diff": max(diffs.values()), "scale": scale, "by_task": diffs}


def measure_cell(module: RankingModule, history: int, num_candidates: int, args: argparse.Namespace) -> dict[str, Any]:
    """Check agreement, then time the cached and the naive path on one (encoder, history, C) cell."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    k = min(args.naive_candidates or num_candidates, num_candidates)
    naive_microbatch = args.naive_microbatch or max(1, min(args.microbatch, 8192 // history))
    cached = CandidateScorer(module, microbatch=args.microbatch)
    naive = CandidateScorer(module, microbatch=naive_microbatch, naive=True)
    count = max(1, args.warmup) + args.requests  # the check needs a request even with --warmup 0
    requests = [
        (r.to(device), c.to(device))
        for r, c in make_requests(module.features, history, count, num_candidates, args.seed + num_candidates)
    ]
    warmup, timed = requests[: args.warmup], requests[count - args.requests :]

    def autocast() -> AbstractContextManager:
        if args.dtype == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def score_cached(request: Request) -> dict[str, torch.Tensor]:
        with autocast():
            return cached.score(*request)

    def score_naive(request: Request) -> dict[str, torch.Tensor]:
        with autocast():
            return naive.score(request[0], first_candidates(request[1], k))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    check = agreement(score_cached(requests[0]), score_naive(requests[0]), k)
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[args.dtype]
    row: dict[str, Any] = {
        "path": cached.path,
        "naive_candidates": k,
        "naive_rate_basis": f"first {k} of {num_candidates} candidates per request"
        if k < num_candidates
        else "all candidates",
        "microbatch": args.microbatch,
        "naive_microbatch": naive_microbatch,
        "max_abs_diff": check["max_abs_diff"],
        "max_abs_diff_by_task": check["by_task"],
        "max_abs_score": check["scale"],
        "tolerance": tolerance * max(1.0, check["scale"]),
    }
    if not check["max_abs_diff"] <= row["tolerance"]:  # NaN disagrees too
        row.update(status="scores disagree", error=f"max |cached - naive| = {check['max_abs_diff']:.3g}")
        return row

    memory = Memory(device)
    row["memory_kind"] = memory.kind
    for name, score, per_request in (("cached", score_cached, num_candidates), ("naive", score_naive, k)):
        memory.start()
        times, warmed = run_path(score, warmup, timed, args.max_seconds, sync)
        peak, delta = memory.peak()
        latency = name == "cached" or k == num_candidates  # a latency only for what was measured
        row.update(
            {
                f"{name}_requests": len(times),
                f"{name}_warmup_requests": warmed,
                f"{name}_candidates_per_s": per_request * len(times) / (sum(times) * 1e-3),
                f"{name}_p50_ms": percentile(times, 50) if latency else None,
                f"{name}_p99_ms": percentile(times, 99) if latency else None,
                f"{name}_mean_ms": sum(times) / len(times),
                f"{name}_request_ms": times,
                f"{name}_peak_mib": peak,
                f"{name}_peak_delta_mib": delta,
            }
        )
    row["speedup"] = row["cached_candidates_per_s"] / row["naive_candidates_per_s"]
    row["status"] = "ok"
    return row


# ----------------------------------------------------------------------------- reporting


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], memory_kind: str) -> None:
    header = (
        f"| {'encoder':<7} | {'history':>7} | {'C':>5} | {'cached cand/s':>13} | {'p50 ms':>8} | {'p99 ms':>8} | "
        f"{'n':>3} | {'K':>5} | {'naive cand/s':>12} | {'p50 ms':>8} | {'p99 ms':>8} | {'n':>3} | {'speed-up':>8} | "
        f"{'max Δ':>8} | {'peak MiB c/n':>13} | note"
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|------|")
    for r in rows:
        ok = r["status"] == "ok"
        note = r.get("error", "")
        if ok and r["naive_candidates"] < r["candidates"]:
            note = f"naive rate on the first {r['naive_candidates']} of {r['candidates']} candidates"
        peak = f"{r['cached_peak_mib']:.0f} / {r['naive_peak_mib']:.0f}" if ok else "—"
        speedup = f"{r['speedup']:.1f}x" if ok else "—"
        print(
            f"| {r['encoder']:<7} | {r['history']:>7} | {r['candidates']:>5} | "
            f"{fmt(r.get('cached_candidates_per_s'), '.1f'):>13} | {fmt(r.get('cached_p50_ms'), '.1f'):>8} | "
            f"{fmt(r.get('cached_p99_ms'), '.1f'):>8} | {fmt(r.get('cached_requests'), 'd'):>3} | "
            f"{fmt(r.get('naive_candidates'), 'd'):>5} | {fmt(r.get('naive_candidates_per_s'), '.2f'):>12} | "
            f"{fmt(r.get('naive_p50_ms'), '.1f'):>8} | {fmt(r.get('naive_p99_ms'), '.1f'):>8} | "
            f"{fmt(r.get('naive_requests'), 'd'):>3} | {speedup:>8} | {fmt(r.get('max_abs_diff'), '.1e'):>8} | "
            f"{peak:>13} | {note}"
        )
    print(f"\npeak MiB c/n: cached / naive path, {memory_kind}")


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goal per (encoder, history) at C = 1000: cached >= 20x the naive candidates/s."""
    out = []
    for r in rows:
        if r["candidates"] != GOAL_C:
            continue
        goal = {"encoder": r["encoder"], "history": r["history"], "candidates": GOAL_C}
        if r["status"] == "ok":
            goal.update(speedup=r["speedup"], met=r["speedup"] >= GOAL_SPEEDUP, naive_basis=r["naive_rate_basis"])
        else:
            goal.update(speedup=None, met=None, result=r["status"])
        out.append(goal)
    return out


def print_goals(results: list[dict[str, Any]]) -> None:
    print(f"\ngoal: cached >= {GOAL_SPEEDUP:.0f}x the re-encoding candidates/s at C = {GOAL_C}")
    if not results:
        print(f"  not measured (no C = {GOAL_C} in --candidates)")
    for g in results:
        if g["met"] is None:
            print(f"  {g['encoder']} history {g['history']}: not measured ({g['result']})")
        else:
            verdict = "met" if g["met"] else "missed"
            print(f"  {g['encoder']} history {g['history']}: {g['speedup']:.1f}x ({g['naive_basis']}): {verdict}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


# ----------------------------------------------------------------------------- main


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--history", nargs="+", type=positive_int, default=[1024, 8192], help="history lengths")
    parser.add_argument("--candidates", nargs="+", type=positive_int, default=[100, 1000], help="C per request")
    parser.add_argument("--dim", type=positive_int, default=64)
    parser.add_argument("--layers", type=positive_int, default=2)
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--requests", type=positive_int, default=20, help="timed requests per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per path first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    dtype_help = "bfloat16: torch.autocast (default: bfloat16 on CUDA, float32 on the CPU)"
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help=dtype_help)
    parser.add_argument("--microbatch", type=positive_int, default=1024, help="pairs per forward, cached path")
    naive_help = "pairs per forward, naive path (default: min(--microbatch, max(1, 8192 // history)))"
    parser.add_argument("--naive-microbatch", type=positive_int, default=None, help=naive_help)
    k_help = "K: the naive path scores the first K candidates of each request (default: all C)"
    parser.add_argument("--naive-candidates", type=positive_int, default=None, help=k_help)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time limit per path and cell")
    parser.add_argument("--tolerance", type=float, default=None, help="agreement check; see the description")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_serving.json"))
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # a caller's setting (main([...]) in a test process) is left as it was


def run(args: argparse.Namespace) -> int:
    """Every (encoder, history, C) cell of ``args``; prints and writes the results; the exit status."""
    device = torch.device(args.device)
    name = device_name(device)
    memory_kind = Memory(device).kind
    meta = {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "dtype": args.dtype if args.dtype == "float32" else "bfloat16 autocast",
        "memory": memory_kind,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "configs": {e: f"configs/{CONFIGS[e]}" for e in args.encoders},
    }
    print(f"device: {name}; torch {torch.__version__}; {meta['dtype']}; {meta['threads']} threads", flush=True)
    rows: list[dict[str, Any]] = []

    def write() -> None:
        args.out.write_text(json.dumps({**meta, "rows": rows, "goals": goals(rows)}, indent=2))

    for encoder in args.encoders:
        for history in args.history:
            model = model_config(encoder, history, args)
            module = None
            for num_candidates in args.candidates:
                row: dict[str, Any] = {"encoder": encoder, "history": history, "candidates": num_candidates}
                label = f"{encoder} history={history} C={num_candidates}"
                try:
                    if module is None:
                        torch.manual_seed(args.seed)
                        module = build_module(model).to(device).eval()
                    row.update(encoder_init_args=model["encoder"]["init_args"])
                    row.update(parameters=sum(p.numel() for p in module.parameters()))
                    row.update(measure_cell(module, history, num_candidates, args))
                    if row["status"] == "ok":
                        print(
                            f"{label}: cached {row['cached_candidates_per_s']:.1f} cand/s "
                            f"({row['cached_requests']} requests), naive {row['naive_candidates_per_s']:.2f} cand/s "
                            f"(K={row['naive_candidates']}, {row['naive_requests']} requests), "
                            f"{row['speedup']:.1f}x, max abs diff {row['max_abs_diff']:.1e}",
                            flush=True,
                        )
                    else:
                        print(f"{label}: !!! MISMATCH !!! {row['error']}", flush=True)
                except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
                    row.update(status="out of memory", error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                    print(f"{label}: out of memory", flush=True)
                except Exception as exc:
                    if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):  # the CPU allocator
                        row.update(status="out of memory", error=f"RuntimeError: {str(exc).splitlines()[0]}")
                        print(f"{label}: out of memory", flush=True)
                        rows.append(row)
                        write()
                        continue
                    traceback.print_exc()
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}")
                    print(f"{label}: !!! {row['error']}", flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                write()
            del module
            gc.collect()

    print(f"\n{name} — serving, one request per call, {meta['dtype']}, {meta['threads']} threads\n")
    print_table(rows, memory_kind)
    print_goals(goals(rows))
    write()
    print(f"\nwrote {args.out}")
    return 1 if any(r["status"] in ("error", "scores disagree") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
