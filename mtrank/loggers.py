"""Loggers: Weights & Biases offline by default.

`WandbLogger` is Lightning's, with one change: ``offline=True`` unless the user says otherwise,
so that no run ever needs the network. Going online is the user's choice: ``offline: false`` in
the YAML (and a ``wandb login`` or ``WANDB_API_KEY``). Offline runs land in
``<save_dir>/wandb/offline-run-*`` and upload later with ``wandb sync``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's `WandbLogger`, offline unless ``offline=False``.

    Args:
        project: the W&B project.
        save_dir: where the run's files go.
        offline: True (default): write locally, never touch the network.
        **kwargs: passed to Lightning's `WandbLogger` and on to ``wandb.init``.
    """

    def __init__(self, project: str = "mtrank", save_dir: str = "runs", offline: bool = True, **kwargs: Any) -> None:
        if offline:
            if kwargs.get("mode") not in (None, "offline"):
                raise ValueError(
                    f"WandbLogger: offline=True conflicts with mode={kwargs['mode']!r}; use offline: false"
                )
            kwargs["mode"] = "offline"  # also when a config passes mode: null explicitly
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
