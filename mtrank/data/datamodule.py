"""`RankingDataModule`: Parquet users + samples tables -> DataLoaders of `Batch` for Lightning.

Files live in ``data_dir``: ``users`` (history store) and one samples table per stage. With
``synth`` set and the files missing (or made from another config), `prepare_data` generates them
with `mtrank.data.synth.generate`. `setup` runs the schema check (``validate``) and builds one
`HistoryDataset` per stage; each loader takes whole index batches from a `ShardedBatchSampler`
(training shuffles per epoch; every DDP rank gets the same number of batches, no duplicates).
With ``length_sampling`` set, the training loader instead takes a `BalancedLengthSampler`:
stochastic history lengths in token-balanced batches (`mtrank.data.lengths`); evaluation never cuts.
Lightning must run with ``use_distributed_sampler=False`` (the mtrank CLI sets it).

Resuming mid-epoch (``trainer.fit(..., ckpt_path=...)``): Lightning stores `state_dict` in the
checkpoint under ``RankingDataModule`` and hands it back through `load_state_dict` before it asks
for the training loader. The data position comes from the trainer's counters, not from the loader
(the prefetch thread, worker processes and Lightning's fetcher all run ahead of the training step):
the epoch and the number of training batches whose step has run in it. `train_dataloader` then
builds the training sampler (`ShardedBatchSampler` or `BalancedLengthSampler`) already positioned:
its first iteration runs the rest of that epoch, from that batch, and later epochs start at batch
0. So a run stopped and resumed from a checkpoint sees exactly the batches of an uninterrupted run
(the model's RNG states are restored by `RankingModule`, `mtrank.resume`). Resuming mid-epoch with
another world size, seed, batch size or length sampling raises a ValueError (the rest of the epoch
cannot be the uninterrupted run's); at an epoch boundary a change only logs a warning. Save during
training (``ModelCheckpoint``: every n steps, on validation or epoch end) to resume exactly: after
``fit`` stopped at ``max_steps`` mid-epoch, Lightning's loop counts that epoch as finished, so a
checkpoint written then resumes (as Lightning does) in the next epoch, at the same batch.

Every loader draws the base seed of its workers from its own generator, seeded by ``seed``, not
from torch's global generator: iterating a loader (validation, a resume) never shifts the global
random stream that dropout draws from.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from mtrank.data.dataset import HistoryDataset, ShardedBatchSampler, make_loader
from mtrank.data.lengths import BalancedLengthSampler, LengthSampling
from mtrank.data.schema import check_schema
from mtrank.data.store import UserStore
from mtrank.data.synth import SynthConfig, generate, load_config
from mtrank.spec import FeatureSpec, TaskSpec, check_tasks

log = logging.getLogger(__name__)

_STAGES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class RankingDataModule(L.LightningDataModule):
    """Users + samples Parquet tables as Lightning data.

    Args:
        data_dir: folder of the Parquet files (relative names below are taken inside it).
        features: the feature spec (linked from ``model.features`` by the CLI).
        tasks: the task list (linked from ``model.tasks``); each task's label column is read.
        users: the users table.
        train, val, test: samples tables per stage (None: the stage has no data).
        predict: samples table of ``predict``; defaults to ``test``.
        batch_size: training batch size (largest; batches are near-equal, see `ShardedBatchSampler`).
        eval_batch_size: batch size of val/test/predict (default ``batch_size``).
        num_workers: DataLoader worker processes per loader (persistent when > 0). The default 0
            builds batches in this process, which is faster than handing them over from workers
            (``scripts/bench_loader.py``), ``prefetch`` batches ahead in a background thread.
        prefetch: with ``num_workers: 0``, batches a background thread builds ahead (0: none).
        seed: seed of the per-epoch shuffle.
        synth: generate a synthetic data set into ``data_dir`` when missing or stale.
        validate: run the schema check in `setup`.
        pin_memory: pin batches (for GPU training).
        length_sampling: stochastic history lengths for TRAINING (`LengthSampling`, e.g.
            ``{kind: hstu, alpha: 1.6}``): each training sample keeps its newest, randomly drawn
            number of behaviours, batches are token-balanced across steps and ranks
            (`BalancedLengthSampler`) and padded to their longest history rounded up to a multiple
            of 8. Val/test/predict never cut. Default None: full histories, width ``features.max_len``.

    Checkpoints: `state_dict` / `load_state_dict` carry the training data position (see the module
    docstring); a resumed ``fit`` continues at the batch after the last one trained.
    """

    def __init__(
        self,
        data_dir: str,
        features: FeatureSpec | None = None,
        tasks: list[TaskSpec] | None = None,
        users: str = "users.parquet",
        train: str | None = "train.parquet",
        val: str | None = "val.parquet",
        test: str | None = "test.parquet",
        predict: str | None = None,
        batch_size: int = 512,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        prefetch: int = 2,
        seed: int = 0,
        synth: SynthConfig | None = None,
        validate: bool = True,
        pin_memory: bool = False,
        length_sampling: LengthSampling | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {prefetch}")
        self.data_dir = Path(data_dir)
        self.features = features
        self.tasks = tasks
        self.files = {"users": users, "train": train, "val": val, "test": test, "predict": predict or test}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.seed = seed
        self.synth = synth
        self.validate = validate
        self.pin_memory = pin_memory
        self.length_sampling = length_sampling
        self.store: UserStore | None = None
        self.datasets: dict[str, HistoryDataset] = {}
        self.samplers: dict[str, ShardedBatchSampler] = {}
        self._checked: set[str] = set()
        self._resume: dict[str, Any] | None = None  # from `load_state_dict`, applied by the next `train_dataloader`

    def path(self, split: str) -> Path | None:
        """The file of ``split`` (``users``, ``train``, ``val``, ``test``, ``predict``), or None."""
        name = self.files.get(split)
        return None if name is None else self.data_dir / name

    def prepare_data(self) -> None:
        """Generate the synthetic data set when ``synth`` is set and the files are missing or stale."""
        if self.synth is None:
            return
        wanted = [self.path(s) for s in ("users", "train", "val", "test")]
        existing = load_config(self.data_dir)
        if existing == self.synth and all(p is None or p.is_file() for p in wanted):
            log.info("reusing synthetic data in %s", self.data_dir)
            return
        reason = "missing" if existing is None else "made from another config"
        log.info("generating synthetic data in %s (%s)", self.data_dir, reason)
        generate(self.synth, self.data_dir)

    def _resolved(self) -> tuple[FeatureSpec, list[TaskSpec]]:
        features = self.features or (self.synth.features() if self.synth else None)
        tasks = self.tasks if self.tasks is not None else (self.synth.tasks() if self.synth else None)
        if features is None:
            raise ValueError("data.features is not set: link it from model.features (the mtrank CLI does)")
        if tasks is None:
            raise ValueError("data.tasks is not set: link it from model.tasks (the mtrank CLI does)")
        check_tasks(tasks)
        if self.length_sampling is not None:
            self.length_sampling.check(features.max_len)
        return features, tasks

    def setup(self, stage: str | None = None) -> None:
        """Schema-check (when ``validate``) and open the datasets of ``stage`` (all stages when None)."""
        features, tasks = self._resolved()
        splits = [s for st in ([stage] if stage else list(_STAGES)) for s in _STAGES.get(st, ())]
        splits = [s for s in splits if self.path(s) is not None and s not in self.datasets]
        if not splits:
            return
        users = self.path("users")
        if self.validate:
            labelled = [self.path(s) for s in splits if s != "predict" and self.path(s) not in self._checked]
            if labelled:
                check_schema(users, labelled, features, tasks)
            if "predict" in splits and self.path("predict") not in self._checked:
                check_schema(users, [self.path("predict")], features, [])
            self._checked.update(self.path(s) for s in splits)
        if self.store is None:
            self.store = UserStore(users, features)
        for split in splits:
            labels = [t.label for t in tasks] if split != "predict" else self._available_labels(split, tasks)
            self.datasets[split] = HistoryDataset(self.path(split), self.store, features, labels)

    def _available_labels(self, split: str, tasks: list[TaskSpec]) -> list[str]:
        names = set(pq.read_schema(self.path(split)).names)
        return [t.label for t in tasks if t.label in names]

    def dataset(self, split: str) -> HistoryDataset:
        """The dataset of ``split`` (``train``, ``val``, ``test``, ``predict``) after `setup`."""
        if split not in self.datasets:
            raise RuntimeError(f"data split {split!r} is not set up (file: {self.files.get(split)})")
        return self.datasets[split]

    def sample_columns(self, split: str, names: list[str]) -> dict[str, np.ndarray]:
        """Columns of a split's samples table by row, e.g. to attach ids via ``batch.sample_index``."""
        ds = self.dataset(split)
        return {name: np.asarray(ds.column(name)) for name in names}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        sampler: ShardedBatchSampler
        if shuffle and self.length_sampling is not None:
            sampler = BalancedLengthSampler(
                ds.history_len, self.batch_size, self.length_sampling, max_len=ds.max_len, seed=self.seed
            )
        else:
            sampler = ShardedBatchSampler(
                len(ds), self.batch_size if shuffle else self.eval_batch_size, shuffle=shuffle, seed=self.seed
            )
        self.samplers[split] = sampler
        loader = make_loader(
            ds, sampler, num_workers=self.num_workers, pin_memory=self.pin_memory, prefetch=self.prefetch
        )
        # the workers' base seed comes from this generator, not torch's global one (whose stream dropout uses)
        loader.generator = torch.Generator().manual_seed(self.seed)
        return loader

    def train_dataloader(self) -> DataLoader:
        """The training loader, its sampler positioned where training resumes (or at the trainer's epoch).

        After `load_state_dict`, the first iteration runs epoch ``state["epoch"]`` from batch
        ``state["batches"]``; later epochs start at batch 0. Without a state, the sampler is set to
        the trainer's current epoch, so the prefetch thread or the workers (started by Lightning's
        ``iter()`` before it calls ``set_epoch``) never begin an epoch with another's order.

        Raises:
            ValueError: the state is mid-epoch and was saved with another world size, seed, batch
                size or length sampling.
        """
        loader = self._loader("train", shuffle=True)
        sampler = self.samplers["train"]
        state, self._resume = self._resume, None
        if state is None:
            trainer = self.trainer
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0)
            return loader
        self._check_resume(state, sampler)
        sampler.load_state_dict({"epoch": state["epoch"], "batches_consumed": state["batches"], "seed": self.seed})
        if state["batches"]:
            log.info("resuming training data at epoch %d, batch %d", state["epoch"], state["batches"])
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training data position, for checkpoints (Lightning stores it under ``RankingDataModule``).

        Keys:
            epoch: the epoch training resumes in: the one Lightning's loop passes to ``set_epoch`` on
                resume (``fit_loop.epoch_progress.current.processed``, plus one when that epoch's
                last batch has run but its loop has not ended yet).
            batches: training batches of that epoch whose step has run
                (``fit_loop.epoch_loop.batch_progress.current.processed``: batches, not optimizer
                steps, under ``accumulate_grad_batches``); 0 when the epoch is complete.
            seed, world_size, batch_size, length_sampling: the settings the sample order depends on
                (``length_sampling`` as a dict, or None).
            accumulate_grad_batches: the trainer's, to warn on a resume inside an accumulation.

        Empty without a trainer (nothing to resume).
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        epochs = trainer.fit_loop.epoch_progress.current
        progress = trainer.fit_loop.epoch_loop.batch_progress
        # `processed` is increased right after the training step, before on_train_batch_end: it counts the
        # batch of a checkpoint saved there (`completed` does not yet), on_validation_end or on_train_epoch_end.
        batches = progress.current.processed
        # `epochs.processed` is increased when an epoch's loop ends, before on_train_epoch_end (also when
        # max_steps cut it: Lightning then counts the epoch as done and resumes the next one at this batch)
        epoch = epochs.processed
        running = epochs.started > epochs.processed  # inside the loop of epoch `epochs.processed`
        complete = batches >= trainer.num_training_batches or (
            progress.is_last_batch and batches == progress.current.ready
        )
        if batches and complete:
            epoch, batches = epoch + int(running), 0
        sampler = self.samplers.get("train")
        return {
            "epoch": int(epoch),
            "batches": int(batches),
            "seed": int(self.seed),
            "world_size": int(sampler.world_size if sampler is not None else trainer.world_size),
            "batch_size": int(self.batch_size),
            "length_sampling": _as_dict(self.length_sampling),
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a `state_dict` for the next `train_dataloader` (Lightning calls this before it asks for the loader).

        Ignored when the attached trainer is not fitting (validate/test/predict from a checkpoint), so a
        later fresh ``fit`` does not start at that position.
        """
        trainer = self.trainer
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            return
        self._resume = dict(state_dict) if state_dict else None

    def _check_resume(self, state: dict[str, Any], sampler: ShardedBatchSampler) -> None:
        """Raise (mid-epoch) or warn (at an epoch boundary) when the sample order cannot be the saved run's."""
        now = {
            "world_size": (sampler.world_size, "the world size (trainer devices x num_nodes)"),
            "seed": (self.seed, "data.seed"),
            "batch_size": (self.batch_size, "data.batch_size"),
            "length_sampling": (_as_dict(self.length_sampling), "data.length_sampling"),
        }
        changed = [
            f"{name} {state[key]!r} in the checkpoint, {value!r} now"
            for key, (value, name) in now.items()
            if key in state and state[key] != value
        ]
        if changed:
            where = f"epoch {state['epoch']}, batch {state['batches']}"
            if state["batches"]:
                raise ValueError(
                    f"cannot resume the training data mid-epoch ({where}): {'; '.join(changed)}. With another "
                    "setting the rest of the epoch is another set of samples (some would repeat, others be "
                    "skipped); resume with the checkpoint's setting, or from a checkpoint saved at the end of an "
                    "epoch"
                )
            log.warning("resuming the training data at %s with %s: the sample order differs", where, "; ".join(changed))
        accumulate = int(state.get("accumulate_grad_batches", 1))
        if accumulate > 1 and state["batches"] % accumulate:
            log.warning(
                "the checkpoint was saved %d batches into an accumulation of %d (epoch %d, batch %d): the "
                "accumulated gradients are not in checkpoints, so the next optimizer step sees only the "
                "batches after it",
                state["batches"] % accumulate, accumulate, state["epoch"], state["batches"],
            )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)


def _as_dict(sampling: LengthSampling | None) -> dict[str, Any] | None:
    """``sampling`` as a plain dict (checkpoint-safe), or None."""
    return None if sampling is None else dataclasses.asdict(sampling)
