"""Random number generator states in checkpoints, for every rank: a resumed run draws what an uninterrupted one would.

Lightning checkpoints hold the weights, the optimiser and the loops, not the global RNGs, so after a
resume dropout (and anything else drawing from torch's, numpy's or Python's global generator) takes
other draws than the uninterrupted run. `RankingModule.on_save_checkpoint` calls `save_rng_states`
and `RankingModule.on_load_checkpoint` calls `load_rng_states`.

Under DDP only rank 0 writes the checkpoint, but ``on_save_checkpoint`` runs on every rank (Lightning's
``trainer.save_checkpoint`` must be called on all of them), so `save_rng_states` gathers every rank's
states with ``torch.distributed.all_gather_object``; on load each rank restores its own entry.

Checkpoint entry ``checkpoint["mtrank_rng"]``::

    {"world_size": W, "ranks": [state of rank 0, ..., state of rank W - 1]}

each state as `rng_state` returns it: only tensors, ints, floats and None, so a checkpoint loads
with ``torch.load(weights_only=True)``.

The data order does not depend on these generators (the samplers draw from their own, seeded by
``(seed, epoch)``; `mtrank.data.datamodule`); together with the data position that
`RankingDataModule.state_dict` stores, a run stopped mid-epoch and resumed ends with the same weights.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

RNG_KEY = "mtrank_rng"


def rng_state() -> dict[str, Any]:
    """This process's global RNG states.

    Returns:
        ``torch``: (5056,) uint8 CPU generator state; ``cuda``: list of uint8 states, one per
        visible device, or None when CUDA is not initialised (nothing has drawn from it);
        ``numpy``: ``{"keys": (624,) int64, "pos", "has_gauss", "cached_gaussian"}`` of the legacy
        global ``np.random`` MT19937 state; ``python``: ``{"version", "internal": (625,) int64,
        "gauss_next"}`` of `random`'s state.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    if kind != "MT19937":
        raise ValueError(f"unexpected numpy RNG kind {kind!r}")
    version, internal, gauss_next = random.getstate()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned. CUDA states are restored when CUDA is available and the
    number of visible devices matches (else a warning); a state without CUDA leaves CUDA as it is."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning(
                "the checkpoint holds CUDA RNG states of %d devices, this process sees %d: CUDA RNGs not restored",
                len(cuda), torch.cuda.device_count(),
            )  # fmt: skip
    npy = state["numpy"]
    keys = np.asarray(npy["keys"].cpu().numpy(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's `rng_state`, in rank order (a collective under DDP: call it on all ranks)."""
    mine = rng_state()
    if not _distributed():
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def save_rng_states(checkpoint: dict[str, Any]) -> None:
    """Put every rank's RNG states into ``checkpoint[RNG_KEY]`` (call from ``on_save_checkpoint`` on all ranks)."""
    states = gather_rng_states()
    checkpoint[RNG_KEY] = {"world_size": len(states), "ranks": states}


def load_rng_states(trainer: L.Trainer | None, checkpoint: dict[str, Any]) -> bool:
    """Restore this rank's RNG states from ``checkpoint`` when ``trainer`` is fitting (resuming).

    Nothing happens without a trainer (``load_from_checkpoint``), outside ``fit`` (validate, test,
    predict from a checkpoint) or when the checkpoint has no states. With another world size than the
    checkpoint's, a warning names the checkpoint and the RNGs are left as they are.

    Returns:
        True when the states were restored.
    """
    entry = checkpoint.get(RNG_KEY)
    if entry is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return False
    world, rank = trainer.world_size, trainer.global_rank
    if int(entry["world_size"]) != world:
        log.warning(
            "checkpoint %s holds the RNG states of %d processes, this run has %d: RNG states not restored, "
            "so random draws (dropout) differ from the saved run's",
            trainer.ckpt_path, entry["world_size"], world,
        )  # fmt: skip
        return False
    set_rng_state(entry["ranks"][rank])
    return True
