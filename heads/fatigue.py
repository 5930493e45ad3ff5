"""FRec fatigue branch (Li et al., "Modeling User Fatigue for Sequential Recommendation", SIGIR 2024;
reference code tsinghua-fib-lab/SIGIR24-FRec).

Users tire of items too similar to what they saw just before. FRec models this with four parts,
all here; the branch runs between the encoder and the task heads and hands them a fatigue-aware
``EncoderOutput.target``.

Notation: ``e = [item ; category]`` (D = ``item_dim + category_dim``) the branch's own embedding of an
item; ``v`` the target (candidate), ``e_1 .. e_T`` the newest ``T = recent`` behaviours, oldest first;
``K = num_interests``.

1. **Multi-interest extraction** (self-attentive, as the reference's ``SANetwork``): over the newest
   ``interest_window`` behaviours ``H`` (B, N, D), ``A = softmax_N(W2 tanh(W1 H))`` (B, K, N),
   interests ``U = A H`` (B, K, D).
2. **Interest-aware similarity matrix** between the target and the recent history, per interest
   and per level (item part and category part of ``e`` separately):
   ``M[t, k, l] = 1 / (1 + |(e_t^l - v^l) · u_k^l| / ||u_k^l||)``, shape (B, T, 2K) (0 at padding): 1
   where a recent behaviour is the same item/category as the target along interest k's direction.
3. **Fatigue-gated recurrent unit** over the recent behaviours. Per step, the temporal fatigue
   representation is ``c_t = TCN(Cross(M_t))`` (a low-rank DCN-v2 feature cross of the similarity
   row, then two causal 1-D convolutions over time) together with explicit temporal fatigue
   features ``τ_t`` = [log1p minutes from e_t to the impression, log1p minutes since the behaviour
   before, same category as the target, same item as the target, log1p of same-category repeats
   so far]; with ``f_t = [e_t, c_t, τ_t]``:

       z_t = σ(W_fz f_t + U_z h_{t-1} + b_z)          (update gate)
       r_t = σ(W_fr f_t + U_r h_{t-1} + b_r)          (reset gate)
       ĥ_t = tanh(W_e e_t + W_h (r_t ⊙ h_{t-1}) + b_e)
       h_t = z_t ⊙ h_{t-1} + (1 - z_t) ⊙ ĥ_t         (padded steps keep h)

   starting from the fused long-term interest ``h_0 = ū``; ``h_T`` is the short-term interest.
4. **Fatigue-enhanced multi-interest fusion**: each interest's similarity profile over the recent
   steps (its two columns of M, (B, 2T)) goes through a feature cross and an MLP to a score ``s_k``;
   ``ū = Σ_k softmax(s)_k u_k``. The fatigue score is ``φ = mean_t MLP(Cross(M_t))`` (B,).

The task heads read ``x' = x + W_o GELU(W_i [ū, h_T, v, tanh φ])`` (``x = EncoderOutput.target``;
``W_o`` starts at 0, so switching the branch on starts from the same network as without it).

**Contrastive objective** (training only, ``cl_weight > 0``): ``num_augment`` copies of each
sample's recent window get ``n`` of their non-target steps overwritten by the target item (item and
category; ``n`` uniform in ``[max(1, #target already there), #non-target]``): explicit extra exposure,
so each copy should read as more fatigued than the original. With ``φ_0`` the original's fatigue
score and ``φ_j`` the copies', ``L = -log(e^{-φ_0/τ} / (e^{-φ_0/τ} + Σ_j e^{-φ_j/τ}))``, averaged over the
samples eligible for augmentation (history of at least ``cl_min_history`` behaviours, the target at
most half of the recent window, at least one non-target step), times ``cl_weight`` (logged as
``loss/fatigue_cl``). Cheap: the copies reuse the interests and skip the recurrent unit.

Choices the reference leaves open or that differ from it, and why:

- Time gaps and repeat counts feed the gates (the paper's "temporal fatigue representations"); the
  reference code feeds only the convolved similarity features. Both are here.
- The reference subtracts ``tanh φ`` from its single logit; here ``tanh φ`` and the interests enter the
  representation every task head reads, so each task decides how fatigue moves it.
- Augmented copies reuse the original's interests ``U`` (the reference recomputes them with the
  copy's history; the recent window is a small part of it).
- The reference switches the fatigue weighting off at inference for samples it would not augment;
  here every part is always on (that switch depends on the label in the reference).
- Defaults follow the reference's run script: T = 40 is cut to 20 here (CPU budget), K = 4, kernel 5,
  2 cross layers, ``cl_weight`` 0.1, 4 copies, temperature 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import EncoderOutput
from heads.base import Branch, BranchOutput
from heads.context import check_history_channels, recent_window
from mtrank.batch import Batch
from mtrank.spec import FeatureSpec, TaskSpec

_TEMPORAL = 5  # explicit temporal fatigue features per step


class CrossNetwork(nn.Module):
    """Low-rank DCN-v2 cross: ``x_{l+1} = x_0 ⊙ (V_l U_l x_l + b_l) + x_l``; output ``[x_L, x_0]``.

    Args:
        dim: width of the input (..., dim); the output is (..., 2 dim).
        num_layers: cross layers.
        rank: inner width of each ``U_l`` (dim -> rank) and ``V_l`` (rank -> dim).
    """

    def __init__(self, dim: int, num_layers: int = 2, rank: int = 4) -> None:
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(dim, max(rank, 1), bias=False) for _ in range(num_layers))
        self.up = nn.ModuleList(nn.Linear(max(rank, 1), dim) for _ in range(num_layers))
        self.output_dim = 2 * dim

    def forward(self, x0: Tensor) -> Tensor:
        """(..., dim) -> (..., 2 dim)."""
        x = x0
        for down, up in zip(self.down, self.up, strict=True):
            x = x0 * up(down(x)) + x
        return torch.cat([x, x0], dim=-1)


class CausalTCN(nn.Module):
    """Causal 1-D convolutions over time: (B, T, C_in) -> (B, T, channels[-1]), step t sees steps <= t.

    Args:
        input_dim: C_in.
        channels: output channels of each layer (leaky ReLU after each).
        kernel_size: width of each convolution.
    """

    def __init__(self, input_dim: int, channels: Sequence[int], kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        dims = [input_dim, *channels]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, kernel_size) for a, b in itertools.pairwise(dims))
        self.output_dim = dims[-1]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, T, C_in), mask: (B, T) bool valid steps -> (B, T, C_out), 0 at padded steps."""
        y = x.transpose(1, 2)  # (B, C, T)
        for conv in self.convs:
            y = F.leaky_relu(conv(F.pad(y, (self.kernel_size - 1, 0))))
        return y.transpose(1, 2) * mask.unsqueeze(-1).to(y.dtype)


class FatigueGRU(nn.Module):
    """The fatigue-gated recurrent unit: update and reset gates read the fatigue input ``f_t``.

    Args:
        input_dim: E, width of the behaviour embedding ``e_t``.
        fatigue_dim: F, width of the gate input ``f_t``.
        hidden_dim: width of the state h.
    """

    def __init__(self, input_dim: int, fatigue_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gates_in = nn.Linear(fatigue_dim, 2 * hidden_dim)  # W_fz, W_fr, b_z, b_r
        self.gates_h = nn.Linear(hidden_dim, 2 * hidden_dim, bias=False)  # U_z, U_r
        self.cand_in = nn.Linear(input_dim, hidden_dim)  # W_e, b_e
        self.cand_h = nn.Linear(hidden_dim, hidden_dim, bias=False)  # W_h

    def forward(self, e: Tensor, f: Tensor, mask: Tensor, h0: Tensor) -> Tensor:
        """e: (B, T, E), f: (B, T, F), mask: (B, T) bool, h0: (B, H) -> h_T (B, H) (padded steps keep h)."""
        gates_in = self.gates_in(f)  # (B, T, 2H), all steps at once
        cand_in = self.cand_in(e)  # (B, T, H)
        h = h0
        for t in range(e.shape[1]):
            z, r = torch.sigmoid(gates_in[:, t] + self.gates_h(h)).chunk(2, dim=-1)
            candidate = torch.tanh(cand_in[:, t] + self.cand_h(r * h))
            h = torch.where(mask[:, t, None], z * h + (1 - z) * candidate, h)
        return h


class FRec(Branch):
    """The fatigue branch: multi-interest + similarity matrix + fatigue-gated GRU -> a fatigue-aware target.

    Args:
        input_dim: width of ``EncoderOutput.target`` (the output keeps it).
        tasks: the task list (unused: every head reads the enriched representation).
        features: the feature spec (item vocabulary, the ``category`` channel).
        category: a feature that is both a history channel and an item feature (same vocabulary):
            the similarity matrix's category level and the repeat features; None: item level only.
        item_dim: width of the branch's item id embedding.
        category_dim: width of its category embedding.
        recent: T, the recent behaviours the recurrent unit runs over.
        interest_window: the newest behaviours the interests are extracted from.
        num_interests: K.
        cross_layers: layers of each feature cross.
        conv_channels: channels of the two causal convolutions (the temporal fatigue representation).
        kernel_size: their width.
        hidden_dim: width of the fusion MLP.
        dropout: dropout before the output projection.
        cl_weight: weight of the contrastive loss (0: off, no augmentation computed).
        cl_temperature: τ of the contrastive loss.
        num_augment: augmented copies per sample.
        cl_min_history: samples with fewer behaviours are not augmented.
        user_dim: unused (the module passes it to every branch).
    """

    position = "encoder"
    requires = ("history_ts", "history_sparse[category]", "item_sparse[category]")

    def __init__(
        self,
        input_dim: int,
        tasks: Sequence[TaskSpec],
        features: FeatureSpec,
        category: str | None = "category",
        item_dim: int = 32,
        category_dim: int = 16,
        recent: int = 20,
        interest_window: int = 100,
        num_interests: int = 4,
        cross_layers: int = 2,
        conv_channels: Sequence[int] = (16, 32),
        kernel_size: int = 5,
        hidden_dim: int = 64,
        dropout: float = 0.0,
        cl_weight: float = 0.1,
        cl_temperature: float = 1.0,
        num_augment: int = 4,
        cl_min_history: int = 3,
        user_dim: int | None = None,
    ) -> None:
        super().__init__(input_dim, tasks, features, user_dim)
        if category is not None:
            check_history_channels(features, [category], "model.fatigue.category")
        if min(recent, interest_window, num_interests, item_dim, kernel_size) < 1 or not conv_channels:
            raise ValueError(
                "model.fatigue: recent, interest_window, num_interests, item_dim and kernel_size must be >= 1 "
                "and conv_channels non-empty"
            )
        if category is not None and category_dim < 1:
            raise ValueError("model.fatigue.category_dim must be >= 1 when a category feature is used")
        if cl_weight < 0 or cl_temperature <= 0 or (cl_weight > 0 and num_augment < 1):
            raise ValueError("model.fatigue: need cl_weight >= 0, cl_temperature > 0 and num_augment >= 1")
        self.category = category
        self.recent = recent
        self.interest_window = interest_window
        self.num_interests = K = num_interests
        self.cl_weight = cl_weight
        self.cl_temperature = cl_temperature
        self.num_augment = num_augment
        self.cl_min_history = cl_min_history
        self.levels = [item_dim] + ([category_dim] if category is not None else [])
        D = sum(self.levels)

        self.item = nn.Embedding(features.num_items, item_dim)
        self.category_table = nn.Embedding(features.item_sparse[category], category_dim) if category else None
        for table in (self.item, self.category_table):
            if table is not None:
                nn.init.normal_(table.weight, std=1.0 / math.sqrt(table.embedding_dim))
        # 1. interests
        self.interest_hidden = nn.Linear(D, 4 * D)
        self.interest_logits = nn.Linear(4 * D, K, bias=False)
        # 2.-3. similarity features, temporal representation, recurrent unit
        width = K * len(self.levels)  # columns of M
        self.step_cross = CrossNetwork(width, cross_layers, max(width // 2, 1))
        self.tcn = CausalTCN(self.step_cross.output_dim, conv_channels, kernel_size)
        self.gru = FatigueGRU(D, D + self.tcn.output_dim + _TEMPORAL, D)
        self.score = nn.Sequential(nn.Linear(self.step_cross.output_dim, K), nn.ReLU(), nn.Linear(K, 1))
        # 4. fusion weights from each interest's similarity profile over the recent steps
        profile = len(self.levels) * recent
        self.profile_cross = CrossNetwork(profile, cross_layers, max(profile // 3, 1))
        self.fusion_score = nn.Sequential(
            nn.Linear(self.profile_cross.output_dim, recent), nn.LeakyReLU(), nn.Linear(recent, 1)
        )
        # output: a residual on the target representation, starting at 0
        self.out_in = nn.Linear(3 * D + 1, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, input_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # --------------------------------------------------------------------------- pieces
    def embed(self, item: Tensor, category: Tensor | None) -> Tensor:
        """(...) item ids and category ids -> (..., D) ``[item ; category]``."""
        parts = [self.item(item)]
        if self.category_table is not None:
            parts.append(self.category_table(category))
        return torch.cat(parts, dim=-1)

    def interests(self, h: Tensor, mask: Tensor) -> Tensor:
        """h: (B, N, D) behaviours, mask: (B, N) -> (B, K, D) interests (0 for an empty history)."""
        logits = self.interest_logits(torch.tanh(self.interest_hidden(h))).float()  # (B, N, K)
        logits = logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        attn = torch.softmax(logits, dim=1).nan_to_num(0.0).to(h.dtype)  # all-masked rows -> 0
        return torch.einsum("bnk,bnd->bkd", attn, h)

    def similarity(self, recent: Tensor, target: Tensor, interests: Tensor, mask: Tensor) -> Tensor:
        """Interest-aware similarity matrix.

        Args:
            recent: (B, ..., T, D) recent behaviour embeddings; target: (B, D); interests: (B, K, D);
            mask: (B, ..., T) valid steps.

        Returns:
            (B, ..., T, K * levels): ``1 / (1 + |(e_t - v) · u_k| / ||u_k||)`` per level, 0 at padding.
        """
        extra = recent.dim() - 3  # batch dims between B and T (augmented copies)
        diff = recent - target.view(target.shape[0], *([1] * (extra + 1)), target.shape[-1])
        out, start = [], 0
        for width in self.levels:
            u = interests[..., start : start + width]  # (B, K, w)
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            proj = torch.einsum("b...td,bkd->b...tk", diff[..., start : start + width], u)
            out.append(1.0 / (1.0 + proj.abs()))
            start += width
        return torch.cat(out, dim=-1) * mask.unsqueeze(-1).to(recent.dtype)

    def fatigue_score(self, sim: Tensor, mask: Tensor) -> Tensor:
        """sim: (B, ..., T, C) similarity rows, mask: (B, ..., T) -> (B, ...) mean step score φ."""
        step = self.score(self.step_cross(sim)).squeeze(-1)  # (B, ..., T)
        m = mask.to(step.dtype)
        return (step * m).sum(-1) / m.sum(-1).clamp_min(1)

    def temporal_features(
        self, batch: Batch, index: Tensor, mask: Tensor, item: Tensor, category: Tensor | None
    ) -> Tensor:
        """(B, T, 5) explicit temporal fatigue features of each recent step (0 at padding)."""
        ts = batch.history_ts.gather(1, index)  # (B, T)
        prev = torch.cat([ts[:, :1], ts[:, :-1]], dim=1)
        to_target = ((batch.ts[:, None] - ts).clamp_min(0).float() / 60.0).log1p()
        gap = ((ts - prev).clamp_min(0).float() / 60.0).log1p()
        same_item = (item == batch.item_id[:, None]).float()
        if category is not None:
            same_cat = (category == batch.item_sparse[self.category][:, None]).float()
        else:
            same_cat = same_item
        m = mask.float()
        repeats = torch.cumsum(same_cat * m, dim=1).log1p()
        return torch.stack([to_target, gap, same_cat, same_item, repeats], dim=-1) * m.unsqueeze(-1)

    # --------------------------------------------------------------------------- forward
    def forward(self, x: EncoderOutput, batch: Batch) -> BranchOutput:
        """`EncoderOutput` + batch -> `BranchOutput` with the fatigue-aware ``encoded`` and ``fatigue_score`` (B,)."""
        cat_name = self.category
        hist_cat = batch.history_sparse[cat_name] if cat_name else None
        target_cat = batch.item_sparse[cat_name] if cat_name else None
        v = self.embed(batch.item_id, target_cat)  # (B, D)

        w_index, w_mask = recent_window(batch, self.interest_window)
        window = self.embed(
            batch.history_item_id.gather(1, w_index), hist_cat.gather(1, w_index) if cat_name else None
        ) * w_mask.unsqueeze(-1).to(v.dtype)
        U = self.interests(window, w_mask)  # (B, K, D)

        index, mask = recent_window(batch, self.recent)  # (B, T)
        item = batch.history_item_id.gather(1, index)
        category = hist_cat.gather(1, index) if cat_name else None
        e = self.embed(item, category) * mask.unsqueeze(-1).to(v.dtype)  # (B, T, D)
        T = e.shape[1]
        sim = self.similarity(e, v, U, mask)  # (B, T, C)

        # fatigue-enhanced fusion of the interests
        profile = sim.view(sim.shape[0], T, len(self.levels), self.num_interests).permute(0, 3, 2, 1)  # (B, K, lv, T)
        profile = F.pad(profile, (0, self.recent - T)).flatten(2)  # (B, K, lv * recent)
        weights = torch.softmax(self.fusion_score(self.profile_cross(profile)).squeeze(-1).float(), dim=-1)
        u_bar = torch.einsum("bk,bkd->bd", weights.to(U.dtype), U)  # (B, D)

        # temporal fatigue representation and the fatigue-gated recurrent unit
        c = self.tcn(self.step_cross(sim), mask)  # (B, T, C2)
        tau = self.temporal_features(batch, index, mask, item, category).to(e.dtype)
        h_T = self.gru(e, torch.cat([e, c, tau], dim=-1), mask, u_bar)  # (B, D)
        phi = self.fatigue_score(sim, mask)  # (B,)

        delta = self.out(self.dropout(F.gelu(self.out_in(torch.cat([u_bar, h_T, v, torch.tanh(phi)[:, None]], -1)))))
        encoded = dataclasses.replace(x, target=x.target + delta.to(x.target.dtype))
        state = {"fatigue_score": phi}
        if self.training and self.cl_weight > 0:
            state.update(self._augmented_scores(batch, index, mask, item, category, v, U))
        return BranchOutput(encoded=encoded, outputs={"score": phi}, state=state)

    def _augmented_scores(
        self,
        batch: Batch,
        index: Tensor,
        mask: Tensor,
        item: Tensor,
        category: Tensor | None,
        v: Tensor,
        U: Tensor,
    ) -> dict[str, Tensor]:
        """Fatigue scores of the augmented copies: ``augmented`` (B, J) and ``eligible`` (B,) bool."""
        B, T = item.shape
        J = self.num_augment
        is_target = (item == batch.item_id[:, None]) & mask
        free = mask & ~is_target  # steps that may be overwritten
        n_free = free.sum(1)  # (B,)
        n_target = is_target.sum(1)
        n_valid = mask.sum(1)
        eligible = (batch.history_len >= self.cl_min_history) & (2 * n_target <= n_valid) & (n_free > 0)
        low = n_target.clamp_min(1).clamp_max(n_free.clamp_min(1))  # (B,)
        span = (n_free - low + 1).clamp_min(1)
        n = low[:, None] + (torch.rand(B, J, device=item.device) * span[:, None]).long().clamp_max(span[:, None] - 1)
        scores = torch.rand(B, J, T, device=item.device).masked_fill(~free[:, None], -1.0)
        rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # (B, J, T) rank of each step
        chosen = (rank < n[..., None]) & free[:, None]
        aug_item = torch.where(chosen, batch.item_id[:, None, None].to(item.dtype), item[:, None])
        aug_cat = None
        if category is not None:
            target_cat = batch.item_sparse[self.category][:, None, None].to(category.dtype)
            aug_cat = torch.where(chosen, target_cat, category[:, None])
        aug_mask = mask[:, None].expand(B, J, T)
        e = self.embed(aug_item, aug_cat) * aug_mask.unsqueeze(-1).to(v.dtype)  # (B, J, T, D)
        sim = self.similarity(e, v, U, aug_mask)
        return {"augmented": self.fatigue_score(sim, aug_mask), "eligible": eligible}

    def loss(self, out: BranchOutput, batch: Batch) -> dict[str, Tensor]:
        """``{"fatigue_cl": cl_weight * L}`` in training with ``cl_weight > 0``; else nothing."""
        if "augmented" not in out.state:
            return {}
        phi0 = out.state["fatigue_score"].float()[:, None]  # (B, 1)
        logits = -torch.cat([phi0, out.state["augmented"].float()], dim=1) / self.cl_temperature  # (B, 1 + J)
        per = -torch.log_softmax(logits, dim=1)[:, 0]  # (B,)
        m = out.state["eligible"].float()
        return {"fatigue_cl": self.cl_weight * (per * m).sum() / m.sum().clamp_min(1)}
