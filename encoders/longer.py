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
   ``G + k`` queries only. Every layer is a standard pre-LN transformer block: softmax
   `scaled_dot_product_attention` with a boolean mask, residual, GELU MLP, residual. Layer 1's
   projections start as the identity (see "Choices").
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

_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention with a boolean mask; on CUDA without cuDNN's kernel, which fails on these masks
    in bf16 (torch 2.11, H100: ``mha_graph.execute`` is not good)."""
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, mlp_ratio: int = 4) -> None:
        super().__init__()
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
        mask: Tensor,
        kv_tokens: Tensor | None = None,
        extra_k: Tensor | None = None,
        extra_v: Tensor | None = None,
    ) -> Tensor:
        """Queries ``x`` (B, Q, D) -> (B, Q, D).

        Args:
            x: (B, Q, D) query tokens (also the residual stream).
            mask: (B, Q, N) bool, True where query q may attend key j; every row needs one True.
            kv_tokens: (B, N0, D) tokens whose keys/values come first (default: ``x`` itself).
            extra_k, extra_v: (B, H, N1, D/H) precomputed keys/values appended after them
                (``N = N0 + N1``), or None.
        """
        B, Q, D = x.shape
        q = self.q_proj(self.norm1(x)).view(B, Q, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Q, d)
        k, v = self.key_values(x if kv_tokens is None else kv_tokens)  # (B, H, N0, d)
        if extra_k is not None:
            k, v = torch.cat([k, extra_k.to(k.dtype)], dim=2), torch.cat([v, extra_v.to(v.dtype)], dim=2)
        attn = _attention(q, k, v, mask.unsqueeze(1))  # (B, H, Q, d)
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
    ) -> None:
        super().__init__()
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

        self.embeddings = FeatureEmbeddings(features, dim, user_dim)
        self.position = nn.Embedding(features.max_len + 1, dim)  # distance to the candidate: newest 1
        self.time = nn.Embedding(NUM_TIME_BUCKETS, dim)  # bucketed age of the behaviour
        self.user_token = nn.Linear(self.embeddings.user_dim, dim)
        self.learned_tokens = nn.Parameter(torch.empty(num_learned_global_tokens, dim))
        self.dropout = nn.Dropout(dropout)
        if merge_k > 1:
            self.inner_position = nn.Parameter(torch.empty(merge_k, dim))
            self.inner = nn.ModuleList(LongerBlock(dim, num_heads, dropout) for _ in range(inner_layers))
            self.merge_proj = nn.Linear(merge_k * dim, dim)
            self.merge_norm = nn.LayerNorm(dim)
            self.merge_gate = nn.Parameter(torch.full((dim,), MERGE_GATE_INIT))
        else:
            self.inner_position, self.inner, self.merge_proj = None, None, None
            self.merge_norm, self.merge_gate = None, None
        self.layers = nn.ModuleList(LongerBlock(dim, num_heads, dropout) for _ in range(num_layers))
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

    def _block(self, block: LongerBlock, *args: Tensor | None) -> Tensor:
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
        x = F.pad(tokens, (0, 0, 0, pad)).reshape(B * M, K, D)  # (B M, K, D)
        slot = F.pad(mask, (0, pad)).reshape(B * M, K)  # (B M, K) valid behaviours in each group
        group_valid = slot.any(dim=1)  # (B M,)
        weight = slot.unsqueeze(-1).to(x.dtype)  # (B M, K, 1)
        mean = (x * weight).sum(1) / weight.sum(1).clamp(min=1)  # (B M, D) mean of the valid behaviours
        x = (x + self.inner_position) * weight
        # keys: the group's valid slots; an all-padding group attends to all its (zero) slots, then is dropped
        keys = slot | ~group_valid.unsqueeze(1)  # (B M, K)
        attn_mask = keys.unsqueeze(1).expand(B * M, K, K)  # (B M, K, K)
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

        # masks: globals at position -1 (see the module docstring for the rule)
        is_cand = torch.zeros(G + k, dtype=torch.bool, device=device)
        is_cand[0] = True  # the candidate is a query, never a key
        q_global = torch.arange(G + k, device=device) < G  # (G + k,)
        q_pos = torch.cat([recent_pos.new_full((B, G), -1), recent_pos], dim=1)  # (B, G + k)
        q_valid = torch.cat([recent_valid.new_ones(B, G), recent_valid], dim=1)  # (B, G + k)

        def rule(k_pos: Tensor, k_valid: Tensor, k_global: Tensor, k_cand: Tensor) -> Tensor:
            allowed = (k_valid & ~k_cand[None, :]).unsqueeze(1)
            causal = q_global[None, :, None] | k_global[None, None, :] | (k_pos.unsqueeze(1) <= q_pos.unsqueeze(2))
            return allowed & causal  # (B, G + k, N)

        seq_pos = torch.arange(M, device=device).expand(B, M)
        cross_mask = rule(
            torch.cat([q_pos[:, :G], seq_pos], dim=1),
            torch.cat([q_valid[:, :G], seq_mask], dim=1),
            torch.arange(G + M, device=device) < G,
            torch.arange(G + M, device=device) == 0,
        )  # (B, G + k, G + M)
        self_mask = rule(q_pos, q_valid, q_global, is_cand)  # (B, G + k, G + k)

        x = torch.cat([globals_, recent.to(globals_.dtype)], dim=1)  # (B, G + k, D)
        x = self._block(self.layers[0], x, cross_mask, globals_, cache.keys, cache.values)
        for layer in self.layers[1:]:
            x = self._block(layer, x, self_mask)

        h = self.norm_out(x)  # (B, G + k, D)
        h_c, user = h[:, 0], h[:, 1]  # (B, D) each
        target = self.target_mlp(h_c, e_c, u)
        return EncoderOutput(target=target, user=user, sequence=None, mask=cache.history_mask)

    def forward(self, batch: Batch) -> EncoderOutput:
        """`Batch` -> `EncoderOutput` (see the class docstring): `encode_user_sequence` then `forward_from_cache`."""
        return self.forward_from_cache(batch, self.encode_user_sequence(batch))
