"""Stochastic history lengths: the draws, newest-kept cuts, narrow widths, token-balanced sharding."""

from __future__ import annotations

import math
from pathlib import Path

import jsonargparse
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser

from mtrank.batch import Batch
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.dataset import CutBatch, HistoryDataset, ShardedBatchSampler, make_loader, padded_width
from mtrank.data.lengths import BalancedLengthSampler, LengthSampling, assign_balanced, draw_cut_lengths
from mtrank.data.store import UserStore
from mtrank.data.synth import SynthConfig

TINY = {"num_users": 60, "num_items": 50, "history_mean": 20, "samples_per_user": 30, "max_len": 16, "seed": 2}


def _skewed_lengths(n: int, max_len: int, seed: int = 0) -> np.ndarray:
    """(n,) heavy-tailed history lengths in [0, max_len]: most short, a long tail capped at max_len."""
    rng = np.random.default_rng(seed)
    return np.minimum(np.floor(rng.lognormal(3.5, 1.2, n)), max_len).astype(np.int64)


# ---- the draws ----------------------------------------------------------------------------------


def test_hstu_cuts_only_long_histories_with_the_papers_probability() -> None:
    N, alpha, draws = 256, 1.6, 100_000
    sampling = LengthSampling(kind="hstu", alpha=alpha)
    threshold, target = sampling.hstu_target(N)
    assert math.isclose(threshold, N**0.8) and target == round(N**0.8) == 84
    rng = np.random.default_rng(0)
    short = np.repeat(np.arange(0, 85), 200)  # n <= N^(alpha/2) = 84.4: never cut
    np.testing.assert_array_equal(draw_cut_lengths(short, sampling, N, rng), short)
    for n in (85, 100, 200, 256):
        cut = draw_cut_lengths(np.full(draws, n), sampling, N, rng)
        assert set(np.unique(cut).tolist()) <= {n, target}
        expected = 1 - N**alpha / n**2
        assert abs((cut < n).mean() - expected) < 0.01, (n, (cut < n).mean(), expected)
    never = LengthSampling(kind="hstu", alpha=2.0)  # N^alpha / n^2 >= 1 for every n <= N
    lengths = np.arange(N + 1)
    np.testing.assert_array_equal(draw_cut_lengths(lengths, never, N, rng), lengths)


def test_uniform_draws_cover_the_bounds_and_never_lengthen() -> None:
    sampling = LengthSampling(kind="uniform", min_len=4, max_len=20)
    rng = np.random.default_rng(1)
    cut = draw_cut_lengths(np.full(50_000, 32), sampling, 32, rng)
    assert cut.min() == 4 and cut.max() == 20
    counts = np.bincount(cut, minlength=21)[4:]
    assert counts.min() / counts.max() > 0.9  # flat over {4..20}
    lengths = np.random.default_rng(2).integers(0, 33, 20_000)
    cut = draw_cut_lengths(lengths, sampling, 32, rng)
    assert (cut <= lengths).all() and (cut == np.minimum(cut, lengths)).all()
    assert (cut[lengths <= 4] == lengths[lengths <= 4]).all()  # shorter than every draw: untouched
    assert (cut >= np.minimum(lengths, 4)).all()
    default = draw_cut_lengths(np.full(20_000, 32), LengthSampling(kind="uniform"), 32, rng)
    assert default.min() == 1 and default.max() == 32  # max_len defaults to features.max_len


def test_loguniform_draws_follow_the_log_cdf() -> None:
    lo, hi, N = 2, 200, 256
    sampling = LengthSampling(kind="loguniform", min_len=lo, max_len=hi)
    cut = draw_cut_lengths(np.full(100_000, N), sampling, N, np.random.default_rng(3))
    assert cut.min() == lo and cut.max() == hi
    for k in (2, 5, 20, 60, 150):
        expected = math.log((k + 1) / lo) / math.log((hi + 1) / lo)  # P(d <= k)
        assert abs((cut <= k).mean() - expected) < 0.01, k
    short = np.full(1000, 3)
    assert (draw_cut_lengths(short, sampling, N, np.random.default_rng(0)) <= 3).all()


@pytest.mark.parametrize("kind", ["hstu", "uniform", "loguniform"])
def test_draws_are_deterministic_given_the_generator(kind: str) -> None:
    lengths = _skewed_lengths(5000, 128)
    sampling = LengthSampling(kind=kind)
    a = draw_cut_lengths(lengths, sampling, 128, np.random.default_rng(5))
    b = draw_cut_lengths(lengths, sampling, 128, np.random.default_rng(5))
    c = draw_cut_lengths(lengths, sampling, 128, np.random.default_rng(6))
    assert a.dtype == np.int64 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a <= lengths).all() and (a >= 0).all() and (a < lengths).any()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "random"}, r"data\.length_sampling\.kind must be one of 'hstu', 'uniform', 'loguniform'"),
        ({"alpha": 2.5}, r"data\.length_sampling\.alpha must be in \(1, 2\], got 2\.5"),
        ({"alpha": 1.0}, r"data\.length_sampling\.alpha must be in \(1, 2\]"),
        ({"alpha": float("nan")}, r"data\.length_sampling\.alpha"),
        ({"kind": "uniform", "min_len": 0}, r"data\.length_sampling\.min_len must be an integer >= 1, got 0"),
        (
            {"kind": "uniform", "min_len": 8, "max_len": 4},
            r"data\.length_sampling\.max_len must be an integer >= min_len",
        ),
    ],
)
def test_bad_settings_name_the_setting(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LengthSampling(**settings)


def test_settings_beyond_the_feature_max_len_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.length_sampling\.max_len must be <= features\.max_len \(32\), got 64"):
        LengthSampling(kind="uniform", max_len=64).check(32)
    with pytest.raises(ValueError, match=r"data\.length_sampling\.min_len must be <= features\.max_len \(32\)"):
        BalancedLengthSampler(np.arange(10), 4, LengthSampling(kind="loguniform", min_len=40), max_len=32)
    config = SynthConfig(**TINY)
    dm = RankingDataModule(
        str(tmp_path),
        features=config.features(),
        tasks=config.tasks(),
        synth=config,
        length_sampling=LengthSampling(kind="uniform", max_len=17),  # features.max_len is 16
    )
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"data\.length_sampling\.max_len must be <= features\.max_len \(16\)"):
        dm.setup("fit")


# ---- the dataset: newest behaviours kept, narrow widths ------------------------------------------


@pytest.mark.parametrize(
    ("longest", "max_len", "width"), [(0, 32, 8), (1, 32, 8), (8, 32, 8), (9, 32, 16), (30, 32, 32)]
)
def test_padded_width_rounds_up_to_eight_and_caps(longest: int, max_len: int, width: int) -> None:
    assert padded_width(longest, max_len) == width
    assert padded_width(longest, 6) == 6  # capped at max_len


def _channels(batch: Batch) -> dict[str, torch.Tensor]:
    out = {"item_id": batch.history_item_id, "ts": batch.history_ts}
    out.update({f"s.{k}": v for k, v in batch.history_sparse.items()})
    out.update({f"d.{k}": v for k, v in batch.history_dense.items()})
    return out


def test_cut_batch_keeps_the_newest_behaviours_left_aligned(small_synth) -> None:
    config, paths = small_synth
    features = config.features()  # max_len 32
    ds = HistoryDataset(paths["train"], UserStore(paths["users"], features), features, ["click"])
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ds))[:200]
    full = ds[idx]
    cut = rng.integers(0, ds.history_len[idx] + 1)  # anywhere in [0, full length]
    cut[:5] = 100  # longer than the history: kept whole
    cut[5] = 0
    for variant in (ds[CutBatch(idx, cut)], ds.get_batch(idx, cut_len=torch.from_numpy(cut), shared=True)):
        kept = np.minimum(cut, ds.history_len[idx])
        assert variant.history_len.tolist() == kept.tolist()
        assert variant.max_len == padded_width(int(kept.max()), 32)
        assert variant.sample_index.tolist() == idx.tolist()
        assert torch.equal(variant.item_id, full.item_id) and torch.equal(variant.labels["click"], full.labels["click"])
        full_len = full.history_len.numpy()
        for name, values in _channels(variant).items():
            whole = _channels(full)[name].numpy()
            got = values.numpy()
            for b in range(len(idx)):
                n, k = full_len[b], kept[b]
                np.testing.assert_array_equal(got[b, :k], whole[b, n - k : n], err_msg=f"{name} row {b}")
                assert not got[b, k:].any(), f"{name}: padding of row {b} is not zero"
    narrow = ds[CutBatch(idx[:10], np.full(10, 3))]
    assert narrow.max_len == 8 and narrow.history_item_id.shape == (10, 8)
    empty = ds[CutBatch(idx[:0], np.zeros(0, np.int64))]
    assert empty.batch_size == 0 and empty.history_item_id.shape == (0, 8)
    with pytest.raises(ValueError, match="cut_len must be >= 0"):
        ds.get_batch(idx[:2], cut_len=np.array([1, -1]))
    with pytest.raises(ValueError, match="cut_len has shape"):
        ds.get_batch(idx[:2], cut_len=np.array([1, 2, 3]))


# ---- the balanced sampler ------------------------------------------------------------------------


def _balanced(
    lengths: np.ndarray, bs: int, world: int, epoch: int = 0, seed: int = 0, kind: str = "hstu", max_len: int = 256
) -> list[list[CutBatch]]:
    out = []
    for rank in range(world):
        sampler = BalancedLengthSampler(
            lengths, bs, LengthSampling(kind=kind), max_len, seed=seed, rank=rank, world_size=world
        )
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 100, 1001])
@pytest.mark.parametrize("bs", [1, 16, 64])
def test_balanced_sampler_covers_every_sample_once_with_equal_batch_counts(world: int, n: int, bs: int) -> None:
    lengths = _skewed_lengths(n, 64, seed=n)
    per_rank = _balanced(lengths, bs, world, epoch=1, kind="uniform", max_len=64)
    counts = {len(b) for b in per_rank}
    assert counts == {len(ShardedBatchSampler(n, bs, rank=0, world_size=world))}  # same steps as the plain sampler
    everything = np.concatenate([b.indices for batches in per_rank for b in batches])
    assert sorted(everything.tolist()) == list(range(n))
    sizes = [len(b.indices) for batches in per_rank for b in batches]
    assert max(sizes) <= bs and max(sizes) - min(sizes) <= 1
    for batches in per_rank:
        for b in batches:
            assert b.indices.dtype == np.int64 and b.cut_len.dtype == np.int64 and b.cut_len.shape == b.indices.shape
            assert (b.cut_len <= lengths[b.indices]).all()


@pytest.mark.parametrize("kind", ["hstu", "uniform", "loguniform"])
def test_balanced_sampler_balances_tokens_far_better_than_the_plain_one(kind: str) -> None:
    n, bs, world, N = 20_011, 128, 2, 256
    lengths = _skewed_lengths(n, N)
    per_rank = _balanced(lengths, bs, world, epoch=0, seed=1, kind=kind, max_len=N)
    cut_of = np.full(n, -1)
    tokens, widths = [], []
    for batches in per_rank:
        for b in batches:
            cut_of[b.indices] = b.cut_len
            tokens.append(int((b.cut_len + 1).sum()))
            widths.append(padded_width(int(b.cut_len.max()), N))
    assert (cut_of >= 0).all()
    plain, plain_widths = [], []
    for rank in range(world):  # the same epoch's cut lengths, dealt by the plain sampler
        for idx in ShardedBatchSampler(n, bs, shuffle=True, seed=1, rank=rank, world_size=world):
            plain.append(int((cut_of[idx] + 1).sum()))
            plain_widths.append(padded_width(int(cut_of[idx].max()), N))
    balanced_ratio, plain_ratio = max(tokens) / min(tokens), max(plain) / min(plain)
    print(
        f"\n{kind}: token max/min balanced {balanced_ratio:.3f} vs plain {plain_ratio:.3f};"
        f" padded width {min(widths)}..{max(widths)} vs {min(plain_widths)}..{max(plain_widths)}"
    )
    assert balanced_ratio < 1.15
    assert plain_ratio > 1.3 and plain_ratio - 1 > 5 * (balanced_ratio - 1)
    per_step = np.array(tokens).reshape(world, -1)  # rank r's step s: balanced across ranks at every step
    assert (per_step.max(0) / per_step.min(0)).max() < 1.15


def test_assign_balanced_deals_one_per_stratum() -> None:
    rng = np.random.default_rng(0)
    cut = rng.integers(0, 100, 1003)
    batch_of = assign_balanced(cut, 10, rng)
    sizes = np.bincount(batch_of, minlength=10)
    assert sizes.min() == 100 and sizes.max() == 101 and sizes.sum() == 1003
    order = np.argsort(-cut, kind="stable")
    for stratum in order[:1000].reshape(100, 10):
        assert sorted(batch_of[stratum].tolist()) == list(range(10))  # one of each stratum per batch
    assert assign_balanced(np.zeros(0, np.int64), 0, rng).shape == (0,)


def test_balanced_sampler_is_deterministic_per_seed_and_epoch_and_resumable() -> None:
    lengths = _skewed_lengths(1000, 128)

    def flat(per_rank: list[list[CutBatch]]) -> np.ndarray:
        return np.concatenate([np.concatenate([b.indices, b.cut_len]) for batches in per_rank for b in batches])

    a, b = (
        _balanced(lengths, 64, 2, epoch=3, seed=7, max_len=128),
        _balanced(lengths, 64, 2, epoch=3, seed=7, max_len=128),
    )
    assert np.array_equal(flat(a), flat(b))
    assert not np.array_equal(flat(a), flat(_balanced(lengths, 64, 2, epoch=4, seed=7, max_len=128)))
    assert not np.array_equal(flat(a), flat(_balanced(lengths, 64, 2, epoch=3, seed=8, max_len=128)))
    plans = [BalancedLengthSampler(lengths, 64, LengthSampling(), 128, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for p in plans:
        p.set_epoch(3)
    assert all(np.array_equal(x, y) for x, y in zip(plans[0].epoch_plan(), plans[1].epoch_plan(), strict=True))

    sampler = BalancedLengthSampler(lengths, 64, LengthSampling(), 128, seed=7, rank=1, world_size=2)
    sampler.set_epoch(3)
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    assert state == {"epoch": 3, "batches_consumed": 3, "seed": 7}
    resumed = BalancedLengthSampler(lengths, 64, LengthSampling(), 128, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(first + rest) == len(a[1])
    for x, y in zip(first + rest, a[1], strict=True):
        assert np.array_equal(x.indices, y.indices) and np.array_equal(x.cut_len, y.cut_len)
    assert len(list(resumed)) == len(a[1])  # the next iteration starts from the beginning again


def test_loader_workers_give_the_same_cut_batches(small_synth) -> None:
    config, paths = small_synth
    features = config.features()
    ds = HistoryDataset(paths["val"], UserStore(paths["users"], features), features, ["click"])
    sampler = BalancedLengthSampler(ds.history_len, 256, LengthSampling(kind="uniform", max_len=12), 32, seed=4)
    inline = list(make_loader(ds, sampler, num_workers=0, prefetch=2))
    workers = list(make_loader(ds, sampler, num_workers=1, persistent_workers=False))
    assert len(inline) == len(workers) == len(sampler)
    for x, y in zip(inline, workers, strict=True):
        assert torch.equal(x.sample_index, y.sample_index) and torch.equal(x.history_item_id, y.history_item_id)
        assert x.max_len <= 16 and bool((x.history_len <= 12).all())


# ---- the data module -----------------------------------------------------------------------------


def test_datamodule_cuts_train_only(tmp_path: Path) -> None:
    config = SynthConfig(**TINY)  # features.max_len 16
    dm = RankingDataModule(
        str(tmp_path),
        features=config.features(),
        tasks=config.tasks(),
        synth=config,
        batch_size=64,
        eval_batch_size=100,
        length_sampling=LengthSampling(kind="uniform", min_len=2, max_len=8),
    )
    dm.prepare_data()
    dm.setup("fit")
    train_ds = dm.dataset("train")
    train = list(dm.train_dataloader())
    assert isinstance(dm.samplers["train"], BalancedLengthSampler)
    seen = np.concatenate([b.sample_index.numpy() for b in train])
    assert sorted(seen.tolist()) == list(range(len(train_ds)))
    assert all(b.max_len == 8 for b in train)  # the saving: width 8 instead of 16
    full = np.concatenate([train_ds.history_len[b.sample_index.numpy()] for b in train])
    got = np.concatenate([b.history_len.numpy() for b in train])
    assert (got <= np.minimum(full, 8)).all() and (got < full).any()
    dm.setup("test")
    dm.setup("predict")
    for split, loader in (
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
        ("predict", dm.predict_dataloader()),
    ):
        assert type(dm.samplers[split]) is ShardedBatchSampler
        ds = dm.dataset(split)
        for batch in loader:
            assert batch.max_len == 16
            np.testing.assert_array_equal(batch.history_len.numpy(), ds.history_len[batch.sample_index.numpy()])


def test_length_sampling_parses_from_yaml_through_jsonargparse() -> None:
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(RankingDataModule, "data")
    cfg = parser.parse_object({"data": {"data_dir": "x", "length_sampling": {"kind": "hstu", "alpha": 1.6}}})
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, RankingDataModule)
    assert dm.length_sampling == LengthSampling(kind="hstu", alpha=1.6, min_len=1, max_len=None)
    assert parser.instantiate(parser.parse_object({"data": {"data_dir": "x"}})).data.length_sampling is None

    cli = LightningArgumentParser()  # what `mtrank fit --config` uses for the `data:` section
    cli.add_lightning_class_args(RankingDataModule, "data", subclass_mode=False)
    yaml = "data:\n  data_dir: x\n  length_sampling:\n    kind: loguniform\n    min_len: 4\n    max_len: 64\n"
    dm = cli.instantiate(cli.parse_string(yaml)).data
    assert dm.length_sampling == LengthSampling(kind="loguniform", min_len=4, max_len=64)


def test_bad_alpha_in_yaml_names_the_setting() -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RankingDataModule, "data")
    cfg = {"data": {"data_dir": "x", "length_sampling": {"kind": "hstu", "alpha": 2.5}}}
    with pytest.raises(ValueError, match=r"data\.length_sampling\.alpha must be in \(1, 2\], got 2\.5"):
        parser.instantiate(parser.parse_object(cfg))


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)
        self.out = torch.nn.Linear(4, 1)
        self.seen: list[tuple[np.ndarray, int]] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch.sample_index.numpy().copy(), batch.max_len))
        h = (self.emb(batch.history_item_id) * batch.history_mask()[..., None]).sum(1)
        logit = self.out(h + self.emb(batch.item_id)).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, batch.labels["click"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_with_length_sampling_reshuffles_per_epoch(tmp_path: Path) -> None:
    config = SynthConfig(**TINY)
    dm = RankingDataModule(
        str(tmp_path),
        features=config.features(),
        tasks=config.tasks(),
        synth=config,
        batch_size=256,
        length_sampling=LengthSampling(kind="uniform", max_len=8),
    )
    model = _Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    n, half = len(dm.dataset("train")), len(model.seen) // 2
    first = np.concatenate([s for s, _ in model.seen[:half]])
    second = np.concatenate([s for s, _ in model.seen[half:]])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert not np.array_equal(first, second)  # Lightning called set_epoch: a new plan
    assert {width for _, width in model.seen} == {8}
