"""Strategy settings mtrank fills in before DeepSpeed starts, and the strategy files it ships.

``configs/strategies/`` holds one file per strategy (DDP; DeepSpeed ZeRO stage 1, 2, 3, each also with the
optimiser state offloaded to CPU memory, stage 3 with the weights too), each added to a model config with a
second ``--config``; Lightning's registry names work as well
(``--trainer.strategy deepspeed_stage_3``). Whichever way the strategy comes, `prepare_strategy` (called by
`RankingModule.setup`, before the strategy sets DeepSpeed up) completes its config:

- ``train_micro_batch_size_per_gpu``: DeepSpeed wants it for its throughput log; Lightning would infer it
  from the loader's ``batch_sampler``, which mtrank's loaders do not have (they take whole index batches
  from a sampler). It is set to the data module's batch size (1 without one) unless the config has it.
- ``zero_force_ds_cpu_optimizer: false`` with optimiser offload, unless the config says otherwise: DeepSpeed
  otherwise refuses any optimiser but its compiled ``DeepSpeedCPUAdam``; mtrank keeps the configured torch
  optimiser, which then steps the CPU copy of the state (slower than ``DeepSpeedCPUAdam``, which a user
  selects with ``--model.optimizer deepspeed.ops.adam.DeepSpeedCPUAdam`` where a compiler is available).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy

log = logging.getLogger(__name__)


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's `DeepSpeedStrategy` (or a subclass)."""
    return isinstance(strategy, DeepSpeedStrategy)


def zero_stage(strategy: Any) -> int:
    """The ZeRO stage of a DeepSpeed strategy (0: ZeRO off), -1 for any other strategy."""
    if not is_deepspeed(strategy):
        return -1
    zero = (strategy.config or {}).get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def prepare_strategy(trainer: L.Trainer) -> None:
    """Complete a DeepSpeed strategy's config in place (see the module docstring); no-op otherwise."""
    strategy = trainer.strategy
    if not is_deepspeed(strategy) or not isinstance(strategy.config, dict):
        return
    config = strategy.config
    if "train_micro_batch_size_per_gpu" not in config:
        datamodule = getattr(trainer, "datamodule", None)
        config["train_micro_batch_size_per_gpu"] = int(getattr(datamodule, "batch_size", None) or 1)
    zero = config.get("zero_optimization") or {}
    offload = isinstance(zero, dict) and isinstance(zero.get("offload_optimizer"), dict)
    offload = offload and zero["offload_optimizer"].get("device", "none") != "none"
    if offload and "zero_force_ds_cpu_optimizer" not in config:
        config["zero_force_ds_cpu_optimizer"] = False
        log.info("ZeRO optimiser offload with the configured torch optimiser (zero_force_ds_cpu_optimizer: false)")
