"""FRec fatigue branch: its parts by hand, the module wiring, and the planted fatigue effect."""

from __future__ import annotations

import dataclasses
from functools import partial

import lightning as L
import pytest
import torch
from helpers import quiet_trainer, small_model

from encoders import HSTUEncoder
from encoders.base import EncoderOutput
from heads import MMoE
from heads.fatigue import CausalTCN, CrossNetwork, FatigueGRU, FRec
from mtrank.batch import Batch
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.synth import SynthConfig, random_batch
from mtrank.exposure import ExposureSlice, recent_exposure
from mtrank.module import RankingModule
from mtrank.spec import FeatureSpec, TaskSpec

TASKS = [TaskSpec(name="click")]
FEATURES = FeatureSpec(
    num_users=10, num_items=50, max_len=8, history_sparse={"category": 5}, item_sparse={"category": 5}
)


def tiny_batch() -> Batch:
    """Two rows by hand: row 0 saw the target item (7, category 2) twice in the last hour; row 1 has no history."""
    t = 1_000_000
    return Batch(
        sample_index=torch.arange(2),
        user_id=torch.tensor([0, 1]),
        item_id=torch.tensor([7, 9]),
        ts=torch.tensor([t, t]),
        history_len=torch.tensor([4, 0]),
        history_item_id=torch.tensor([[3, 7, 4, 7, 0, 0, 0, 0], [0] * 8]),
        history_ts=torch.tensor([[t - 7200, t - 1800, t - 1200, t - 60, 0, 0, 0, 0], [0] * 8]),
        history_sparse={"category": torch.tensor([[1, 2, 2, 2, 0, 0, 0, 0], [0] * 8])},
        item_sparse={"category": torch.tensor([2, 3])},
    )


def test_recent_exposure_counts_same_category_in_window() -> None:
    batch = tiny_batch()
    assert recent_exposure(batch, "category", 3600).tolist() == [3, 0]
    assert recent_exposure(batch, "category", 600).tolist() == [1, 0]
    assert ExposureSlice(min_count=3).mask(batch).tolist() == [True, False]
    with pytest.raises(KeyError, match="history channel"):
        recent_exposure(batch, "genre")


def test_temporal_features_and_similarity_by_hand() -> None:
    torch.manual_seed(0)
    branch = FRec(16, TASKS, FEATURES, recent=4, num_interests=2, item_dim=4, category_dim=2)
    batch = tiny_batch()
    index = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]])
    mask = torch.tensor([[True] * 4, [False] * 4])
    item = batch.history_item_id.gather(1, index)
    cat = batch.history_sparse["category"].gather(1, index)
    tau = branch.temporal_features(batch, index, mask, item, cat)
    minutes = torch.tensor([120.0, 30.0, 20.0, 1.0])
    torch.testing.assert_close(tau[0, :, 0], minutes.log1p())
    torch.testing.assert_close(tau[0, :, 1], torch.tensor([0.0, 90.0, 10.0, 19.0]).log1p())
    assert tau[0, :, 2].tolist() == [0, 1, 1, 1]  # same category as the target
    assert tau[0, :, 3].tolist() == [0, 1, 0, 1]  # same item
    torch.testing.assert_close(tau[0, :, 4], torch.tensor([0.0, 1.0, 2.0, 3.0]).log1p())  # repeats so far
    assert tau[1].abs().sum() == 0  # padding

    e = branch.embed(item, cat) * mask.unsqueeze(-1)
    v = branch.embed(batch.item_id, batch.item_sparse["category"])
    U = torch.randn(2, 2, 6)
    sim = branch.similarity(e, v, U, mask)  # (B, T, K * 2 levels)
    assert sim.shape == (2, 4, 4)
    assert torch.all(sim[0, [1, 3]] == 1)  # the target item itself: distance 0 on every interest and level
    assert torch.all(sim[0, 2, 2:] == 1) and torch.all(sim[0, 2, :2] < 1)  # same category, other item
    assert torch.all(sim[1] == 0)
    assert torch.all((sim[0] > 0) & (sim[0] <= 1))


def test_cross_tcn_and_gru_pieces() -> None:
    torch.manual_seed(0)
    cross = CrossNetwork(6, num_layers=2, rank=2)
    x = torch.randn(3, 6)
    assert cross(x).shape == (3, 12) and torch.equal(cross(x)[:, 6:], x)
    tcn = CausalTCN(4, (5, 3), kernel_size=3)
    a, mask = torch.randn(2, 7, 4), torch.ones(2, 7, dtype=torch.bool)
    b = a.clone()
    b[:, 5:] += 1.0  # change the future: steps 0..4 must not move
    torch.testing.assert_close(tcn(a, mask)[:, :5], tcn(b, mask)[:, :5])
    assert not torch.allclose(tcn(a, mask)[:, 5:], tcn(b, mask)[:, 5:])
    gru = FatigueGRU(4, 6, 5)
    e, f, h0 = torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.randn(2, 5)
    none = torch.zeros(2, 3, dtype=torch.bool)
    torch.testing.assert_close(gru(e, f, none, h0), h0)  # padded steps keep the state
    # the gates read the fatigue input: a different f_t changes the state for the same behaviours
    assert not torch.allclose(gru(e, f, ~none, h0), gru(e, f + 1.0, ~none, h0))


def test_frec_output_starts_as_identity_and_loss_only_in_training() -> None:
    torch.manual_seed(0)
    cfg = SynthConfig(num_users=20, num_items=40, num_categories=5, max_len=16)
    features = cfg.features()
    batch = random_batch(features, [0, 1, 3, 16, 9, 12])
    branch = FRec(8, TASKS, features, recent=6)
    x = EncoderOutput(target=torch.randn(6, 8))
    out = branch(x, batch)
    torch.testing.assert_close(out.encoded.target, x.target)  # W_o starts at 0
    assert out.outputs["score"].shape == (6,)
    loss = branch.loss(out, batch)["fatigue_cl"]
    assert loss.dim() == 0 and loss > 0
    assert out.state["eligible"].tolist()[:2] == [False, False]  # no history / too short
    loss.backward()
    assert branch.score[0].weight.grad.abs().sum() > 0
    branch.eval()
    assert branch.loss(branch(x, batch), batch) == {}
    assert FRec(8, TASKS, features, cl_weight=0.0).train().loss(branch(x, batch), batch) == {}


def test_augmentation_inserts_the_target() -> None:
    """Every augmented copy holds more target items than the original, never fewer valid steps."""
    torch.manual_seed(0)
    cfg = SynthConfig(num_users=20, num_items=40, num_categories=5, max_len=16)
    batch = random_batch(cfg.features(), [16, 10, 8])
    branch = FRec(8, TASKS, cfg.features(), recent=8, num_augment=3)
    calls = {}

    def spy(item: torch.Tensor, category: torch.Tensor | None) -> torch.Tensor:
        calls.setdefault("items", []).append(item)
        return FRec.embed(branch, item, category)

    branch.embed = spy  # type: ignore[method-assign]
    branch(EncoderOutput(target=torch.randn(3, 8)), batch)
    original, augmented = calls["items"][2], calls["items"][3]  # recent window, then the copies
    assert augmented.shape == (3, 3, 8)
    target = batch.item_id[:, None]
    before = (original == target).sum(-1)  # (B,)
    after = (augmented == target[:, None]).sum(-1)  # (B, J)
    assert torch.all(after > before[:, None])


def test_frec_refuses_a_category_without_history_channel() -> None:
    features = dataclasses.replace(FEATURES, history_sparse={})
    with pytest.raises(ValueError, match="history channel"):
        FRec(8, TASKS, features)


def test_switched_off_branch_has_no_parameters() -> None:
    cfg = SynthConfig(num_users=20, num_items=40, num_categories=5, max_len=16)
    features, tasks = cfg.features(), cfg.tasks()
    kw = {"encoder": partial(HSTUEncoder, dim=16, num_layers=1, num_heads=2), "heads": partial(MMoE, num_experts=2)}
    off = RankingModule(tasks, features, **kw)
    on = RankingModule(tasks, features, fatigue=partial(FRec), **kw)
    n_off = sum(p.numel() for p in off.parameters())
    n_branch = sum(p.numel() for p in on.fatigue.parameters())
    assert off.fatigue is None and off.branches() == {}
    assert sum(p.numel() for p in on.parameters()) == n_off + n_branch > n_off
    batch = random_batch(features, [3, 16, 0, 9])
    batch.labels = {t.label: torch.randint(0, 2, (4,)).float() for t in tasks}
    on.train()
    encoded, head_out = on(batch)
    assert set(head_out.branches) == {"fatigue"}
    losses = on.losses(encoded, head_out, batch)
    assert "loss/fatigue_cl" in losses
    preds = on.predict_step(batch, 0)
    assert preds["fatigue_score"].shape == (4,)


def _fit(cfg: SynthConfig, data_dir: str, fatigue: bool) -> dict[str, float]:
    L.seed_everything(0)
    tasks = [t for t in cfg.tasks() if t.name in ("click", "like")]
    data = RankingDataModule(data_dir, features=cfg.features(), tasks=tasks, synth=cfg, batch_size=256)
    branch = partial(FRec) if fatigue else None
    model = small_model(tasks, cfg.features(), fatigue=branch, exposure_slice=ExposureSlice())
    trainer = quiet_trainer()
    trainer.fit(model, data)
    return trainer.validate(model, data, verbose=False)[0]


def test_fatigue_branch_lowers_logloss_on_high_exposure_samples(tmp_path) -> None:
    """Planted fatigue: the click logit drops 0.5 per same-category impression beyond 2 in the last hour."""
    cfg = SynthConfig(
        num_users=1000, num_items=500, num_categories=20, history_mean=100, samples_per_user=60,
        max_len=32, seed=1, fatigue_strength=0.5, val_fraction=0.25,
    )  # fmt: skip
    without = _fit(cfg, str(tmp_path), fatigue=False)
    with_branch = _fit(cfg, str(tmp_path), fatigue=True)
    print(
        f"exposed click logloss without {without['val/exposed/click/logloss']:.4f}, "
        f"with {with_branch['val/exposed/click/logloss']:.4f}; exposed share {without['val/exposed/fraction']:.3f}"
    )
    assert 0.1 < without["val/exposed/fraction"] < 0.3
    assert with_branch["val/exposed/click/logloss"] < without["val/exposed/click/logloss"] - 0.005
