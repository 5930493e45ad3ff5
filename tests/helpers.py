"""Test helpers shared by several test files (importable as ``helpers``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from encoders import HSTUEncoder
from heads import MMoE
from mtrank.batch import Batch
from mtrank.module import RankingModule
from mtrank.spec import FeatureSpec, TaskSpec

# a small feature spec with every kind of feature (two history channels, a dense history value, item and user
# sparse and dense features): the encoder, baseline, kernel and serving tests build their models on it
FEATURES = FeatureSpec(
    num_users=20,
    num_items=50,
    max_len=8,
    history_sparse={"category": 6, "action": 3},
    history_dense=["watch"],
    item_sparse={"category": 6},
    item_dense=["duration"],
    user_sparse={"age": 5},
    user_dense=["activity"],
)


def widen(batch: Batch, pad: int) -> Batch:
    """``batch`` with ``pad`` more padded history columns (0 everywhere, as the loader pads): the same samples."""
    return dataclasses.replace(
        batch,
        history_item_id=F.pad(batch.history_item_id, (0, pad)),
        history_ts=F.pad(batch.history_ts, (0, pad)),
        history_sparse={n: F.pad(t, (0, pad)) for n, t in batch.history_sparse.items()},
        history_dense={n: F.pad(t, (0, pad)) for n, t in batch.history_dense.items()},
    )


def other_candidate(batch: Batch) -> Batch:
    """``batch`` (on ``FEATURES``) with another candidate per row: item id, category and duration changed."""
    return dataclasses.replace(
        batch,
        item_id=(batch.item_id + 11) % FEATURES.num_items,
        item_sparse={"category": (batch.item_sparse["category"] + 1) % 6},
        item_dense={"duration": batch.item_dense["duration"] + 10},
    )


def quiet_trainer(devices: int = 1, **kwargs: Any) -> L.Trainer:
    """A CPU `L.Trainer` without logger, checkpoints, progress bar or summary (``kwargs`` override);
    ``devices > 1``: that many DDP processes (``ddp_spawn``, gloo)."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": devices,
        "strategy": "ddp_spawn" if devices > 1 else "auto",
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
    }
    settings.update(kwargs)
    return L.Trainer(**settings)


def small_model(tasks: Sequence[TaskSpec], features: FeatureSpec, **kwargs: Any) -> RankingModule:
    """A small HSTU + MMoE `RankingModule` (AdamW 3e-3) for learning tests; ``kwargs`` add branches etc."""
    return RankingModule(
        list(tasks),
        features,
        encoder=partial(HSTUEncoder, dim=32, num_layers=1, num_heads=2),
        heads=partial(MMoE, num_experts=2, expert_dims=(64,), tower_dims=(32,)),
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        **kwargs,
    )
