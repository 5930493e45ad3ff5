"""ULTRA-HSTU (Meta, "Bending the Scaling Law Curve in Large-Scale Recommendation Systems", arXiv 2602.16986),
plain PyTorch, on top of the spine's HSTU layer (arXiv 2402.17152, `encoders.hstu`).

ULTRA-HSTU keeps HSTU's layer (pointwise ``SiLU`` attention with a relative position/time bias and a
``U`` gate, no softmax) and changes what goes in and which keys each query sees. Every part is a
setting of `UltraHSTUEncoder`, so each can be switched off for an ablation:

1. **Action–item merged tokens** (``merge_action_item``, default on): one token per event, the item's
   embeddings and the action's embeddings summed (`FeatureEmbeddings.history_tokens`). Off: HSTU's
   interleaved layout ``item_0, action_0, item_1, action_1, ...`` (twice the tokens for the same
   content). Which history channels are "action" channels is ``action_channels`` (default
   ``action`` and ``watch``; the item id and the other channels make the item token).
2. **Contextual prefix** (``num_context_tokens``): the user features (`FeatureEmbeddings.user_features`)
   projected into P tokens placed in front of the history, visible to every later token.
3. **Semi-local attention, SLA** (``local_window`` K1, ``global_prefix`` K2): on logical positions
   (prefix ``0..P-1``, then the history), a sequence token ``i`` attends ``j`` iff ``j <= i`` and
   (``i - j < K1`` or ``j < K2``); the candidate (target) token attends to every sequence token and
   to itself; no sequence token attends to the candidate. A layer costs ``O(N·(K1 + K2))``:
   `sla_attention` computes the local band block by block (query blocks of ``min(K1, N)`` tokens
   against a key window of ``2·min(K1, N) - 1``) and the global prefix as one ``N × K2`` product,
   with the two masks disjoint so no key is counted twice. ``K1 >= N`` is full causal HSTU
   attention exactly (one block, the whole sequence as the window).
4. **Attention truncation** (``full_layers``, ``tail_len``): the first ``full_layers`` layers see the
   whole sequence; the remaining ones only the contextual prefix plus the newest ``tail_len``
   sequence tokens of each row (gathered once, left-aligned; logical positions and times kept, so
   the relative bias and the SLA rule are unchanged). The candidate always keeps its token.
5. **Mixture of transducers, MoT** (``streams``, ``fusion``): one HSTU stack per behaviour stream
   (`TransducerStream`: the whole history, or the behaviours whose channel value is in a set, e.g.
   engaged actions; each stream keeps its newest ``max_len`` matching behaviours), sharing the
   embedding tables and the contextual prefix; the streams' candidate states are fused by a sum or
   by concatenation + a linear layer.
6. **Selective activation recomputation** (``recompute="selective"``): each layer runs under
   `torch.utils.checkpoint` with a selective policy that *saves* the outputs of the layer's linear
   projections (``f1``, ``f2``: the expensive matrix products with the weights) and *recomputes*
   everything else in the backward pass — LayerNorms, SiLUs, the relative-bias gather and add,
   masking, normalising, gating, and the attention's score and value products (which grow with
   the window, and which a fused attention kernel recomputes in its backward pass anyway).
   ``"full"`` recomputes whole layers, ``"none"`` stores everything. `scripts/bench_recompute.py`
   measures the memory saved and the time it costs.
7. **Load-balanced stochastic length sampling** lives in the data loader (`mtrank.data.lengths`):
   the encoder accepts any history width up to ``features.max_len``.

Choices where the paper's public text is silent (each documented on the argument too):

- ``global_prefix`` defaults to the contextual prefix P (the "at least the contextual prefix" of the
  paper's description) and is refused below it, so context is never cut off from any token.
- Truncated layers keep the contextual prefix besides the tail (it is the part of the sequence the
  paper keeps global everywhere, and it costs P keys).
- ``tail_len`` counts tokens, so with interleaved (unmerged) tokens it keeps ``tail_len / 2`` events.
- The relative attention bias, ``n`` (``attention_norm``) and the optional absolute position
  embedding (distance to the candidate in tokens) are HSTU's (`encoders.hstu`); prefix tokens carry
  the request time ``ts``, so their time bias to a behaviour is the behaviour's age.
- ``EncoderOutput.target`` is `TargetMLP` over the fused candidate state, the candidate embedding
  and the user features, as for HSTU and LONGER; ``user`` is the mean over streams of each stream's
  newest valid state (candidate-free); ``sequence`` is the last layer's history states when they map
  one to one onto the batch's history positions (one stream over the whole history, merged tokens,
  no truncation), else None.

Layout: histories are left-aligned (`Batch`); a stream's sequence is ``[prefix | its behaviours]``,
left-aligned with ``P + n_b`` valid tokens; the candidate is kept as a separate (B, 1, D) token whose
logical position is ``P + n_b`` (merged) or ``P + 2 n_b`` (interleaved), right after the newest one.

Example:
    >>> encoder = UltraHSTUEncoder(features, dim=64, num_layers=4, local_window=64, full_layers=2, tail_len=128)
    >>> out = encoder(batch)      # out.target (B, 64), out.user (B, 64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from encoders.base import EncoderOutput, SequenceEncoder, TargetMLP
from encoders.embeddings import FeatureEmbeddings, symlog
from encoders.hstu import AttentionNorm, HSTULayer, bucket_position_distance, bucket_time_delta, resolve_kernel
from mtrank.batch import Batch
from mtrank.spec import FeatureSpec

Recompute = Literal["none", "selective", "full"]
Fusion = Literal["sum", "concat"]

# ------------------------------------------------------------------------------------------ streams


@dataclass
class TransducerStream:
    """One behaviour stream of the mixture of transducers: which behaviours its HSTU stack reads.

    Args:
        name: a label for logs and errors.
        channel: the integer history channel (``features.history_sparse``) that selects behaviours,
            or None for the whole history.
        values: keep the behaviours whose ``channel`` value is in this list (required with ``channel``).
        max_len: the newest matching behaviours kept (default ``features.max_len``).
    """

    name: str = "all"
    channel: str | None = None
    values: list[int] | None = None
    max_len: int | None = None


# ------------------------------------------------------------------------------------------ SLA layout


class SLALayout(NamedTuple):
    """Masks, key indices and bias buckets of semi-local attention over one sequence layout.

    ``W`` sequence tokens (left-aligned), ``Kb`` queries per block, ``nb = ceil(W / Kb)`` blocks,
    ``Wk`` keys per block window, ``G`` global key columns. Bucket fields are None when that bias is off.
    """

    block: int  # Kb
    key_index: Tensor  # (nb, Wk) long: the sequence index of each window key (clamped into [0, W))
    local_mask: Tensor  # (B, nb, Kb, Wk) bool
    global_mask: Tensor | None  # (B, W, G) bool, or None when no query uses a global key
    candidate_mask: Tensor  # (B, W) bool: the valid sequence tokens (the candidate also sees itself)
    n_sequence: Tensor | float  # (B, W, 1) keys per sequence query (>= 1), or the constant n
    n_candidate: Tensor | float  # (B, 1, 1) keys of the candidate, or the constant n
    local_position: Tensor | None  # (B, nb, Kb, Wk)
    local_time: Tensor | None
    global_position: Tensor | None  # (B, W, G)
    global_time: Tensor | None
    candidate_position: Tensor | None  # (B, 1, W + 1): the sequence keys, then the candidate itself
    candidate_time: Tensor | None


class SLAKernelLayout(NamedTuple):
    """What the fused kernel (`encoders.kernels.hstu_attention.hstu_mha`) needs for semi-local attention over
    one sequence layout (it computes masks, key counts and the sequence's bias buckets itself), plus the
    candidate's part, which stays in PyTorch (one query over ``W + 1`` keys)."""

    lengths: Tensor  # (B,) valid sequence tokens
    position: Tensor  # (B, W) logical positions
    ts: Tensor  # (B, W) event times
    local_window: int  # K1, 0: unbounded
    global_prefix: int  # K2
    n: float | None  # constant normaliser, or None for the number of keys
    max_distance: int
    candidate_mask: Tensor  # (B, W) bool
    n_candidate: Tensor | float  # (B, 1, 1) or the constant n
    candidate_position: Tensor | None  # (B, 1, W + 1)
    candidate_time: Tensor | None


def sla_mask(position: Tensor, valid: Tensor, local_window: int, global_prefix: int) -> Tensor:
    """Dense SLA mask over sequence tokens (the rule, literally; for tests and small inputs).

    Args:
        position: (B, W) logical positions.
        valid: (B, W) bool valid tokens.
        local_window: K1.
        global_prefix: K2.

    Returns:
        (B, W, W) bool, True where query i may attend key j:
        both valid, ``pos_j <= pos_i`` and (``pos_i - pos_j < K1`` or ``pos_j < K2``).
    """
    pi, pj = position.unsqueeze(2), position.unsqueeze(1)
    rule = (pj <= pi) & ((pi - pj < local_window) | (pj < global_prefix))
    return rule & valid.unsqueeze(2) & valid.unsqueeze(1)


def build_sla_layout(
    position: Tensor,
    valid: Tensor,
    ts: Tensor,
    candidate_position: Tensor,
    candidate_ts: Tensor,
    local_window: int,
    global_prefix: int,
    num_position_buckets: int,
    num_time_buckets: int,
    max_distance: int,
    constant_n: float | None,
    block_size: int = 64,
    kernel: str = "reference",
) -> SLALayout | SLAKernelLayout:
    """The `SLALayout` of a left-aligned sequence (built once per layout, shared by its layers).

    Args:
        position: (B, W) long logical positions (increasing along valid tokens).
        valid: (B, W) bool valid tokens (left-aligned).
        ts: (B, W) long event times (seconds).
        candidate_position: (B,) long logical position of the candidate.
        candidate_ts: (B,) long request time.
        local_window: K1 >= 1.
        global_prefix: K2 >= 0.
        num_position_buckets, num_time_buckets: relative bias sizes (0: that bias off).
        max_distance: the largest position distance (for the log-spaced position buckets).
        constant_n: the attention normaliser, or None for the number of keys of each query.
        block_size: queries per block of the local band (capped at K1); each block's key window is
            ``block + K1 - 1`` keys, so a query costs about ``K1 + block`` keys instead of ``W``. When
            that window would reach the whole sequence, one block of all ``W`` queries and keys is used.
        kernel: ``reference`` (an `SLALayout`) or ``triton`` (an `SLAKernelLayout`: no (B, W, K) tensors).
    """
    B, W = valid.shape
    device = valid.device
    if kernel == "triton":
        candidate_pos, candidate_time = _candidate_buckets(
            position, ts, candidate_position, candidate_ts, num_position_buckets, num_time_buckets, max_distance
        )
        lengths = valid.sum(dim=1)  # (B,)
        return SLAKernelLayout(
            lengths=lengths,
            position=position,
            ts=ts,
            local_window=0 if local_window > max_distance else local_window,
            global_prefix=global_prefix,
            n=constant_n,
            max_distance=max_distance,
            candidate_mask=valid,
            n_candidate=(lengths.float() + 1).view(B, 1, 1) if constant_n is None else constant_n,
            candidate_position=candidate_pos,
            candidate_time=candidate_time,
        )
    k1 = max(1, min(local_window, W))
    block = max(1, min(block_size, k1))
    if block + k1 - 1 >= W:  # one block: every key is in the window
        nb, block, key_raw = 1, W, torch.arange(W, device=device).unsqueeze(0)  # (1, W)
    else:
        nb = -(-W // block)
        starts = torch.arange(nb, device=device) * block - (k1 - 1)
        key_raw = starts.unsqueeze(1) + torch.arange(block + k1 - 1, device=device)  # (nb, Wk)
    in_range = (key_raw >= 0) & (key_raw < W)  # (nb, Wk)
    key_index = key_raw.clamp(0, max(W - 1, 0))
    query_index = torch.arange(nb * block, device=device).view(nb, block)  # (nb, Kb)
    q_in = query_index < W
    query_index = query_index.clamp(max=max(W - 1, 0))

    def blocked(t: Tensor) -> tuple[Tensor, Tensor]:  # (B, W) -> queries (B, nb, Kb, 1), keys (B, nb, 1, Wk)
        return t[:, query_index].unsqueeze(-1), t[:, key_index].unsqueeze(-2)

    qp, kp = blocked(position)
    qv, kv = blocked(valid)
    qv = qv & q_in[None, :, :, None]
    kv = kv & in_range[None, :, None, :]
    causal = kp <= qp
    local_mask = qv & kv & causal & (qp - kp < local_window)  # (B, nb, Kb, Wk)

    G = min(global_prefix, W)
    global_mask = None
    if G > 0 and local_window < W + 1 and B:
        pi, pj = position.unsqueeze(2), position[:, :G].unsqueeze(1)  # (B, W, 1), (B, 1, G)
        gm = valid.unsqueeze(2) & valid[:, :G].unsqueeze(1) & (pj < global_prefix) & (pj <= pi)
        gm = gm & (pi - pj >= local_window)  # disjoint from the local band
        if bool(gm.any()):
            global_mask = gm

    if constant_n is None:
        count = local_mask.sum(dim=-1).reshape(B, nb * block)[:, :W].float()  # (B, W)
        if global_mask is not None:
            count = count + global_mask.sum(dim=-1).float()
        n_sequence: Tensor | float = count.clamp(min=1).unsqueeze(-1)  # (B, W, 1)
        n_candidate: Tensor | float = (valid.sum(dim=1).float() + 1).view(B, 1, 1)
    else:
        n_sequence = n_candidate = constant_n

    def buckets(qpos: Tensor, kpos: Tensor, qts: Tensor, kts: Tensor) -> tuple[Tensor | None, Tensor | None]:
        pb = tb = None
        if num_position_buckets:
            pb = bucket_position_distance((qpos - kpos).clamp(min=0), num_position_buckets, max_distance)
        if num_time_buckets:
            tb = bucket_time_delta(qts - kts, num_time_buckets)
        return pb, tb

    qts, kts = blocked(ts)
    local_position, local_time = buckets(qp, kp, qts, kts)
    global_position = global_time = None
    if global_mask is not None:
        global_position, global_time = buckets(
            position.unsqueeze(2), position[:, :G].unsqueeze(1), ts.unsqueeze(2), ts[:, :G].unsqueeze(1)
        )
    candidate_pos, candidate_time = _candidate_buckets(
        position, ts, candidate_position, candidate_ts, num_position_buckets, num_time_buckets, max_distance
    )
    return SLALayout(
        block=block,
        key_index=key_index,
        local_mask=local_mask,
        global_mask=global_mask,
        candidate_mask=valid,
        n_sequence=n_sequence,
        n_candidate=n_candidate,
        local_position=local_position,
        local_time=local_time,
        global_position=global_position,
        global_time=global_time,
        candidate_position=candidate_pos,
        candidate_time=candidate_time,
    )


def _candidate_buckets(
    position: Tensor,
    ts: Tensor,
    candidate_position: Tensor,
    candidate_ts: Tensor,
    num_position_buckets: int,
    num_time_buckets: int,
    max_distance: int,
) -> tuple[Tensor | None, Tensor | None]:
    """(B, 1, W + 1) position and time buckets of the candidate against the sequence keys, then itself."""
    B = position.shape[0]
    key_pos = torch.cat([position, candidate_position.unsqueeze(1)], dim=1).unsqueeze(1)  # (B, 1, W + 1)
    key_ts = torch.cat([ts, candidate_ts.unsqueeze(1)], dim=1).unsqueeze(1)
    pb = tb = None
    if num_position_buckets:
        distance = (candidate_position.view(B, 1, 1) - key_pos).clamp(min=0)
        pb = bucket_position_distance(distance, num_position_buckets, max_distance)
    if num_time_buckets:
        tb = bucket_time_delta(candidate_ts.view(B, 1, 1) - key_ts, num_time_buckets)
    return pb, tb


# ------------------------------------------------------------------------------------------ attention


def candidate_attention(
    qc: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    candidate_mask: Tensor,
    n_candidate: Tensor | float,
    bias_candidate: Tensor | None,
    alpha: float,
) -> Tensor:
    """The candidate's attention over every valid sequence token and itself.

    Args:
        qc, kc: (B, H, 1, d_qk) the candidate's query and key; k: (B, H, W, d_qk) sequence keys.
        vc: (B, H, 1, d_v) the candidate's value; v: (B, H, W, d_v) sequence values.
        candidate_mask: (B, W) bool valid sequence tokens.
        n_candidate: (B, 1, 1) keys of the candidate, or the constant n.
        bias_candidate: (B, H, 1, W + 1) relative bias, or None.
        alpha: scale of ``QKᵀ``.

    Returns:
        (B, H, 1, d_v).
    """
    B, W = candidate_mask.shape
    keys, values = torch.cat([k, kc], dim=2), torch.cat([v, vc], dim=2)  # (B, H, W + 1, d)
    scores = alpha * torch.matmul(qc, keys.transpose(-1, -2))  # (B, H, 1, W + 1)
    if bias_candidate is not None:
        scores = scores + bias_candidate
    keep = F.pad(candidate_mask, (0, 1), value=True).view(B, 1, 1, W + 1)
    n_c = n_candidate.unsqueeze(1) if isinstance(n_candidate, Tensor) else n_candidate
    attn = F.silu(scores) * keep / n_c
    return torch.matmul(attn.to(v.dtype), values)  # (B, H, 1, dv)


def sla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    layout: SLALayout,
    bias_local: Tensor | None,
    bias_global: Tensor | None,
    bias_candidate: Tensor | None,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Semi-local HSTU attention, reference: ``SiLU(α QKᵀ + rab) ⊙ mask / n · V`` over the SLA keys only.

    Args:
        q, k: (B, H, W, d_qk) sequence queries and keys.
        v: (B, H, W, d_v) sequence values.
        qc, kc: (B, H, 1, d_qk) the candidate's query and key.
        vc: (B, H, 1, d_v) the candidate's value.
        layout: the sequence's `SLALayout`.
        bias_local: (B, H, nb, Kb, Wk) relative bias of the local band, or None.
        bias_global: (B, H, W, G) relative bias of the global prefix, or None.
        bias_candidate: (B, H, 1, W + 1) relative bias of the candidate's keys, or None.
        alpha: scale of ``QKᵀ``.

    Returns:
        (B, H, W, d_v) sequence outputs (0 for a query without keys) and (B, H, 1, d_v) the candidate's.
    """
    B, H, W, dqk = q.shape
    block, key_index = layout.block, layout.key_index
    nb = key_index.shape[0]
    pad = nb * block - W
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, nb, block, dqk)
    kb, vb = k[:, :, key_index], v[:, :, key_index]  # (B, H, nb, Wk, d)
    scores = alpha * torch.matmul(qb, kb.transpose(-1, -2))  # (B, H, nb, Kb, Wk)
    if bias_local is not None:
        scores = scores + bias_local
    n_seq = layout.n_sequence
    if isinstance(n_seq, Tensor):
        n_blocked = F.pad(n_seq.squeeze(-1), (0, pad), value=1.0).view(B, 1, nb, block, 1)
    else:
        n_blocked = n_seq
    attn = F.silu(scores) * layout.local_mask.unsqueeze(1) / n_blocked
    out = torch.matmul(attn.to(v.dtype), vb).view(B, H, nb * block, -1)[:, :, :W]  # (B, H, W, dv)

    if layout.global_mask is not None:
        G = layout.global_mask.shape[-1]
        scores = alpha * torch.matmul(q, k[:, :, :G].transpose(-1, -2))  # (B, H, W, G)
        if bias_global is not None:
            scores = scores + bias_global
        n = n_seq.unsqueeze(1) if isinstance(n_seq, Tensor) else n_seq
        attn = F.silu(scores) * layout.global_mask.unsqueeze(1) / n
        out = out + torch.matmul(attn.to(v.dtype), v[:, :, :G])

    out_c = candidate_attention(
        qc, k, v, kc, vc, layout.candidate_mask, layout.n_candidate, bias_candidate, alpha
    )  # (B, H, 1, dv)
    return out, out_c


SLA_ATTENTION_KERNELS = ("auto", "reference", "triton")


def sla_attention_kernel(kernel: str) -> str:
    """Check the ``kernel`` setting of ULTRA-HSTU's attention; ValueError if unknown.

    ``reference``: `sla_attention` (blocked dense PyTorch); ``triton``: the fused kernel
    `encoders.kernels.hstu_attention.hstu_mha` with the semi-local mask and block skipping (CUDA, or the
    CPU under ``TRITON_INTERPRET=1``); ``auto``: ``triton`` on CUDA, ``reference`` elsewhere.
    """
    if kernel not in SLA_ATTENTION_KERNELS:
        raise ValueError(f"unknown ULTRA-HSTU attention kernel {kernel!r}; available: {list(SLA_ATTENTION_KERNELS)}")
    return kernel


# ------------------------------------------------------------------------------------------ recompute

_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save the linear projections' outputs (``mm``/``addmm``); recompute norms, activations, attention, gates."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_context() -> Any:
    """``context_fn`` for `torch.utils.checkpoint.checkpoint`: ULTRA-HSTU's selective recomputation policy."""
    return create_selective_checkpoint_contexts(_selective_policy)


# ------------------------------------------------------------------------------------------ layer


class UltraHSTULayer(HSTULayer):
    """An HSTU layer (same parameters as `HSTULayer`) whose attention is semi-local, with a separate candidate.

    Args: as `HSTULayer`. The implementation follows the layout it is given: `SLALayout` runs the
    reference `sla_attention`, `SLAKernelLayout` the fused kernel for the sequence (the candidate's one
    query stays in PyTorch, `candidate_attention`).
    """

    def forward(  # type: ignore[override]
        self, x: Tensor, candidate: Tensor, valid: Tensor, layout: SLALayout | SLAKernelLayout
    ) -> tuple[Tensor, Tensor]:
        """(B, W, D) sequence tokens, (B, 1, D) candidate -> both updated; sequence 0 where ``valid`` is False."""
        B, W, _ = x.shape
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        xc = torch.cat([x, candidate], dim=1)  # (B, W + 1, D)
        uvqk = F.silu(self.f1(self.norm_x(xc)))
        u, v, q, k = uvqk.split([H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        alpha = 1.0 / math.sqrt(dqk)

        if isinstance(layout, SLAKernelLayout):
            from encoders.kernels.hstu_attention import hstu_mha

            q4, k4, v4 = q.view(B, W + 1, H, dqk), k.view(B, W + 1, H, dqk), v.view(B, W + 1, H, dv)
            position, time = self.rab.position, self.rab.time
            av = hstu_mha(
                q4[:, :W],
                k4[:, :W],
                v4[:, :W],
                layout.lengths,
                alpha=alpha,
                n=layout.n,
                position=layout.position,
                ts=layout.ts if time is not None else None,
                position_weight=position.weight if position is not None else None,
                time_weight=time.weight if time is not None else None,
                max_distance=layout.max_distance,
                local_window=layout.local_window,
                global_prefix=layout.global_prefix,
            ).transpose(1, 2)  # (B, H, W, dv)
            qh, kh, vh = q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)  # (B, H, W + 1, d)
            bias_candidate = self.rab(layout.candidate_position, layout.candidate_time)
            av_c = candidate_attention(
                qh[:, :, W:],
                kh[:, :, :W],
                vh[:, :, :W],
                kh[:, :, W:],
                vh[:, :, W:],
                layout.candidate_mask,
                layout.n_candidate,
                bias_candidate,
                alpha,
            )
        else:

            def heads(t: Tensor, d: int) -> Tensor:
                return t.view(B, W + 1, H, d).transpose(1, 2)  # (B, H, W + 1, d)

            q, k, v = heads(q, dqk), heads(k, dqk), heads(v, dv)
            bias_local = self.rab(layout.local_position, layout.local_time)
            bias_global = (
                self.rab(layout.global_position, layout.global_time) if layout.global_mask is not None else None
            )
            bias_candidate = self.rab(layout.candidate_position, layout.candidate_time)
            av, av_c = sla_attention(
                q[:, :, :W],
                k[:, :, :W],
                v[:, :, :W],
                q[:, :, W:],
                k[:, :, W:],
                v[:, :, W:],
                layout,
                bias_local,
                bias_global,
                bias_candidate,
                alpha=alpha,
            )
        av = torch.cat([av, av_c], dim=2).transpose(1, 2).reshape(B, W + 1, H * dv)
        y = self.f2(self.dropout(self.norm_av(av) * u)) + xc  # (B, W + 1, D)
        keep = F.pad(valid, (0, 1), value=True).unsqueeze(-1).to(y.dtype)
        y = y * keep
        return y[:, :W], y[:, W:]


# ------------------------------------------------------------------------------------------ encoder


class _Sequence(NamedTuple):
    tokens: Tensor  # (B, W, D)
    valid: Tensor  # (B, W) bool, left-aligned
    position: Tensor  # (B, W) long logical positions
    ts: Tensor  # (B, W) long
    length: Tensor  # (B,) valid tokens, prefix included
    candidate_position: Tensor  # (B,) long


class UltraHSTUEncoder(SequenceEncoder):
    """ULTRA-HSTU over the user's history with the candidate as a target-aware token (see the module docstring).

    Args:
        features: the feature spec (vocabularies and ``max_len``).
        dim: D, the token width.
        num_layers: HSTU layers per transducer (stream).
        num_heads: H.
        attention_dim: d_qk per head (default ``dim // num_heads``).
        linear_dim: d_v per head (default ``dim // num_heads``).
        dropout: on the input tokens, inside each layer and in the target MLP.
        merge_action_item: one token per event (item + action summed); False: interleaved item and
            action tokens as in HSTU (twice the length).
        action_channels: the history channels (sparse or dense) that make the action token when
            ``merge_action_item`` is False (default ``["action", "watch"]``, those present).
        num_context_tokens: P, tokens of user features in front of the history (0: none).
        local_window: K1, the SLA local window in tokens (default: unbounded, i.e. full causal attention).
        global_prefix: K2, the SLA global prefix in tokens (default and minimum: P).
        sla_block_size: queries per block of the reference SLA's local band (cost per query about
            ``K1 + sla_block_size`` keys; smaller blocks waste less, larger ones make bigger matmuls).
        full_layers: layers that see the whole sequence before truncation (default: all, no truncation).
        tail_len: tokens of each row's sequence kept by the truncated layers (required with ``full_layers``).
        streams: the mixture of transducers' behaviour streams (default: one stream, the whole history).
        fusion: how the streams' candidate states are combined: ``sum`` or ``concat`` (+ linear).
        position_embedding: add a learned absolute position embedding (distance to the candidate in tokens).
        num_position_buckets: relative position bias buckets (0: off).
        num_time_buckets: relative time bias buckets (0: off).
        attention_norm: ``num_keys`` (keys each query attends to) or ``max_len`` (a constant).
        kernel: the attention implementation: ``auto`` (the fused Triton kernel on CUDA, the reference
            elsewhere), ``reference`` or ``triton`` (see `sla_attention_kernel`).
        recompute: ``none``, ``selective`` (save the linear projections' outputs, recompute the rest)
            or ``full`` (whole layers).
        output_dim: width of ``EncoderOutput.target``.
        user_dim: width of the user features (default ``dim``).
    """

    def __init__(
        self,
        features: FeatureSpec,
        dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        attention_dim: int | None = None,
        linear_dim: int | None = None,
        dropout: float = 0.0,
        merge_action_item: bool = True,
        action_channels: list[str] | None = None,
        num_context_tokens: int = 1,
        local_window: int | None = None,
        global_prefix: int | None = None,
        sla_block_size: int = 64,
        full_layers: int | None = None,
        tail_len: int | None = None,
        streams: list[TransducerStream] | None = None,
        fusion: Fusion = "sum",
        position_embedding: bool = True,
        num_position_buckets: int = 32,
        num_time_buckets: int = 128,
        attention_norm: AttentionNorm = "num_keys",
        kernel: str = "auto",
        recompute: Recompute = "none",
        output_dim: int = 64,
        user_dim: int | None = None,
    ) -> None:
        super().__init__()
        name = "UltraHSTUEncoder"
        if dim % num_heads and (attention_dim is None or linear_dim is None):
            raise ValueError(
                f"{name}: dim={dim} is not divisible by num_heads={num_heads}; set attention_dim and linear_dim"
            )
        if num_layers < 1 or num_context_tokens < 0:
            raise ValueError(f"{name}: need num_layers >= 1 and num_context_tokens >= 0")
        if sla_block_size < 1:
            raise ValueError(f"{name}: sla_block_size must be >= 1, got {sla_block_size}")
        if local_window is not None and local_window < 1:
            raise ValueError(f"{name}: local_window must be >= 1, got {local_window}")
        if global_prefix is not None and global_prefix < num_context_tokens:
            raise ValueError(
                f"{name}: global_prefix={global_prefix} is below num_context_tokens={num_context_tokens}; "
                "the global prefix must cover the contextual prefix"
            )
        if (full_layers is None) != (tail_len is None):
            raise ValueError(f"{name}: set both full_layers and tail_len for attention truncation, or neither")
        if full_layers is not None and not (0 <= full_layers <= num_layers and tail_len >= 1):
            raise ValueError(
                f"{name}: need 0 <= full_layers <= num_layers and tail_len >= 1, got {full_layers}, {tail_len}"
            )
        if attention_norm not in ("num_keys", "max_len"):
            raise ValueError(f"{name}: attention_norm must be 'num_keys' or 'max_len', got {attention_norm!r}")
        if recompute not in ("none", "selective", "full"):
            raise ValueError(f"{name}: recompute must be 'none', 'selective' or 'full', got {recompute!r}")
        if fusion not in ("sum", "concat"):
            raise ValueError(f"{name}: fusion must be 'sum' or 'concat', got {fusion!r}")
        self.kernel = sla_attention_kernel(kernel)
        streams = [TransducerStream()] if not streams else [_as_stream(s) for s in streams]
        for stream in streams:
            _check_stream(stream, features, name)
        if action_channels is None:
            action_channels = [
                c for c in ("action", "watch") if c in features.history_sparse or c in features.history_dense
            ]
        for channel in action_channels:
            if channel not in features.history_sparse and channel not in features.history_dense:
                raise ValueError(
                    f"{name}: action_channels names {channel!r}, which is not a history channel "
                    f"(history_sparse {sorted(features.history_sparse)}, history_dense {features.history_dense})"
                )

        self.features = features
        self.dim = dim
        self.output_dim = output_dim
        self.max_len = features.max_len
        self.merge_action_item = merge_action_item
        self.action_channels = list(action_channels)
        self.num_context_tokens = num_context_tokens
        self.local_window = local_window
        self.global_prefix = num_context_tokens if global_prefix is None else global_prefix
        self.sla_block_size = sla_block_size
        self.full_layers = num_layers if full_layers is None else full_layers
        self.tail_len = tail_len
        self.streams = streams
        self.fusion = fusion
        self.num_position_buckets = num_position_buckets
        self.num_time_buckets = num_time_buckets
        self.attention_norm = attention_norm
        self.recompute = recompute
        tokens_per_event = 1 if merge_action_item else 2
        self.max_tokens = num_context_tokens + tokens_per_event * features.max_len  # sequence tokens, no candidate

        self.embeddings = FeatureEmbeddings(features, dim, user_dim)
        self.context = nn.Linear(self.embeddings.user_dim, num_context_tokens * dim) if num_context_tokens else None
        self.position = nn.Embedding(self.max_tokens + 1, dim) if position_embedding else None
        if self.position is not None:
            nn.init.normal_(self.position.weight, std=1.0 / math.sqrt(dim))
        self.dropout = nn.Dropout(dropout)
        self.transducers = nn.ModuleList(
            nn.ModuleList(
                UltraHSTULayer(
                    dim,
                    num_heads,
                    attention_dim or dim // num_heads,
                    linear_dim or dim // num_heads,
                    dropout=dropout,
                    num_position_buckets=num_position_buckets,
                    num_time_buckets=num_time_buckets,
                )
                for _ in range(num_layers)
            )
            for _ in streams
        )
        self.norm_out = nn.LayerNorm(dim)
        self.fuse = nn.Linear(len(streams) * dim, dim) if fusion == "concat" and len(streams) > 1 else None
        self.target_mlp = TargetMLP(dim, self.embeddings.user_dim, output_dim, dropout)

    # -------------------------------------------------------------------------------- inputs

    def event_tokens(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """History tokens, per-token event index and validity.

        Returns:
            tokens (B, T·L, D), 0 at padding; event (B, T·L) the history index of each token; valid (B, T·L);
            ``T = 1`` with merged action–item tokens, 2 (item, action, item, ...) otherwise.
        """
        mask = batch.history_mask()  # (B, L)
        B, L = mask.shape
        event = torch.arange(L, device=mask.device).expand(B, L)
        if self.merge_action_item:
            return self.embeddings.history_tokens(batch), event, mask
        item, action = self._item_and_action_parts(batch)
        tokens = torch.stack([item, action], dim=2).reshape(B, 2 * L, -1) * mask.repeat_interleave(2, 1).unsqueeze(-1)
        return tokens, event.repeat_interleave(2, dim=1), mask.repeat_interleave(2, dim=1)

    def _item_and_action_parts(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(B, L, D) item part (item id + non-action channels) and action part (action channels) of each event."""
        emb = self.embeddings
        item = emb.item(batch.history_item_id)
        action = torch.zeros_like(item)
        for name, table in emb.history_sparse.items():
            part = table(batch.history_sparse[name])
            if name in self.action_channels:
                action = action + part
            else:
                item = item + part
        if emb.history_dense is not None:
            names = self.features.history_dense
            dense = symlog(torch.stack([batch.history_dense[n] for n in names], dim=-1).float())  # (B, L, C)
            is_action = torch.tensor([n in self.action_channels for n in names], device=dense.device)
            weight = emb.history_dense.weight  # (D, C)
            action = action + F.linear(dense * is_action.to(dense.dtype), weight)
            item = item + F.linear(dense * (~is_action).to(dense.dtype), weight)
        return item, action

    def stream_sequence(
        self,
        batch: Batch,
        stream_index: int,
        context: Tensor | None,
        events: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> _Sequence:
        """The stream's left-aligned ``[prefix | behaviours]`` sequence with positions and times.

        ``events`` is `event_tokens` of ``batch`` when already computed (shared by all streams).
        """
        stream = self.streams[stream_index]
        tokens, event, valid = events if events is not None else self.event_tokens(batch)  # (B, T L, D), ...
        B = tokens.shape[0]
        T = 1 if self.merge_action_item else 2
        history_ts = batch.history_ts.long()
        if stream.channel is not None:
            values = torch.tensor(stream.values, device=valid.device)
            channel = batch.history_sparse[stream.channel].long()  # (B, L)
            keep = torch.isin(channel, values).repeat_interleave(T, dim=1) & valid
        else:
            keep = valid
        cap = T * (stream.max_len or self.max_len)
        count = keep.sum(dim=1)  # (B,) kept tokens
        width = int(min(cap, keep.shape[1]))
        if stream.channel is not None or width < keep.shape[1]:
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept tokens first, in order
            start = (count - cap).clamp(min=0)  # drop the oldest beyond the stream's cap
            index = order.gather(
                1, (start.unsqueeze(1) + torch.arange(width, device=keep.device)).clamp(max=keep.shape[1] - 1)
            )
            count = count.clamp(max=cap)
            keep = torch.arange(width, device=keep.device).unsqueeze(0) < count.unsqueeze(1)
            tokens = tokens.gather(1, index.unsqueeze(-1).expand(B, width, tokens.shape[-1])) * keep.unsqueeze(-1)
            event = event.gather(1, index)
        ts = history_ts.gather(1, event) * keep
        P = self.num_context_tokens
        position = P + torch.arange(width, device=keep.device).expand(B, width)
        if P:
            tokens = torch.cat([context.to(tokens.dtype), tokens], dim=1)
            keep = torch.cat([keep.new_ones(B, P), keep], dim=1)
            ts = torch.cat([batch.ts.long().unsqueeze(1).expand(B, P), ts], dim=1)
            position = torch.cat([torch.arange(P, device=keep.device).expand(B, P), position], dim=1)
        position = position * keep
        return _Sequence(tokens, keep, position, ts, P + count, P + count)

    # -------------------------------------------------------------------------------- layers

    def _layout(self, seq: _Sequence, batch_ts: Tensor) -> SLALayout | SLAKernelLayout:
        return build_sla_layout(
            seq.position,
            seq.valid,
            seq.ts,
            seq.candidate_position,
            batch_ts,
            self.local_window if self.local_window is not None else self.max_tokens + 1,
            self.global_prefix,
            self.num_position_buckets,
            self.num_time_buckets,
            self.max_tokens,
            float(self.max_tokens + 1) if self.attention_norm == "max_len" else None,
            self.sla_block_size,
            kernel=resolve_kernel(self.kernel, seq.valid.device, "UltraHSTUEncoder"),
        )

    def truncate(self, seq: _Sequence, tokens: Tensor) -> tuple[_Sequence, Tensor]:
        """Keep the contextual prefix and the newest ``tail_len`` sequence tokens of each row (left-aligned)."""
        P, T = self.num_context_tokens, self.tail_len
        B, W = seq.valid.shape
        behaviours = seq.length - P  # (B,)
        width = min(T, W - P)
        start = P + (behaviours - T).clamp(min=0)  # (B,)
        tail = (start.unsqueeze(1) + torch.arange(width, device=tokens.device)).clamp(max=max(W - 1, 0))
        index = torch.cat([torch.arange(P, device=tokens.device).expand(B, P), tail], dim=1)  # (B, P + width)
        kept = behaviours.clamp(max=T)
        valid = torch.arange(P + width, device=tokens.device).unsqueeze(0) < (P + kept).unsqueeze(1)
        tokens = tokens.gather(1, index.unsqueeze(-1).expand(B, P + width, tokens.shape[-1]))
        tokens = tokens * valid.unsqueeze(-1).to(tokens.dtype)
        new = _Sequence(
            tokens=tokens,
            valid=valid,
            position=seq.position.gather(1, index) * valid,
            ts=seq.ts.gather(1, index) * valid,
            length=P + kept,
            candidate_position=seq.candidate_position,
        )
        return new, tokens

    def _run_layer(
        self, layer: UltraHSTULayer, x: Tensor, c: Tensor, valid: Tensor, layout: SLALayout | SLAKernelLayout
    ) -> tuple[Tensor, Tensor]:
        if self.recompute == "none" or not torch.is_grad_enabled():
            return layer(x, c, valid, layout)
        context_fn = selective_checkpoint_context if self.recompute == "selective" else noop_context_fn
        return checkpoint(layer, x, c, valid, layout, use_reentrant=False, context_fn=context_fn)

    def run_stream(
        self,
        batch: Batch,
        stream_index: int,
        e_c: Tensor,
        context: Tensor | None,
        events: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, _Sequence]:
        """One transducer: -> candidate state (B, D), last layer's sequence (B, W', D), the final `_Sequence`."""
        seq = self.stream_sequence(batch, stream_index, context, events)
        x, c = seq.tokens, e_c.unsqueeze(1).to(seq.tokens.dtype)  # (B, W, D), (B, 1, D)
        if self.position is not None:
            to_candidate = (seq.candidate_position.unsqueeze(1) - seq.position).clamp(0, self.max_tokens)
            x = x + self.position(to_candidate) * seq.valid.unsqueeze(-1).to(x.dtype)
            c = c + self.position.weight[0].to(c.dtype)
        x, c = self.dropout(x), self.dropout(c)
        layout = self._layout(seq, batch.ts.long())
        for i, layer in enumerate(self.transducers[stream_index]):
            if i == self.full_layers and self.tail_len is not None:
                seq, x = self.truncate(seq, x)
                layout = self._layout(seq, batch.ts.long())
            x, c = self._run_layer(layer, x, c, seq.valid, layout)
        return c.squeeze(1), x, seq

    def forward(self, batch: Batch) -> EncoderOutput:
        """`Batch` -> `EncoderOutput`: ``target`` (B, output_dim), ``user`` (B, D), ``sequence`` (B, L, D) or None."""
        B, L = batch.history_item_id.shape
        if self.max_len < L:
            raise ValueError(f"UltraHSTUEncoder: the batch's history width {L} exceeds features.max_len={self.max_len}")
        e_c = self.embeddings.candidate_tokens(batch)  # (B, D)
        u = self.embeddings.user_features(batch)  # (B, D_u)
        context = self.context(u).view(B, self.num_context_tokens, self.dim) if self.context is not None else None
        events = self.event_tokens(batch)  # embedded once, shared by every stream
        candidates, users, sequence = [], [], None
        for s in range(len(self.streams)):
            h_c, x, seq = self.run_stream(batch, s, e_c, context, events)
            h = self.norm_out(x) * seq.valid.unsqueeze(-1).to(x.dtype)  # (B, W', D)
            newest = (seq.length - 1).clamp(min=0)
            has_history = seq.length > self.num_context_tokens
            users.append(h[torch.arange(B, device=h.device), newest] * has_history.unsqueeze(-1).to(h.dtype))
            candidates.append(self.norm_out(h_c))
            if s == 0 and self._sequence_maps_to_history():
                sequence = h[:, self.num_context_tokens :]
        h_c = self.fuse(torch.cat(candidates, dim=-1)) if self.fuse is not None else torch.stack(candidates).sum(0)
        user = torch.stack(users).mean(dim=0)
        target = self.target_mlp(h_c, e_c, u)
        return EncoderOutput(target=target, user=user, sequence=sequence, mask=batch.history_mask())

    def _sequence_maps_to_history(self) -> bool:
        s = self.streams[0]
        no_cap = s.max_len is None or s.max_len >= self.max_len
        return s.channel is None and no_cap and self.merge_action_item and self.full_layers == len(self.transducers[0])


def _as_stream(stream: TransducerStream | dict[str, Any]) -> TransducerStream:
    return stream if isinstance(stream, TransducerStream) else TransducerStream(**stream)


def _check_stream(stream: TransducerStream, features: FeatureSpec, name: str) -> None:
    where = f"{name}: stream {stream.name!r}"
    if stream.channel is not None:
        if stream.channel not in features.history_sparse:
            raise ValueError(
                f"{where}: channel {stream.channel!r} is not an integer history channel "
                f"(history_sparse: {sorted(features.history_sparse)})"
            )
        if not stream.values:
            raise ValueError(f"{where}: channel {stream.channel!r} needs a non-empty 'values' list")
        vocab = features.history_sparse[stream.channel]
        bad = [v for v in stream.values if not 0 <= v < vocab]
        if bad:
            raise ValueError(f"{where}: values {bad} are outside the vocabulary [0, {vocab}) of {stream.channel!r}")
    elif stream.values:
        raise ValueError(f"{where}: 'values' given without a 'channel'")
    if stream.max_len is not None and stream.max_len < 1:
        raise ValueError(f"{where}: max_len must be >= 1, got {stream.max_len}")


__all__: Sequence[str] = [
    "SLA_ATTENTION_KERNELS",
    "SLALayout",
    "TransducerStream",
    "UltraHSTUEncoder",
    "UltraHSTULayer",
    "build_sla_layout",
    "selective_checkpoint_context",
    "sla_attention",
    "sla_attention_kernel",
    "sla_mask",
]
