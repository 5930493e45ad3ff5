"""Stop mid-epoch, resume from the checkpoint: the same batches, weights and metrics as an uninterrupted run.

The data position is `RankingDataModule.state_dict` (epoch + batches whose step ran, taken from the
trainer), the RNG states of every rank are `mtrank.resume` (dropout is on, so they matter)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from encoders import HSTUEncoder
from heads import MMoE
from mtrank.batch import Batch
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.lengths import LengthSampling
from mtrank.data.synth import SynthConfig, generate
from mtrank.module import RankingModule
from mtrank.resume import RNG_KEY, load_rng_states, rng_state, save_rng_states, set_rng_state

SYNTH = SynthConfig(num_users=40, num_items=50, history_mean=12, samples_per_user=20, max_len=8, seed=7)
BATCH = 96  # -> 7 training batches per epoch on one process, 4 per rank on two
EPOCHS = 3


class RecordTrainBatches(L.Callback):
    """Keeps the sample indices of every training batch; with ``out_dir``, writes ``<dir>/rank<k>.npz`` at the end."""

    def __init__(self, out_dir: Path | None = None) -> None:
        self.out_dir = out_dir
        self.seen: list[np.ndarray] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Batch, idx: int) -> None:
        self.seen.append(batch.sample_index.cpu().numpy().copy())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.out_dir is not None:
            np.savez(self.out_dir / f"rank{trainer.global_rank}.npz", *self.seen)


class SeedPerRank(L.Callback):
    """Seeds torch's global RNG with ``100 + rank`` in ``setup`` (before a checkpoint is restored): ranks draw
    different dropout masks, so a rank restoring another rank's RNG state would change the result."""

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        torch.manual_seed(100 + trainer.global_rank)


@dataclass
class Run:
    """One fit's outcome: the trained module, its training batches (sample indices) and last metrics."""

    model: RankingModule
    batches: list[np.ndarray]
    metrics: dict[str, float]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume_data")
    generate(SYNTH, path)
    return path


def build(data_dir: Path, **data_kwargs: object) -> tuple[RankingModule, RankingDataModule]:
    """A tiny HSTU + MMoE ranker with dropout (initialised from seed 0) and its data module."""
    settings: dict[str, object] = {"batch_size": BATCH, "num_workers": 0, "prefetch": 2, "seed": 3}
    settings.update(data_kwargs)
    data = RankingDataModule(str(data_dir), synth=SYNTH, **settings)
    L.seed_everything(0)
    model = RankingModule(
        SYNTH.tasks(),
        SYNTH.features(),
        encoder=partial(HSTUEncoder, dim=8, num_layers=1, num_heads=1, dropout=0.3, output_dim=8),
        heads=partial(MMoE, num_experts=2, expert_dims=(8,), tower_dims=(4,), dropout=0.2),
    )
    L.seed_everything(1)  # the training RNG stream differs from the initialisation one
    return model, data


def fit(
    data_dir: Path,
    root: Path,
    ckpt_path: str | None = None,
    callbacks: tuple[L.Callback, ...] = (),
    data_kwargs: dict[str, object] | None = None,
    **trainer_kwargs: object,
) -> Run:
    model, data = build(data_dir, **(data_kwargs or {}))
    record = RecordTrainBatches()
    settings: dict[str, object] = {"max_epochs": EPOCHS, "default_root_dir": str(root), "limit_val_batches": 2}
    settings.update(trainer_kwargs)
    if any(isinstance(c, ModelCheckpoint) for c in callbacks):
        settings["enable_checkpointing"] = True
    trainer = quiet_trainer(1, callbacks=[record, *callbacks], **settings)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=False)  # hparams hold the factories
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return Run(model, record.seen, metrics)


def steps_per_epoch(data_dir: Path, **data_kwargs: object) -> int:
    _, data = build(data_dir, **data_kwargs)
    data.setup("fit")
    data.train_dataloader()
    return len(data.samplers["train"])


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_same_batches(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(g, w), f"batch {i}"


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted run (prefetch thread), ``EPOCHS`` epochs."""
    run = fit(data_dir, tmp_path_factory.mktemp("reference"))
    assert len(run.batches) == EPOCHS * steps_per_epoch(data_dir) and run.metrics
    return run


def stop_and_resume(data_dir: Path, root: Path, stop: int, **data_kwargs: object) -> tuple[Run, Run, Path]:
    """Train until ``stop`` steps (ModelCheckpoint saves there, in on_train_batch_end), then resume in a new
    Trainer from that checkpoint to ``EPOCHS`` epochs."""
    saver = ModelCheckpoint(dirpath=str(root / "ckpt"), filename="stop", every_n_train_steps=stop, save_top_k=-1)
    first = fit(data_dir, root, callbacks=(saver,), data_kwargs=data_kwargs, max_steps=stop)
    assert len(first.batches) == stop
    ckpt = root / "ckpt" / "stop.ckpt"
    resumed = fit(data_dir, root, ckpt_path=str(ckpt), data_kwargs=data_kwargs)
    return first, resumed, ckpt


@pytest.mark.parametrize(
    "data_kwargs",
    [{"num_workers": 0, "prefetch": 2}, {"num_workers": 1}],
    ids=["prefetch-thread", "worker-process"],
)
def test_resume_mid_epoch_equals_uninterrupted_run(
    data_dir: Path, tmp_path: Path, reference: Run, data_kwargs: dict[str, object]
) -> None:
    """Stopped inside the second epoch, resumed in a new Trainer: the rest of the reference's batches, its final
    weights (bit for bit: dropout draws the same masks) and its last validation metrics."""
    n = steps_per_epoch(data_dir)
    stop = n + n // 2  # inside the second epoch: an epoch boundary before the stop and one after it
    first, resumed, ckpt = stop_and_resume(data_dir, tmp_path, stop, **data_kwargs)

    state = torch.load(ckpt, weights_only=False)["RankingDataModule"]
    assert (state["epoch"], state["batches"], state["world_size"]) == (1, n // 2, 1)
    # the loader is deterministic and iterating it draws nothing from the global RNG: workers or the
    # prefetch thread give the reference's batches and weights
    assert_same_batches(first.batches, reference.batches[:stop])
    assert_same_batches(resumed.batches, reference.batches[stop:])  # no batch repeated or missed
    assert_same_weights(resumed.model, reference.model)
    assert resumed.metrics == reference.metrics


def test_resume_with_length_sampling(data_dir: Path, tmp_path: Path) -> None:
    """`BalancedLengthSampler` (cut histories): the resumed run's batches and weights equal the uninterrupted run's."""
    lengths = {"length_sampling": LengthSampling(kind="uniform", min_len=2, max_len=8)}
    n = steps_per_epoch(data_dir, **lengths)
    full = fit(data_dir, tmp_path / "full", data_kwargs=lengths)
    _, resumed, _ = stop_and_resume(data_dir, tmp_path, n + 2, **lengths)
    assert_same_batches(resumed.batches, full.batches[n + 2 :])
    assert_same_weights(resumed.model, full.model)


def test_resume_from_end_of_epoch_checkpoint(data_dir: Path, tmp_path: Path, reference: Run) -> None:
    """A checkpoint saved at the end of an epoch (on validation end) resumes at the next epoch's first batch."""
    n = steps_per_epoch(data_dir)
    saver = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), filename="end{epoch}", save_top_k=-1, auto_insert_metric_name=False
    )
    fit(data_dir, tmp_path, callbacks=(saver,), max_epochs=1)
    ckpt = tmp_path / "ckpt" / "end0.ckpt"
    state = torch.load(ckpt, weights_only=False)["RankingDataModule"]
    assert (state["epoch"], state["batches"]) == (1, 0)
    resumed = fit(data_dir, tmp_path, ckpt_path=str(ckpt))
    assert_same_batches(resumed.batches, reference.batches[n:])
    assert_same_weights(resumed.model, reference.model)
    assert resumed.metrics == reference.metrics


def test_resume_from_mid_epoch_validation_checkpoint(data_dir: Path, tmp_path: Path, reference: Run) -> None:
    """``val_check_interval``: a checkpoint saved on a mid-epoch validation end resumes after the batch before it;
    validation draws nothing from the global RNG, so batches and weights are still the reference's."""
    n = steps_per_epoch(data_dir)
    stop = n + 3
    saver = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), filename="val{step}", save_top_k=-1, auto_insert_metric_name=False
    )
    fit(data_dir, tmp_path, callbacks=(saver,), val_check_interval=3, max_steps=stop)
    ckpt = tmp_path / "ckpt" / f"val{stop}.ckpt"
    state = torch.load(ckpt, weights_only=False)["RankingDataModule"]
    assert (state["epoch"], state["batches"]) == (1, 3)
    resumed = fit(data_dir, tmp_path, ckpt_path=str(ckpt), val_check_interval=3)
    assert_same_batches(resumed.batches, reference.batches[stop:])
    assert_same_weights(resumed.model, reference.model)


def test_resume_with_another_seed_raises(data_dir: Path, tmp_path: Path) -> None:
    n = steps_per_epoch(data_dir)
    root = tmp_path / "stop"
    saver = ModelCheckpoint(dirpath=str(root), filename="stop", every_n_train_steps=2, save_top_k=-1)
    fit(data_dir, root, callbacks=(saver,), max_steps=2, limit_val_batches=0)
    assert n > 2
    with pytest.raises(ValueError, match=r"data\.seed 3 in the checkpoint, 4 now"):
        fit(data_dir, tmp_path, ckpt_path=str(root / "stop.ckpt"), data_kwargs={"seed": 4}, limit_val_batches=0)


def _state(**overrides: object) -> dict[str, object]:
    state: dict[str, object] = {"epoch": 2, "batches": 3, "seed": 3, "world_size": 1, "batch_size": BATCH}
    state.update({"length_sampling": None, "accumulate_grad_batches": 1, **overrides})
    return state


@pytest.mark.parametrize("length_sampling", [None, LengthSampling(kind="uniform", max_len=8)], ids=["sharded", "cut"])
def test_train_dataloader_applies_the_state_once(data_dir: Path, length_sampling: LengthSampling | None) -> None:
    """Both sampler kinds: the first iteration is the rest of the saved epoch, the next epoch starts at batch 0."""
    _, data = build(data_dir, length_sampling=length_sampling)
    data.setup("fit")
    data.load_state_dict(_state(length_sampling=None if length_sampling is None else vars(length_sampling)))
    loader = data.train_dataloader()
    sampler = data.samplers["train"]
    assert sampler.epoch == 2
    got = [b.sample_index.numpy() for b in loader]  # the prefetch thread starts on epoch 2, batch 3
    want = sampler.batches()[3:]
    assert_same_batches(got, [w.indices if hasattr(w, "indices") else w for w in want])
    sampler.set_epoch(3)
    assert len(list(loader)) == len(sampler)
    # a later loader (reload_dataloaders_every_n_epochs) is not moved again
    data.train_dataloader()
    assert data.samplers["train"].epoch == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"world_size": 2}, r"world size \(trainer devices x num_nodes\) 2 in the checkpoint, 1 now"),
        ({"seed": 9}, r"data\.seed 9 in the checkpoint, 3 now"),
        ({"batch_size": 32}, r"data\.batch_size 32 in the checkpoint, 96 now"),
    ],
)
def test_changed_setting_mid_epoch_raises(data_dir: Path, overrides: dict[str, object], message: str) -> None:
    _, data = build(data_dir)
    data.setup("fit")
    data.load_state_dict(_state(**overrides))
    with pytest.raises(ValueError, match=message):
        data.train_dataloader()


def test_changed_setting_at_epoch_boundary_warns(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, data = build(data_dir)
    data.setup("fit")
    data.load_state_dict(_state(batches=0, world_size=2, seed=9))
    with caplog.at_level(logging.WARNING, logger="mtrank.data.datamodule"):
        data.train_dataloader()
    assert "world size" in caplog.text and "data.seed" in caplog.text
    assert data.samplers["train"].epoch == 2


def test_resume_inside_gradient_accumulation_warns(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, data = build(data_dir)
    data.setup("fit")
    data.load_state_dict(_state(batches=3, accumulate_grad_batches=2))
    with caplog.at_level(logging.WARNING, logger="mtrank.data.datamodule"):
        data.train_dataloader()
    assert "1 batches into an accumulation of 2" in caplog.text


def test_state_loaded_outside_fit_is_ignored(data_dir: Path) -> None:
    """validate/test from a checkpoint restores the data module too: a later fresh fit starts at epoch 0, batch 0."""
    _, data = build(data_dir)
    data.setup("fit")
    data.trainer = SimpleNamespace(  # type: ignore[assignment]
        state=SimpleNamespace(fn=TrainerFn.VALIDATING),
        fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=0))),
    )
    data.load_state_dict(_state())
    loader = data.train_dataloader()
    assert data.samplers["train"].epoch == 0 and len(list(loader)) == len(data.samplers["train"])


def test_rng_states_round_trip_and_load_weights_only(tmp_path: Path) -> None:
    checkpoint: dict[str, object] = {}
    save_rng_states(checkpoint)
    torch.save(checkpoint, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), random.random())
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert loaded[RNG_KEY]["world_size"] == 1
    fitting = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), world_size=1, global_rank=0, ckpt_path="x")
    assert load_rng_states(fitting, loaded)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert random.random() == expected[2]
    # not fitting (validate from a checkpoint, load_from_checkpoint): the RNGs are left alone
    validating = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), world_size=1, global_rank=0)
    assert not load_rng_states(validating, loaded)  # type: ignore[arg-type]
    assert not load_rng_states(None, loaded)
    set_rng_state(rng_state())  # a state restores itself


def test_rng_states_of_another_world_size_warn(caplog: pytest.LogCaptureFixture) -> None:
    checkpoint: dict[str, object] = {}
    save_rng_states(checkpoint)
    checkpoint[RNG_KEY] = {"world_size": 2, "ranks": checkpoint[RNG_KEY]["ranks"] * 2}  # type: ignore[index]
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), world_size=1, global_rank=0)
    trainer.ckpt_path = "runs/last.ckpt"
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="mtrank.resume"):
        assert not load_rng_states(trainer, checkpoint)  # type: ignore[arg-type]
    assert "runs/last.ckpt" in caplog.text and "2 processes" in caplog.text
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_ddp_resume_mid_epoch_gives_each_rank_its_batches(data_dir: Path, tmp_path: Path) -> None:
    """2 gloo processes: every rank's batches after the resume are the uninterrupted run's, and so are the weights."""

    def ddp_fit(root: Path, ckpt_path: str | None = None, **kwargs: object) -> RankingModule:
        root.mkdir(parents=True, exist_ok=True)
        model, data = build(data_dir)
        callbacks = [RecordTrainBatches(root), SeedPerRank(), *kwargs.pop("callbacks", [])]  # type: ignore[misc]
        settings: dict[str, object] = {"max_epochs": 2, "default_root_dir": str(root), "limit_val_batches": 2}
        settings.update(kwargs)
        if any(isinstance(c, ModelCheckpoint) for c in callbacks):
            settings["enable_checkpointing"] = True
        quiet_trainer(2, callbacks=callbacks, **settings).fit(
            model, datamodule=data, ckpt_path=ckpt_path, weights_only=False
        )
        return model

    def per_rank(root: Path) -> list[list[np.ndarray]]:
        return [list(np.load(root / f"rank{r}.npz").values()) for r in (0, 1)]

    full_model = ddp_fit(tmp_path / "full")
    full = per_rank(tmp_path / "full")
    n = len(full[0]) // 2  # batches per rank and epoch
    stop = n + n // 2
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="stop", every_n_train_steps=stop, save_top_k=-1)
    ddp_fit(tmp_path / "first", callbacks=[saver], max_steps=stop)
    ckpt = tmp_path / "ckpt" / "stop.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    state, rng = saved["RankingDataModule"], saved[RNG_KEY]
    assert (state["epoch"], state["batches"], state["world_size"]) == (1, n // 2, 2)
    assert rng["world_size"] == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    resumed_model = ddp_fit(tmp_path / "resumed", ckpt_path=str(ckpt))
    resumed = per_rank(tmp_path / "resumed")
    for rank in (0, 1):
        assert_same_batches(resumed[rank], full[rank][stop:])
    assert_same_weights(resumed_model, full_model)
