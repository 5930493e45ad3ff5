"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., "Actions Speak Louder than Words", arXiv 2402.17152).

One HSTU layer (the paper's eqs. 1-3), on tokens ``X`` (B, N, D):

    U, V, Q, K = Split(φ1(f1(Norm(X))))                          # pointwise projection, φ1 = SiLU
    A(X) V(X)  = φ2(α Q Kᵀ + rab^{p,t}) / n · V                   # pointwise aggregated attention, φ2 = SiLU
    Y(X)       = f2(Norm(A(X) V(X)) ⊙ U(X)) + X                   # gated transformation + residual

There is **no softmax**: each key contributes ``SiLU(score)`` independently, which keeps the intensity
of a user's preferences that a softmax would normalise away. ``rab^{p,t}`` is a learned relative
attention bias on the bucketed position distance and the bucketed ``log Δt`` between query and key.

Target-aware ranking: the candidate item is one more token after the history. Histories in a
`Batch` are left-aligned (valid at ``[0, history_len[b])``); the candidate is placed at index
``history_len[b]``, right after the row's newest behaviour, so each row holds ``history_len + 1``
valid tokens followed by padding. One causal rule on the index then gives the whole mask:

    query i may attend key j  <=>  both are valid tokens and j <= i

so history token ``i`` attends to behaviours ``0..i`` only (causal; never to the candidate, whose
index is ``history_len > i``), the candidate attends to the whole valid history and to itself
(a row with an empty history: to itself only), and padded queries attend to nothing and are zeroed.
The history states are therefore independent of the candidate, which is what lets a serving system
cache the user prefix and score many candidates against it: `HSTUEncoder.encode_user_prefix` runs the
history once per user and keeps each layer's keys/values, `HSTUEncoder.forward_candidates` then runs only the
candidate tokens through the layers against them (`mtrank.serve` scores a request's candidates this way).

The attention runs either as the dense reference `hstu_attention` or as the fused Triton kernel
`encoders.kernels.hstu_attention.hstu_mha` (``kernel``: ``auto`` picks the kernel on CUDA), which
computes the same mask and relative bias inside the kernel and never stores the N×N matrix.

Choices where the paper is open (all documented on `HSTUEncoder`'s arguments):

- ``n``: by default the number of keys each query attends to (``attention_norm="num_keys"``, at
  least 1, so an empty history never divides by zero). The paper's reference code divides by the
  maximum sequence length instead (``attention_norm="max_len"``, here ``features.max_len + 1``,
  a constant, so that a sample's output does not depend on the batch's padding width). Both are
  followed by ``Norm(AV)``, which removes the overall scale; dividing short rows by a large
  constant pushes ``AV`` under the LayerNorm's ``eps`` and washes their signal out, hence the default.
- ``α = 1/sqrt(d_qk)`` scales ``QKᵀ`` as in the later generative-recommenders kernels.
- Relative attention bias per head and per layer: position distance bucketed exactly below
  ``num_position_buckets // 2`` and log-spaced up to ``features.max_len``; time bucket
  ``floor(ln(max(|Δt|, 1)) / 0.301)`` as in the paper's code, clamped to ``num_time_buckets - 1``.
  The candidate's time is the sample's ``ts``, so its Δt to a behaviour is the behaviour's age.
- The optional absolute position embedding indexes the distance to the candidate
  (``history_len - i``: the candidate 0, the newest behaviour 1, ...), so "the newest behaviour"
  means the same thing whatever the history's length.
- The candidate's representation (``EncoderOutput.target``) is a small MLP over
  ``[h_c, e_c, u, h_c ⊙ e_c]``: the candidate token's final state, its input embedding, the user
  features and their elementwise product (an explicit target-history interaction).
- A final LayerNorm on the last layer's states (as ``ln_f`` in GPT-2) before they are handed out.

Example:
    >>> encoder = HSTUEncoder(features, dim=64, num_layers=2, num_heads=2)
    >>> out = encoder(batch)      # out.target (B, 64), out.sequence (B, L, 64), out.user (B, 64)
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from encoders.base import EncoderOutput, SequenceEncoder, TargetMLP
from encoders.embeddings import FeatureEmbeddings
from mtrank.batch import Batch
from mtrank.spec import FeatureSpec

AttentionNorm = Literal["num_keys", "max_len"]

# ------------------------------------------------------------------------------------------ attention


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    mask: Tensor,
    alpha: float = 1.0,
    n: float | None = None,
) -> Tensor:
    """HSTU pointwise aggregated attention, reference implementation: ``(SiLU(α QKᵀ + bias) ⊙ mask / n) V``.

    Args:
        q: (B, H, N, d_qk) queries.
        k: (B, H, N, d_qk) keys.
        v: (B, H, N, d_v) values.
        bias: (B, H, N, N) additive relative attention bias (query i, key j), or None.
        mask: (B, N, N) bool, True where query i may attend key j.
        alpha: scale of ``QKᵀ``.
        n: normaliser: a constant, or None for the number of keys each query attends to (at least 1).

    Returns:
        (B, H, N, d_v); a query that attends to no key gets 0.
    """
    scores = alpha * torch.matmul(q, k.transpose(-1, -2))  # (B, H, N, N)
    if bias is not None:
        scores = scores + bias
    keep = mask.unsqueeze(1)  # (B, 1, N, N)
    if n is None:
        n_keys = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1, N, 1)
        attn = F.silu(scores) * keep / n_keys
    else:
        attn = F.silu(scores) * keep / n
    return torch.matmul(attn.to(v.dtype), v)  # (B, H, N, d_v)


HSTU_ATTENTION_KERNELS = ("auto", "reference", "triton")


def hstu_attention_kernel(kernel: str) -> str:
    """Check the ``kernel`` setting (the one dispatch point of HSTU attention); ValueError if unknown.

    ``reference``: `hstu_attention`, dense PyTorch (any device). ``triton``: the fused kernel
    `encoders.kernels.hstu_attention.hstu_mha` (CUDA; on the CPU only under ``TRITON_INTERPRET=1``).
    ``auto``: ``triton`` on CUDA when Triton is installed, else ``reference`` (the CPU, the interpreter).
    """
    if kernel not in HSTU_ATTENTION_KERNELS:
        raise ValueError(f"unknown HSTU attention kernel {kernel!r}; available: {list(HSTU_ATTENTION_KERNELS)}")
    return kernel


def resolve_kernel(kernel: str, device: torch.device, owner: str = "HSTU") -> str:
    """The implementation that runs for the setting ``kernel`` on ``device``: ``reference`` or ``triton``."""
    from encoders.kernels.hstu_attention import interpreting, triton_available

    if kernel == "reference":
        return "reference"
    if kernel == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) and not interpreting() else "reference"
    if not triton_available(device):
        raise RuntimeError(
            f"{owner}: kernel='triton' cannot run on {device.type}: it needs CUDA and Triton "
            "(or TRITON_INTERPRET=1 on the CPU); set kernel: auto to fall back to the reference there"
        )
    return "triton"


# ------------------------------------------------------------------------------------------ rab^{p,t}


def bucket_position_distance(distance: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """(...) int distance >= 0 -> (...) int64 bucket in ``[0, num_buckets)``.

    Exact below ``num_buckets // 2``, log-spaced from there to ``max_distance``, the last bucket
    beyond (one-sided T5 bucketing: under a causal mask a key is never after its query). When every
    distance up to ``max_distance`` fits, all are exact.
    """
    d = distance.long().clamp(min=0)
    if max_distance < num_buckets:
        return d.clamp(max=num_buckets - 1)
    exact = num_buckets // 2
    log_ratio = torch.log(d.float().clamp(min=exact) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(d < exact, d, far)


def bucket_time_delta(delta: Tensor, num_buckets: int) -> Tensor:
    """(...) int time difference -> (...) int64 bucket ``floor(ln(max(|Δt|, 1)) / 0.301)`` in ``[0, num_buckets)``.

    The bucketing of the paper's code: about 3.3 buckets per e-fold (with Δt in seconds: 1 s -> 0,
    1 h -> 27, 1 day -> 37, 1 year -> 57).
    """
    seconds = delta.abs().clamp(min=1).float()
    return (torch.log(seconds) / 0.301).long().clamp(0, num_buckets - 1)


class _BucketGather(torch.autograd.Function):
    """(K, H) table, (B, N, N) bucket index -> (B, H, N, N) ``table[index, h]``.

    The index holds millions of lookups into a table of a few thousand rows of H values. Forward is
    one scalar ``take`` per head (a row gather of H-wide rows ran 8× slower on an H100), written
    straight in the (B, H, N, N) layout the attention adds. Backward sums gradients per bucket with a
    weighted ``bincount`` per head: autograd's embedding backward sorts the indices first, which took
    a quarter of a CPU training step and 2.5× this on the H100.
    """

    @staticmethod
    def forward(ctx: Any, table: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = table.shape[0]
        return torch.stack([table[:, h].take(index) for h in range(table.shape[1])], dim=1)  # (B, H, N, N)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        flat = index.reshape(-1)
        per_head = [
            torch.bincount(flat, weights=grad[:, h].reshape(-1).float(), minlength=ctx.num_rows)
            for h in range(grad.shape[1])
        ]
        return torch.stack(per_head, dim=1).to(grad.dtype), None


class RelativeAttentionBias(nn.Module):
    """``rab^{p,t}``: learned per-head bias on bucketed position distance plus bucketed ``log Δt``.

    The two tables are added into one (position bucket × time bucket, H) table and gathered once.

    Args:
        num_heads: H.
        num_position_buckets: size of the position table, or 0 for no position bias.
        num_time_buckets: size of the time table, or 0 for no time bias.
    """

    def __init__(self, num_heads: int, num_position_buckets: int, num_time_buckets: int) -> None:
        super().__init__()
        self.position = nn.Embedding(num_position_buckets, num_heads) if num_position_buckets else None
        self.time = nn.Embedding(num_time_buckets, num_heads) if num_time_buckets else None
        for table in (self.position, self.time):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)

    def forward(self, position_bucket: Tensor | None, time_bucket: Tensor | None) -> Tensor | None:
        """(B, N, N) bucket indices (query i, key j) -> (B, H, N, N) bias, or None when both are off."""
        use_position = self.position is not None and position_bucket is not None
        use_time = self.time is not None and time_bucket is not None
        if use_position and use_time:
            table = (self.position.weight[:, None, :] + self.time.weight[None, :, :]).flatten(0, 1)  # (P·T, H)
            index = position_bucket * self.time.num_embeddings + time_bucket
        elif use_position:
            table, index = self.position.weight, position_bucket
        elif use_time:
            table, index = self.time.weight, time_bucket
        else:
            return None
        return _BucketGather.apply(table, index)  # (B, H, N, N)


# ------------------------------------------------------------------------------------------ layer


class AttentionInputs(NamedTuple):
    """What every layer's attention needs besides q, k, v, built once per forward by the encoder.

    ``kernel`` is ``reference`` (then ``mask`` and the bucket tensors are set) or ``triton`` (then
    ``lengths``, ``ts`` and ``max_distance`` are: the kernel computes mask and buckets itself).
    """

    kernel: str
    n: float | None
    lengths: Tensor | None = None  # (B,) valid tokens
    ts: Tensor | None = None  # (B, N) event times
    max_distance: int = 0
    mask: Tensor | None = None  # (B, N, N) bool
    position_bucket: Tensor | None = None  # (B, N, N)
    time_bucket: Tensor | None = None  # (B, N, N)


class HSTULayer(nn.Module):
    """One HSTU layer (eqs. 1-3; the paper's code calls it a sequential transduction unit).

    Args:
        dim: D, the token width.
        num_heads: H.
        attention_dim: d_qk, the per-head width of Q and K.
        linear_dim: d_v, the per-head width of U and V.
        dropout: dropout on ``Norm(AV) ⊙ U`` before ``f2``.
        num_position_buckets, num_time_buckets: sizes of this layer's ``rab^{p,t}`` tables (0: off).
    The attention implementation is chosen per forward by the encoder (`AttentionInputs.kernel`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention_dim: int,
        linear_dim: int,
        dropout: float = 0.0,
        num_position_buckets: int = 32,
        num_time_buckets: int = 128,
    ) -> None:
        super().__init__()
        self.num_heads, self.attention_dim, self.linear_dim = num_heads, attention_dim, linear_dim
        self.norm_x = nn.LayerNorm(dim)
        self.f1 = nn.Linear(dim, num_heads * (2 * linear_dim + 2 * attention_dim))  # -> U, V, Q, K
        self.rab = RelativeAttentionBias(num_heads, num_position_buckets, num_time_buckets)
        self.norm_av = nn.LayerNorm(num_heads * linear_dim)
        self.dropout = nn.Dropout(dropout)
        self.f2 = nn.Linear(num_heads * linear_dim, dim)

    def forward(self, x: Tensor, valid: Tensor, inputs: AttentionInputs) -> Tensor:
        """(B, N, D) tokens -> (B, N, D) tokens, 0 where ``valid`` (B, N) is False."""
        B, N, _ = x.shape
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        uvqk = F.silu(self.f1(self.norm_x(x)))  # (B, N, H * (2 dv + 2 dqk))
        u, v, q, k = uvqk.split([H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        q, k, v = q.view(B, N, H, dqk), k.view(B, N, H, dqk), v.view(B, N, H, dv)  # views, no copy
        alpha = 1.0 / math.sqrt(dqk)
        if inputs.kernel == "triton":
            from encoders.kernels.hstu_attention import hstu_mha

            position, time = self.rab.position, self.rab.time
            av = hstu_mha(
                q,
                k,
                v,
                inputs.lengths,
                alpha=alpha,
                n=inputs.n,
                ts=inputs.ts if time is not None else None,
                position_weight=position.weight if position is not None else None,
                time_weight=time.weight if time is not None else None,
                max_distance=inputs.max_distance,
            )  # (B, N, H, dv)
        else:
            bias = self.rab(inputs.position_bucket, inputs.time_bucket)  # (B, H, N, N) or None
            av = hstu_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, inputs.mask, alpha, inputs.n
            )
            av = av.transpose(1, 2)  # (B, N, H, dv)
        av = av.reshape(B, N, H * dv)
        y = self.f2(self.dropout(self.norm_av(av) * u)) + x  # (B, N, D)
        return y * valid.unsqueeze(-1).to(y.dtype)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``SiLU(f1(Norm(x)))`` split, as in `forward`: (..., D) tokens -> ``u`` (..., H·d_v), ``v`` (..., H, d_v),
        ``q`` (..., H, d_qk), ``k`` (..., H, d_qk) (views of one tensor)."""
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        uvqk = F.silu(self.f1(self.norm_x(x)))
        u, v, q, k = uvqk.split([H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        return u, v.unflatten(-1, (H, dv)), q.unflatten(-1, (H, dqk)), k.unflatten(-1, (H, dqk))

    def forward_targets(
        self, x: Tensor, keys: Tensor, values: Tensor, key_mask: Tensor, bias: Tensor | None, n: Tensor
    ) -> Tensor:
        """Target tokens against a cached prefix (serving; `HSTUEncoder.forward_candidates`): (B, C, D) -> (B, C, D).

        Each of the C target tokens of row b is a query that attends to row b's valid prefix keys and to
        itself, never to another target: exactly what the candidate token computes in `forward` (reference
        attention), with the prefix's keys/values computed once per row instead of once per candidate.

        Args:
            x: (B, C, D) target tokens (this layer's input).
            keys: (B, H, L, d_qk) this layer's keys of the prefix tokens.
            values: (B, H, L, d_v) this layer's values of the prefix tokens.
            key_mask: (B, L) bool valid prefix keys.
            bias: (B, H, 1 or C, L + 1) relative attention bias of a target to each prefix key and, in the
                last column, to itself; or None.
            n: (B,) float normaliser of each row's attention.
        """
        B, C, _ = x.shape
        u, v, q, k = self.project(x)  # (B, C, H·dv), (B, C, H, dv), (B, C, H, dqk) x 2
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, C, d)
        alpha = 1.0 / math.sqrt(self.attention_dim)
        scores = alpha * torch.matmul(q, keys.transpose(-1, -2))  # (B, H, C, L)
        own = alpha * (q * k).sum(-1, keepdim=True)  # (B, H, C, 1): each target's score on its own key
        if bias is not None:
            scores, own = scores + bias[..., :-1], own + bias[..., -1:]
        scale = n.to(scores.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        attn = F.silu(scores) * key_mask[:, None, None, :] / scale  # (B, H, C, L)
        av = torch.matmul(attn.to(values.dtype), values) + (F.silu(own) / scale).to(v.dtype) * v  # (B, H, C, dv)
        av = av.transpose(1, 2).reshape(B, C, self.num_heads * self.linear_dim)
        return self.f2(self.dropout(self.norm_av(av) * u)) + x


# ------------------------------------------------------------------------------------------ serving cache


class HSTUPrefixCache(NamedTuple):
    """The candidate-free part of HSTU for a batch of users (`HSTUEncoder.encode_user_prefix`).

    Causal attention with the candidate after the history makes every history state independent of the
    candidate, so per layer the history's keys and values, and the candidate's relative bias to each history
    position (it depends only on the distance ``history_len - j`` and the age ``ts - history_ts[j]``), are
    computed once per user and reused for every candidate (`HSTUEncoder.forward_candidates`).

    Attributes:
        keys: per layer, (B, H, L, d_qk) the keys of the history tokens (that layer's input).
        values: per layer, (B, H, L, d_v) their values.
        bias: per layer, (B, H, 1, L + 1) the relative attention bias of the candidate (at index
            ``history_len``, time ``ts``) to each history position and, in the last column, to itself;
            None when the layers have no relative bias.
        key_mask: (B, L) bool valid history positions.
        n: (B,) float32 the candidate's attention normaliser (``history_len + 1`` or ``max_len + 1``).
        user: (B, D) the final state of the newest valid behaviour (0 for an empty history), as in `forward`.
        sequence: (B, L, D) the last layer's history states after the output norm, 0 at padding.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    bias: tuple[Tensor | None, ...]
    key_mask: Tensor
    n: Tensor
    user: Tensor
    sequence: Tensor


# ------------------------------------------------------------------------------------------ encoder


class HSTUEncoder(SequenceEncoder):
    """HSTU over the user's history with the candidate as a target-aware last token.

    Args:
        features: the feature spec (vocabularies and ``max_len``).
        dim: D, the token width.
        num_layers: number of HSTU layers.
        num_heads: H, attention heads per layer.
        attention_dim: d_qk per head (default ``dim // num_heads``).
        linear_dim: d_v per head, the width of U and V (default ``dim // num_heads``).
        dropout: on the input tokens, inside each layer and in the target MLP.
        position_embedding: add a learned absolute position embedding (indexed by distance to the candidate).
        num_position_buckets: relative position bias buckets (0: no position bias).
        num_time_buckets: relative time bias buckets on ``log Δt`` (0: no time bias).
        attention_norm: ``n`` of the attention: ``num_keys`` (keys each query attends to) or
            ``max_len`` (the constant ``features.max_len + 1``, the paper's code).
        kernel: the attention implementation: ``auto`` (the fused Triton kernel on CUDA, the reference
            elsewhere), ``reference`` (dense PyTorch) or ``triton`` (see `hstu_attention_kernel`).
        activation_checkpointing: recompute each layer's activations in the backward pass
            (``torch.utils.checkpoint``, non-reentrant) to trade compute for memory.
        output_dim: width of ``EncoderOutput.target``.
        user_dim: width of the user features (default ``dim``).

    Output (`EncoderOutput`): ``target`` (B, output_dim); ``user`` (B, D) the state at the newest
    valid history position (0 for an empty history); ``sequence`` (B, L, D) the last layer's states
    (0 at padding); ``mask`` (B, L) valid history positions.
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
        position_embedding: bool = True,
        num_position_buckets: int = 32,
        num_time_buckets: int = 128,
        attention_norm: AttentionNorm = "num_keys",
        kernel: str = "auto",
        activation_checkpointing: bool = False,
        output_dim: int = 64,
        user_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads and (attention_dim is None or linear_dim is None):
            raise ValueError(
                f"HSTUEncoder: dim={dim} is not divisible by num_heads={num_heads}; set attention_dim and linear_dim"
            )
        if attention_norm not in ("num_keys", "max_len"):
            raise ValueError(f"HSTUEncoder: attention_norm must be 'num_keys' or 'max_len', got {attention_norm!r}")
        hstu_attention_kernel(kernel)  # refuse an unknown kernel here, with the list of known ones
        self.features = features
        self.dim = dim
        self.output_dim = output_dim
        self.max_len = features.max_len
        self.num_position_buckets = num_position_buckets
        self.num_time_buckets = num_time_buckets
        self.attention_norm = attention_norm
        self.kernel = kernel
        self.activation_checkpointing = activation_checkpointing

        self.embeddings = FeatureEmbeddings(features, dim, user_dim)
        self.position = nn.Embedding(features.max_len + 1, dim) if position_embedding else None
        if self.position is not None:
            nn.init.normal_(self.position.weight, std=1.0 / math.sqrt(dim))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            HSTULayer(
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
        self.norm_out = nn.LayerNorm(dim)
        self.target_mlp = TargetMLP(dim, self.embeddings.user_dim, output_dim, dropout)

    def attention_inputs(self, lengths: Tensor, ts: Tensor, valid: Tensor) -> AttentionInputs:
        """The layers' `AttentionInputs` for tokens ``[history | candidate | padding]``: causal on the index.

        Args:
            lengths: (B,) valid tokens per row (history + 1).
            ts: (B, N) event times (the candidate's: the request time).
            valid: (B, N) bool, ``index < lengths``.
        """
        n = float(self.max_len + 1) if self.attention_norm == "max_len" else None
        kernel = resolve_kernel(self.kernel, ts.device, "HSTUEncoder")
        if kernel == "triton":
            return AttentionInputs(kernel, n, lengths=lengths, ts=ts, max_distance=self.max_len)
        N = ts.shape[1]
        index = torch.arange(N, device=ts.device)
        mask = valid.unsqueeze(2) & valid.unsqueeze(1) & (index[None, :] <= index[:, None]).unsqueeze(0)  # (B, N, N)
        position_bucket = time_bucket = None
        if self.num_position_buckets:
            distance = (index[:, None] - index[None, :]).expand(ts.shape[0], N, N)  # (B, N, N)
            position_bucket = bucket_position_distance(distance, self.num_position_buckets, self.max_len)
        if self.num_time_buckets:
            time_bucket = bucket_time_delta(ts.unsqueeze(2) - ts.unsqueeze(1), self.num_time_buckets)  # (B, N, N)
        return AttentionInputs(kernel, n, mask=mask, position_bucket=position_bucket, time_bucket=time_bucket)

    def forward(self, batch: Batch) -> EncoderOutput:
        """`Batch` -> `EncoderOutput` (see the class docstring for the shapes)."""
        B, L = batch.history_item_id.shape
        if self.max_len < L:
            raise ValueError(f"HSTUEncoder: the batch's history width {L} exceeds features.max_len={self.max_len}")
        history_len = batch.history_len.long()  # (B,)
        history_mask = batch.history_mask()  # (B, L)

        e_c = self.embeddings.candidate_tokens(batch)  # (B, D)
        # N = L + 1 tokens: the history, the candidate right after the newest behaviour (index history_len), padding
        N = L + 1
        index = torch.arange(N, device=e_c.device).expand(B, N)
        is_candidate = index == history_len.unsqueeze(1)  # (B, N)
        valid = index <= history_len.unsqueeze(1)  # (B, N)
        history = torch.cat([self.embeddings.history_tokens(batch), e_c.new_zeros(B, 1, e_c.shape[-1])], dim=1)
        x = torch.where(is_candidate.unsqueeze(-1), e_c.unsqueeze(1).to(history.dtype), history)  # (B, N, D)
        if self.position is not None:
            to_candidate = (history_len.unsqueeze(1) - index).clamp(0, self.max_len)  # (B, N): candidate 0, newest 1
            x = x + self.position(to_candidate) * valid.unsqueeze(-1).to(x.dtype)
        x = self.dropout(x)
        ts = torch.cat([batch.history_ts.long(), batch.ts.long().unsqueeze(1)], dim=1)  # (B, N)
        ts = torch.where(is_candidate, batch.ts.long().unsqueeze(1), ts)
        inputs = self.attention_inputs(history_len + 1, ts, valid)

        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, valid, inputs, use_reentrant=False)
            else:
                x = layer(x, valid, inputs)

        h = self.norm_out(x) * valid.unsqueeze(-1).to(x.dtype)  # (B, N, D)
        rows = torch.arange(B, device=h.device)
        sequence = h[:, :L] * history_mask.unsqueeze(-1).to(h.dtype)  # (B, L, D): the candidate's slot zeroed
        h_c = h[rows, history_len]  # (B, D)
        newest = (history_len - 1).clamp(min=0)  # (B,)
        user = h[rows, newest] * (history_len > 0).unsqueeze(-1).to(h.dtype)  # (B, D)
        u = self.embeddings.user_features(batch)  # (B, D_u)
        target = self.target_mlp(h_c, e_c, u)  # (B, output_dim)
        return EncoderOutput(target=target, user=user, sequence=sequence, mask=history_mask)

    # -------------------------------------------------------------------------------- serving: prefix cache

    def encode_user_prefix(self, batch: Batch) -> HSTUPrefixCache:
        """The candidate-free part of `forward`, once per user: the history run through every layer.

        Reads only the history columns, ``history_len`` and ``ts`` (the request time, the candidate's time in
        the time bias), never the candidate. The history tokens are run alone (N = L, causal, with the same
        position embedding ``history_len - i``, relative bias and normaliser as in `forward`, where no history
        token attends to the candidate), keeping each layer's keys and values of the history tokens.
        The attention of this pass uses the encoder's ``kernel`` (the Triton kernel on CUDA under ``auto``).

        Args:
            batch: B users (one row each); its item fields are not read.

        Returns:
            `HSTUPrefixCache` with B rows, for `forward_candidates`.
        """
        B, L = batch.history_item_id.shape
        if self.max_len < L:
            raise ValueError(f"HSTUEncoder: the batch's history width {L} exceeds features.max_len={self.max_len}")
        history_len = batch.history_len.long()  # (B,)
        history_mask = batch.history_mask()  # (B, L)
        x = self.embeddings.history_tokens(batch)  # (B, L, D), 0 at padding
        index = torch.arange(L, device=x.device)
        if self.position is not None:
            to_candidate = (history_len.unsqueeze(1) - index).clamp(0, self.max_len)  # (B, L): newest 1
            x = x + self.position(to_candidate) * history_mask.unsqueeze(-1).to(x.dtype)
        x = self.dropout(x)
        history_ts = batch.history_ts.long()  # (B, L)
        keys: list[Tensor] = []
        values: list[Tensor] = []
        if L > 0:
            inputs = self.attention_inputs(history_len, history_ts, history_mask)
        for layer in self.layers:
            _, v, _, k = layer.project(x)  # (B, L, H, d)
            keys.append(k.transpose(1, 2))  # (B, H, L, d_qk)
            values.append(v.transpose(1, 2))  # (B, H, L, d_v)
            if L > 0:
                x = layer(x, history_mask, inputs)
        h = self.norm_out(x) * history_mask.unsqueeze(-1).to(x.dtype)  # (B, L, D)
        newest = (history_len - 1).clamp(min=0)
        rows = torch.arange(B, device=h.device)
        user = h[rows, newest] if L > 0 else h.new_zeros(B, h.shape[-1])
        user = user * (history_len > 0).unsqueeze(-1).to(h.dtype)  # (B, D)

        # the candidate (index history_len, time ts) to each history key j, then (last column) to itself
        zero = history_len.new_zeros(B, 1)
        position_bucket = time_bucket = None
        if self.num_position_buckets:
            distance = torch.cat([history_len.unsqueeze(1) - index, zero], dim=1)  # (B, L + 1)
            position_bucket = bucket_position_distance(distance, self.num_position_buckets, self.max_len)
            position_bucket = position_bucket.unsqueeze(1)  # (B, 1, L + 1)
        if self.num_time_buckets:
            delta = torch.cat([batch.ts.long().unsqueeze(1) - history_ts, zero], dim=1)  # (B, L + 1)
            time_bucket = bucket_time_delta(delta, self.num_time_buckets).unsqueeze(1)  # (B, 1, L + 1)
        bias = tuple(layer.rab(position_bucket, time_bucket) for layer in self.layers)  # (B, H, 1, L + 1) or None
        if self.attention_norm == "max_len":
            n = torch.full((B,), float(self.max_len + 1), device=h.device)
        else:
            n = (history_len + 1).float()
        return HSTUPrefixCache(tuple(keys), tuple(values), bias, history_mask, n, user, h)

    def forward_candidates(self, batch: Batch, cache: HSTUPrefixCache) -> EncoderOutput:
        """Score candidates against `encode_user_prefix`'s cache: what `forward` gives for each (user, candidate).

        The rows of ``batch`` are ``B · C`` (user, candidate) pairs, user-major: row ``b · C + c`` is candidate
        ``c`` of the cache's user ``b``. Per layer, the C candidate tokens of a user attend to that user's cached
        history keys/values and to themselves (`HSTULayer.forward_targets`, reference attention), with the same
        position embedding (distance 0), relative bias and normaliser as the candidate token of `forward`.

        Args:
            batch: ``B · C`` rows; reads the candidate fields (``item_id``, ``item_sparse``, ``item_dense``) and
                the user fields (``user_id``, ``user_sparse``, ``user_dense``); the history fields are not read.
            cache: `encode_user_prefix` of the B users.

        Returns:
            `EncoderOutput` with ``B · C`` rows: ``target`` (B·C, output_dim); ``user`` (B·C, D) the cache's user
            state of each row's user; ``sequence`` and ``mask`` None (per user in ``cache``, not repeated per row).
        """
        B = cache.n.shape[0]
        rows = batch.batch_size
        if B == 0 or rows % B:
            raise ValueError(f"HSTUEncoder.forward_candidates: {rows} batch rows are not a multiple of the cache's {B}")
        C = rows // B
        e_c = self.embeddings.candidate_tokens(batch)  # (B·C, D)
        x = e_c
        if self.position is not None:
            x = x + self.position.weight[0].to(x.dtype)  # distance to the candidate: 0
        x = self.dropout(x).reshape(B, C, -1)
        for layer, keys, values, bias in zip(self.layers, cache.keys, cache.values, cache.bias, strict=True):
            x = layer.forward_targets(x, keys, values, cache.key_mask, bias, cache.n)
        h_c = self.norm_out(x).reshape(rows, -1)  # (B·C, D)
        u = self.embeddings.user_features(batch)  # (B·C, D_u)
        target = self.target_mlp(h_c, e_c, u)
        user = cache.user.unsqueeze(1).expand(B, C, cache.user.shape[-1]).reshape(rows, -1)
        return EncoderOutput(target=target, user=user, sequence=None, mask=None)
