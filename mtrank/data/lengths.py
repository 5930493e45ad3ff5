"""Stochastic history lengths for training, with token-balanced batches (``data.length_sampling``).

During training each sample's history is cut to a randomly drawn length (HSTU's "Stochastic
Length", arXiv 2402.17152 §3.3; load-balanced as in ULTRA-HSTU, arXiv 2602.16986), which cuts the
attention cost of long histories and regularises the model toward recent behaviour. Evaluation
(val/test/predict) never cuts.

**Which behaviours survive a cut:** always the NEWEST ``cut`` ones; the oldest are dropped. The
newest behaviours carry the most signal about the next interaction, and keeping one contiguous
recent window (rather than a random subsequence) keeps the relative positions and the time gaps
between neighbouring behaviours what they are at serving time. A history no longer than its drawn
length is untouched.

Pieces:

- `LengthSampling`: the config (``kind``: ``hstu``, ``uniform``, ``loguniform``).
- `draw_cut_lengths`: vectorised draw of the cut lengths of an array of history lengths.
- `assign_balanced`: stratified dealing of an epoch's samples into batches of near-equal tokens.
- `BalancedLengthSampler`: the training batch sampler; yields `CutBatch` (indices + cut lengths),
  which `HistoryDataset` turns into a `Batch` whose padded width is the batch's longest cut
  rounded up to a multiple of 8 (`mtrank.data.dataset.padded_width`), not ``features.max_len``.

YAML::

    data:
      length_sampling:
        kind: hstu        # or uniform / loguniform
        alpha: 1.6        # hstu only
      # length_sampling: {kind: uniform, min_len: 16, max_len: 256}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtrank.data.dataset import CutBatch, ShardedBatchSampler

KINDS = ("hstu", "uniform", "loguniform")


@dataclass
class LengthSampling:
    """How training histories are cut to random lengths (``data.length_sampling``).

    With ``N`` = ``features.max_len`` and ``n`` a sample's history length (at most ``N``):

    - ``hstu`` (HSTU's stochastic length): a history with ``n > N^(alpha/2)`` is cut to
      ``round(N^(alpha/2))`` with probability ``1 - N^alpha / n^2``, else kept whole; shorter
      histories are never cut. The expected attention cost ``E[cut^2]`` is at most ``~2 N^alpha``
      instead of ``N^2``.
    - ``uniform``: draw ``d ~ Uniform{min_len, ..., max_len}``, cut to ``min(n, d)``.
    - ``loguniform``: draw ``d`` log-uniform on ``[min_len, max_len]`` (``d = floor(exp(u))``,
      ``u ~ U(log min_len, log(max_len + 1))``, so ``P(d = k) ∝ log((k + 1) / k)``), cut to ``min(n, d)``.

    A cut keeps the newest behaviours (see the module docstring).

    Args:
        kind: ``"hstu"`` (default), ``"uniform"`` or ``"loguniform"``.
        alpha: ``hstu`` exponent, in ``(1, 2]``; default 1.6 (``alpha = 2`` never cuts). Ignored by
            the other kinds.
        min_len: ``uniform``/``loguniform`` smallest drawn length, ``>= 1`` and at most
            ``features.max_len``; default 1. Ignored by ``hstu``.
        max_len: ``uniform``/``loguniform`` largest drawn length, ``>= min_len`` and at most
            ``features.max_len``; default None: ``features.max_len``. Ignored by ``hstu``.
    """

    kind: str = "hstu"
    alpha: float = 1.6
    min_len: int = 1
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"data.length_sampling.kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}"
            )
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float, np.number))
            or not 1 < self.alpha <= 2
        ):
            raise ValueError(f"data.length_sampling.alpha must be in (1, 2], got {self.alpha}")
        if not _is_int(self.min_len) or self.min_len < 1:
            raise ValueError(f"data.length_sampling.min_len must be an integer >= 1, got {self.min_len!r}")
        if self.max_len is not None and (not _is_int(self.max_len) or self.max_len < self.min_len):
            raise ValueError(
                f"data.length_sampling.max_len must be an integer >= min_len ({self.min_len}) or null,"
                f" got {self.max_len!r}"
            )

    def bounds(self, feature_max_len: int) -> tuple[int, int]:
        """``(min_len, max_len)`` of the ``uniform``/``loguniform`` draw given ``features.max_len``.

        Raises ValueError when a bound exceeds ``features.max_len``.
        """
        if feature_max_len <= 0:
            raise ValueError(f"features.max_len must be positive, got {feature_max_len}")
        hi = feature_max_len if self.max_len is None else self.max_len
        if hi > feature_max_len:
            raise ValueError(f"data.length_sampling.max_len must be <= features.max_len ({feature_max_len}), got {hi}")
        if self.min_len > feature_max_len:
            raise ValueError(
                f"data.length_sampling.min_len must be <= features.max_len ({feature_max_len}), got {self.min_len}"
            )
        return self.min_len, hi

    def check(self, feature_max_len: int) -> None:
        """Raise ValueError when the settings do not fit ``features.max_len`` (bounds ignored by ``hstu``)."""
        if feature_max_len <= 0:
            raise ValueError(f"features.max_len must be positive, got {feature_max_len}")
        if self.kind != "hstu":
            self.bounds(feature_max_len)

    def hstu_target(self, feature_max_len: int) -> tuple[float, int]:
        """``(N^(alpha/2), round(N^(alpha/2)))`` for ``N = feature_max_len``: the ``hstu`` threshold and cut length."""
        threshold = float(feature_max_len) ** (float(self.alpha) / 2.0)
        return threshold, max(1, math.floor(threshold + 0.5))


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def draw_cut_lengths(
    history_len: np.ndarray, sampling: LengthSampling, max_len: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw the cut length of every history: (n,) int64 with ``0 <= cut <= history_len``.

    Args:
        history_len: (n,) ints, the full history lengths (``HistoryDataset.history_len``, each
            at most ``max_len``).
        sampling: the distribution.
        max_len: ``features.max_len`` (``N``).
        rng: the generator; the result is a deterministic function of its state, and exactly one
            draw of ``n`` values is consumed whatever the lengths.

    Returns:
        (n,) int64 cut lengths; ``cut == history_len`` where the history is kept whole.
    """
    h = np.asarray(history_len, dtype=np.int64)
    if h.ndim != 1:
        raise ValueError(f"history_len must be one-dimensional, got shape {h.shape}")
    if h.size and h.min() < 0:
        raise ValueError("history_len must be >= 0")
    n = h.shape[0]
    if sampling.kind == "hstu":
        if max_len <= 0:
            raise ValueError(f"features.max_len must be positive, got {max_len}")
        threshold, target = sampling.hstu_target(max_len)
        u = rng.random(n)
        hf = np.maximum(h, 1).astype(np.float64)
        p_cut = 1.0 - float(max_len) ** float(sampling.alpha) / (hf * hf)
        cut = (h > threshold) & (u < p_cut)
        return np.where(cut, np.minimum(h, target), h).astype(np.int64)
    lo, hi = sampling.bounds(max_len)
    if sampling.kind == "uniform":
        drawn = rng.integers(lo, hi, size=n, endpoint=True, dtype=np.int64)
    else:  # loguniform
        u = rng.uniform(math.log(lo), math.log(hi + 1), size=n)
        drawn = np.clip(np.floor(np.exp(u)).astype(np.int64), lo, hi)
    return np.minimum(h, drawn)


def assign_balanced(cut_len: np.ndarray, num_batches: int, rng: np.random.Generator) -> np.ndarray:
    """Deal samples into ``num_batches`` batches of near-equal token totals (stratified dealing).

    The samples are sorted by cut length, longest first (ties keep the input order, so shuffle the
    input), and the sorted order is split into strata of ``num_batches`` samples; every batch gets
    one sample of each full stratum, at a random position inside the stratum. The last, partial
    stratum (the ``n mod num_batches`` shortest samples) goes one each to the batches with the
    fewest tokens so far. So every batch has near the same length distribution: token totals
    (``sum(cut + 1)``) and padded widths (the longest cut, drawn from the top stratum) are
    near-equal, while which samples meet stays random. Batch sizes differ by at most one.

    Args:
        cut_len: (n,) ints, each sample's (cut) history length.
        num_batches: number of batches (>= 1 when ``n > 0``).
        rng: the generator (one permutation per stratum is drawn).

    Returns:
        (n,) int64 batch id in ``[0, num_batches)`` of each sample.
    """
    c = np.asarray(cut_len, dtype=np.int64)
    n = c.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    k = num_batches
    order = np.argsort(-c, kind="stable")
    full, rest = divmod(n, k)
    strata = rng.permuted(order[: full * k].reshape(full, k), axis=1)  # (full, k): column j -> batch j
    batch_of = np.empty(n, dtype=np.int64)
    batch_of[strata] = np.arange(k, dtype=np.int64)[None, :]
    if rest:
        tokens = (c[strata] + 1).sum(axis=0) if full else np.zeros(k, dtype=np.int64)
        tie_break = rng.permutation(k)
        takers = tie_break[np.argsort(tokens[tie_break], kind="stable")[:rest]]
        batch_of[order[full * k :]] = takers
    return batch_of


class BalancedLengthSampler(ShardedBatchSampler):
    """Training batch sampler with stochastic history lengths and token-balanced batches.

    Yields this rank's `CutBatch` es (``indices`` (b,) int64 sample rows, ``cut_len`` (b,) int64
    history lengths to keep) of one epoch. Per epoch, with a generator seeded by ``(seed, epoch)``
    (identical on every rank): the samples are permuted, each one's cut length is drawn
    (`draw_cut_lengths`), and the samples are dealt (`assign_balanced`) into the epoch's
    ``world_size * len(self)`` batches, batch ``k`` going to step ``k // world_size`` of rank
    ``k % world_size``. So every batch on every rank holds near the same number of tokens and has
    near the same padded width, every sample comes exactly once per epoch over all ranks, every rank
    runs the same number of batches as `ShardedBatchSampler` would (``len(self)``), and batch sizes
    differ by at most one (at most ``batch_size``). `set_epoch`, `state_dict` and `load_state_dict`
    behave as in `ShardedBatchSampler`.

    Args:
        history_len: (num_samples,) ints, every sample's full history length
            (``HistoryDataset.history_len``).
        batch_size: the largest batch.
        sampling: the length distribution.
        max_len: ``features.max_len``.
        seed: base seed of the per-epoch permutation and draws.
        rank, world_size: override; default from `torch.distributed` when initialised, else 0 and 1.
    """

    def __init__(
        self,
        history_len: np.ndarray,
        batch_size: int,
        sampling: LengthSampling,
        max_len: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        lengths = np.asarray(history_len, dtype=np.int64)
        if lengths.ndim != 1:
            raise ValueError(f"history_len must be one-dimensional, got shape {lengths.shape}")
        super().__init__(len(lengths), batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size)
        sampling.check(max_len)
        self.history_len = lengths
        self.sampling = sampling
        self.max_len = max_len

    def epoch_plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The current epoch over all ranks: ``(order, cut_len, batch_of)``, each (num_samples,).

        ``order`` is the permuted sample rows, ``cut_len[i]`` the cut length of sample
        ``order[i]``, ``batch_of[i]`` its global batch id (step ``batch_of // world_size``, rank
        ``batch_of % world_size``).
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_samples).astype(np.int64)
        cut = draw_cut_lengths(self.history_len[order], self.sampling, self.max_len, rng)
        batch_of = assign_balanced(cut, len(self) * self.world_size, rng)
        return order, cut, batch_of

    def batches(self) -> list[CutBatch]:  # type: ignore[override]
        """This rank's batches of the current epoch, in order."""
        world, rank = self.world_size, self.rank
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        steps = len(self)
        if steps == 0:
            return []
        order, cut, batch_of = self.epoch_plan()
        mine = np.flatnonzero(batch_of % world == rank)
        mine = mine[np.argsort(batch_of[mine], kind="stable")]
        counts = np.bincount(batch_of[mine] // world, minlength=steps)
        return [CutBatch(order[p], cut[p]) for p in np.split(mine, np.cumsum(counts)[:-1])]
