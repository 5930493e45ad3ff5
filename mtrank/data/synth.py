"""Synthetic recommender data with planted, documented effects: ``mtrank synth --out DIR``.

Writes ``users.parquet``, ``train.parquet``, ``val.parquet``, ``test.parquet`` and
``synth_config.json`` (the config; written last, so its presence means the set is complete).
Deterministic under ``seed``; users are generated in chunks of ``chunk_users`` and streamed to
disk with ``pyarrow.parquet.ParquetWriter``, so memory is bounded by one chunk.

Timeline (times in seconds from ``2023-11-14``, i.e. ``ts >= 1_700_000_000``). Each user has one
behaviour timeline of *impressions*, grouped into requests (1-4 impressions sharing one ``ts`` and
one ``request_id``) and requests into sessions (requests ~90 s apart). The first ``days -
sample_days`` days are the pre-sample log (about ``history_mean`` impressions per user times their
``activity``); the last ``sample_days`` days hold about ``samples_per_user`` impressions per user,
which are written as labelled samples. **Every impression is also a behaviour in the users
table** (``hist_*`` columns hold the user's whole timeline, including the sample window), so a
sample sees exactly the impressions strictly before its ``ts`` — the loader's strictly-before rule
keeps it leak-free, and the impressions of its own request (same ``ts``) are not in its history.
Samples are split by time: the first ``1 - val_fraction - test_fraction`` of the sample window is
``train``, then ``val``, then ``test``.

Planted effects (``sigmoid`` = logistic function; ``w[u, c]`` = user ``u``'s interest in category ``c``):

- **Category interest.** Each user has 3 favourite categories with Dirichlet(1, 1, 1) weights
  ``w`` (0 for other categories). Half of the impressions come from a favourite category (picked by
  weight), the rest are popularity-sampled from all items. Click logit
  ``z0 = -3.0 + interest_strength * w[u, c] + 0.5 * popularity_z(item) + 0.3 * log(activity)
  - fatigue_strength * max(0, n_same_category_last_hour - 2)``: a target whose category matches the
  categories the user clicked in the history is clicked far more often.
- **Fatigue.** ``n_same_category_last_hour`` counts the user's impressions of the target's category
  in the hour strictly before the impression; more than 2 lower the click logit.
- **Treatment.** ``treatment`` ~ Bernoulli(0.5) per impression (``propensity`` = 0.5), shifting the
  click logit by ``treatment_effects[segment]`` (default ``+1.0, +0.4, 0.0, -0.6`` for segments
  0..3; ``segment`` is a static user feature). ``true_effect`` = ``sigmoid(z0 + tau) -
  sigmoid(z0)``, the sample's true uplift in click probability (evaluation only).
- **Correlated tasks.** ``like`` only after a click, ``P = sigmoid(-1 + 2 w)``; ``follow`` only
  after a click, ``P = sigmoid(-3.8 + 2 w + like)`` (rare); ``watch_time`` (seconds): after a click a
  fraction ~ Beta with mean ``sigmoid(1 - 0.8 log(duration / 30) + 1.5 w)`` of the item's
  ``duration``, otherwise min(duration, Exp(2 s)); ``long_view`` = ``watch_time >= 0.7 duration``,
  so it is tied to the item's duration (short items are long-viewed far more often).
  Rates: follow < like < click.

Columns. users: ``user_id``, ``hist_item_id``, ``hist_ts``, ``hist_category``, ``hist_action``
(0 view, 1 click, 2 like, 3 follow — the strongest engagement), ``hist_watch`` (seconds, float),
``segment`` (int), ``activity`` (float, mean 1). samples: ``user_id``, ``item_id``, ``ts``,
``request_id``, ``category``, ``duration``, ``click``, ``like``, ``follow``, ``long_view``,
``watch_time``, ``treatment``, ``propensity``, ``true_effect``. `SynthConfig.features` and
`SynthConfig.tasks` give the matching `FeatureSpec` and task list.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtrank.batch import Batch
from mtrank.spec import FeatureSpec, TaskSpec

log = logging.getLogger(__name__)

T0 = 1_700_000_000
DAY = 86_400
HOUR = 3_600
IMPRESSIONS_PER_REQUEST = 2.5  # 1 + Binomial(3, 0.5)
REQUESTS_PER_SESSION = 6
CONFIG_FILE = "synth_config.json"
SPLITS = ("train", "val", "test")


@dataclass
class SynthConfig:
    """Size and effect strengths of a synthetic data set.

    Args:
        num_users: users (ids ``0..num_users-1``).
        num_items: items (ids ``0..num_items-1``).
        num_categories: item categories.
        history_mean: mean impressions per user before the sample window (scaled by ``activity``).
        samples_per_user: mean labelled impressions per user in the sample window (train+val+test).
        max_len: the feature spec's ``max_len`` (history width given to the model).
        num_segments: user segments (the treatment effect depends on the segment).
        treatment_effects: click-logit shift of the treatment per segment (cycled if shorter).
        interest_strength: click-logit weight of the user's interest in the target's category.
        fatigue_strength: click-logit penalty per same-category impression beyond 2 in the last hour.
        days: length of the whole timeline.
        sample_days: length of the final window whose impressions become samples.
        val_fraction, test_fraction: time fractions of the sample window for val and test.
        seed: random seed; same config -> identical files.
        chunk_users: users generated and written per chunk (bounds memory).
    """

    num_users: int = 2000
    num_items: int = 2000
    num_categories: int = 20
    history_mean: float = 150.0
    samples_per_user: float = 100.0
    max_len: int = 256
    num_segments: int = 4
    treatment_effects: list[float] = field(default_factory=lambda: [1.0, 0.4, 0.0, -0.6])
    interest_strength: float = 5.0
    fatigue_strength: float = 0.5
    days: float = 60.0
    sample_days: float = 15.0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    chunk_users: int = 500

    def __post_init__(self) -> None:
        if min(self.num_users, self.num_items, self.num_categories, self.num_segments, self.chunk_users) <= 0:
            raise ValueError("synth: num_users, num_items, num_categories, num_segments, chunk_users must be > 0")
        if self.num_categories < 3:
            raise ValueError("synth: num_categories must be >= 3 (each user has 3 favourite categories)")
        if not 0 < self.sample_days < self.days:
            raise ValueError(f"synth: need 0 < sample_days < days, got {self.sample_days}, {self.days}")
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("synth: val_fraction and test_fraction must be >= 0 and sum to < 1")
        if not self.treatment_effects:
            raise ValueError("synth: treatment_effects must not be empty")
        if self.history_mean < 0 or self.samples_per_user < 0:
            raise ValueError("synth: history_mean and samples_per_user must be >= 0")

    def features(self) -> FeatureSpec:
        """The `FeatureSpec` matching the generated columns."""
        return FeatureSpec(
            num_users=self.num_users,
            num_items=self.num_items,
            max_len=self.max_len,
            history_sparse={"category": self.num_categories, "action": 4},
            history_dense=["watch"],
            item_sparse={"category": self.num_categories},
            item_dense=["duration"],
            user_sparse={"segment": self.num_segments},
            user_dense=["activity"],
            num_treatments=2,
            extra_columns=["true_effect"],
        )

    def tasks(self) -> list[TaskSpec]:
        """The generated tasks: click, like, follow, long_view (binary) and watch_time (regression)."""
        return [
            TaskSpec(name="click", kind="binary", group="engagement"),
            TaskSpec(name="like", kind="binary", group="engagement"),
            TaskSpec(name="follow", kind="binary", group="engagement"),
            TaskSpec(name="long_view", kind="binary", group="consumption"),
            TaskSpec(name="watch_time", kind="regression", loss="log_mse", group="consumption"),
        ]

    def to_json(self) -> str:
        """The config as canonical JSON (compared to decide whether files can be reused)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class _Items:
    category: np.ndarray  # (I,) int32
    duration: np.ndarray  # (I,) float32 seconds
    pop_z: np.ndarray  # (I,) standardised log popularity
    cum_pop: np.ndarray  # (I,) cumulative popularity over all items, in (0, 1]
    by_cat: np.ndarray  # (I,) item ids sorted by category
    cat_key: np.ndarray  # (I,) category + within-category cumulative popularity, aligned with by_cat


def _make_items(cfg: SynthConfig) -> _Items:
    rng = np.random.default_rng([cfg.seed, 1])
    num_items, num_cats = cfg.num_items, cfg.num_categories
    category = rng.permutation(np.arange(num_items) % num_cats).astype(np.int32)
    pop = 1.0 / (rng.permutation(num_items) + 10.0) ** 0.8
    duration = np.clip(rng.lognormal(np.log(30.0), 0.8, num_items), 3.0, 600.0).round(1).astype(np.float32)
    log_pop = np.log(pop)
    pop_z = (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9)
    cum_pop = np.cumsum(pop) / pop.sum()
    by_cat = np.lexsort((np.arange(num_items), category))
    cat_sorted = category[by_cat]
    pop_sorted = pop[by_cat]
    cat_total = np.bincount(cat_sorted, weights=pop_sorted, minlength=num_cats)
    within = np.cumsum(pop_sorted) - np.concatenate([[0.0], np.cumsum(cat_total)[:-1]])[cat_sorted]
    cat_key = cat_sorted + within / cat_total[cat_sorted]
    return _Items(category, duration, pop_z, cum_pop, by_cat, cat_key)


def _requests(rng: np.random.Generator, mean_events: np.ndarray, start: float, end: float) -> tuple:
    """Request times of each user in [start, end): (user_local, ts) sorted, grouped in sessions."""
    n_users = mean_events.shape[0]
    num_req = rng.poisson(mean_events / IMPRESSIONS_PER_REQUEST)
    total = int(num_req.sum())
    user = np.repeat(np.arange(n_users), num_req)
    num_sess = np.maximum(1, np.round(num_req / REQUESTS_PER_SESSION)).astype(np.int64)
    sess_base = np.concatenate([[0], np.cumsum(num_sess)[:-1]])
    sess_start = rng.uniform(start, end, int(num_sess.sum()))
    session = sess_base[user] + np.floor(rng.random(total) * num_sess[user]).astype(np.int64)
    order = np.argsort(session, kind="stable")
    session = session[order]
    user = user[order]
    gaps = rng.exponential(90.0, total) + 5.0
    csum = np.cumsum(gaps)
    first = np.concatenate([[True], session[1:] != session[:-1]]) if total else np.zeros(0, bool)
    group_base = np.maximum.accumulate(np.where(first, csum - gaps, 0.0)) if total else csum
    ts = np.minimum(sess_start[session] + (csum - group_base), end - 1)
    return user, np.floor(ts).astype(np.int64)


def _chunk(cfg: SynthConfig, items: _Items, chunk: int, u0: int, u1: int, request_base: int) -> tuple:
    """Generate users ``u0..u1-1``: (users table, samples table, number of requests)."""
    rng = np.random.default_rng([cfg.seed, 2, chunk])
    n, num_cats = u1 - u0, cfg.num_categories
    segment = rng.integers(0, cfg.num_segments, n).astype(np.int32)
    activity = rng.lognormal(-0.125, 0.5, n).astype(np.float32)
    favs = np.argsort(rng.random((n, num_cats)), axis=1)[:, :3]
    fav_w = -np.sort(-rng.dirichlet(np.ones(3), n), axis=1)
    interest = np.zeros((n, num_cats))
    np.put_along_axis(interest, favs, fav_w, axis=1)

    span = cfg.days * DAY
    sample_start = (cfg.days - cfg.sample_days) * DAY
    hu, hts = _requests(rng, cfg.history_mean * activity, 0.0, sample_start)
    su, sts = _requests(rng, cfg.samples_per_user * activity, sample_start, span)
    req_user = np.concatenate([hu, su])
    req_ts = np.concatenate([hts, sts])
    order = np.lexsort((req_ts, req_user))
    req_user, req_ts = req_user[order], req_ts[order]
    num_requests = req_user.shape[0]
    per_req = 1 + rng.binomial(3, 0.5, num_requests)
    user = np.repeat(req_user, per_req)
    ts = np.repeat(req_ts, per_req)
    request_id = np.repeat(request_base + np.arange(num_requests, dtype=np.int64), per_req)
    m = user.shape[0]

    # candidate items: half from a favourite category (by weight), half popularity-sampled
    from_fav = rng.random(m) < 0.5
    slot = (rng.random(m)[:, None] > np.cumsum(fav_w[user], axis=1)[:, :2]).sum(axis=1)
    fav_cat = favs[user, slot]
    key = fav_cat + rng.random(m)
    in_cat = items.by_cat[np.minimum(np.searchsorted(items.cat_key, key), cfg.num_items - 1)]
    popular = np.minimum(np.searchsorted(items.cum_pop, rng.random(m)), cfg.num_items - 1)
    item = np.where(from_fav, in_cat, popular).astype(np.int32)
    cat = items.category[item]
    w = interest[user, cat]

    # fatigue: same-category impressions of the user in [ts - 1h, ts)
    width = int(span) + 2 * HOUR
    gkey = (user.astype(np.int64) * num_cats + cat) * width + (ts + HOUR)
    skey = np.sort(gkey)
    same_last_hour = np.searchsorted(skey, gkey, "left") - np.searchsorted(skey, gkey - HOUR, "left")

    effects = np.asarray(cfg.treatment_effects, dtype=np.float64)
    tau = effects[segment[user] % len(effects)]
    z0 = (
        -3.0
        + cfg.interest_strength * w
        + 0.5 * items.pop_z[item]
        + 0.3 * np.log(activity[user])
        - cfg.fatigue_strength * np.maximum(0, same_last_hour - 2)
    )
    treatment = (rng.random(m) < 0.5).astype(np.int8)
    p0, p1 = _sigmoid(z0), _sigmoid(z0 + tau)
    click = rng.random(m) < np.where(treatment == 1, p1, p0)
    like = click & (rng.random(m) < _sigmoid(-1.0 + 2.0 * w))
    follow = click & (rng.random(m) < _sigmoid(-3.8 + 2.0 * w + like))
    duration = items.duration[item].astype(np.float64)
    mean_frac = _sigmoid(1.0 - 0.8 * np.log(duration / 30.0) + 1.5 * w)
    frac = rng.beta(np.maximum(mean_frac * 4.0, 1e-3), np.maximum((1.0 - mean_frac) * 4.0, 1e-3))
    watch = np.where(click, frac * duration, np.minimum(duration, rng.exponential(2.0, m)))
    watch = watch.round(1).astype(np.float32)
    long_view = watch >= 0.7 * duration
    action = np.where(follow, 3, np.where(like, 2, np.where(click, 1, 0))).astype(np.int32)

    counts = np.bincount(user, minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)

    def lists(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    users = pa.table(
        {
            "user_id": pa.array(np.arange(u0, u1, dtype=np.int32)),
            "hist_item_id": lists(item),
            "hist_ts": lists(T0 + ts),
            "hist_category": lists(cat),
            "hist_action": lists(action),
            "hist_watch": lists(watch),
            "segment": pa.array(segment),
            "activity": pa.array(activity),
        }
    )
    keep = ts >= sample_start
    samples = pa.table(
        {
            "user_id": pa.array((u0 + user[keep]).astype(np.int32)),
            "item_id": pa.array(item[keep]),
            "ts": pa.array(T0 + ts[keep]),
            "request_id": pa.array(request_id[keep]),
            "category": pa.array(cat[keep]),
            "duration": pa.array(items.duration[item[keep]]),
            "click": pa.array(click[keep].astype(np.int8)),
            "like": pa.array(like[keep].astype(np.int8)),
            "follow": pa.array(follow[keep].astype(np.int8)),
            "long_view": pa.array(long_view[keep].astype(np.int8)),
            "watch_time": pa.array(watch[keep]),
            "treatment": pa.array(treatment[keep]),
            "propensity": pa.array(np.full(int(keep.sum()), 0.5, dtype=np.float32)),
            "true_effect": pa.array((p1 - p0)[keep].astype(np.float32)),
        }
    )
    return users, samples, num_requests


def random_batch(features: FeatureSpec, history_len: list[int], width: int | None = None, seed: int = 0) -> Batch:
    """A `Batch` of random ids and values for ``features``, without planted effects (benchmarks, FLOP counts).

    Args:
        features: sizes every id column and names every channel.
        history_len: (B,) behaviours per row, each at most ``width``.
        width: the padded history width L (default ``max(history_len)``, at least 1).
        seed: torch generator seed.

    Returns:
        B rows, left-aligned histories (0 at padding) with ascending times strictly before ``ts``.
        With ``features.request_candidates = C > 0`` also random request candidates: ``request_len``
        in ``[1, C]``, position 0 the row's own item and item features, random items after it, 0
        at and after ``request_len``.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(history_len)
    L = width if width is not None else max([1, *history_len])
    lengths = torch.tensor(history_len, dtype=torch.int64)
    if B and int(lengths.max()) > L:
        raise ValueError(f"random_batch: history_len {int(lengths.max())} exceeds the width {L}")
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)

    def ids(vocab: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, vocab, shape, generator=g)

    ts = torch.full((B,), T0 + 30 * DAY, dtype=torch.int64)
    gaps = torch.randint(1, HOUR, (B, L), generator=g)
    history_ts = ts[:, None] - gaps.flip(1).cumsum(1).flip(1)  # ascending, all < ts
    # drawn in the order of the Batch fields, so every seed gives the values it always gave
    user_id, item_id = ids(features.num_users, B), ids(features.num_items, B)
    history_item_id = ids(features.num_items, B, L) * mask
    history_sparse = {n: ids(v, B, L) * mask for n, v in features.history_sparse.items()}
    history_dense = {n: torch.rand(B, L, generator=g) * 100 * mask for n in features.history_dense}
    item_sparse = {n: ids(v, B) for n, v in features.item_sparse.items()}
    item_dense = {n: torch.rand(B, generator=g) * 60 for n in features.item_dense}
    user_sparse = {n: ids(v, B) for n, v in features.user_sparse.items()}
    user_dense = {n: torch.rand(B, generator=g) for n in features.user_dense}
    request: dict = {}
    C = features.request_candidates
    if C > 0:  # drawn last: the other fields do not depend on C
        request_len = torch.randint(1, C + 1, (B,), generator=g)
        valid = torch.arange(C)[None, :] < request_len[:, None]  # (B, C)

        def candidates(own: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
            """Position 0 = the row's own value, then ``others``; 0 at and after ``request_len``."""
            return torch.cat([own[:, None], others[:, 1:]], dim=1) * valid

        request = {
            "request_len": request_len,
            "request_item_id": candidates(item_id, ids(features.num_items, B, C)),
            "request_sparse": {n: candidates(item_sparse[n], ids(v, B, C)) for n, v in features.item_sparse.items()},
            "request_dense": {
                n: candidates(item_dense[n], torch.rand(B, C, generator=g) * 60) for n in features.item_dense
            },
        }
    return Batch(
        sample_index=torch.arange(B),
        user_id=user_id,
        item_id=item_id,
        ts=ts,
        history_len=lengths,
        history_item_id=history_item_id,
        history_ts=history_ts * mask,
        history_sparse=history_sparse,
        history_dense=history_dense,
        item_sparse=item_sparse,
        item_dense=item_dense,
        user_sparse=user_sparse,
        user_dense=user_dense,
        **request,
    )


def generate(config: SynthConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write the data set of ``config`` to ``out_dir``.

    Returns:
        paths by name: ``users``, ``train``, ``val``, ``test`` (Parquet) and ``config`` (JSON).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.parquet" for name in ("users", *SPLITS)}
    paths["config"] = out / CONFIG_FILE
    paths["config"].unlink(missing_ok=True)
    items = _make_items(config)
    sample_start = T0 + int((config.days - config.sample_days) * DAY)
    window = config.sample_days * DAY
    cut_val = sample_start + int(window * (1.0 - config.val_fraction - config.test_fraction))
    cut_test = sample_start + int(window * (1.0 - config.test_fraction))
    writers: dict[str, pq.ParquetWriter] = {}
    rows = dict.fromkeys(("users", *SPLITS), 0)
    request_base = 0
    try:
        for chunk, u0 in enumerate(range(0, config.num_users, config.chunk_users)):
            u1 = min(u0 + config.chunk_users, config.num_users)
            users, samples, num_requests = _chunk(config, items, chunk, u0, u1, request_base)
            request_base += num_requests
            ts = samples.column("ts").to_numpy()
            parts = {
                "users": users,
                "train": samples.filter(pa.array(ts < cut_val)),
                "val": samples.filter(pa.array((ts >= cut_val) & (ts < cut_test))),
                "test": samples.filter(pa.array(ts >= cut_test)),
            }
            for name, table in parts.items():
                if name not in writers:
                    writers[name] = pq.ParquetWriter(paths[name], table.schema, compression="zstd")
                writers[name].write_table(table, row_group_size=1 << 17)
                rows[name] += table.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    paths["config"].write_text(config.to_json())
    log.info("synth: wrote %s to %s", ", ".join(f"{k} {v} rows" for k, v in rows.items()), out)
    return paths


def load_config(out_dir: str | Path) -> SynthConfig | None:
    """The `SynthConfig` a complete data set in ``out_dir`` was made from, or None."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return SynthConfig(**json.loads(path.read_text()))
    except (TypeError, ValueError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """``mtrank synth --out DIR [--num-users N ...]``: generate a data set; returns the exit status."""
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(prog="mtrank synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    for f in dataclasses.fields(SynthConfig):
        default = getattr(defaults, f.name)
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        if isinstance(default, list):
            parser.add_argument(*flags, dest=f.name, type=float, nargs="+", default=default)
        else:
            parser.add_argument(*flags, dest=f.name, type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        config = SynthConfig(**args)
    except ValueError as err:
        parser.error(str(err))
    paths = generate(config, out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
