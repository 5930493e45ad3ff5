"""Baseline encoders (`NoHistoryEncoder`, `MeanPoolEncoder`): shapes, what they read and ignore, padding,
the hand-computed mean, gradients, training inside `RankingModule` and loading from a config."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FEATURES, other_candidate, quiet_trainer, widen

from encoders import EncoderOutput, MeanPoolEncoder, NoHistoryEncoder, SequenceEncoder
from heads import MMoE
from mtrank.batch import Batch
from mtrank.cli import TRAINER_DEFAULTS, MTRankCLI
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.synth import SynthConfig, random_batch
from mtrank.module import RankingModule
from mtrank.spec import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = {
    "no_history": partial(NoHistoryEncoder, dim=16, hidden_dims=(24,), output_dim=12),
    "mean_pool": partial(MeanPoolEncoder, dim=16, output_dim=12),
}


def make_encoder(name: str, **kwargs) -> SequenceEncoder:
    torch.manual_seed(0)
    return ENCODERS[name](FEATURES, **kwargs).eval()


def make_batch(history_len: list[int], L: int = 6, seed: int = 0) -> Batch:
    return random_batch(FEATURES, history_len, L, seed)


def other_history(batch: Batch, seed: int = 1) -> Batch:
    """``batch`` with every history field (lengths, items, side channels, times) redrawn."""
    other = random_batch(FEATURES, [int(n) for n in torch.randint(0, 7, (batch.batch_size,))], 7, seed)
    return dataclasses.replace(
        batch,
        history_len=other.history_len,
        history_item_id=other.history_item_id,
        history_ts=other.history_ts,
        history_sparse=other.history_sparse,
        history_dense=other.history_dense,
    )


def other_user(batch: Batch) -> Batch:
    return dataclasses.replace(
        batch,
        user_id=(batch.user_id + 3) % FEATURES.num_users,
        user_sparse={"age": (batch.user_sparse["age"] + 1) % 5},
        user_dense={"activity": batch.user_dense["activity"] + 2},
    )


# ------------------------------------------------------------------------------------------ shapes


def test_no_history_output_shapes() -> None:
    out = make_encoder("no_history")(make_batch([6, 3, 1, 0]))
    assert isinstance(out, EncoderOutput)
    assert out.target.shape == (4, 12) and out.user.shape == (4, 16)
    assert out.sequence is None and out.mask is None and out.aux_loss is None
    assert torch.isfinite(out.target).all() and torch.isfinite(out.user).all()


def test_mean_pool_output_shapes() -> None:
    batch = make_batch([6, 3, 1, 0])
    encoder = make_encoder("mean_pool")
    out = encoder(batch)
    assert out.target.shape == (4, 12) and out.user.shape == (4, 16) and out.sequence.shape == (4, 6, 16)
    assert torch.equal(out.mask, batch.history_mask())
    assert torch.all(out.sequence[~out.mask] == 0)
    assert torch.all(out.user[3] == 0)  # empty history: the zero vector
    assert torch.isfinite(out.target).all() and torch.isfinite(out.user).all()
    assert encoder.user_dim == 16 and encoder.output_dim == 12


@pytest.mark.parametrize("name", list(ENCODERS))
def test_user_dim_sizes_the_user_features(name: str) -> None:
    encoder = make_encoder(name, user_dim=8)
    assert encoder.embeddings.user_dim == 8 and encoder.user_dim == 16
    out = encoder(make_batch([4, 0]))
    assert out.target.shape == (2, 12) and out.user.shape == (2, 16)


def test_no_history_without_hidden_layers() -> None:
    encoder = make_encoder("no_history", hidden_dims=())
    assert len(encoder.mlp) == 1
    assert encoder(make_batch([2, 0])).target.shape == (2, 12)


@pytest.mark.parametrize(
    ("name", "kwargs", "setting"),
    [
        ("no_history", {"dim": 0}, "dim"),
        ("no_history", {"output_dim": -1}, "output_dim"),
        ("no_history", {"user_dim": 0}, "user_dim"),
        ("no_history", {"dropout": 1.0}, "dropout"),
        ("no_history", {"hidden_dims": (32, 0)}, "hidden_dims"),
        ("mean_pool", {"dim": -4}, "dim"),
        ("mean_pool", {"output_dim": 0}, "output_dim"),
        ("mean_pool", {"user_dim": -1}, "user_dim"),
        ("mean_pool", {"dropout": -0.1}, "dropout"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(name: str, kwargs: dict, setting: str) -> None:
    owner = type(make_encoder(name)).__name__
    with pytest.raises(ValueError, match=f"{owner}: {setting} "):
        ENCODERS[name](FEATURES, **kwargs)


def test_mean_pool_refuses_a_history_wider_than_max_len() -> None:
    with pytest.raises(ValueError, match=r"history width 9 exceeds features\.max_len=8"):
        make_encoder("mean_pool")(make_batch([3, 9], L=9))


# ------------------------------------------------------------------------------------------ what they read


def test_no_history_ignores_the_history_but_not_the_candidate_or_the_user() -> None:
    batch = make_batch([6, 3, 1, 0])
    encoder = make_encoder("no_history")
    out = encoder(batch)
    emptied = dataclasses.replace(batch, history_len=torch.zeros_like(batch.history_len))
    for changed in (other_history(batch), widen(batch, 2), emptied):
        out2 = encoder(changed)
        assert torch.equal(out.target, out2.target)
        assert torch.equal(out.user, out2.user)
    by_candidate = encoder(other_candidate(batch))
    assert not torch.allclose(out.target, by_candidate.target)
    assert torch.equal(out.user, by_candidate.user)  # user vector: candidate-free
    by_user = encoder(other_user(batch))
    assert not torch.allclose(out.target, by_user.target)
    assert not torch.allclose(out.user, by_user.user)


def test_no_history_never_reads_the_history_width() -> None:
    """Any history width, even beyond ``max_len``, is fine: the history is never read."""
    encoder = make_encoder("no_history")
    narrow = make_batch([2, 0], L=2)
    wide = widen(narrow, 20)
    assert torch.equal(encoder(narrow).target, encoder(wide).target)


def test_mean_pool_reads_history_candidate_and_user() -> None:
    batch = make_batch([6, 3, 1, 0])
    encoder = make_encoder("mean_pool")
    out = encoder(batch)
    for changed in (other_history(batch), other_candidate(batch), other_user(batch)):
        assert not torch.allclose(out.target, encoder(changed).target)
    assert torch.equal(out.user, encoder(other_candidate(batch)).user)  # pooled history: candidate-free


def test_mean_pool_does_not_depend_on_padding() -> None:
    narrow = make_batch([3, 2, 0], L=3)
    encoder = make_encoder("mean_pool")
    out, out_wide = encoder(narrow), encoder(widen(narrow, 5))
    assert out_wide.sequence.shape == (3, 8, 16)
    assert torch.allclose(out.target, out_wide.target, atol=1e-6)
    assert torch.allclose(out.user, out_wide.user, atol=1e-6)
    assert torch.equal(out.sequence, out_wide.sequence[:, :3])
    # garbage in the padded slots (the mask, not the zeros, defines padding) changes nothing either
    noisy = dataclasses.replace(narrow, history_item_id=narrow.history_item_id + (~narrow.history_mask()) * 17)
    assert torch.equal(encoder(noisy).target, out.target)


def test_mean_pool_user_is_the_masked_mean() -> None:
    batch = make_batch([6, 3, 1, 0])
    encoder = make_encoder("mean_pool")
    out = encoder(batch)
    tokens = encoder.embeddings.history_tokens(batch)
    for b, n in enumerate(batch.history_len.tolist()):
        expected = tokens[b, :n].mean(dim=0) if n else torch.zeros(16)
        assert torch.allclose(out.user[b], expected, atol=1e-6), b
    # by hand from the tables, for the row with one behaviour
    emb, i = encoder.embeddings, 0
    by_hand = (
        emb.item.weight[batch.history_item_id[2, i]]
        + emb.history_sparse["category"].weight[batch.history_sparse["category"][2, i]]
        + emb.history_sparse["action"].weight[batch.history_sparse["action"][2, i]]
        + emb.history_dense(torch.log1p(batch.history_dense["watch"][2, i : i + 1]))
    )
    assert torch.allclose(out.user[2], by_hand, atol=1e-6)


def test_mean_pool_empty_histories_are_finite() -> None:
    encoder = make_encoder("mean_pool")
    for batch in (make_batch([0, 0], L=0), make_batch([0, 0], L=4), make_batch([5, 0, 2])):
        out = encoder(batch)
        assert torch.isfinite(out.target).all() and torch.isfinite(out.user).all()
        assert torch.all(out.user[batch.history_len == 0] == 0)
    out = encoder(make_batch([0, 0], L=0))
    assert out.sequence.shape == (2, 0, 16) and out.mask.shape == (2, 0)


# ------------------------------------------------------------------------------------------ training


def test_gradients_reach_the_tables() -> None:
    for name in ENCODERS:
        encoder = make_encoder(name).train()
        batch = make_batch([6, 3, 0])
        out = encoder(batch)
        out.target.square().sum().backward()
        emb = encoder.embeddings
        grad = emb.item.weight.grad
        assert grad is not None, name
        assert grad[batch.item_id].abs().sum() > 0, name  # the candidates' rows
        params = [emb.user.weight, emb.user_sparse["age"].weight, emb.user_dense.weight, emb.item_dense.weight]
        if name == "mean_pool":
            assert grad[batch.history_item_id[0]].abs().sum() > 0
            params += [emb.history_sparse["action"].weight, emb.history_dense.weight]
        else:  # the history tables are never touched
            assert emb.history_sparse["action"].weight.grad is None and emb.history_dense.weight.grad is None
        for param in params:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


TASKS = [TaskSpec(name="click", kind="binary"), TaskSpec(name="watch", kind="regression", loss="log_mse")]


def labelled_batch(size: int = 64, seed: int = 0) -> Batch:
    """A random batch whose labels depend on the candidate, the user and the history (learnable)."""
    g = torch.Generator().manual_seed(seed)
    batch = random_batch(FEATURES, torch.randint(0, 9, (size,), generator=g).tolist(), 8, seed)
    click = ((batch.item_id % 3 == 0) ^ (batch.user_sparse["age"] < 2)).float()
    watch = batch.history_len.float() * (1 + click)
    return dataclasses.replace(batch, labels={"click": click, "watch": watch})


@pytest.mark.parametrize("name", list(ENCODERS))
def test_trains_inside_ranking_module_with_mmoe(name: str) -> None:
    torch.manual_seed(0)
    model = RankingModule(
        TASKS, FEATURES, encoder=ENCODERS[name], heads=partial(MMoE, num_experts=2, expert_dims=(32,), tower_dims=(16,))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = labelled_batch()
    losses = []
    for _ in range(30):
        encoded, head_out = model(batch)
        loss = model.losses(encoded, head_out, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", list(ENCODERS))
def test_fits_with_lightning_on_synthetic_data(name: str, tmp_path: Path) -> None:
    synth = SynthConfig(num_users=30, num_items=40, history_mean=8, samples_per_user=6, max_len=8, seed=1)
    data = RankingDataModule(str(tmp_path / "data"), synth=synth, batch_size=32, num_workers=0)
    model = RankingModule(synth.tasks(), synth.features(), encoder=ENCODERS[name], heads=partial(MMoE))
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("class_name", "init_args"),
    [("NoHistoryEncoder", {"dim": 16, "hidden_dims": [32, 16], "output_dim": 8}), ("MeanPoolEncoder", {"dim": 16})],
)
def test_loads_from_a_class_path_config(class_name: str, init_args: dict, tmp_path: Path) -> None:
    override = tmp_path / "encoder.yaml"
    encoder = {"class_path": f"encoders.{class_name}", "init_args": init_args}
    override.write_text(yaml.safe_dump({"model": {"encoder": encoder}}))
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(override)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false"]
    cli = MTRankCLI(
        RankingModule, RankingDataModule, run=False, args=args, trainer_defaults=TRAINER_DEFAULTS,
        auto_configure_optimizers=False,
    )  # fmt: skip
    built = cli.model.encoder
    assert type(built).__name__ == class_name
    assert built.dim == 16 and built.output_dim == init_args.get("output_dim", 64)
    if class_name == "NoHistoryEncoder":
        assert [m.out_features for m in built.mlp if isinstance(m, torch.nn.Linear)] == [32, 16, 8]
