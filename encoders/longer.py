"""LONGER: long-sequence transformer encoder (ByteDance, "LONGER: Scaling Up Long Sequence Modeling in
Industrial Recommenders", arXiv 2505.04421), plain PyTorch.

Pipeline, on a `Batch` with ``B`` rows and a left-aligned history of padded width ``L``:

1. **Behaviour tokens** (B, L, D): `FeatureEmbeddings.history_tokens` (item + side channels) plus a
   learned position embedding indexed by the distance to the candidate (``history_len - i``: the
   newest behaviour 1, ...) plus a learned embedding of the behaviour's age ``ts - history_ts``
   bucketed as in HSTU (`bucket_time_delta`). Exactly 0 at padding.
2. **Token merge** (K = ``merge_k``): group ``g`` covers behaviours ``[gK, gK + K)`` (groups are
   aligned to the *oldest* behaviour, so a group's content never depends on the padding width and
   only the newest group of a row can be partial). Each group runs through an **InnerTransformer**
   (``inner_layers`` pre-LN softmax self-attention + MLP blocks, attention within the group only,
   padded slots masked as keys, plus a learned within-group position embedding); the K outputs, with
   padded slots zeroed, are concatenated and projected ``K·D -> D`` (concat keeps the order inside the
   group, which mean pooling would lose). The merged token is a *residual* merge (see "Choices"):

       merged_g = mean(valid behaviour tokens of g) + γ ⊙ LayerNorm(W_merge · concat(InnerTransformer(g)))

   with ``γ`` a learned per-channel gain starting at ``MERGE_GATE_INIT``. A group is valid iff it holds
   at least one valid behaviour, so a row has ``m_b = ceil(history_len[b] / K)`` merged tokens of the
   ``M = ceil(L / K)``. ``K = 1`` is merging off, exactly: no InnerTransformer is built and the merged
   tokens *are* the behaviour tokens.
3. **Global tokens** (B, G, D), ``G = 2 + num_learned_global_tokens``, in this order: the candidate
   item (`FeatureEmbeddings.candidate_tokens`), a user token (the user features projected to D), and
   the learned tokens. They are the attention anchors.
4. **Hybrid attention**: layer 1 is cross-attention whose queries are the global tokens plus the most
   recent ``k = num_recent_queries`` merged tokens (per row: merged positions
   ``max(0, m_b - k) .. m_b - 1``, gathered, masked where ``m_b < k``) and whose keys/values are the
   global tokens plus the *whole* merged sequence; layers 2.. are self-attention among those
   ``G + k`` queries only. Every layer is a standard pre-LN transformer block: masked softmax attention
   (`longer_attention`, see "Attention kernels"), residual, GELU MLP, residual. Layer 1's projections
   start as the identity (see "Choices").
5. **Output**: a final LayerNorm; ``target`` = MLP over ``[h_c, e_c, u, h_c ⊙ e_c]`` as in
   `HSTUEncoder` (the candidate global token's final state, the candidate embedding, the user
   features, the product); ``user`` = the user global token's final state.

The attention mask (query q, key j), on merged positions for sequence tokens:

    q may attend j  <=>  j is valid
                         and j is not the candidate
                         and (q or j is a global token  or  position(j) <= position(q))

So sequence tokens are causal among themselves (merged position ``i`` sees ``j <= i``) and see the
global tokens; the global tokens see every valid sequence token; an empty history leaves the globals
attending to the (non-candidate) globals only; the user token is always a key, so every query has one.

**The candidate token is a query, never a key** (not even its own; choice, the paper's figure does
not spell it out): no token attends to the candidate. Everything except the candidate's own state
is therefore candidate-free: ``EncoderOutput.user`` keeps its contract (a candidate-free user
summary), and at serving time not only layer 1's sequence K/V but every non-candidate state can be
computed once per request and reused for all candidates. The candidate attends to everything else
in every layer, which is what makes the model target-aware; its own embedding is already in its
residual stream, so attending to itself adds nothing, and with a similarity start (below) its own
key would score highest and soak up its attention (a sink that kept the history from being used).

Choices where the paper is silent, and why (quick start: ``configs/longer.yaml``, val click AUC;
the planted signal is the match between the candidate's category and the history's categories):

- **Residual token merge.** A plain ``W_merge · concat(...)`` merge (the first version here) learned
  nothing from the history (val AUC 0.626 = a model without history, K = 2 or 4, also after 4
  epochs): within ~10 Adam steps the merged tokens collapsed onto one shared vector (mean pairwise
  cosine of LN(merged) 0.33 at init, 0.93 after 12 steps, 0.99 after 25; norm 2 -> 28, almost all of
  it common to every token), so LayerNorm left no content in layer 1's keys/values. Cause: the
  behaviour tokens share a large token-independent part (the ``view`` action and age-bucket
  embeddings, the inner MLP's GELU mean), and Adam moves each weight by about ``lr`` per step, so a
  gradient that is the same for every token (early on: the heads' calibration) moves the output of
  a fan-in ``K·D`` projection by ``lr · ‖shared input‖₁`` per step, ~25× what an embedding row can
  move. The mean path carries the group's content in the candidate's own embedding space from the
  first step and cannot be collapsed faster than the embeddings; the InnerTransformer summary is
  LayerNormed (bounded) and enters through ``γ``, which moves like an embedding, so it refines the
  token without being able to drown it. ``K = 1`` builds none of it.
- **Layer 1 starts as similarity attention.** Query, key, value and output projections of the
  cross-attention are initialised to the identity (the other layers use PyTorch's default). From
  random projections the candidate's attention never found the matching behaviours at K = 4 (the
  attention it gave groups holding its category stayed at 1.0× that of other groups, even with
  the merge fixed: AUC 0.64); with the identity start it scores behaviours by their dot product
  with itself (shared item and category tables) and reads their embeddings out in ``e_c``'s space,
  where `TargetMLP`'s ``h_c ⊙ e_c`` compares them with the candidate directly; training then
  sharpens this (attention ratio 4-10× on matching groups, AUC 0.75-0.78 over 3 seeds).

**KV-cache split**: `LongerEncoder.encode_user_sequence` computes the candidate-free part (merged
states, their mask and layer 1's keys/values of the whole merged sequence, the O(M) part), and
`LongerEncoder.forward_from_cache` the rest (global tokens, recent-query gather, layers, output
MLP, all O(G + k)); `forward` is exactly the two in turn. To score C candidates of one user, repeat
the cache's rows C times (``expand`` is free) instead of re-encoding the sequence.

**Attention kernels** (``kernel``, one setting for every block, main and inner; `LONGER_ATTENTION_KERNELS`):
every mask is a `LongerMask`, the rule above as per-token tensors (key validity, key and query
positions: global keys at -1, global queries after every sequence position, the candidate an invalid
key), from which each kernel takes what it needs:

- ``"reference"``: ``softmax(QKᵀ/sqrt(d), masked keys -inf) V`` spelled out in float32 (autocast off,
  result cast back); a query with no allowed key gets 0 (none occurs here: the user token is always a
  key and an all-padding merge group attends its own zero slots).
- ``"sdpa"``: `F.scaled_dot_product_attention` with the dense (B, Q, N) mask, cuDNN's backend excluded
  on CUDA (it fails on these masks in bf16); fully masked rows give 0 on CPU too (torch 2.13). No layer
  can drop its mask exactly: the candidate's key column is masked in every main layer and the
  sequence queries are causal with the globals in front (not ``is_causal``'s pattern); the inner
  transformer needs its key-padding mask for the newest, partial group of each row.
- ``"flex"``: FlexAttention (`torch.compile`-d once per process on CUDA; eager, forward only, on CPU)
  with a `BlockMask` from the same rule: main layers' ``mask_mod`` reads key validity and positions
  (blocks of padding keys are skipped); the InnerTransformer runs each row's ``M`` groups as one
  block-diagonal sequence of ``M·K`` tokens (a free view of the per-group layout) with a block mask
  computed from the group size, not from a dense mask. Rows with no allowed key give 0.
- ``"auto"`` (default): per call, from the tensors' device, `AUTO_KERNEL` (``"sdpa"`` on CUDA and CPU
  until measured on the GPU).

bf16: everything runs under ``torch.autocast``; ``activation_checkpointing`` recomputes every block
(inner and main) in the backward pass (``torch.utils.checkpoint``, non-reentrant).

Example:
    >>> encoder = LongerEncoder(features, dim=64, num_layers=2, num_heads=2, merge_k=4, num_recent_queries=32)
    >>> out = encoder(batch)      # out.target (B, 64), out.user (B, 64), out.mask (B, L)
    >>> cache = encoder.encode_user_sequence(batch)
    >>> out = encoder.forward_from_cache(batch, cache)   # the same
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from encoders.base import EncoderOutput, SequenceEncoder, TargetMLP
from encoders.embeddings import FeatureEmbeddings
from encoders.hstu import bucket_time_delta
from mtrank.batch import Batch
from mtrank.spec import FeatureSpec

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5: kernel="flex" is refused with a clear error
    BlockMask = create_block_mask = flex_attention = None

_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# ------------------------------------------------------------------------------------------ attention kernels

LONGER_ATTENTION_KERNELS = ("auto", "reference", "sdpa", "flex")
AUTO_KERNEL = {"cuda": "sdpa", "cpu": "sdpa"}  # what "auto" runs, by device type (others: "sdpa"); to be measured
FLEX_BLOCK_SIZE = 128  # FlexAttention's sparse block (its default): the unit of the grouped layout's block mask

_compiled_flex: dict[str, Callable[..., Tensor]] = {}  # torch.compile-d `_FLEX_CALLS`, built on first use


class LongerMask:
    """Which keys each query may attend, as a rule on per-token tensors that every kernel can use.

    Query ``q`` of attention row ``b`` may attend key ``j`` iff

        key_valid[b, j]  and  key_pos[b, j] <= query_pos[b, q]        (positions None: key_valid alone)

    LONGER's main layers give global keys position -1 (every query sees them), global queries position
    ``M`` (they see every valid key) and sequence tokens their merged position (causal among themselves);
    the candidate is an invalid key. The InnerTransformer has no positions: its rows are the merge groups,
    ``groups`` consecutive rows per sample, each attending its own valid slots.

    `dense` is the (B, Q, N) boolean mask (for "reference" and "sdpa"), `block_mask` FlexAttention's
    `BlockMask` of the same rule; both are built once per mask and shared by the layers that use it.

    Args:
        key_valid: (B, N) bool.
        key_pos: (B, N) int positions of the keys, or None (then ``query_pos`` is None too).
        query_pos: (B, Q) int positions of the queries, or None.
        groups: with ``key_pos`` None and Q = N: the B rows are ``B / groups`` samples of ``groups``
            independent rows each, which a kernel may lay side by side as one block-diagonal sequence of
            length ``groups · N`` per sample (what "flex" does); None: no such structure.
    """

    def __init__(
        self,
        key_valid: Tensor,
        key_pos: Tensor | None = None,
        query_pos: Tensor | None = None,
        groups: int | None = None,
    ) -> None:
        if (key_pos is None) != (query_pos is None):
            raise ValueError("LongerMask: key_pos and query_pos are both given or both None")
        if groups is not None and (key_pos is not None or groups < 1 or key_valid.shape[0] % groups):
            raise ValueError(f"LongerMask: groups={groups} needs no positions and divide the {key_valid.shape[0]} rows")
        self.key_valid, self.key_pos, self.query_pos, self.groups = key_valid, key_pos, query_pos, groups
        self._dense: dict[int, Tensor] = {}
        self._block_masks: dict[tuple[int, int, int], BlockMask] = {}

    def dense(self, num_queries: int) -> Tensor:
        """(B, Q, N) bool mask, ``Q = num_queries`` (an expanded view when there are no positions)."""
        if num_queries not in self._dense:
            B, N = self.key_valid.shape
            if self.query_pos is None:
                mask = self.key_valid.unsqueeze(1).expand(B, num_queries, N)
            else:
                if self.query_pos.shape[1] != num_queries:
                    raise ValueError(f"LongerMask: {self.query_pos.shape[1]} query positions, {num_queries} queries")
                mask = self.key_valid.unsqueeze(1) & (self.key_pos.unsqueeze(1) <= self.query_pos.unsqueeze(2))
            self._dense[num_queries] = mask
        return self._dense[num_queries]

    def block_mask(self, batch: int, num_queries: int, num_keys: int) -> BlockMask:
        """FlexAttention `BlockMask` of the rule for FlexAttention inputs of batch ``batch`` with ``num_queries``
        queries and ``num_keys`` keys (grouped: ``B / groups`` samples of ``groups · N`` tokens)."""
        key = (batch, num_queries, num_keys)
        if key not in self._block_masks:
            key_valid, key_pos, query_pos = self.key_valid, self.key_pos, self.query_pos
            if self.groups is not None:
                group = key_valid.shape[1]
                self._block_masks[key] = _grouped_block_mask(key_valid.reshape(batch, num_keys), group)
            else:
                if key_pos is None:

                    def mask_mod(b: Tensor, h: Tensor, q: Tensor, j: Tensor) -> Tensor:
                        return key_valid[b, j]

                else:

                    def mask_mod(b: Tensor, h: Tensor, q: Tensor, j: Tensor) -> Tensor:
                        return key_valid[b, j] & (key_pos[b, j] <= query_pos[b, q])

                self._block_masks[key] = create_block_mask(
                    mask_mod, batch, None, num_queries, num_keys, device=key_valid.device
                )
        return self._block_masks[key]


def _grouped_block_mask(key_valid: Tensor, group: int) -> BlockMask:
    """`BlockMask` of block-diagonal attention: (S, T) valid keys, ``T = groups · group``; position ``q`` may
    attend ``j`` iff both are in the same group of ``group`` consecutive positions and ``key_valid[s, j]``.

    The block structure does not depend on the sample (one, broadcast over S) and is computed, not evaluated
    from a dense (S, T, T) mask: query block ``i`` spans groups ``g0 .. g1``, whose keys lie in the key blocks
    ``g0·K // 128 .. (min((g1 + 1)·K, T) - 1) // 128``; every block listed is partial (``mask_mod`` applies).
    """
    T = key_valid.shape[1]
    size, device = FLEX_BLOCK_SIZE, key_valid.device
    first_q = torch.arange(0, T, size, device=device)  # (nb,) first position of each query block
    last_q = (first_q + size).clamp(max=T) - 1
    first = first_q // group * group // size  # (nb,) first and last key block of its groups
    last = (((last_q // group + 1) * group).clamp(max=T) - 1) // size
    kv_num_blocks = (last - first + 1).to(torch.int32)  # (nb,)
    # (nb, nb): the key blocks in ascending order, entries past kv_num_blocks unread
    kv_indices = torch.minimum(first.unsqueeze(1) + torch.arange(len(first_q), device=device), last.unsqueeze(1))

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, j: Tensor) -> Tensor:
        return (q // group == j // group) & key_valid[b, j]

    return BlockMask.from_kv_blocks(
        kv_num_blocks[None, None],
        kv_indices.to(torch.int32)[None, None],
        BLOCK_SIZE=size,
        mask_mod=mask_mod,
        seq_lengths=(T, T),
    )


def _reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """``softmax(QKᵀ/sqrt(d), masked) V`` spelled out, in float32 at least (autocast off), returned in q's
    dtype; rows with no allowed key give 0."""
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Q, N)
        if mask is not None:
            allowed = mask.unsqueeze(1)  # (B, 1, Q, N)
            any_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, Q, 1)
            # -inf on masked keys; a row with none allowed gets finite scores (no NaN, no NaN gradient) and weight 0
            scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~any_key, 0.0)
            weights = scores.softmax(dim=-1).masked_fill(~any_key, 0.0)
        else:
            weights = scores.softmax(dim=-1)
        return (weights @ v.to(dtype)).to(q.dtype)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """`F.scaled_dot_product_attention`; on CUDA without cuDNN's kernel, which fails on these masks in bf16
    (torch 2.11, H100: ``mha_graph.execute`` is not good). Without a mask FlashAttention can be chosen."""
    attn_mask = None if mask is None else mask.unsqueeze(1)
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


# One call site (code object) per kind of mask: torch.compile keeps its compiled variants per code object,
# at most `torch._dynamo.config.recompile_limit` (8) each, and every mask_mod, dtype, grad mode and the
# switch to dynamic shapes is a variant; one shared call site ran out of them in a mixed fp32/bf16 session.
def _flex_rule(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask | None) -> Tensor:
    return flex_attention(q, k, v, block_mask=block_mask)


def _flex_grouped(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    return flex_attention(q, k, v, block_mask=block_mask)


def _flex_dense(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    return flex_attention(q, k, v, block_mask=block_mask)


_FLEX_CALLS = {"rule": _flex_rule, "grouped": _flex_grouped, "dense": _flex_dense}


def _flex_function(device: torch.device, kind: str) -> Callable[..., Tensor]:
    """The FlexAttention call for masks of ``kind`` (`_FLEX_CALLS`): `torch.compile`-d on CUDA (once per
    process), eager elsewhere (CPU: the unfused reference implementation, forward only)."""
    call = _FLEX_CALLS[kind]
    if device.type != "cuda":
        return call
    if kind not in _compiled_flex:
        _compiled_flex[kind] = torch.compile(call)
    return _compiled_flex[kind]


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | LongerMask | None) -> Tensor:
    """FlexAttention with a `BlockMask` of the same rule; rows with no allowed key give 0 (FlexAttention's
    own convention). A grouped `LongerMask` runs as one block-diagonal sequence per sample."""
    _require_flex()
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError(
            "LONGER attention kernel='flex': FlexAttention has no backward pass on CPU (forward only, unfused); "
            "train on CUDA or use kernel='sdpa' / 'reference'"
        )
    if q.device.type == "cpu":  # no gradient wanted (checked above); FlexAttention refuses inputs requiring one
        q, k, v = q.detach(), k.detach(), v.detach()
    B, H, Q, _ = q.shape
    N = k.shape[2]
    if q.numel() == 0 or N == 0:  # FlexAttention needs non-empty inputs; the reference's answer (zeros) is exact
        return _reference_attention(q, k, v, None if mask is None else _dense(mask, Q))
    grouped = isinstance(mask, LongerMask) and mask.groups is not None
    if grouped and Q != N:
        raise ValueError(f"LONGER attention: a grouped LongerMask needs as many queries as keys, got {Q} and {N}")
    kind = "grouped" if grouped else "dense" if isinstance(mask, Tensor) else "rule"
    if grouped:  # (S·G, H, K, d) -> (S, H, G·K, d): free views of the blocks' (rows, K, H, d) layouts
        S, G = B // mask.groups, mask.groups
        q, k, v = (t.transpose(1, 2).reshape(S, G * t.shape[2], H, t.shape[3]).transpose(1, 2) for t in (q, k, v))
        block_mask = mask.block_mask(S, G * Q, G * N)
    elif isinstance(mask, LongerMask):
        # one memory layout for cross- (concatenated, contiguous K/V) and self-attention (views of the
        # projection): each layout is a compiled variant of its own; the self-attention copies are O(G + k)
        k, v = k.contiguous(), v.contiguous()
        block_mask = mask.block_mask(B, Q, N)
    elif mask is not None:
        dense = mask.expand(B, Q, N)

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, j: Tensor) -> Tensor:
            return dense[b, qi, j]

        block_mask = create_block_mask(mask_mod, B, None, Q, N, device=q.device)
    else:
        block_mask = None
    with torch.autocast(q.device.type, enabled=False), warnings.catch_warnings():
        # eager flex (CPU) warns that it materialises the scores: expected, it is the test/debug path here
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = _flex_function(q.device, kind)(q, k, v, block_mask)
    if grouped:
        out = out.transpose(1, 2).reshape(B, Q, H, v.shape[3]).transpose(1, 2)
    return out


def _dense(mask: Tensor | LongerMask, num_queries: int) -> Tensor:
    return mask.dense(num_queries) if isinstance(mask, LongerMask) else mask


def _require_flex() -> None:
    if flex_attention is None:
        raise RuntimeError(
            f"LONGER attention kernel='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); "
            f"this is torch {torch.__version__}: use kernel='sdpa' or 'reference'"
        )


def longer_attention_kernel(kernel: str, device: torch.device | str) -> str:
    """The kernel that runs for setting ``kernel`` on ``device``: "auto" is `AUTO_KERNEL` of the device type
    ("sdpa" on CUDA and CPU for now); ValueError for an unknown setting."""
    if kernel not in LONGER_ATTENTION_KERNELS:
        raise ValueError(f"LONGER attention: unknown kernel={kernel!r}; allowed: {', '.join(LONGER_ATTENTION_KERNELS)}")
    if kernel == "auto":
        return AUTO_KERNEL.get(torch.device(device).type, "sdpa")
    return kernel


def longer_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | LongerMask | None = None, kernel: str = "auto"
) -> Tensor:
    """Softmax attention ``softmax(QKᵀ/sqrt(d), masked) V``; rows with no allowed key give 0 ("reference",
    "flex", "sdpa" on CPU; SDPA's CUDA backends are not relied on for them: LONGER's masks have none).

    Args:
        q: (B, H, Q, d) queries.
        k, v: (B, H, N, d) keys and values (same dtype as q).
        mask: (B, Q, N) bool, True where query q may attend key j (size-1 dims broadcast), a `LongerMask`,
            or None (every key).
        kernel: one of `LONGER_ATTENTION_KERNELS`, chosen per call from q's device ("auto").

    Returns:
        (B, H, Q, d) in q's dtype.
    """
    name = longer_attention_kernel(kernel, q.device)
    if name == "flex":
        return _flex_attention(q, k, v, mask)
    dense = None if mask is None else _dense(mask, q.shape[2])
    return _reference_attention(q, k, v, dense) if name == "reference" else _sdpa_attention(q, k, v, dense)


NUM_TIME_BUCKETS = 64  # bucket_time_delta: 1 s -> 0, 1 day -> 37, 1 year -> 57
MERGE_GATE_INIT = 0.01  # initial per-channel gain of the InnerTransformer summary in a merged token

# ------------------------------------------------------------------------------------------ block


class LongerBlock(nn.Module):
    """Pre-LN transformer block with softmax attention, usable as self- or cross-attention.

    ``y = x + Drop(Attn(Norm1(x), keys)) ; y = y + Drop(MLP(Norm2(y)))``. Keys/values are projected
    from ``Norm1`` of the key tokens (the same norm and projection as the queries' tokens, so a token's
    key does not depend on whether it is also a query) and may be extended by precomputed ones (the
    cached sequence K/V of LONGER's layer 1).

    Args:
        dim: D.
        num_heads: H (D must be divisible by H).
        dropout: on the attention output and inside the MLP's output.
        mlp_ratio: hidden width of the MLP is ``mlp_ratio · D``.
        kernel: the attention implementation, one of `LONGER_ATTENTION_KERNELS` (see `longer_attention`).
    """

    def __init__(
        self, dim: int, num_heads: int, dropout: float = 0.0, mlp_ratio: int = 4, kernel: str = "auto"
    ) -> None:
        super().__init__()
        longer_attention_kernel(kernel, "cpu")  # refuse an unknown name here
        if kernel == "flex":
            _require_flex()
        self.kernel = kernel
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def key_values(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, D) tokens -> keys, values (B, H, N, D/H) each."""
        B, N, _ = tokens.shape
        kv = self.kv_proj(self.norm1(tokens)).view(B, N, 2, self.num_heads, self.head_dim)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | LongerMask,
        kv_tokens: Tensor | None = None,
        extra_k: Tensor | None = None,
        extra_v: Tensor | None = None,
    ) -> Tensor:
        """Queries ``x`` (B, Q, D) -> (B, Q, D).

        Args:
            x: (B, Q, D) query tokens (also the residual stream).
            mask: (B, Q, N) bool, True where query q may attend key j, or the same as a `LongerMask`; a
                query with no allowed key gets a 0 attention output (see `longer_attention`).
            kv_tokens: (B, N0, D) tokens whose keys/values come first (default: ``x`` itself).
            extra_k, extra_v: (B, H, N1, D/H) precomputed keys/values appended after them
                (``N = N0 + N1``), or None.
        """
        B, Q, D = x.shape
        q = self.q_proj(self.norm1(x)).view(B, Q, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Q, d)
        k, v = self.key_values(x if kv_tokens is None else kv_tokens)  # (B, H, N0, d)
        if extra_k is not None:
            k, v = torch.cat([k, extra_k.to(k.dtype)], dim=2), torch.cat([v, extra_v.to(v.dtype)], dim=2)
        attn = longer_attention(q, k, v, mask, self.kernel)  # (B, H, Q, d)
        x = x + self.dropout(self.out_proj(attn.transpose(1, 2).reshape(B, Q, D)))
        return x + self.dropout(self.mlp(self.norm2(x)))


# ------------------------------------------------------------------------------------------ cache


class LongerSequenceCache(NamedTuple):
    """The candidate-free part of LONGER for a batch of users (`LongerEncoder.encode_user_sequence`).

    Attributes:
        states: (B, M, D) merged sequence tokens (layer 1's input), 0 where invalid.
        mask: (B, M) bool valid merged tokens (``m_b = ceil(history_len / K)`` per row, left-aligned).
        keys: (B, H, M, D/H) layer 1's keys of the whole merged sequence.
        values: (B, H, M, D/H) layer 1's values of the whole merged sequence.
        history_mask: (B, L) bool valid history positions.
    """

    states: Tensor
    mask: Tensor
    keys: Tensor
    values: Tensor
    history_mask: Tensor


class LongerContextCache(NamedTuple):
    """Everything of LONGER that does not depend on the candidate, for a batch of users
    (`LongerEncoder.encode_user_context`): the candidate's query then needs one row per layer.

    The candidate is a query of every main layer but never a key, so the other queries (user, learned and
    recent tokens) never see it: their states, and the keys/values they offer the candidate, are per user.

    Attributes:
        keys1, values1: (B, H, G - 1 + M, d) layer 1's keys/values for the candidate's query: the non-candidate
            global tokens, then the merged sequence.
        valid1: (B, G - 1 + M) bool, the keys the candidate may attend in layer 1.
        keys, values: (B, num_layers - 1, H, G - 1 + k, d) keys/values of layers 2.. : the non-candidate query
            tokens at each layer's input.
        valid: (B, G - 1 + k) bool, the keys the candidate may attend in layers 2.. .
        user: (B, D) the user token's final state (``EncoderOutput.user``).
        history_mask: (B, L) bool valid history positions.
    """

    keys1: Tensor
    values1: Tensor
    valid1: Tensor
    keys: Tensor
    values: Tensor
    valid: Tensor
    user: Tensor
    history_mask: Tensor


# ------------------------------------------------------------------------------------------ encoder


class LongerEncoder(SequenceEncoder):
    """LONGER over the user's history: global tokens, token merge + InnerTransformer, hybrid attention.

    Args:
        features: the feature spec (vocabularies and ``max_len``).
        dim: D, the token width (divisible by ``num_heads``).
        num_layers: main blocks: layer 1 is the cross-attention, layers 2.. self-attention over the queries.
        num_heads: H, attention heads (main and inner blocks).
        num_learned_global_tokens: learned global tokens besides the candidate and user tokens (>= 0).
        merge_k: K, adjacent behaviours merged into one token (1: merging off).
        inner_layers: blocks of the InnerTransformer summarising each group (used when K > 1).
        num_recent_queries: k, the most recent merged tokens that stay queries after layer 1.
        dropout: on the input tokens, inside every block and in the target MLP.
        activation_checkpointing: recompute each block's activations in the backward pass.
        output_dim: width of ``EncoderOutput.target``.
        user_dim: width of the user features (default ``dim``).
        kernel: softmax attention implementation of every block (main and inner), one of
            `LONGER_ATTENTION_KERNELS`: "reference" (explicit PyTorch math, float32), "sdpa"
            (`F.scaled_dot_product_attention`, no cuDNN), "flex" (FlexAttention with a block-sparse mask,
            compiled on CUDA; forward only on CPU), "auto" (chosen per call from the device: "sdpa" on CUDA
            and CPU for now). All give the same outputs up to rounding.

    Output (`EncoderOutput`): ``target`` (B, output_dim); ``user`` (B, D) the user global token's final
    state (candidate-free); ``sequence`` None; ``mask`` (B, L) valid history positions.
    """

    def __init__(
        self,
        features: FeatureSpec,
        dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        num_learned_global_tokens: int = 1,
        merge_k: int = 1,
        inner_layers: int = 1,
        num_recent_queries: int = 32,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
        output_dim: int = 64,
        user_dim: int | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        longer_attention_kernel(kernel, "cpu")  # refuse an unknown name before building anything
        if dim % num_heads:
            raise ValueError(f"LongerEncoder: dim={dim} is not divisible by num_heads={num_heads}")
        if num_layers < 1 or merge_k < 1 or num_recent_queries < 0 or num_learned_global_tokens < 0:
            raise ValueError(
                "LongerEncoder: need num_layers >= 1, merge_k >= 1, num_recent_queries >= 0, "
                f"num_learned_global_tokens >= 0; got {num_layers}, {merge_k}, {num_recent_queries}, "
                f"{num_learned_global_tokens}"
            )
        self.features = features
        self.dim = dim
        self.num_heads = num_heads
        self.output_dim = output_dim
        self.max_len = features.max_len
        self.merge_k = merge_k
        self.num_recent_queries = num_recent_queries
        self.num_global = 2 + num_learned_global_tokens
        self.activation_checkpointing = activation_checkpointing
        self.kernel = kernel

        self.embeddings = FeatureEmbeddings(features, dim, user_dim)
        self.position = nn.Embedding(features.max_len + 1, dim)  # distance to the candidate: newest 1
        self.time = nn.Embedding(NUM_TIME_BUCKETS, dim)  # bucketed age of the behaviour
        self.user_token = nn.Linear(self.embeddings.user_dim, dim)
        self.learned_tokens = nn.Parameter(torch.empty(num_learned_global_tokens, dim))
        self.dropout = nn.Dropout(dropout)
        if merge_k > 1:
            self.inner_position = nn.Parameter(torch.empty(merge_k, dim))
            self.inner = nn.ModuleList(LongerBlock(dim, num_heads, dropout, kernel=kernel) for _ in range(inner_layers))
            self.merge_proj = nn.Linear(merge_k * dim, dim)
            self.merge_norm = nn.LayerNorm(dim)
            self.merge_gate = nn.Parameter(torch.full((dim,), MERGE_GATE_INIT))
        else:
            self.inner_position, self.inner, self.merge_proj = None, None, None
            self.merge_norm, self.merge_gate = None, None
        self.layers = nn.ModuleList(LongerBlock(dim, num_heads, dropout, kernel=kernel) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)
        self.target_mlp = TargetMLP(dim, self.embeddings.user_dim, output_dim, dropout)
        for p in (self.position.weight, self.time.weight, self.learned_tokens, self.inner_position):
            if p is not None:
                nn.init.normal_(p, std=1.0 / math.sqrt(dim))
        self._init_cross_attention_as_similarity()

    def _init_cross_attention_as_similarity(self) -> None:
        """Layer 1 (the cross-attention) starts as dot-product similarity attention in the token space.

        Query, key, value and output projections are the identity (biases 0): the candidate's score on a
        merged token is the dot product of their normalised embeddings, so behaviours sharing its item or
        category get more weight from the first step, and what it reads out is the behaviours' own
        (normalised) embeddings, in the space of ``e_c``, which `TargetMLP`'s ``h_c ⊙ e_c`` compares with
        the candidate directly. The module docstring says why a random start does not learn.
        """
        block = self.layers[0]
        eye = torch.eye(self.dim)
        with torch.no_grad():
            block.q_proj.weight.copy_(eye)
            block.kv_proj.weight.copy_(torch.cat([eye, eye]))
            block.out_proj.weight.copy_(eye)
            for lin in (block.q_proj, block.kv_proj, block.out_proj):
                lin.bias.zero_()

    # -------------------------------------------------------------------------------- helpers

    def _block(self, block: LongerBlock, *args: Tensor | LongerMask | None) -> Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def behaviour_tokens(self, batch: Batch) -> Tensor:
        """(B, L, D) history tokens + position (distance to the candidate) + age embeddings; 0 at padding."""
        B, L = batch.history_item_id.shape
        history_mask = batch.history_mask()
        x = self.embeddings.history_tokens(batch)  # (B, L, D), 0 at padding
        index = torch.arange(L, device=x.device).expand(B, L)
        to_candidate = (batch.history_len.long().unsqueeze(1) - index).clamp(0, self.max_len)  # newest 1
        age = bucket_time_delta(batch.ts.long().unsqueeze(1) - batch.history_ts.long(), NUM_TIME_BUCKETS)
        x = x + self.position(to_candidate) + self.time(age)
        return x * history_mask.unsqueeze(-1).to(x.dtype)

    def merge_tokens(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Token merge: (B, L, D) behaviour tokens, (B, L) mask -> (B, M, D) merged tokens, (B, M) mask.

        Group ``g`` covers behaviours ``[gK, gK + K)``; ``M = ceil(L / K)``; a group is valid iff it holds
        a valid behaviour. K = 1 returns the inputs unchanged. Invalid groups are exactly 0.
        """
        K = self.merge_k
        if K == 1:
            return tokens, mask
        B, L, D = tokens.shape
        M = -(-L // K)
        pad = M * K - L
        if pad:  # F.pad copies even with nothing to pad; without it the reshapes below are views
            tokens, mask = F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        x = tokens.reshape(B * M, K, D)  # (B M, K, D)
        slot = mask.reshape(B * M, K)  # (B M, K) valid behaviours in each group
        group_valid = slot.any(dim=1)  # (B M,)
        weight = slot.unsqueeze(-1).to(x.dtype)  # (B M, K, 1)
        mean = (x * weight).sum(1) / weight.sum(1).clamp(min=1)  # (B M, D) mean of the valid behaviours
        x = (x + self.inner_position) * weight
        # keys: the group's valid slots; an all-padding group attends to all its (zero) slots, then is dropped
        keys = slot | ~group_valid.unsqueeze(1)  # (B M, K)
        attn_mask = LongerMask(keys, groups=M or None)  # every slot sees the group's keys; M groups per row
        for block in self.inner:
            x = self._block(block, x, attn_mask)
        x = x * weight  # padded slots never reach the summary
        summary = self.merge_norm(self.merge_proj(x.reshape(B * M, K * D)))  # (B M, D)
        merged = (mean + self.merge_gate.to(x.dtype) * summary) * group_valid.unsqueeze(-1).to(x.dtype)
        return merged.reshape(B, M, D), group_valid.reshape(B, M)

    def global_tokens(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(B, G, D) global tokens [candidate, user, learned...], the candidate embedding e_c (B, D), u (B, D_u)."""
        e_c = self.embeddings.candidate_tokens(batch)  # (B, D)
        u = self.embeddings.user_features(batch)  # (B, D_u)
        B = e_c.shape[0]
        learned = self.learned_tokens.unsqueeze(0).expand(B, -1, -1).to(e_c.dtype)
        g = torch.cat([e_c.unsqueeze(1), self.user_token(u).unsqueeze(1).to(e_c.dtype), learned], dim=1)
        return g, e_c, u

    # -------------------------------------------------------------------------------- the two halves

    def encode_user_sequence(self, batch: Batch) -> LongerSequenceCache:
        """The candidate-free part: merged sequence states, their mask and layer 1's sequence keys/values.

        Reads only the history columns, ``history_len`` and ``ts`` (the request time), never the candidate.
        """
        L = batch.history_item_id.shape[1]
        if self.max_len < L:
            raise ValueError(f"LongerEncoder: the batch's history width {L} exceeds features.max_len={self.max_len}")
        history_mask = batch.history_mask()  # (B, L)
        x = self.dropout(self.behaviour_tokens(batch))  # (B, L, D)
        states, mask = self.merge_tokens(x, history_mask)  # (B, M, D), (B, M)
        keys, values = self.layers[0].key_values(states)  # (B, H, M, d)
        return LongerSequenceCache(states, mask, keys, values, history_mask)

    def forward_from_cache(self, batch: Batch, cache: LongerSequenceCache) -> EncoderOutput:
        """Global tokens, hybrid attention and the output MLP on top of `encode_user_sequence`'s cache."""
        states, seq_mask = cache.states, cache.mask
        B, M, _ = states.shape
        G = self.num_global
        device = states.device
        globals_, e_c, u = self.global_tokens(batch)  # (B, G, D)
        globals_ = self.dropout(globals_)

        # the most recent k merged tokens per row: positions m_b - k .. m_b - 1 (masked where < 0)
        k = min(self.num_recent_queries, M)
        m = seq_mask.sum(dim=1)  # (B,)
        recent_pos = m.unsqueeze(1) - k + torch.arange(k, device=device)  # (B, k)
        recent_valid = recent_pos >= 0
        recent_pos = recent_pos.clamp(min=0)
        recent = torch.gather(states, 1, recent_pos.unsqueeze(-1).expand(B, k, states.shape[-1]))
        recent = recent * recent_valid.unsqueeze(-1).to(recent.dtype)  # (B, k, D)

        # masks (the module docstring's rule) as positions: q may attend a valid key j iff pos(j) <= pos(q), with
        # global keys at -1 (every query sees them) and global queries at M (they see every valid key)
        g_key_valid = (torch.arange(G, device=device) > 0).expand(B, G)  # the candidate is a query, never a key
        g_key_pos = recent_pos.new_full((B, G), -1)
        q_pos = torch.cat([recent_pos.new_full((B, G), M), recent_pos], dim=1)  # (B, G + k)
        seq_pos = torch.arange(M, device=device).expand(B, M)
        cross_mask = LongerMask(  # (B, G + k) queries, (B, G + M) keys
            torch.cat([g_key_valid, seq_mask], dim=1), torch.cat([g_key_pos, seq_pos], dim=1), q_pos
        )
        self_mask = LongerMask(  # (B, G + k) queries and keys
            torch.cat([g_key_valid, recent_valid], dim=1), torch.cat([g_key_pos, recent_pos], dim=1), q_pos
        )

        x = torch.cat([globals_, recent.to(globals_.dtype)], dim=1)  # (B, G + k, D)
        x = self._block(self.layers[0], x, cross_mask, globals_, cache.keys, cache.values)
        for layer in self.layers[1:]:
            x = self._block(layer, x, self_mask)

        h = self.norm_out(x)  # (B, G + k, D)
        h_c, user = h[:, 0], h[:, 1]  # (B, D) each
        target = self.target_mlp(h_c, e_c, u)
        return EncoderOutput(target=target, user=user, sequence=None, mask=cache.history_mask)

    def encode_user_context(self, batch: Batch) -> LongerContextCache:
        """The candidate-free part of the whole encoder (serving): `encode_user_sequence`, then every main layer
        over the non-candidate queries, keeping the keys/values each layer offers the candidate's query.

        Reads the history columns, ``history_len``, ``ts`` and the user features, never the candidate.
        """
        seq = self.encode_user_sequence(batch)
        states, seq_mask = seq.states, seq.mask
        B, M, D = states.shape
        G, device = self.num_global, states.device
        u = self.embeddings.user_features(batch)  # (B, D_u)
        dtype = states.dtype
        learned = self.learned_tokens.unsqueeze(0).expand(B, -1, -1).to(dtype)
        others = self.dropout(torch.cat([self.user_token(u).unsqueeze(1).to(dtype), learned], dim=1))  # (B, G-1, D)
        k = min(self.num_recent_queries, M)
        m = seq_mask.sum(dim=1)
        recent_pos = m.unsqueeze(1) - k + torch.arange(k, device=device)  # (B, k)
        recent_valid = recent_pos >= 0
        recent_pos = recent_pos.clamp(min=0)
        recent = torch.gather(states, 1, recent_pos.unsqueeze(-1).expand(B, k, D))
        recent = recent * recent_valid.unsqueeze(-1).to(recent.dtype)
        g_valid = torch.ones(B, G - 1, dtype=torch.bool, device=device)
        g_pos = recent_pos.new_full((B, G - 1), -1)
        q_pos = torch.cat([recent_pos.new_full((B, G - 1), M), recent_pos], dim=1)  # (B, G - 1 + k)
        seq_pos = torch.arange(M, device=device).expand(B, M)
        cross_mask = LongerMask(torch.cat([g_valid, seq_mask], 1), torch.cat([g_pos, seq_pos], 1), q_pos)
        valid = torch.cat([g_valid, recent_valid], dim=1)  # (B, G - 1 + k)
        self_mask = LongerMask(valid, torch.cat([g_pos, recent_pos], dim=1), q_pos)

        first = self.layers[0]
        g_keys, g_values = first.key_values(others)  # (B, H, G - 1, d)
        keys1 = torch.cat([g_keys, seq.keys.to(g_keys.dtype)], dim=2)
        values1 = torch.cat([g_values, seq.values.to(g_values.dtype)], dim=2)
        x = torch.cat([others, recent.to(others.dtype)], dim=1)  # (B, G - 1 + k, D)
        x = first(x, cross_mask, others, seq.keys, seq.values)
        keys, values = [], []
        for layer in self.layers[1:]:
            kl, vl = layer.key_values(x)  # what the candidate's query reads in this layer
            keys.append(kl)
            values.append(vl)
            x = layer(x, self_mask)
        H, d = keys1.shape[1], keys1.shape[3]
        empty = keys1.new_zeros(B, 0, H, x.shape[1], d)
        stack = (lambda ts: torch.stack(ts, dim=1)) if keys else (lambda ts: empty)
        user = self.norm_out(x)[:, 0]  # (B, D)
        return LongerContextCache(
            keys1, values1, torch.cat([g_valid, seq_mask], 1), stack(keys), stack(values), valid, user,
            seq.history_mask,
        )  # fmt: skip

    def forward_candidates(self, batch: Batch, cache: LongerContextCache) -> EncoderOutput:
        """Only the candidate's query through the main layers, on `encode_user_context`'s cache (rows aligned
        with ``batch``'s): the same `EncoderOutput` as `forward` (``target``, ``user``, ``mask``) at
        O(G + M) attention per candidate in layer 1 and O(G + k) in the others, instead of running every query."""
        e_c = self.embeddings.candidate_tokens(batch)  # (B, D)
        u = self.embeddings.user_features(batch)
        x = self.dropout(e_c.unsqueeze(1))  # (B, 1, D): the candidate, query only
        none = x[:, :0]  # (B, 0, D): no key tokens besides the cached ones
        x = self.layers[0](x, LongerMask(cache.valid1), none, cache.keys1, cache.values1)
        mask = LongerMask(cache.valid)
        for i, layer in enumerate(self.layers[1:]):
            x = layer(x, mask, none, cache.keys[:, i], cache.values[:, i])
        h_c = self.norm_out(x)[:, 0]
        target = self.target_mlp(h_c, e_c, u)
        return EncoderOutput(target=target, user=cache.user, sequence=None, mask=cache.history_mask)

    def forward(self, batch: Batch) -> EncoderOutput:
        """`Batch` -> `EncoderOutput` (see the class docstring): `encode_user_sequence` then `forward_from_cache`."""
        return self.forward_from_cache(batch, self.encode_user_sequence(batch))
