"""Serving: score a request's candidates, encoding the user's history once (`CandidateScorer`).

At serving time a ranker scores hundreds to thousands of candidates for one user request. Re-encoding
the whole history once per candidate (what `RankingModule.forward` does on a batch holding one row per
(user, candidate) pair) is the naive cost; the encoders with a candidate-free part let it be computed
once per request instead:

Example:
    >>> scorer = CandidateScorer(module, microbatch=1024)
    >>> scores = scorer.score(request, Candidates(item_id, {"category": cat}, {"duration": dur}, mask))
    >>> scores["click"]            # (B, C) probabilities; 0 where mask is False
    >>> scorer.score_user(one_row_request, item_id=torch.tensor([3, 17, 42]), item_sparse=..., item_dense=...)

**Inputs.** ``request`` is a `Batch` of B users, one row per request: ``user_id``, the user features, the
history (left-aligned, ``history_len``) and ``ts`` = the request time (the candidates' impression time); its
item fields, labels and request-candidate fields are ignored. `Candidates` holds each request's C
candidates: ``item_id`` (B, C), every ``features.item_sparse`` and ``features.item_dense`` column (B, C),
and ``mask`` (B, C) valid positions (requests with fewer candidates are padded; masked positions may hold
any value: their ids and features are replaced by 0 before any lookup).

**Output.** task name -> (B, C) float32 prediction, the transform of `RankingModule.predictions`
(``sigmoid`` for binary tasks, the regression output transform), equal to what the training-time forward
gives for a `Batch` whose row (b, c) holds request b's user, history and ``ts`` and candidate c's item fields.
Masked positions hold ``fill_value`` (default 0). With ``branch_outputs`` the dict also holds every branch's
outputs as ``<branch>_<output>`` (B, C, ...) (as `RankingModule.predict_step` names them), e.g.
``fatigue_score`` or ``uplift_effect_t1``.

**Paths** (`scoring_path`, chosen from the encoder's type; `CandidateScorer.path`):

- ``hstu_prefix`` (`encoders.hstu.HSTUEncoder`): the candidate sits after the history and attention is
  causal, so the history states never see it. `HSTUEncoder.encode_user_prefix` runs the history once per
  request and keeps each layer's keys/values and the candidate's relative bias to every history position;
  `HSTUEncoder.forward_candidates` then runs only the candidate tokens through the layers, each attending
  to the cached keys/values and to itself (all C candidates of a user as the queries of one attention).
  Per candidate: O(L·D) attention + O(D²) projections instead of a whole O(L²·D + L·D²) forward.
- ``longer_cache`` (`encoders.longer.LongerEncoder`): the candidate is a query of every main layer but never
  a key, so every other query (user, learned and recent tokens) is candidate-free too.
  `LongerEncoder.encode_user_context` runs once per request: the token merge, layer 1's keys/values of the
  merged sequence, and every main layer over the non-candidate queries, keeping the keys/values each layer
  offers the candidate. `LongerEncoder.forward_candidates` then runs only the candidate's query, one row per
  layer, the cache's rows repeated per candidate (``expand``: a view when a microbatch holds one request, a
  copy of at most ``microbatch`` rows otherwise). Per candidate: O((G + M)·D) attention in layer 1 and
  O((G + k)·D) in the others, plus the O(D²) projections of one token.
- ``reencode`` (every other encoder: ULTRA-HSTU, the baselines; and ``naive=True`` for any encoder): the
  request batch is expanded to one row per (user, candidate) pair and `RankingModule.forward` runs on it
  in microbatches. Correct, uncached: the history is encoded once per candidate (the benchmark baseline).

In the two cached paths the heads and branches run on the cached encoder output exactly as in
`RankingModule.forward` (fatigue between encoder and heads, then heads, then uplift beside them), on a pair
batch holding the request's user fields and history (so the branches can read them) and the candidates'
item fields. A module with ``features.request_candidates > 0`` (the uplift branch's candidate attention)
gets, per pair, the request's candidate set laid out as the loader does (`mtrank.batch`): the candidate
itself first, then the request's other valid candidates in list order, ``request_candidates`` at most.

**Microbatching.** At most ``microbatch`` (user, candidate) pairs run through one forward: a request with
C >= microbatch is split into column chunks, smaller requests are grouped ``microbatch // C`` at a time (the
user prefix is encoded once per group). Masked positions are computed with the rest (their ids are 0) and
overwritten. Results do not depend on ``microbatch`` or on which requests share a call (up to float
rounding). `score` runs under `torch.inference_mode` and puts the module in eval mode (dropout off); it
casts nothing, so run it under ``torch.autocast`` for bf16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from encoders.base import EncoderOutput, SequenceEncoder
from encoders.hstu import HSTUEncoder
from encoders.longer import LongerEncoder
from heads.base import HeadOutput
from mtrank.batch import Batch
from mtrank.module import RankingModule
from mtrank.spec import FeatureSpec

ScoringPath = Literal["hstu_prefix", "longer_cache", "reencode"]


@dataclass
class Candidates:
    """The candidates of B requests, C per request (padded).

    Attributes:
        item_id: (B, C) int candidate item ids.
        item_sparse: name -> (B, C) int, one per ``features.item_sparse`` column.
        item_dense: name -> (B, C) float, one per ``features.item_dense`` column.
        mask: (B, C) bool, True at valid candidates; None: all valid.
    """

    item_id: Tensor
    item_sparse: dict[str, Tensor] = field(default_factory=dict)
    item_dense: dict[str, Tensor] = field(default_factory=dict)
    mask: Tensor | None = None

    def to(self, device: torch.device | str) -> Candidates:
        """A copy with every tensor on ``device``."""
        return Candidates(
            self.item_id.to(device),
            {n: t.to(device) for n, t in self.item_sparse.items()},
            {n: t.to(device) for n, t in self.item_dense.items()},
            None if self.mask is None else self.mask.to(device),
        )


def scoring_path(encoder: SequenceEncoder) -> ScoringPath:
    """The path `CandidateScorer` takes for ``encoder`` (see the module docstring).

    An HSTU or LONGER subclass that overrides ``forward`` gets ``reencode``: its cache split is not known.
    """
    if isinstance(encoder, HSTUEncoder) and type(encoder).forward is HSTUEncoder.forward:
        return "hstu_prefix"
    if isinstance(encoder, LongerEncoder) and type(encoder).forward is LongerEncoder.forward:
        return "longer_cache"
    return "reencode"


class CandidateScorer:
    """Scores every task for each (request, candidate) pair, encoding each request's user sequence once.

    Args:
        module: the trained ranker; put in eval mode.
        microbatch: the most (user, candidate) pairs per forward (>= 1).
        naive: always re-encode the history per candidate (the ``reencode`` path), whatever the encoder.
        fill_value: the score reported at masked candidate positions (default 0; ``float("nan")`` to make
            any use of them visible).
        branch_outputs: also return the branches' outputs, ``<branch>_<output>`` (B, C, ...).

    Attributes:
        path: the `ScoringPath` taken: `scoring_path` of the encoder; ``reencode`` with ``naive`` or for a
            `RankingModule` subclass that overrides ``forward`` (the cached paths replay `RankingModule.forward`).
    """

    def __init__(
        self,
        module: RankingModule,
        microbatch: int = 1024,
        naive: bool = False,
        fill_value: float = 0.0,
        branch_outputs: bool = False,
    ) -> None:
        if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1:
            raise ValueError(f"microbatch must be an int >= 1 (pairs per forward), got {microbatch!r}")
        self.module = module.eval()
        self.microbatch = microbatch
        self.fill_value = float(fill_value)
        self.branch_outputs = branch_outputs
        custom_forward = type(module).forward is not RankingModule.forward  # its order of parts is unknown
        self.path: ScoringPath = "reencode" if naive or custom_forward else scoring_path(module.encoder)

    # ----------------------------------------------------------------------------- public API
    def score(self, request: Batch, candidates: Candidates) -> dict[str, Tensor]:
        """Every task's prediction for each request's candidates.

        Args:
            request: B users, one row per request (user fields, history, ``ts`` = request time).
            candidates: C candidates per request, (B, C) fields.

        Returns:
            task name -> (B, C) float32 prediction (`RankingModule.predictions`' transform), ``fill_value``
            where ``candidates.mask`` is False; with ``branch_outputs`` also ``<branch>_<output>`` (B, C, ...).
            They are inference tensors (`torch.inference_mode`): clone one to modify it in place outside that mode.
        """
        features = self.module.features
        B = _request_size(request)
        cands = _check_candidates(candidates, B, features)
        C = cands.item_id.shape[1]
        if self.module.training:
            self.module.eval()
        out: dict[str, Tensor] = {}
        with torch.inference_mode():
            for b0, b1, columns in _schedule(B, C, self.microbatch):
                rows = _rows(request, b0, b1)
                row_cands = _candidate_rows(cands, b0, b1)
                prefix = self._encode_prefix(rows)
                for c0, c1 in columns:
                    pairs = pair_batch(rows, row_cands, c0, c1, features.request_candidates)
                    head_out = self._forward(pairs, prefix, c1 - c0)
                    for key, value in self._results(head_out).items():
                        if key not in out:
                            out[key] = value.new_full((B, C, *value.shape[1:]), self.fill_value)
                        out[key][b0:b1, c0:c1] = value.reshape(b1 - b0, c1 - c0, *value.shape[1:])
            if not out:  # no pair at all (B or C is 0)
                device = cands.item_id.device
                out = {t.name: torch.full((B, C), self.fill_value, device=device) for t in self.module.tasks}
            for key, value in out.items():
                invalid = ~cands.mask.reshape(B, C, *([1] * (value.dim() - 2)))
                out[key] = value.masked_fill(invalid, self.fill_value)
        return out

    def score_user(
        self,
        request: Batch,
        item_id: Tensor,
        item_sparse: dict[str, Tensor] | None = None,
        item_dense: dict[str, Tensor] | None = None,
        row: int | None = None,
    ) -> dict[str, Tensor]:
        """One user's candidates: `score` on row ``row`` of ``request`` (or its only row) and C candidates.

        Args:
            request: a `Batch` holding the user (one row, or pick one with ``row``).
            item_id: (C,) int candidate item ids (all valid).
            item_sparse: name -> (C,) int, every ``features.item_sparse`` column.
            item_dense: name -> (C,) float, every ``features.item_dense`` column.
            row: the request row to score; None: ``request`` must have exactly one row.

        Returns:
            task name -> (C,) float32 prediction (plus the branch outputs with ``branch_outputs``).
        """
        B = _request_size(request)
        if row is None:
            if B != 1:
                raise ValueError(f"request: score_user scores one user, got a Batch of {B} rows (pass row=...)")
            row = 0
        elif not 0 <= row < B:
            raise ValueError(f"row={row} is out of range for a request Batch of {B} rows")
        if item_id.dim() != 1:
            raise ValueError(f"item_id must be (C,) for score_user, got shape {tuple(item_id.shape)}")
        candidates = Candidates(
            item_id.unsqueeze(0),
            {n: t.unsqueeze(0) for n, t in (item_sparse or {}).items()},
            {n: t.unsqueeze(0) for n, t in (item_dense or {}).items()},
        )
        return {k: v[0] for k, v in self.score(_rows(request, row, row + 1), candidates).items()}

    # ----------------------------------------------------------------------------- the paths
    def _encode_prefix(self, rows: Batch) -> Any:
        """The candidate-free part of the encoder for these users, or None on the ``reencode`` path."""
        encoder = self.module.encoder
        if self.path == "hstu_prefix":
            return encoder.encode_user_prefix(rows)
        if self.path == "longer_cache":
            return encoder.encode_user_context(rows)
        return None

    def _forward(self, pairs: Batch, prefix: Any, num_candidates: int) -> HeadOutput:
        """`HeadOutput` of the pair batch: the cached encoder path (or the whole module), then branches and heads."""
        module = self.module
        if self.path == "reencode":
            return module(pairs)[1]
        if self.path == "hstu_prefix":
            encoded = module.encoder.forward_candidates(pairs, prefix)
        else:
            encoded = module.encoder.forward_candidates(pairs, repeat_rows(prefix, num_candidates))
        return heads_and_branches(module, encoded, pairs)

    def _results(self, head_out: HeadOutput) -> dict[str, Tensor]:
        """task -> (n,) predictions, plus ``<branch>_<output>`` (n, ...) with ``branch_outputs``."""
        results = self.module.predictions(head_out)
        if self.branch_outputs:
            for name, branch_out in head_out.branches.items():
                results.update({f"{name}_{key}": value.float() for key, value in branch_out.outputs.items()})
        return results


def score_by_reencoding(
    module: RankingModule,
    request: Batch,
    candidates: Candidates,
    microbatch: int = 1024,
    fill_value: float = 0.0,
    branch_outputs: bool = False,
) -> dict[str, Tensor]:
    """The naive baseline: `CandidateScorer` with ``naive=True`` (the history re-encoded per candidate)."""
    scorer = CandidateScorer(module, microbatch, naive=True, fill_value=fill_value, branch_outputs=branch_outputs)
    return scorer.score(request, candidates)


def heads_and_branches(module: RankingModule, encoded: EncoderOutput, batch: Batch) -> HeadOutput:
    """What `RankingModule.forward` does after its encoder (`RankingModule.heads_and_branches`): the `HeadOutput`."""
    return module.heads_and_branches(encoded, batch)[1]


# ----------------------------------------------------------------------------- batches


def pair_batch(request: Batch, candidates: Candidates, c0: int, c1: int, request_candidates: int = 0) -> Batch:
    """The `Batch` of (user, candidate) pairs: row ``b · (c1 - c0) + (c - c0)`` holds request ``b``'s user fields,
    history and ``ts`` and candidate ``c`` (``c0 <= c < c1``).

    Per-user tensors are repeated with ``expand`` (views when ``request`` has one row, copies otherwise);
    labels and extras are left out. With ``request_candidates = R > 0`` each row also gets its request's
    candidate set: the candidate itself, then the request's other valid candidates in list order, R at most
    (`Batch.request_item_id` and friends).

    Args:
        request: B users.
        candidates: their (B, C) candidates, ``mask`` set.
        c0, c1: the candidate columns to pair.
        request_candidates: R (``features.request_candidates``).
    """
    B, Cc = candidates.item_id.shape[0], c1 - c0

    def per_user(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return t.unsqueeze(1).expand(B, Cc, *t.shape[1:]).reshape(B * Cc, *t.shape[1:])

    def per_pair(t: Tensor) -> Tensor:
        return t[:, c0:c1].reshape(B * Cc)

    request_fields: dict[str, Any] = {}
    if request_candidates > 0:
        request_fields = _request_candidates(candidates, c0, c1, request_candidates)
    return Batch(
        sample_index=per_user(request.sample_index),
        user_id=per_user(request.user_id),
        item_id=per_pair(candidates.item_id),
        ts=per_user(request.ts),
        history_len=per_user(request.history_len),
        history_item_id=per_user(request.history_item_id),
        history_ts=per_user(request.history_ts),
        history_sparse={n: per_user(t) for n, t in request.history_sparse.items()},
        history_dense={n: per_user(t) for n, t in request.history_dense.items()},
        item_sparse={n: per_pair(t) for n, t in candidates.item_sparse.items()},
        item_dense={n: per_pair(t) for n, t in candidates.item_dense.items()},
        user_sparse={n: per_user(t) for n, t in request.user_sparse.items()},
        user_dense={n: per_user(t) for n, t in request.user_dense.items()},
        treatment=per_user(request.treatment),
        propensity=per_user(request.propensity),
        request_id=per_user(request.request_id),
        **request_fields,
    )


def _request_candidates(candidates: Candidates, c0: int, c1: int, size: int) -> dict[str, Any]:
    """``request_len`` (n,), ``request_item_id`` (n, R), ``request_sparse``, ``request_dense`` of the pairs of
    columns ``c0:c1``: the candidate itself, then the other valid candidates of its request in order, R at most."""
    valid = candidates.mask  # (B, C)
    B, C = valid.shape
    cols = torch.arange(C, device=valid.device)
    others = valid.unsqueeze(1) & (cols[None, None, :] != cols[c0:c1, None])  # (B, Cc, C)
    rank = others.long().cumsum(-1)  # slot of each other candidate: 1, 2, ...
    keep = others & (rank < size)
    slot = torch.where(keep, rank, torch.full_like(rank, size))  # dropped ones go to a spare slot
    Cc = c1 - c0

    def layout(values: Tensor) -> Tensor:
        """(B, C) -> (B·Cc, R): the candidate at slot 0, its request mates after it, 0 after request_len."""
        buf = values.new_zeros(B, Cc, size + 1)
        buf.scatter_(2, slot, values.unsqueeze(1).expand(B, Cc, C))
        buf[:, :, 0] = values[:, c0:c1]
        return buf[:, :, :size].reshape(B * Cc, size)

    return {
        "request_len": (1 + keep.sum(-1)).reshape(B * Cc),
        "request_item_id": layout(candidates.item_id),
        "request_sparse": {n: layout(t) for n, t in candidates.item_sparse.items()},
        "request_dense": {n: layout(t) for n, t in candidates.item_dense.items()},
    }


def repeat_rows(cache: NamedTuple, repeats: int) -> Any:
    """A cache of B rows (a NamedTuple of tensors) -> B · ``repeats`` rows, each row ``repeats`` times in a row
    (``expand``: a view when B is 1)."""

    def repeat(t: Tensor) -> Tensor:
        return t.unsqueeze(1).expand(t.shape[0], repeats, *t.shape[1:]).reshape(t.shape[0] * repeats, *t.shape[1:])

    return type(cache)(*(repeat(t) for t in cache))


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor of ``batch`` (views)."""
    return _take_rows(batch, slice(start, stop))


def _candidate_rows(candidates: Candidates, start: int, stop: int) -> Candidates:
    return Candidates(
        candidates.item_id[start:stop],
        {n: t[start:stop] for n, t in candidates.item_sparse.items()},
        {n: t[start:stop] for n, t in candidates.item_dense.items()},
        candidates.mask[start:stop],
    )


def _schedule(B: int, C: int, microbatch: int) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(user rows b0:b1, candidate column chunks) of at most ``microbatch`` pairs each."""
    if B == 0 or C == 0:
        return
    if microbatch <= C:
        columns = [(c, min(c + microbatch, C)) for c in range(0, C, microbatch)]
        for b in range(B):
            yield b, b + 1, columns
    else:
        users = microbatch // C
        for b0 in range(0, B, users):
            yield b0, min(b0 + users, B), [(0, C)]


# ----------------------------------------------------------------------------- input checks


def _request_size(request: Batch) -> int:
    """B, the number of requests; ValueError naming the field whose rows disagree."""
    if request.user_id.dim() != 1:
        raise ValueError(f"request.user_id must be (B,), one per request, got shape {tuple(request.user_id.shape)}")
    B = request.user_id.shape[0]
    for name in ("ts", "history_len"):
        shape = tuple(getattr(request, name).shape)
        if shape != (B,):
            raise ValueError(f"request.{name} must be ({B},) like request.user_id, got shape {shape}")
    for name in ("history_item_id", "history_ts"):
        t = getattr(request, name)
        if t.dim() != 2 or t.shape[0] != B:
            raise ValueError(f"request.{name} must be ({B}, L), got shape {tuple(t.shape)}")
    return B


def _check_candidates(candidates: Candidates, B: int, features: FeatureSpec) -> Candidates:
    """Shapes and feature names checked (ValueError naming the argument); ``mask`` filled in; the ids and
    features of masked positions replaced by 0."""
    item_id = candidates.item_id
    if item_id.dim() != 2:
        raise ValueError(f"candidates.item_id must be (B, C), got shape {tuple(item_id.shape)}")
    if item_id.shape[0] != B:
        raise ValueError(
            f"candidates.item_id has {item_id.shape[0]} rows but the request has {B}: one row of candidates per request"
        )
    if item_id.dtype.is_floating_point or item_id.dtype == torch.bool:
        raise ValueError(f"candidates.item_id must be an integer tensor, got {item_id.dtype}")
    shape = tuple(item_id.shape)
    mask = candidates.mask
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=item_id.device)
    elif tuple(mask.shape) != shape or mask.dtype != torch.bool:
        raise ValueError(
            f"candidates.mask must be a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}"
        )
    for group, expected in (("item_sparse", list(features.item_sparse)), ("item_dense", list(features.item_dense))):
        given = getattr(candidates, group)
        unknown = sorted(set(given) - set(expected))
        if unknown:
            raise ValueError(f"candidates.{group}: unknown item feature(s) {unknown}; features.{group} has {expected}")
        missing = [n for n in expected if n not in given]
        if missing:
            raise ValueError(f"candidates.{group}: missing item feature(s) {missing} (features.{group})")
        for name, t in given.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"candidates.{group}[{name!r}] must have shape {shape}, got {tuple(t.shape)}")

    def clean(t: Tensor) -> Tensor:
        return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return Candidates(
        clean(item_id),
        {n: clean(t) for n, t in candidates.item_sparse.items()},
        {n: clean(t) for n, t in candidates.item_dense.items()},
        mask,
    )


def score_rows_by_request(scorer: CandidateScorer, batch: Batch) -> dict[str, Tensor]:
    """Per-row predictions of a flat `Batch` (one row per impression), each request's user sequence encoded once.

    Rows sharing ``request_id``, ``user_id`` and ``ts`` are one request: they share the history (the newest
    behaviours strictly before ``ts``), so the first of them serves as the request row and all of them as its
    candidates (`CandidateScorer.score`). This is what ``mtrank predict`` does on request-grouped data
    (`RankingModule.predict_step`). Rows of one request split across batches are still scored exactly (their
    user sequence is then encoded once per batch).

    Args:
        scorer: the scorer (its module's ``features.request_candidates`` must be 0: the loader's request
            candidate sets come from the whole table, not from one batch).
        batch: B rows with ``request_id``.

    Returns:
        task name -> (B,) prediction per row, in row order (plus ``<branch>_<output>`` (B, ...) with the
        scorer's ``branch_outputs``).
    """
    if batch.request_id is None:
        raise ValueError("score_rows_by_request: the batch has no request_id (the samples table needs the column)")
    if scorer.module.features.request_candidates > 0:
        raise ValueError(
            "score_rows_by_request: features.request_candidates > 0: the loader's request candidate sets span the "
            "whole table, a batch's rows cannot rebuild them"
        )
    B = batch.batch_size
    key = torch.stack([batch.request_id.long(), batch.user_id.long(), batch.ts.long()], dim=1)  # (B, 3)
    _, group = torch.unique(key, dim=0, return_inverse=True)  # (B,) request of each row
    G = int(group.max()) + 1 if B else 0
    counts = torch.bincount(group, minlength=G)  # (G,)
    order = torch.argsort(group, stable=True)  # rows grouped, batch order inside a group
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    position = torch.empty_like(group)
    position[order] = torch.arange(B, device=group.device) - starts[group[order]]  # (B,) slot in its request
    first = order[starts]  # (G,) the first row of every request
    C = int(counts.max()) if B else 0

    def spread(values: Tensor) -> Tensor:  # (B,) row values -> (G, C), 0 at empty slots
        out = values.new_zeros((G, C))
        out[group, position] = values
        return out

    mask = torch.zeros((G, C), dtype=torch.bool, device=group.device)
    mask[group, position] = True
    candidates = Candidates(
        spread(batch.item_id),
        {n: spread(t) for n, t in batch.item_sparse.items()},
        {n: spread(t) for n, t in batch.item_dense.items()},
        mask,
    )
    scores = scorer.score(_take_rows(batch, first), candidates)
    return {k: v[group, position] for k, v in scores.items()}


def _take_rows(batch: Batch, index: Tensor | slice) -> Batch:
    """Rows ``index`` ((K,) indices, or a slice: views) of every tensor of ``batch``."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = value[index]
        elif isinstance(value, dict):
            changes[f.name] = {k: v[index] for k, v in value.items()}
    return dataclasses.replace(batch, **changes)


def make_request(
    features: FeatureSpec,
    *,
    user_id: int,
    ts: int,
    history_item_id: Sequence[int] | Tensor,
    history_ts: Sequence[int] | Tensor,
    history_sparse: Mapping[str, Sequence[int] | Tensor] | None = None,
    history_dense: Mapping[str, Sequence[float] | Tensor] | None = None,
    user_sparse: Mapping[str, int] | None = None,
    user_dense: Mapping[str, float] | None = None,
) -> Batch:
    """A one-row request `Batch` from one user's raw timeline, as the loader would build it for time ``ts``.

    The timeline (oldest first, as in the users table) keeps only behaviours strictly before ``ts``, the
    newest ``features.max_len`` of them, left-aligned (width ``features.max_len``). Every channel of
    ``features.history_sparse`` / ``history_dense`` and every static feature of ``features.user_sparse`` /
    ``user_dense`` must be given; missing or unknown names raise a ValueError naming them.

    Args:
        features: the model's feature spec.
        user_id: the user's id.
        ts: the request time (the candidates' impression time), in the data's unit.
        history_item_id, history_ts: (T,) the user's behaviours, sorted by time.
        history_sparse, history_dense: channel name -> (T,) values.
        user_sparse, user_dense: static feature name -> value.

    Returns:
        a `Batch` of one row for `CandidateScorer.score` / `CandidateScorer.score_user`.
    """
    items = torch.as_tensor(history_item_id, dtype=torch.long).reshape(-1)
    times = torch.as_tensor(history_ts, dtype=torch.long).reshape(-1)
    T = items.numel()
    if times.numel() != T:
        raise ValueError(f"history_ts has {times.numel()} values, history_item_id {T}")
    if T > 1 and bool((times[1:] < times[:-1]).any()):
        raise ValueError("history_ts must be sorted oldest first (as in the users table)")
    channels = {"history_sparse": (history_sparse, list(features.history_sparse)),
                "history_dense": (history_dense, list(features.history_dense)),
                "user_sparse": (user_sparse, list(features.user_sparse)),
                "user_dense": (user_dense, list(features.user_dense))}  # fmt: skip
    for arg, (given, wanted) in channels.items():
        given_names = set(given or {})
        if given_names != set(wanted):
            raise ValueError(f"{arg}: expected {sorted(wanted)} (features.{arg}), got {sorted(given_names)}")
    for name, values in {**(history_sparse or {}), **(history_dense or {})}.items():
        if torch.as_tensor(values).numel() != T:
            raise ValueError(f"history channel {name!r} has {torch.as_tensor(values).numel()} values, expected {T}")
    stop = int(torch.searchsorted(times, torch.tensor(ts, dtype=torch.long), right=False))  # strictly before ts
    start = max(0, stop - features.max_len)
    n, L = stop - start, features.max_len

    def pad(values: Sequence[Any] | Tensor, dtype: torch.dtype) -> Tensor:
        out = torch.zeros(1, L, dtype=dtype)
        out[0, :n] = torch.as_tensor(values, dtype=dtype).reshape(-1)[start:stop]
        return out

    return Batch(
        sample_index=torch.zeros(1, dtype=torch.long),
        user_id=torch.tensor([user_id], dtype=torch.long),
        item_id=torch.zeros(1, dtype=torch.long),
        ts=torch.tensor([ts], dtype=torch.long),
        history_len=torch.tensor([n], dtype=torch.long),
        history_item_id=pad(items, torch.long),
        history_ts=pad(times, torch.long),
        history_sparse={k: pad(v, torch.long) for k, v in (history_sparse or {}).items()},
        history_dense={k: pad(v, torch.float32) for k, v in (history_dense or {}).items()},
        item_sparse={k: torch.zeros(1, dtype=torch.long) for k in features.item_sparse},
        item_dense={k: torch.zeros(1) for k in features.item_dense},
        user_sparse={k: torch.tensor([int(v)]) for k, v in (user_sparse or {}).items()},
        user_dense={k: torch.tensor([float(v)]) for k, v in (user_dense or {}).items()},
    )
