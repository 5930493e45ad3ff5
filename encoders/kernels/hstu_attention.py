"""HSTU pointwise attention as a fused Triton kernel (forward and backward), beside its PyTorch reference.

For batch row ``b`` and head ``h``, over ``lengths[b]`` valid (left-aligned) tokens:

    out_i = Σ_j  mask(i, j) · SiLU(α q_i·k_j + rab(i, j)) / n_i · v_j

with no softmax (HSTU, arXiv 2402.17152). The N×N score matrix is never stored: the forward kernel
walks key blocks for each query block and keeps a (BLOCK_M, d_v) accumulator; the backward pass is
two kernels, one per key block (dK, dV and the bias tables' gradients) and one per query block (dQ),
each recomputing the scores of its tiles, so nothing is accumulated with atomics except the few
bucket sums of the bias tables.

**Mask**, on logical positions ``p`` (the token index, or the ``position`` tensor, which must
increase strictly along each row's valid tokens, from ``p >= 0``):

- a *history* query ``i`` sees history key ``j`` iff ``p_j <= p_i`` and, with a local window
  ``K1 > 0``, ``p_i - p_j < K1`` or ``p_j < K2`` (ULTRA-HSTU's semi-local attention, global prefix K2);
- a *candidate* query (the last ``num_targets[b]`` valid tokens, target-aware ranking) sees every
  history key and itself, never another candidate; no history query sees a candidate. Candidates take
  the logical position right after the newest history token (for the relative bias).

``n_i`` is the number of keys query ``i`` sees (``n=None``) or a constant. Padded queries output 0.

**Relative bias** ``rab(i, j) = position_weight[bucket_p(p_i - p_j), h] + time_weight[bucket_t(ts_i - ts_j), h]``,
with `encoders.hstu.bucket_position_distance` and `encoders.hstu.bucket_time_delta` computed inside
the kernel: the position bucket through a lookup table over distances ``0..max_distance``, the time
bucket from ``log |Δt|`` and then corrected against the exact bucket thresholds (found by bisection
with the reference function on the same device), so kernel and reference agree bucket for bucket.

**Block skipping**: a query block visits only the key blocks its mask can reach: up to the diagonal
(causal), and with a local window only the blocks of the global prefix and of the band
``[i - K1 + 1, i]``, so semi-local attention costs ``O(N·(K1 + K2))``. Tiles entirely inside the mask
skip the mask arithmetic. Blocks past a row's length are skipped. The grid runs (batch·head, block)
with the busiest blocks first (the last query blocks, the first key blocks), so that long programs
do not form a tail.

**Speed** (H100, bf16, `scripts/bench_attention.py`): the SiLU's sigmoid is one ``tanh.approx.f32``
in bf16/fp16, so the pointwise work per score costs what softmax's exponential does. The in-kernel
relative bias is the slow part: its table gathers cost ~10× the attention itself (see the README).

`hstu_mha` runs the Triton kernels (CUDA, or any device under ``TRITON_INTERPRET=1``);
`hstu_mha_reference` is the same function in dense PyTorch (it materialises (B, H, N, N)).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from encoders.hstu import bucket_position_distance, bucket_time_delta

try:  # Triton is optional: the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

INT64_MAX = 2**63 - 1


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: Triton importable and CUDA, or the interpreter."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or interpreting()


# ------------------------------------------------------------------------------------------ shared inputs


def _logical_positions(lengths: Tensor, num_targets: Tensor | None, position: Tensor | None, N: int) -> Tensor:
    """(B, N) long logical positions: ``position`` (or the index) of history tokens; candidates: newest history + 1."""
    B = lengths.shape[0]
    index = torch.arange(N, device=lengths.device).expand(B, N)
    pos = position.long() if position is not None else index
    if num_targets is None:
        return pos
    hist = (lengths - num_targets).long()  # (B,)
    newest = pos.gather(1, (hist - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (B,)
    candidate = torch.where(hist > 0, newest + 1, torch.zeros_like(newest))
    return torch.where(index >= hist.unsqueeze(1), candidate.unsqueeze(1), pos)


def attention_mask(
    lengths: Tensor,
    N: int,
    num_targets: Tensor | None = None,
    position: Tensor | None = None,
    local_window: int = 0,
    global_prefix: int = 0,
) -> Tensor:
    """(B, N, N) bool mask of `hstu_mha` (query i, key j), literally from the rule in the module docstring."""
    B = lengths.shape[0]
    index = torch.arange(N, device=lengths.device)
    valid = index.expand(B, N) < lengths.unsqueeze(1)  # (B, N)
    hist = lengths - (num_targets if num_targets is not None else 0)
    history = index.expand(B, N) < torch.as_tensor(hist, device=lengths.device).reshape(-1, 1)  # (B, N)
    pos = _logical_positions(lengths, num_targets, position, N)
    pi, pj = pos.unsqueeze(2), pos.unsqueeze(1)
    rule = pj <= pi
    if local_window > 0:
        rule = rule & ((pi - pj < local_window) | (pj < global_prefix))
    rule = (history.unsqueeze(1) & (rule | ~history.unsqueeze(2))) | torch.eye(N, dtype=torch.bool, device=pos.device)
    return rule & valid.unsqueeze(2) & valid.unsqueeze(1)


def hstu_mha_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    alpha: float,
    n: float | None = None,
    num_targets: Tensor | None = None,
    position: Tensor | None = None,
    ts: Tensor | None = None,
    position_weight: Tensor | None = None,
    time_weight: Tensor | None = None,
    max_distance: int = 0,
    local_window: int = 0,
    global_prefix: int = 0,
) -> Tensor:
    """`hstu_mha` in dense PyTorch (the reference the kernels are tested against; O(N²) memory).

    Same arguments and result as `hstu_mha`.
    """
    N = q.shape[1]
    mask = attention_mask(lengths, N, num_targets, position, local_window, global_prefix)  # (B, N, N)
    scores = alpha * torch.einsum("bihd,bjhd->bhij", q, k)  # (B, H, N, N)
    if position_weight is not None or time_weight is not None:
        bias = scores.new_zeros(()).float()
        if position_weight is not None:
            pos = _logical_positions(lengths, num_targets, position, N)
            distance = (pos.unsqueeze(2) - pos.unsqueeze(1)).clamp(0, max_distance)
            bucket = bucket_position_distance(distance, position_weight.shape[0], max_distance)  # (B, N, N)
            bias = bias + position_weight[bucket].permute(0, 3, 1, 2)
        if time_weight is not None:
            assert ts is not None
            bucket = bucket_time_delta(ts.unsqueeze(2) - ts.unsqueeze(1), time_weight.shape[0])
            bias = bias + time_weight[bucket].permute(0, 3, 1, 2)
        scores = scores + bias
    keep = mask.unsqueeze(1)
    norm = keep.sum(-1, keepdim=True).clamp(min=1) if n is None else n
    attn = torch.nn.functional.silu(scores) * keep / norm
    return torch.einsum("bhij,bjhd->bihd", attn.to(v.dtype), v)  # (B, N, H, d_v)


@functools.lru_cache(maxsize=64)
def _position_lut(num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """(max_distance + 1,) int32 position bucket of each distance (the reference function's)."""
    d = torch.arange(max_distance + 1, device=device)
    return bucket_position_distance(d, num_buckets, max(max_distance, 1)).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _time_thresholds(num_buckets: int, device: torch.device) -> Tensor:
    """(num_buckets + 1,) int64: entry b is the smallest ``|Δt| >= 1`` whose reference bucket is >= b
    (entry 0 is 0, entry ``num_buckets`` is int64's max), by bisection with `bucket_time_delta` itself."""
    target = torch.arange(num_buckets, device=device)
    lo = torch.ones(num_buckets, dtype=torch.int64, device=device)
    hi = torch.full((num_buckets,), 2**62, dtype=torch.int64, device=device)
    for _ in range(64):  # invariant: bucket(hi) >= target (or hi is the cap), bucket(lo - 1) < target
        mid = lo + (hi - lo) // 2
        above = bucket_time_delta(mid, num_buckets) >= target
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid + 1)
    thresholds = torch.cat([lo, lo.new_full((1,), INT64_MAX)])
    thresholds[0] = 0
    return thresholds


@functools.lru_cache(maxsize=16)
def _placeholders(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One-element int32, int64 and float32 zeros standing in for the pointers of switched-off inputs
    (the kernels never read them; made once per device rather than per call)."""
    return tuple(torch.zeros(1, dtype=t, device=device) for t in (torch.int32, torch.int64, torch.float32))


# ------------------------------------------------------------------------------------------ Triton kernels

if triton is not None:

    def _configs(kind: str) -> list[Any]:
        """Autotuning candidates (BLOCK_M queries x BLOCK_N keys per tile); one fixed config under the
        interpreter, or with ``MTRANK_KERNEL_AUTOTUNE=0`` (quick GPU test runs).

        The choice is made once per key (power-of-two length bucket, head dims, mask and bias flags) and
        kept on disk in Triton's cache (``cache_results=True``, ``TRITON_CACHE_DIR``), so only the first run
        on a machine pays for the tuning."""
        if interpreting():
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        if os.environ.get("MTRANK_KERNEL_AUTOTUNE", "1") == "0":
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)]
        if kind == "dkdv":
            shapes = [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 4, 2), (128, 128, 8, 2)]
        else:
            shapes = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]

    _KEY = ["N_BUCKET", "D_QK", "D_V", "HAS_TARGETS", "HAS_POS", "HAS_POS_BIAS", "HAS_TIME_BIAS", "HAS_WINDOW"]

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """``a @ b`` accumulated in fp32; ``PRECISION == "emulate"``: bf16 operands widened to fp32 first (the
        interpreter has no bf16 matmul; the products of bf16 values are exact in fp32, so the result is the same)."""
        if PRECISION == "emulate":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _sigmoid(x, FAST: tl.constexpr):
        """``sigmoid(x) = (1 + tanh(x / 2)) / 2``; ``FAST``: with the one-instruction ``tanh.approx.f32``
        (max abs error ~5e-4, far below the bf16 rounding of what it feeds), else the exact function."""
        if FAST:
            t = tl.inline_asm_elementwise(
                "tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5], dtype=tl.float32, is_pure=True, pack=1
            )
            return 0.5 * t + 0.5
        else:
            return tl.sigmoid(x)

    @triton.jit
    def _mask(
        qi, kj, pq, pk, length, hist, local_window, global_prefix, HAS_TARGETS: tl.constexpr, HAS_WINDOW: tl.constexpr
    ):
        """Bool tile of the mask; ``qi``/``kj`` (indices) and ``pq``/``pk`` (positions) come broadcastable."""
        rule = pk <= pq
        if HAS_WINDOW:
            rule = rule & ((pq - pk < local_window) | (pk < global_prefix))
        if HAS_TARGETS:
            rule = ((kj < hist) & (rule | (qi >= hist))) | (qi == kj)
        return rule & (qi < length) & (kj < length)

    @triton.jit
    def _rab(
        pq,
        pk,
        tq,
        tk,
        h,
        H,
        PosLut,
        PosW,
        TimeThr,
        TimeW,
        max_distance,
        num_time_buckets,
        HAS_POS_BIAS: tl.constexpr,
        HAS_TIME_BIAS: tl.constexpr,
    ):
        """Relative bias tile (fp32) and the position and time bucket tiles (int32; 0 when that bias is off)."""
        bias = (pq - pk).to(tl.float32) * 0.0
        pb = (pq - pk) * 0
        tb = (pq - pk) * 0
        if HAS_POS_BIAS:
            d = tl.minimum(tl.maximum(pq - pk, 0), max_distance)
            pb = tl.load(PosLut + d)
            bias += tl.load(PosW + pb * H + h).to(tl.float32)
        if HAS_TIME_BIAS:
            dt = tl.maximum(tl.abs(tq - tk), 1)  # int64
            guess = (tl.log(dt.to(tl.float32)) / 0.301).to(tl.int32)
            guess = tl.minimum(tl.maximum(guess, 0), num_time_buckets - 1)
            below = (dt < tl.load(TimeThr + guess)).to(tl.int32)
            above = (dt >= tl.load(TimeThr + guess + 1)).to(tl.int32)
            tb = tl.minimum(tl.maximum(guess - below + above, 0), num_time_buckets - 1)
            bias += tl.load(TimeW + tb * H + h).to(tl.float32)
        return bias, pb, tb

    @triton.jit
    def _load_positions(
        Pos,
        TS,
        offs,
        length,
        hist,
        cand_pos,
        HAS_POS: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HAS_TIME_BIAS: tl.constexpr,
    ):
        """Logical positions (int32) and times (int64, 0 without the time bias) of the tokens ``offs``."""
        pos = offs
        if HAS_POS:
            pos = tl.load(Pos + offs, mask=offs < length, other=0).to(tl.int32)
        if HAS_TARGETS:
            pos = tl.where(offs >= hist, cand_pos, pos)
        ts = offs.to(tl.int64) * 0
        if HAS_TIME_BIAS:
            ts = tl.load(TS + offs, mask=offs < length, other=0).to(tl.int64)
        return pos, ts

    @triton.jit
    def _row_setup(Lengths, NumTargets, Pos, b, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr):
        """A row's length, number of history tokens and the candidates' logical position."""
        length = tl.load(Lengths + b).to(tl.int32)
        hist = length
        if HAS_TARGETS:
            hist = length - tl.load(NumTargets + b).to(tl.int32)
        cand_pos = hist
        if HAS_POS:
            newest = tl.load(Pos + tl.maximum(hist - 1, 0)).to(tl.int32)
            cand_pos = tl.where(hist > 0, newest + 1, 0)
        return length, hist, cand_pos

    @triton.jit
    def _tile_is_full(
        start_q,
        start_k,
        pq,
        pk,
        hist,
        local_window,
        global_prefix,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
    ):
        """Whether every (query, key) pair of the tile is in the mask (then the mask arithmetic is skipped)."""
        full = (start_k + BLOCK_K <= start_q + 1) & (start_q + BLOCK_Q <= hist)
        if HAS_WINDOW:
            full = full & ((tl.max(pq) - tl.min(pk) < local_window) | (tl.max(pk) < global_prefix))
        return full

    @triton.jit
    def _key_ranges(
        start_m,
        length,
        hist,
        local_window,
        global_prefix,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
    ):
        """Key ranges ``[0, p_hi)`` (global prefix) and ``[lo, hi)`` (band up to the diagonal) of a query block."""
        end_m = tl.minimum(start_m + BLOCK_M, length)
        hi = tl.where(start_m < length, end_m, 0)
        p_hi = hi * 0
        lo = hi * 0
        if HAS_WINDOW:
            p_hi = tl.minimum(tl.cdiv(global_prefix, BLOCK_N) * BLOCK_N, hi)
            lo = tl.maximum((tl.maximum(start_m - local_window + 1, 0) // BLOCK_N) * BLOCK_N, p_hi)
            if HAS_TARGETS:  # a block holding candidates sees the whole history
                p_hi = tl.where(end_m > hist, 0, p_hi)
                lo = tl.where(end_m > hist, 0, lo)
        return p_hi, lo, hi

    @triton.jit
    def _fwd_tile(
        acc,
        cnt,
        q,
        pos_m,
        ts_m,
        offs_m,
        start_m,
        start_n,
        K,
        V,
        stride_kn,
        stride_vn,
        h,
        H,
        length,
        hist,
        cand_pos,
        Pos,
        TS,
        PosLut,
        PosW,
        TimeThr,
        TimeW,
        alpha,
        max_distance,
        local_window,
        global_prefix,
        num_time_buckets,
        D_QK: tl.constexpr,
        D_V: tl.constexpr,
        BLOCK_DQK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HAS_POS: tl.constexpr,
        HAS_POS_BIAS: tl.constexpr,
        HAS_TIME_BIAS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        COUNT_KEYS: tl.constexpr,
        PRECISION: tl.constexpr,
        FAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_dq = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        key_ok = offs_n < length
        kt = tl.load(
            K + offs_n[None, :] * stride_kn + offs_dq[:, None],
            mask=key_ok[None, :] & (offs_dq[:, None] < D_QK),
            other=0.0,
        )  # (DQK, BN)
        v = tl.load(
            V + offs_n[:, None] * stride_vn + offs_dv[None, :],
            mask=key_ok[:, None] & (offs_dv[None, :] < D_V),
            other=0.0,
        )  # (BN, DV)
        pos_n, ts_n = _load_positions(Pos, TS, offs_n, length, hist, cand_pos, HAS_POS, HAS_TARGETS, HAS_TIME_BIAS)
        s = _dot(q, kt, PRECISION) * alpha  # (BM, BN) fp32
        if HAS_POS_BIAS or HAS_TIME_BIAS:
            bias, _pb, _tb = _rab(
                pos_m[:, None],
                pos_n[None, :],
                ts_m[:, None],
                ts_n[None, :],
                h,
                H,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                max_distance,
                num_time_buckets,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
            )
            s += bias
        p = s * _sigmoid(s, FAST)
        full = _tile_is_full(
            start_m, start_n, pos_m, pos_n, hist, local_window, global_prefix, BLOCK_M, BLOCK_N, HAS_WINDOW
        )
        if full:
            if COUNT_KEYS:
                cnt += BLOCK_N
        else:
            keep = _mask(
                offs_m[:, None],
                offs_n[None, :],
                pos_m[:, None],
                pos_n[None, :],
                length,
                hist,
                local_window,
                global_prefix,
                HAS_TARGETS,
                HAS_WINDOW,
            )
            p = tl.where(keep, p, 0.0)
            if COUNT_KEYS:
                cnt += tl.sum(keep.to(tl.float32), axis=1)
        acc += _dot(p.to(v.dtype), v, PRECISION)
        return acc, cnt

    @triton.autotune(configs=_configs("fwd"), key=_KEY, cache_results=True)
    @triton.jit
    def _hstu_fwd(
        Q,
        K,
        V,
        Out,
        Count,
        Lengths,
        NumTargets,
        Pos,
        TS,
        PosLut,
        PosW,
        TimeThr,
        TimeW,
        stride_qb,
        stride_qn,
        stride_qh,
        stride_kb,
        stride_kn,
        stride_kh,
        stride_vb,
        stride_vn,
        stride_vh,
        stride_ob,
        stride_on,
        stride_oh,
        stride_pb,
        stride_tb,
        N,
        H,
        alpha,
        inv_n,
        max_distance,
        local_window,
        global_prefix,
        num_time_buckets,
        N_BUCKET,
        D_QK: tl.constexpr,
        D_V: tl.constexpr,
        BLOCK_DQK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HAS_POS: tl.constexpr,
        HAS_POS_BIAS: tl.constexpr,
        HAS_TIME_BIAS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        COUNT_KEYS: tl.constexpr,
        PRECISION: tl.constexpr,
        FAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the busiest (last) query blocks start first
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        Pos += b * stride_pb
        TS += b * stride_tb
        length, hist, cand_pos = _row_setup(Lengths, NumTargets, Pos, b, HAS_TARGETS, HAS_POS)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_dq = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        q = tl.load(
            Q + offs_m[:, None] * stride_qn + offs_dq[None, :],
            mask=(offs_m[:, None] < length) & (offs_dq[None, :] < D_QK),
            other=0.0,
        )
        pos_m, ts_m = _load_positions(Pos, TS, offs_m, length, hist, cand_pos, HAS_POS, HAS_TARGETS, HAS_TIME_BIAS)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
        p_hi, lo, hi = _key_ranges(
            start_m, length, hist, local_window, global_prefix, BLOCK_M, BLOCK_N, HAS_TARGETS, HAS_WINDOW
        )
        for start_n in range(0, p_hi, BLOCK_N):
            acc, cnt = _fwd_tile(
                acc,
                cnt,
                q,
                pos_m,
                ts_m,
                offs_m,
                start_m,
                start_n,
                K,
                V,
                stride_kn,
                stride_vn,
                h,
                H,
                length,
                hist,
                cand_pos,
                Pos,
                TS,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                alpha,
                max_distance,
                local_window,
                global_prefix,
                num_time_buckets,
                D_QK,
                D_V,
                BLOCK_DQK,
                BLOCK_DV,
                HAS_TARGETS,
                HAS_POS,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
                HAS_WINDOW,
                COUNT_KEYS,
                PRECISION,
                FAST,
                BLOCK_M,
                BLOCK_N,
            )
        for start_n in range(lo, hi, BLOCK_N):
            acc, cnt = _fwd_tile(
                acc,
                cnt,
                q,
                pos_m,
                ts_m,
                offs_m,
                start_m,
                start_n,
                K,
                V,
                stride_kn,
                stride_vn,
                h,
                H,
                length,
                hist,
                cand_pos,
                Pos,
                TS,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                alpha,
                max_distance,
                local_window,
                global_prefix,
                num_time_buckets,
                D_QK,
                D_V,
                BLOCK_DQK,
                BLOCK_DV,
                HAS_TARGETS,
                HAS_POS,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
                HAS_WINDOW,
                COUNT_KEYS,
                PRECISION,
                FAST,
                BLOCK_M,
                BLOCK_N,
            )
        if COUNT_KEYS:
            acc = acc / tl.maximum(cnt, 1.0)[:, None]
            if h == 0:
                tl.store(Count + b * N + offs_m, cnt, mask=offs_m < N)
        else:
            acc = acc * inv_n
        Out += b * stride_ob + h * stride_oh
        tl.store(
            Out + offs_m[:, None] * stride_on + offs_dv[None, :],
            acc.to(Out.dtype.element_ty),
            mask=(offs_m[:, None] < N) & (offs_dv[None, :] < D_V),
        )

    @triton.jit
    def _bucket_grad(DW, buckets, ds, h, H):
        """Add the tile's ``ds`` summed per bucket into ``DW[bucket, h]``, one atomic per bucket present
        (``buckets`` is -1 outside the mask)."""
        b_lo = tl.min(tl.where(buckets >= 0, buckets, 2147483647))
        b_hi = tl.max(buckets)
        for bucket in range(b_lo, b_hi + 1):
            tl.atomic_add(DW + bucket * H + h, tl.sum(tl.where(buckets == bucket, ds, 0.0)))

    @triton.jit
    def _dkdv_tile(
        dk,
        dv,
        k,
        v,
        pos_n,
        ts_n,
        offs_n,
        start_n,
        start_m,
        Q,
        DO,
        Count,
        stride_qn,
        stride_don,
        h,
        H,
        length,
        hist,
        cand_pos,
        Pos,
        TS,
        PosLut,
        PosW,
        TimeThr,
        TimeW,
        DPosW,
        DTimeW,
        alpha,
        inv_n,
        max_distance,
        local_window,
        global_prefix,
        num_time_buckets,
        D_QK: tl.constexpr,
        D_V: tl.constexpr,
        BLOCK_DQK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HAS_POS: tl.constexpr,
        HAS_POS_BIAS: tl.constexpr,
        HAS_TIME_BIAS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        COUNT_KEYS: tl.constexpr,
        PRECISION: tl.constexpr,
        FAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_dq = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < length
        qt = tl.load(
            Q + offs_m[None, :] * stride_qn + offs_dq[:, None],
            mask=row_ok[None, :] & (offs_dq[:, None] < D_QK),
            other=0.0,
        )  # (DQK, BM)
        do = tl.load(
            DO + offs_m[:, None] * stride_don + offs_dv[None, :],
            mask=row_ok[:, None] & (offs_dv[None, :] < D_V),
            other=0.0,
        )  # (BM, DV)
        pos_m, ts_m = _load_positions(Pos, TS, offs_m, length, hist, cand_pos, HAS_POS, HAS_TARGETS, HAS_TIME_BIAS)
        if COUNT_KEYS:
            scale = 1.0 / tl.maximum(tl.load(Count + offs_m, mask=row_ok, other=1.0), 1.0)  # (BM,)
        else:
            scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + inv_n
        st = _dot(k, qt, PRECISION) * alpha  # (BN, BM)
        pb = st.to(tl.int32)
        tb = pb
        if HAS_POS_BIAS or HAS_TIME_BIAS:
            bias, pb, tb = _rab(
                pos_m[None, :],
                pos_n[:, None],
                ts_m[None, :],
                ts_n[:, None],
                h,
                H,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                max_distance,
                num_time_buckets,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
            )
            st += bias
        sig = _sigmoid(st, FAST)
        pt = st * sig * scale[None, :]
        dpt = _dot(v, tl.trans(do), PRECISION)  # (BN, BM)
        dst = dpt * sig * (1.0 + st * (1.0 - sig)) * scale[None, :]
        full = _tile_is_full(
            start_m, start_n, pos_m, pos_n, hist, local_window, global_prefix, BLOCK_M, BLOCK_N, HAS_WINDOW
        )
        if not full:
            keep = _mask(
                offs_m[None, :],
                offs_n[:, None],
                pos_m[None, :],
                pos_n[:, None],
                length,
                hist,
                local_window,
                global_prefix,
                HAS_TARGETS,
                HAS_WINDOW,
            )
            pt = tl.where(keep, pt, 0.0)
            dst = tl.where(keep, dst, 0.0)
            if HAS_POS_BIAS:
                pb = tl.where(keep, pb, -1)
            if HAS_TIME_BIAS:
                tb = tl.where(keep, tb, -1)
        dv += _dot(pt.to(do.dtype), do, PRECISION)
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), PRECISION)
        if HAS_POS_BIAS:
            _bucket_grad(DPosW, pb, dst, h, H)
        if HAS_TIME_BIAS:
            _bucket_grad(DTimeW, tb, dst, h, H)
        return dk, dv

    @triton.autotune(configs=_configs("dkdv"), key=_KEY, reset_to_zero=["DPosW", "DTimeW"], cache_results=True)
    @triton.jit
    def _hstu_bwd_dkdv(
        Q,
        K,
        V,
        DO,
        DK,
        DV,
        Count,
        Lengths,
        NumTargets,
        Pos,
        TS,
        PosLut,
        PosW,
        TimeThr,
        TimeW,
        DPosW,
        DTimeW,
        stride_qb,
        stride_qn,
        stride_qh,
        stride_kb,
        stride_kn,
        stride_kh,
        stride_vb,
        stride_vn,
        stride_vh,
        stride_dob,
        stride_don,
        stride_doh,
        stride_dkb,
        stride_dkn,
        stride_dkh,
        stride_dvb,
        stride_dvn,
        stride_dvh,
        stride_pb,
        stride_tb,
        N,
        H,
        alpha,
        inv_n,
        max_distance,
        local_window,
        global_prefix,
        num_time_buckets,
        N_BUCKET,
        D_QK: tl.constexpr,
        D_V: tl.constexpr,
        BLOCK_DQK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HAS_POS: tl.constexpr,
        HAS_POS_BIAS: tl.constexpr,
        HAS_TIME_BIAS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        COUNT_KEYS: tl.constexpr,
        PRECISION: tl.constexpr,
        FAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)  # the busiest (first: causal, global prefix) key blocks start first
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        Pos += b * stride_pb
        TS += b * stride_tb
        Count += b * N
        length, hist, cand_pos = _row_setup(Lengths, NumTargets, Pos, b, HAS_TARGETS, HAS_POS)
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_dq = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        DO += b * stride_dob + h * stride_doh
        key_ok = offs_n < length
        k = tl.load(
            K + offs_n[:, None] * stride_kn + offs_dq[None, :],
            mask=key_ok[:, None] & (offs_dq[None, :] < D_QK),
            other=0.0,
        )  # (BN, DQK)
        v = tl.load(
            V + offs_n[:, None] * stride_vn + offs_dv[None, :],
            mask=key_ok[:, None] & (offs_dv[None, :] < D_V),
            other=0.0,
        )  # (BN, DV)
        pos_n, ts_n = _load_positions(Pos, TS, offs_n, length, hist, cand_pos, HAS_POS, HAS_TARGETS, HAS_TIME_BIAS)
        dk = tl.zeros((BLOCK_N, BLOCK_DQK), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
        # query blocks that can see this key block: from the diagonal to the end, or to the end of the band
        lo1 = (start_n // BLOCK_M) * BLOCK_M
        hi1 = tl.where(start_n < length, length, 0)
        lo2 = hi1 * 0
        hi2 = hi1 * 0
        if HAS_WINDOW:
            band_end = tl.minimum(start_n + BLOCK_N + local_window - 1, length)
            hi1 = tl.where(start_n < global_prefix, hi1, tl.minimum(hi1, band_end))
            if HAS_TARGETS:  # candidate queries see every history key
                lo2 = tl.maximum(tl.cdiv(hi1, BLOCK_M) * BLOCK_M, (hist // BLOCK_M) * BLOCK_M)
                hi2 = tl.where((start_n < hist) & (start_n < length), length, 0)
        for start_m in range(lo1, hi1, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                pos_n,
                ts_n,
                offs_n,
                start_n,
                start_m,
                Q,
                DO,
                Count,
                stride_qn,
                stride_don,
                h,
                H,
                length,
                hist,
                cand_pos,
                Pos,
                TS,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                DPosW,
                DTimeW,
                alpha,
                inv_n,
                max_distance,
                local_window,
                global_prefix,
                num_time_buckets,
                D_QK,
                D_V,
                BLOCK_DQK,
                BLOCK_DV,
                HAS_TARGETS,
                HAS_POS,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
                HAS_WINDOW,
                COUNT_KEYS,
                PRECISION,
                FAST,
                BLOCK_M,
                BLOCK_N,
            )
        for start_m in range(lo2, hi2, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                pos_n,
                ts_n,
                offs_n,
                start_n,
                start_m,
                Q,
                DO,
                Count,
                stride_qn,
                stride_don,
                h,
                H,
                length,
                hist,
                cand_pos,
                Pos,
                TS,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                DPosW,
                DTimeW,
                alpha,
                inv_n,
                max_distance,
                local_window,
                global_prefix,
                num_time_buckets,
                D_QK,
                D_V,
                BLOCK_DQK,
                BLOCK_DV,
                HAS_TARGETS,
                HAS_POS,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
                HAS_WINDOW,
                COUNT_KEYS,
                PRECISION,
                FAST,
                BLOCK_M,
                BLOCK_N,
            )
        DK += b * stride_dkb + h * stride_dkh
        DV += b * stride_dvb + h * stride_dvh
        rows = offs_n[:, None] < N
        tl.store(
            DK + offs_n[:, None] * stride_dkn + offs_dq[None, :],
            (dk * alpha).to(DK.dtype.element_ty),
            mask=rows & (offs_dq[None, :] < D_QK),
        )
        tl.store(
            DV + offs_n[:, None] * stride_dvn + offs_dv[None, :],
            dv.to(DV.dtype.element_ty),
            mask=rows & (offs_dv[None, :] < D_V),
        )

    @triton.jit
    def _dq_tile(
        dq,
        q,
        do,
        scale,
        pos_m,
        ts_m,
        offs_m,
        start_m,
        start_n,
        K,
        V,
        stride_kn,
        stride_vn,
        h,
        H,
        length,
        hist,
        cand_pos,
        Pos,
        TS,
        PosLut,
        PosW,
        TimeThr,
        TimeW,
        alpha,
        max_distance,
        local_window,
        global_prefix,
        num_time_buckets,
        D_QK: tl.constexpr,
        D_V: tl.constexpr,
        BLOCK_DQK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HAS_POS: tl.constexpr,
        HAS_POS_BIAS: tl.constexpr,
        HAS_TIME_BIAS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,
        FAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_dq = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        key_ok = offs_n < length
        kt = tl.load(
            K + offs_n[None, :] * stride_kn + offs_dq[:, None],
            mask=key_ok[None, :] & (offs_dq[:, None] < D_QK),
            other=0.0,
        )  # (DQK, BN)
        vt = tl.load(
            V + offs_n[None, :] * stride_vn + offs_dv[:, None],
            mask=key_ok[None, :] & (offs_dv[:, None] < D_V),
            other=0.0,
        )  # (DV, BN)
        pos_n, ts_n = _load_positions(Pos, TS, offs_n, length, hist, cand_pos, HAS_POS, HAS_TARGETS, HAS_TIME_BIAS)
        s = _dot(q, kt, PRECISION) * alpha  # (BM, BN)
        if HAS_POS_BIAS or HAS_TIME_BIAS:
            bias, _pb, _tb = _rab(
                pos_m[:, None],
                pos_n[None, :],
                ts_m[:, None],
                ts_n[None, :],
                h,
                H,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                max_distance,
                num_time_buckets,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
            )
            s += bias
        sig = _sigmoid(s, FAST)
        dp = _dot(do, vt, PRECISION)  # (BM, BN)
        ds = dp * sig * (1.0 + s * (1.0 - sig)) * scale[:, None]
        full = _tile_is_full(
            start_m, start_n, pos_m, pos_n, hist, local_window, global_prefix, BLOCK_M, BLOCK_N, HAS_WINDOW
        )
        if not full:
            keep = _mask(
                offs_m[:, None],
                offs_n[None, :],
                pos_m[:, None],
                pos_n[None, :],
                length,
                hist,
                local_window,
                global_prefix,
                HAS_TARGETS,
                HAS_WINDOW,
            )
            ds = tl.where(keep, ds, 0.0)
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION)
        return dq

    @triton.autotune(configs=_configs("dq"), key=_KEY, cache_results=True)
    @triton.jit
    def _hstu_bwd_dq(
        Q,
        K,
        V,
        DO,
        DQ,
        Count,
        Lengths,
        NumTargets,
        Pos,
        TS,
        PosLut,
        PosW,
        TimeThr,
        TimeW,
        stride_qb,
        stride_qn,
        stride_qh,
        stride_kb,
        stride_kn,
        stride_kh,
        stride_vb,
        stride_vn,
        stride_vh,
        stride_dob,
        stride_don,
        stride_doh,
        stride_dqb,
        stride_dqn,
        stride_dqh,
        stride_pb,
        stride_tb,
        N,
        H,
        alpha,
        inv_n,
        max_distance,
        local_window,
        global_prefix,
        num_time_buckets,
        N_BUCKET,
        D_QK: tl.constexpr,
        D_V: tl.constexpr,
        BLOCK_DQK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_TARGETS: tl.constexpr,
        HAS_POS: tl.constexpr,
        HAS_POS_BIAS: tl.constexpr,
        HAS_TIME_BIAS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        COUNT_KEYS: tl.constexpr,
        PRECISION: tl.constexpr,
        FAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the busiest (last) query blocks start first
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        Pos += b * stride_pb
        TS += b * stride_tb
        length, hist, cand_pos = _row_setup(Lengths, NumTargets, Pos, b, HAS_TARGETS, HAS_POS)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_dq = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < length
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        DO += b * stride_dob + h * stride_doh
        q = tl.load(
            Q + offs_m[:, None] * stride_qn + offs_dq[None, :],
            mask=row_ok[:, None] & (offs_dq[None, :] < D_QK),
            other=0.0,
        )
        do = tl.load(
            DO + offs_m[:, None] * stride_don + offs_dv[None, :],
            mask=row_ok[:, None] & (offs_dv[None, :] < D_V),
            other=0.0,
        )
        if COUNT_KEYS:
            scale = 1.0 / tl.maximum(tl.load(Count + b * N + offs_m, mask=row_ok, other=1.0), 1.0)
        else:
            scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + inv_n
        pos_m, ts_m = _load_positions(Pos, TS, offs_m, length, hist, cand_pos, HAS_POS, HAS_TARGETS, HAS_TIME_BIAS)
        dq = tl.zeros((BLOCK_M, BLOCK_DQK), dtype=tl.float32)
        p_hi, lo, hi = _key_ranges(
            start_m, length, hist, local_window, global_prefix, BLOCK_M, BLOCK_N, HAS_TARGETS, HAS_WINDOW
        )
        for start_n in range(0, p_hi, BLOCK_N):
            dq = _dq_tile(
                dq,
                q,
                do,
                scale,
                pos_m,
                ts_m,
                offs_m,
                start_m,
                start_n,
                K,
                V,
                stride_kn,
                stride_vn,
                h,
                H,
                length,
                hist,
                cand_pos,
                Pos,
                TS,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                alpha,
                max_distance,
                local_window,
                global_prefix,
                num_time_buckets,
                D_QK,
                D_V,
                BLOCK_DQK,
                BLOCK_DV,
                HAS_TARGETS,
                HAS_POS,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
                HAS_WINDOW,
                PRECISION,
                FAST,
                BLOCK_M,
                BLOCK_N,
            )
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_tile(
                dq,
                q,
                do,
                scale,
                pos_m,
                ts_m,
                offs_m,
                start_m,
                start_n,
                K,
                V,
                stride_kn,
                stride_vn,
                h,
                H,
                length,
                hist,
                cand_pos,
                Pos,
                TS,
                PosLut,
                PosW,
                TimeThr,
                TimeW,
                alpha,
                max_distance,
                local_window,
                global_prefix,
                num_time_buckets,
                D_QK,
                D_V,
                BLOCK_DQK,
                BLOCK_DV,
                HAS_TARGETS,
                HAS_POS,
                HAS_POS_BIAS,
                HAS_TIME_BIAS,
                HAS_WINDOW,
                PRECISION,
                FAST,
                BLOCK_M,
                BLOCK_N,
            )
        DQ += b * stride_dqb + h * stride_dqh
        tl.store(
            DQ + offs_m[:, None] * stride_dqn + offs_dq[None, :],
            (dq * alpha).to(DQ.dtype.element_ty),
            mask=(offs_m[:, None] < N) & (offs_dq[None, :] < D_QK),
        )


# ------------------------------------------------------------------------------------------ autograd


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products unless torch allows TF32 for matmuls; "emulate" for
    bf16 under the interpreter (see `_dot`)."""
    if dtype == torch.bfloat16 and interpreting():
        return "emulate"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        position_weight: Tensor | None,
        time_weight: Tensor | None,
        lengths: Tensor,
        num_targets: Tensor | None,
        position: Tensor | None,
        ts: Tensor | None,
        alpha: float,
        n: float | None,
        max_distance: int,
        local_window: int,
        global_prefix: int,
    ) -> Tensor:
        B, N, H, d_qk = q.shape
        d_v = v.shape[-1]
        device = q.device
        out = torch.empty((B, N, H, d_v), dtype=q.dtype, device=device)
        dummy_i, dummy_l, dummy_f = _placeholders(device)
        count = torch.empty((B, N), dtype=torch.float32, device=device) if n is None else dummy_f
        pos_lut = (
            _position_lut(position_weight.shape[0], max_distance, device) if position_weight is not None else dummy_i
        )
        time_thr = _time_thresholds(time_weight.shape[0], device) if time_weight is not None else dummy_l
        args = dict(
            Lengths=lengths,
            NumTargets=num_targets if num_targets is not None else dummy_i,
            Pos=position if position is not None else dummy_i,
            TS=ts if ts is not None else dummy_l,
            PosLut=pos_lut,
            PosW=position_weight if position_weight is not None else dummy_f,
            TimeThr=time_thr,
            TimeW=time_weight if time_weight is not None else dummy_f,
        )
        scalars = dict(
            stride_pb=position.stride(0) if position is not None else 0,
            stride_tb=ts.stride(0) if ts is not None else 0,
            N=N,
            H=H,
            alpha=alpha,
            inv_n=1.0 / n if n is not None else 1.0,
            max_distance=max_distance,
            local_window=local_window,
            global_prefix=global_prefix,
            num_time_buckets=time_weight.shape[0] if time_weight is not None else 1,
            N_BUCKET=triton.next_power_of_2(max(N, 1)),
            D_QK=d_qk,
            D_V=d_v,
            BLOCK_DQK=max(16, triton.next_power_of_2(d_qk)),
            BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
            HAS_TARGETS=num_targets is not None,
            HAS_POS=position is not None,
            HAS_POS_BIAS=position_weight is not None,
            HAS_TIME_BIAS=time_weight is not None,
            HAS_WINDOW=local_window > 0,
            COUNT_KEYS=n is None,
            PRECISION=_precision(q.dtype),
            FAST=q.dtype in (torch.bfloat16, torch.float16) and not interpreting(),
        )

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return (B * H, triton.cdiv(N, meta["BLOCK_M"]))

        if B * N:
            _hstu_fwd[grid](
                q, k, v, out, count, *args.values(),
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                **scalars,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, count, position_weight, time_weight, *args.values())
        ctx.scalars = scalars
        ctx.has_weights = (position_weight is not None, time_weight is not None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, count, position_weight, time_weight, *args = ctx.saved_tensors
        scalars = ctx.scalars
        B, N, H, _ = q.shape
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
        has_pos, has_time = ctx.has_weights
        d_pos = torch.zeros(position_weight.shape, dtype=torch.float32, device=q.device) if has_pos else args[5]
        d_time = torch.zeros(time_weight.shape, dtype=torch.float32, device=q.device) if has_time else args[7]
        if B * N:
            strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
            _hstu_bwd_dkdv[lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_N"]))](
                q,
                k,
                v,
                grad_out,
                dk,
                dv,
                count,
                *args,
                d_pos,
                d_time,
                *strides,
                *dk.stride()[:3],
                *dv.stride()[:3],
                **scalars,
            )
            _hstu_bwd_dq[lambda meta: (B * H, triton.cdiv(N, meta["BLOCK_M"]))](
                q, k, v, grad_out, dq, count, *args, *strides, *dq.stride()[:3], **scalars
            )
        grad_pos = d_pos.to(position_weight.dtype) if has_pos else None
        grad_time = d_time.to(time_weight.dtype) if has_time else None
        return dq, dk, dv, grad_pos, grad_time, *([None] * 9)


# ------------------------------------------------------------------------------------------ entry point


def _check(name: str, t: Tensor | None, shape: tuple[int, ...], what: str) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"hstu_mha: {name} must have shape {shape} ({what}), got {tuple(t.shape)}")


def hstu_mha(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    alpha: float,
    n: float | None = None,
    num_targets: Tensor | None = None,
    position: Tensor | None = None,
    ts: Tensor | None = None,
    position_weight: Tensor | None = None,
    time_weight: Tensor | None = None,
    max_distance: int = 0,
    local_window: int = 0,
    global_prefix: int = 0,
) -> Tensor:
    """HSTU pointwise attention, fused (Triton), differentiable in q, k, v and both bias tables.

    Args:
        q: (B, N, H, d_qk) queries; any strides with a contiguous last dimension.
        k: (B, N, H, d_qk) keys.
        v: (B, N, H, d_v) values.
        lengths: (B,) int valid tokens per row (left-aligned; the rest is padding).
        alpha: scale of ``q·k``.
        n: the normaliser: a constant, or None for the number of keys each query sees.
        num_targets: (B,) int candidates at the end of each row's valid tokens (target-aware), or None.
        position: (B, N) int logical positions, strictly increasing along valid tokens from >= 0
            (default: the token index). Used by the mask, the window and the position bias.
        ts: (B, N) int event times in seconds (required with ``time_weight``).
        position_weight: (P, H) position bias table over `bucket_position_distance` buckets, or None.
        time_weight: (T, H) time bias table over `bucket_time_delta` buckets, or None.
        max_distance: the distance of the last position bucket (required with ``position_weight``).
        local_window: K1 > 0 for semi-local attention (0: full causal).
        global_prefix: K2, with ``local_window``: keys at positions < K2 stay visible to every later query.

    Returns:
        (B, N, H, d_v) in q's dtype; 0 for padded queries.
    """
    if triton is None:
        raise RuntimeError("hstu_mha needs Triton (pip install triton); use hstu_mha_reference on this machine")
    if q.dim() != 4:
        raise ValueError(f"hstu_mha: q must be (B, N, H, d_qk), got shape {tuple(q.shape)}")
    B, N, H, d_qk = q.shape
    _check("k", k, (B, N, H, d_qk), "like q")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"hstu_mha: v must be (B, N, H, d_v) with q's first three sizes, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"hstu_mha: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(d_qk, v.shape[-1]) > 256:
        raise ValueError(f"hstu_mha: head dims up to 256 are supported, got d_qk={d_qk}, d_v={v.shape[-1]}")
    _check("lengths", lengths, (B,), "valid tokens per row")
    _check("num_targets", num_targets, (B,), "candidates per row")
    _check("position", position, (B, N), "logical positions")
    _check("ts", ts, (B, N), "event times")
    if position_weight is not None:
        _check("position_weight", position_weight, (position_weight.shape[0], H), "buckets x heads")
        if max_distance < 1:
            raise ValueError("hstu_mha: max_distance must be >= 1 with position_weight")
    if time_weight is not None:
        _check("time_weight", time_weight, (time_weight.shape[0], H), "buckets x heads")
        if ts is None:
            raise ValueError("hstu_mha: time_weight needs ts")
    if local_window < 0 or global_prefix < 0:
        raise ValueError(f"hstu_mha: local_window and global_prefix must be >= 0, got {local_window}, {global_prefix}")

    def last_contiguous(t: Tensor) -> Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    lengths = lengths.to(torch.int32).clamp(0, N).contiguous()
    if num_targets is not None:
        num_targets = torch.minimum(num_targets.to(torch.int32), lengths).clamp(min=0).contiguous()
    if position is not None:
        position = position.to(torch.int32).contiguous()
    if ts is not None:
        ts = ts.to(torch.int64).contiguous()
    if position_weight is not None:
        position_weight = position_weight.contiguous()
    if time_weight is not None:
        time_weight = time_weight.contiguous()
    return _HSTUAttention.apply(
        q,
        k,
        v,
        position_weight,
        time_weight,
        lengths,
        num_targets,
        position,
        ts,
        float(alpha),
        None if n is None else float(n),
        int(max_distance),
        int(local_window),
        int(global_prefix),
    )


def check_positions(position: Tensor, lengths: Tensor) -> None:
    """Raise ValueError unless ``position`` (B, N) increases strictly along each row's valid tokens from >= 0."""
    B, N = position.shape
    valid = torch.arange(N, device=position.device).expand(B, N) < lengths.unsqueeze(1)
    step = position[:, 1:] - position[:, :-1]
    bad = (valid[:, 1:] & (step <= 0)).any() | (valid & (position < 0)).any()
    if bool(bad):
        raise ValueError("hstu_mha: position must increase strictly along each row's valid tokens, from >= 0")
