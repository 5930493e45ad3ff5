"""HSTU pointwise attention, kernel against kernel: our Triton `hstu_mha` beside generative-recommenders' Triton
kernel, the dense PyTorch reference and torch's softmax SDPA, at equal tokens per batch.

On a GPU (one H100 for the issue's numbers), from the repository root:

    cp -r ../shared/peers/generative-recommenders peers/       # once; peers/ is git-ignored, never committed
    python scripts/bench_attention.py --out bench_attention.json
    # the same, spelled out (these are the defaults):
    python scripts/bench_attention.py --device cuda --lengths 1024,2048,4096,8192,16384 --tokens 32768 \\
        --dtype bf16 --heads 8 --head-dim 64 --window 512 --prefix 64 \\
        --impls eager,sdpa,gr,ours,ours+rab,gr-semi,ours-semi --gr-path peers/generative-recommenders \\
        --warmup 10 --reps 50 --out bench_attention.json
    # one command per length when a single run must stay short (e.g. under a 10-minute limit):
    python scripts/bench_attention.py --lengths 16384 --out bench_attention_16k.json

CPU smoke test (no GR and no Triton rows: choose what runs with ``--impls``):

    python scripts/bench_attention.py --device cpu --lengths 64 --tokens 128 --impls eager,sdpa --out /tmp/b.json

What runs, for every N of ``--lengths``: B = ``--tokens`` / N sequences, each of full length N, H = ``--heads``
heads of d = ``--head-dim``, ``--dtype`` inputs, random q, k, v (B, N, H, d) (one storage, shared by the jagged
GR view (B·N, H, d)), α = 1/sqrt(d) everywhere. Implementations (``--impls``):

- ``eager``: `hstu_mha_reference` (dense PyTorch, materialises (B, H, N, N)); causal, n = N. Skipped with a
  note when B·H·N²·(bytes per element)·6 exceeds the free GPU memory.
- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, softmax attention in (B, H, N, d)
  layout (its own copies of q, k, v, made outside the timed region): the speed a fused softmax kernel reaches.
- ``gr``: generative-recommenders' ``triton_hstu_mha`` (causal, normalised by N), imported from ``--gr-path``.
- ``ours``: `encoders.kernels.hstu_attention.hstu_mha`, causal, n = float(N) (GR's normalisation).
- ``ours+rab``: ``ours`` plus the relative attention bias: position_weight (32, H), time_weight (128, H), both
  float32 and trained (their grads are computed in the backward pass too), max_distance N, timestamps
  ascending with random gaps of 1 s to 1 day.
- ``gr-semi`` / ``ours-semi``: semi-local attention, window K1 = ``--window`` and global prefix K2 = ``--prefix``
  (GR: ``max_attn_len=K1, contextual_seq_len=K2``; ours: ``local_window=K1, global_prefix=K2``). The masks
  differ: ours keeps the first K2 keys visible to every later query; in GR the first K2 queries attend to every
  key (later ones too), later queries see the K1 + 1 newest keys only (positions shifted by K2 - 1) and not
  the contextual keys once past the window. About the same work, so they are timed side by side, but they are
  not compared numerically.

Correctness, once per N before timing (forward outputs, ``--dtype``): ours (n = N) against GR on the whole batch,
and every selected ours variant (run on the whole batch) against `hstu_mha_reference` on the batch's first
sequence (skipped when the dense reference would not fit in memory). Each prints its max abs diff, which must be
at most 2% of the expected output's max |value|; a mismatch prints ``!!! MISMATCH !!!`` and makes the exit
status 1 (so does a row that fails with an error; running out of memory does not).

Timing: on CUDA, CUDA events around each call, after ``--warmup`` untimed calls (which also absorb Triton's
autotuning), median of ``--reps`` timed calls; before every call the gradients of the inputs are set to None
and a 256 MiB buffer is zeroed to flush the L2 cache (both outside the timed region). On the CPU,
``time.perf_counter`` the same way. ``fwd`` is the forward call alone (autograd recording, as in training);
``fwd+bwd`` is the forward call plus ``out.backward(grad_out)`` with a fixed random ``grad_out``, producing the
grads of q, k, v (and of the bias tables for ``ours+rab``).

Columns:

- ``fwd ms`` / ``fwd+bwd ms``: median milliseconds per call;
- ``TFLOP/s``: causal forward FLOPs 2·B·H·N²·d (the two matmuls over the lower triangle), forward + backward
  3.5× that, divided by the time; "—" for the semi-local rows (they do less work: see ``vs ours``);
- ``peak GiB``: ``max_memory_allocated`` during one forward + backward minus the memory allocated just before
  it (inputs, grad_out, the SDPA copies), GiB; "—" on the CPU;
- ``vs ours``: semi-local rows only: speed-up over ``ours`` (full causal) at the same N, forward / fwd+bwd;
- ``note``: why a row has no numbers (not available, skipped for memory, out of memory, error).

Then a "goals at N=8192" block: ours fwd+bwd against GR (speed-up ≥ 1.5× and ≤ 4.0 ms), ours fwd+bwd TFLOP/s as
a share of SDPA's (≥ 70%), ours-semi against ours full causal, fwd+bwd (≥ 4× with K1 = 512), each met or missed.
Writes JSON (``--out``): device, torch and triton versions, settings, checks, rows, goals (rewritten after each N).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("eager", "sdpa", "gr", "ours", "ours+rab", "gr-semi", "ours-semi")
SEMI = ("gr-semi", "ours-semi")
OURS = ("eager", "ours", "ours+rab", "ours-semi")  # need encoders.kernels.hstu_attention
GR = ("gr", "gr-semi")
GR_MODULE = "generative_recommenders.ops.triton.triton_hstu_attention"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPES.update(fp32=torch.float32, float32=torch.float32)
EAGER_MEMORY_FACTOR = 6  # the reference's fwd+bwd holds about this many (B, H, N, N) tensors
CHECK_TOLERANCE = 0.02  # max |diff| allowed, as a share of max |reference output|
POSITION_BUCKETS, TIME_BUCKETS = 32, 128
GOAL_N = 8192
L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class Inputs:
    """The tensors of one N: (B, N, H, d) leaves for ours / eager / GR, (B, H, N, d) copies for SDPA, rab inputs."""

    q: Tensor
    k: Tensor
    v: Tensor
    lengths: Tensor
    offsets: Tensor
    grad_out: Tensor
    qt: Tensor
    kt: Tensor
    vt: Tensor
    grad_out_t: Tensor
    ts: Tensor
    position_weight: Tensor
    time_weight: Tensor


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", ",").split(",") if x]


def impl_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(IMPLS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    return names


def load_ours(device: torch.device) -> tuple[Callable[..., Tensor] | None, Callable[..., Tensor] | None, str]:
    """(hstu_mha, hstu_mha_reference, "") or, on the CPU only, (None, None, why). On CUDA a failed import raises."""
    try:
        from encoders.kernels.hstu_attention import hstu_mha, hstu_mha_reference
    except ImportError as exc:
        if device.type == "cuda":
            raise
        return None, None, f"encoders.kernels.hstu_attention: {type(exc).__name__}: {exc}"
    return hstu_mha, hstu_mha_reference, ""


def resolve_gr_path(path: Path) -> Path:
    """``path`` as given when it exists or is absolute, else relative to the repository root."""
    return path if path.is_absolute() or path.exists() else ROOT / path


def load_gr(path: Path, device: torch.device) -> tuple[Callable[..., Tensor] | None, str]:
    """(triton_hstu_mha, "") or (None, why it is not available); never raises."""
    path = resolve_gr_path(path)
    if not (path / "generative_recommenders").is_dir():
        return None, (
            f"no generative_recommenders package under --gr-path {path} "
            "(copy it: cp -r ../shared/peers/generative-recommenders peers/)"
        )
    if device.type != "cuda":
        return None, "generative-recommenders' Triton kernel needs CUDA"
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        module = importlib.import_module(GR_MODULE)
    except Exception as exc:  # report, do not crash: the peer is optional
        return None, f"import {GR_MODULE} failed: {type(exc).__name__}: {exc}"
    return module.triton_hstu_mha, ""


def gr_commit(path: Path) -> str | None:
    commit = resolve_gr_path(path) / "COMMIT"
    return commit.read_text().strip() or None if commit.is_file() else None


def make_inputs(B: int, N: int, H: int, d: int, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    q, k, v, grad_out = (randn(B, N, H, d) for _ in range(4))
    gaps = torch.randint(1, 86_400 + 1, (B, N), generator=g, dtype=torch.int64)  # 1 s .. 1 day
    ts = (1_700_000_000 + gaps.cumsum(dim=1)).to(device)

    def leaf(t: Tensor) -> Tensor:
        return t.detach().requires_grad_(True)

    def heads_first(t: Tensor) -> Tensor:
        return t.detach().transpose(1, 2).contiguous()

    return Inputs(
        q=leaf(q),
        k=leaf(k),
        v=leaf(v),
        lengths=torch.full((B,), N, dtype=torch.int64, device=device),
        offsets=torch.arange(B + 1, dtype=torch.int64, device=device) * N,
        grad_out=grad_out,
        qt=leaf(heads_first(q)),
        kt=leaf(heads_first(k)),
        vt=leaf(heads_first(v)),
        grad_out_t=heads_first(grad_out),
        ts=ts,
        position_weight=leaf(0.1 * randn(POSITION_BUCKETS, H, dt=torch.float32)),
        time_weight=leaf(0.1 * randn(TIME_BUCKETS, H, dt=torch.float32)),
    )


def ours_kwargs(impl: str, x: Inputs, N: int, args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of `hstu_mha` / `hstu_mha_reference` for an ours-family row (besides q, k, v, lengths)."""
    kwargs: dict[str, Any] = {"alpha": 1.0 / math.sqrt(args.head_dim), "n": float(N)}
    if impl == "ours+rab":
        kwargs.update(ts=x.ts, position_weight=x.position_weight, time_weight=x.time_weight, max_distance=N)
    elif impl == "ours-semi":
        kwargs.update(local_window=args.window, global_prefix=args.prefix)
    return kwargs


def make_call(
    impl: str, x: Inputs, N: int, args: argparse.Namespace, ours: Any, ref: Any, gr: Any
) -> tuple[Callable[[], Tensor], Tensor, list[Tensor]]:
    """(forward call, its grad_output, the leaves whose grads the backward pass produces) of one row."""
    B, _, H, d = x.q.shape
    alpha = 1.0 / math.sqrt(d)
    qkv = [x.q, x.k, x.v]
    if impl == "sdpa":

        def call_sdpa() -> Tensor:
            return F.scaled_dot_product_attention(x.qt, x.kt, x.vt, is_causal=True)

        return call_sdpa, x.grad_out_t, [x.qt, x.kt, x.vt]
    if impl in GR:
        semi = {"max_attn_len": args.window, "contextual_seq_len": args.prefix} if impl == "gr-semi" else {}

        def call_gr() -> Tensor:
            jagged = [t.view(B * N, H, t.shape[-1]) for t in qkv]
            return gr(N, alpha, *jagged, x.offsets, **semi)

        return call_gr, x.grad_out.view(B * N, H, -1), qkv
    fn = ref if impl == "eager" else ours
    kwargs = ours_kwargs("ours" if impl == "eager" else impl, x, N, args)
    leaves = [*qkv, x.position_weight, x.time_weight] if impl == "ours+rab" else qkv
    return lambda: fn(x.q, x.k, x.v, x.lengths, **kwargs), x.grad_out, leaves


class Timer:
    """Median milliseconds of a call: CUDA events on CUDA (L2 flushed before each call), perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        self.device, self.warmup, self.reps = device, warmup, reps
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    @property
    def description(self) -> str:
        if self.cuda:
            return (
                f"CUDA events, {self.warmup} warm-up calls, median of {self.reps} timed calls, "
                "L2 flushed and grads set to None before each call"
            )
        return f"time.perf_counter, {self.warmup} warm-up calls, median of {self.reps} timed calls"

    def __call__(self, fn: Callable[[], None], before: Callable[[], None]) -> float:
        for _ in range(self.warmup):
            before()
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                before()
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize(self.device)
        events = []
        for _ in range(self.reps):
            before()
            assert self.flush is not None
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events)


def peak_gib(fwd_bwd: Callable[[], None], before: Callable[[], None], device: torch.device) -> float | None:
    """Peak allocated GiB of one forward + backward beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    before()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fwd_bwd()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def eager_fits(B: int, N: int, H: int, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether the dense reference's (B, H, N, N) tensors fit the free GPU memory, and the estimate."""
    need = B * H * N * N * torch.empty((), dtype=dtype).element_size() * EAGER_MEMORY_FACTOR
    if device.type != "cuda":
        return True, f"needs ~{need / 2**30:.1f} GiB"
    free = torch.cuda.mem_get_info(device)[0]
    return need <= free, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def compare(what: str, N: int, out: Tensor, expected: Tensor) -> dict[str, Any]:
    diff = float((out.float() - expected.float()).abs().max())
    scale = float(expected.float().abs().max())
    ok = math.isfinite(diff) and diff <= CHECK_TOLERANCE * scale
    flag = "ok" if ok else "!!! MISMATCH !!!"
    print(
        f"  check N={N}: {what}: max abs diff {diff:.3e} (max |expected| {scale:.3e}, "
        f"tolerance {CHECK_TOLERANCE:.0%} of it): {flag}",
        flush=True,
    )
    return {"N": N, "check": what, "max_abs_diff": diff, "max_abs_expected": scale, "ok": ok}


def first_sequence(x: Inputs) -> Inputs:
    """The inputs of the batch's first sequence alone (B = 1)."""
    one = {name: getattr(x, name)[:1] for name in ("q", "k", "v", "lengths", "grad_out", "qt", "kt", "vt")}
    return Inputs(
        **one,
        offsets=x.offsets[:2],
        grad_out_t=x.grad_out_t[:1],
        ts=x.ts[:1],
        position_weight=x.position_weight,
        time_weight=x.time_weight,
    )


def run_check(what: str, N: int, out_fn: Callable[[], Tensor], expected_fn: Callable[[], Tensor]) -> dict | None:
    """`compare` of two calls; an error is a failed check, running out of memory only skips it (None)."""
    try:
        return compare(what, N, out_fn(), expected_fn())
    except torch.cuda.OutOfMemoryError:
        print(f"  check N={N}: {what}: skipped, out of memory", flush=True)
        return None
    except Exception as exc:
        traceback.print_exc()
        print(f"  check N={N}: {what}: !!! ERROR {type(exc).__name__}: {exc}", flush=True)
        return {"N": N, "check": what, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_checks(
    x: Inputs, N: int, args: argparse.Namespace, impls: list[str], ours: Any, ref: Any, gr: Any
) -> list[dict[str, Any]]:
    """ours (n = N) vs GR on the whole batch; each selected ours variant vs the reference on the first sequence."""
    checks: list[dict[str, Any] | None] = []
    B, _, H, _ = x.q.shape
    with torch.no_grad():
        if ours is not None and gr is not None:
            checks.append(
                run_check(
                    "ours vs gr (causal, n=N, whole batch)",
                    N,
                    lambda: ours(x.q, x.k, x.v, x.lengths, **ours_kwargs("ours", x, N, args)),
                    lambda: make_call("gr", x, N, args, ours, ref, gr)[0]().view(B, N, H, -1),
                )
            )
        if ours is None:
            return []
        one = first_sequence(x)
        fits, estimate = eager_fits(1, N, H, torch.float32, x.q.device)
        for impl in ("ours", "ours+rab", "ours-semi"):
            if impl not in impls:
                continue
            what = f"{impl} vs hstu_mha_reference (first sequence)"
            if not fits:
                print(f"  check N={N}: {what}: skipped, the reference {estimate}", flush=True)
                continue
            # ours runs on the whole batch (its first call, so Triton autotunes on the timed shapes: the
            # autotuning key holds N, not B); its first sequence is compared with the reference on that one alone
            full, first = ours_kwargs(impl, x, N, args), ours_kwargs(impl, one, N, args)
            checks.append(
                run_check(
                    what,
                    N,
                    lambda kw=full: ours(x.q, x.k, x.v, x.lengths, **kw)[:1],
                    lambda kw=first: ref(one.q, one.k, one.v, one.lengths, **kw),
                )
            )
    return [c for c in checks if c is not None]


def measure(
    impl: str, x: Inputs, N: int, args: argparse.Namespace, timer: Timer, ours: Any, ref: Any, gr: Any
) -> dict[str, Any]:
    """Time one row: forward, forward + backward, peak memory. Raises what the implementation raises."""
    B, _, H, d = x.q.shape
    call, grad_out, leaves = make_call(impl, x, N, args, ours, ref, gr)

    def clear() -> None:
        for t in leaves:
            t.grad = None

    def fwd() -> None:
        call()

    def fwd_bwd() -> None:
        call().backward(grad_out)

    fwd_ms = timer(fwd, clear)
    fwd_bwd_ms = timer(fwd_bwd, clear)
    peak = peak_gib(fwd_bwd, clear, x.q.device)
    clear()
    flops = 2.0 * B * H * N * N * d
    full = impl not in SEMI
    return {
        "status": "ok",
        "fwd_ms": fwd_ms,
        "fwd_tflops": flops / (fwd_ms * 1e-3) / 1e12 if full else None,
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_bwd_tflops": 3.5 * flops / (fwd_bwd_ms * 1e-3) / 1e12 if full else None,
        "peak_gib": peak,
    }


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"| {'N':>6} | {'impl':<9} | {'fwd ms':>8} | {'fwd TFLOP/s':>11} | {'fwd+bwd ms':>10} | "
        f"{'fwd+bwd TFLOP/s':>15} | {'peak GiB':>8} | {'vs ours (fwd / fwd+bwd)':>23} | note"
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|------|")
    for r in rows:
        vs = "—"
        if r.get("speedup_vs_ours_fwd") is not None:
            vs = f"{r['speedup_vs_ours_fwd']:.2f}x / {r['speedup_vs_ours_fwd_bwd']:.2f}x"
        note = r.get("note", "")
        print(
            f"| {r['N']:>6} | {r['impl']:<9} | {fmt(r.get('fwd_ms'), '.3f'):>8} | "
            f"{fmt(r.get('fwd_tflops'), '.1f'):>11} | {fmt(r.get('fwd_bwd_ms'), '.3f'):>10} | "
            f"{fmt(r.get('fwd_bwd_tflops'), '.1f'):>15} | {fmt(r.get('peak_gib'), '.2f'):>8} | {vs:>23} | {note}"
        )


def goals(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The issue's goals at N = 8192, each met / missed / not measured."""
    at = {r["impl"]: r for r in rows if r["N"] == GOAL_N and r["status"] == "ok"}
    out: list[dict[str, Any]] = []

    def missing(*impls: str) -> str | None:
        gone = [i for i in impls if i not in at]
        return f"not measured ({', '.join(gone)} has no N={GOAL_N} result)" if gone else None

    name = "ours fwd+bwd vs gr: speed-up >= 1.5x and <= 4.0 ms"
    if why := missing("ours", "gr"):
        out.append({"goal": name, "result": why, "met": None})
    else:
        ms, speedup = at["ours"]["fwd_bwd_ms"], at["gr"]["fwd_bwd_ms"] / at["ours"]["fwd_bwd_ms"]
        out.append(
            {"goal": name, "result": f"{speedup:.2f}x, {ms:.2f} ms", "met": speedup >= 1.5 and ms <= 4.0,
             "speedup": speedup, "ms": ms}
        )  # fmt: skip
    name = "ours fwd+bwd TFLOP/s >= 70% of sdpa's"
    if why := missing("ours", "sdpa"):
        out.append({"goal": name, "result": why, "met": None})
    else:
        share = at["ours"]["fwd_bwd_tflops"] / at["sdpa"]["fwd_bwd_tflops"]
        result = f"{at['ours']['fwd_bwd_tflops']:.1f} / {at['sdpa']['fwd_bwd_tflops']:.1f} TFLOP/s = {share:.0%}"
        out.append({"goal": name, "result": result, "met": share >= 0.70, "share": share})
    name = "ours-semi (K1=512) fwd+bwd >= 4x faster than ours full causal"
    if why := missing("ours", "ours-semi"):
        out.append({"goal": name, "result": why, "met": None})
    else:
        speedup = at["ours"]["fwd_bwd_ms"] / at["ours-semi"]["fwd_bwd_ms"]
        result = f"{speedup:.2f}x" + (f" (measured with K1={args.window}, not 512)" if args.window != 512 else "")
        out.append({"goal": name, "result": result, "met": speedup >= 4.0, "speedup": speedup})
    return out


def print_goals(results: list[dict[str, Any]]) -> None:
    print(f"\ngoals at N={GOAL_N}:")
    for g in results:
        verdict = {True: "met", False: "missed", None: "—"}[g["met"]]
        print(f"  {g['goal']}: {g['result']}: {verdict}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int_list, default=[1024, 2048, 4096, 8192, 16384], help="N, comma list")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch: B = tokens // N")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--impls", type=impl_list, default=list(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--window", type=int, default=512, help="semi-local window K1")
    parser.add_argument("--prefix", type=int, default=64, help="semi-local global prefix K2")
    parser.add_argument("--gr-path", type=Path, default=Path("peers/generative-recommenders"))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_attention.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    impls: list[str] = args.impls

    ours = ref = gr = None
    ours_why = gr_why = ""
    if any(i in OURS for i in impls):
        ours, ref, ours_why = load_ours(device)
    if any(i in GR for i in impls):
        gr, gr_why = load_gr(args.gr_path, device)
        if gr is None:
            print(f"generative-recommenders: not available: {gr_why}", flush=True)
    if ours_why:
        print(f"our kernel: not available: {ours_why}", flush=True)
    timer = Timer(device, args.warmup, args.reps)
    name = device_name(device)
    meta = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version(),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "alpha": 1.0 / math.sqrt(args.head_dim),
            "timer": timer.description,
            "gr_commit": gr_commit(args.gr_path) if any(i in GR for i in impls) else None,
            "flops": "causal forward 2*B*H*N^2*d, forward+backward 3.5x that",
        },
    }
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []

    def write() -> None:
        args.out.write_text(json.dumps({**meta, "checks": checks, "rows": rows, "goals": goals(rows, args)}, indent=2))

    print(f"device: {name}; torch {torch.__version__}, triton {meta['triton']}; {args.dtype}", flush=True)
    print(f"timer: {timer.description}", flush=True)
    for N in args.lengths:
        B = max(1, args.tokens // N)
        print(f"\nN={N}: B={B}, H={args.heads}, d={args.head_dim}", flush=True)
        torch.manual_seed(args.seed)
        x = make_inputs(B, N, args.heads, args.head_dim, dtype, device, args.seed + N)
        checks += run_checks(x, N, args, impls, ours, ref, gr)
        for impl in impls:
            row: dict[str, Any] = {"N": N, "B": B, "impl": impl}
            if impl in OURS and ours is None:
                row.update(status="not available", note=ours_why)
            elif impl in GR and gr is None:
                row.update(status="not available", note=gr_why)
            elif impl == "eager" and not (fits := eager_fits(B, N, args.heads, dtype, device))[0]:
                row.update(status="skipped", note=f"dense (B, H, N, N) reference {fits[1]}")
            else:
                try:
                    row.update(measure(impl, x, N, args, timer, ours, ref, gr))
                except torch.cuda.OutOfMemoryError as exc:
                    row.update(status="out of memory", note=f"OutOfMemoryError: {str(exc).splitlines()[0]}")
                except Exception as exc:
                    traceback.print_exc()
                    row.update(status="error", note=f"!!! {type(exc).__name__}: {exc}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            done = f"{row['fwd_ms']:.3f} ms fwd, {row['fwd_bwd_ms']:.3f} ms fwd+bwd" if "fwd_ms" in row else ""
            print(f"  {impl}: {row['status']} {done or row.get('note', '')}", flush=True)
        base = next((r for r in rows if r["N"] == N and r["impl"] == "ours" and r["status"] == "ok"), None)
        for r in rows:
            if r["N"] == N and r["impl"] in SEMI and r["status"] == "ok" and base is not None:
                r["speedup_vs_ours_fwd"] = base["fwd_ms"] / r["fwd_ms"]
                r["speedup_vs_ours_fwd_bwd"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        del x
        write()

    print(f"\n{name} — HSTU attention, {args.tokens} tokens per batch, H={args.heads}, d={args.head_dim}, {args.dtype}")
    print(f"semi-local: K1={args.window}, K2={args.prefix}; timer: {timer.description}\n")
    print_table(rows)
    bad = [c for c in checks if not c["ok"]]
    if bad:
        print(f"\n!!! {len(bad)} correctness check(s) FAILED: " + "; ".join(f"N={c['N']} {c['check']}" for c in bad))
    print_goals(goals(rows, args))
    write()
    print(f"\nwrote {args.out}")
    return 1 if bad or any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
