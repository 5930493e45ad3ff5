"""``mtrank convert-checkpoint``: any training checkpoint -> one float32 file for inference.

Under DeepSpeed a checkpoint is a folder of shards (``<name>.ckpt/checkpoint/``: the bf16 module states of
rank 0 and every rank's partition of the fp32 master weights and optimiser state); under DDP or one device it
is one file with the optimiser state beside the weights. `convert_checkpoint` turns either into one file
holding the float32 ``state_dict`` (consolidated from the ZeRO partitions, stage 1, 2 or 3, by DeepSpeed's
``zero_to_fp32`` through Lightning) with the module's hyper-parameters, the epoch and step, and none of
the training state (optimiser, schedulers, loops, callbacks, data position). It loads without DeepSpeed:

    mtrank convert-checkpoint runs/.../last.ckpt model.ckpt
    mtrank predict --config configs/hstu_mmoe_gpu.yaml --ckpt_path model.ckpt
    # or in Python: torch.load("model.ckpt")["state_dict"] into a RankingModule built from the same config

Conversion runs on the CPU (no GPU needed); a ZeRO folder needs ``deepspeed`` importable.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

#: checkpoint keys kept in the inference file besides ``state_dict``
KEPT_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "hparams_name")


def is_zero_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint folder (Lightning's ``<name>.ckpt/`` with ``checkpoint/``
    inside, or that inner folder itself: it holds a ``latest`` file or ``*model_states.pt`` shards)."""
    path = Path(path)
    if not path.is_dir():
        return False
    inner = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    return (inner / "latest").is_file() or any(inner.rglob("*model_states.pt"))


def _load_zero(path: Path) -> dict[str, Any]:
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as err:  # pragma: no cover - lightning always has the module
        raise ImportError(f"{path}: converting a ZeRO checkpoint needs lightning's deepspeed utilities") from err
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fp32.ckpt"
        try:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"{path}: converting a ZeRO checkpoint needs deepspeed installed ({err})"
            ) from err
        return torch.load(out, map_location="cpu", weights_only=False)


def convert_checkpoint(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write the inference file of checkpoint ``src`` (a file, or a DeepSpeed folder) to ``dst``.

    Returns:
        What was written: ``state_dict`` (name -> float32 tensor; other dtypes as stored), the `KEPT_KEYS`
        present in the source, and ``mtrank_converted_from`` ({"path", "format": "zero" | "file"}).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` is a folder that is not a DeepSpeed checkpoint, or a file without ``state_dict``.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if src.is_dir():
        if not is_zero_checkpoint(src):
            raise ValueError(f"{src}: a folder but not a DeepSpeed checkpoint (no 'latest' or *model_states.pt)")
        ckpt, kind = _load_zero(src), "zero"
    else:
        ckpt, kind = torch.load(src, map_location="cpu", weights_only=False), "file"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{src}: not a Lightning checkpoint (no 'state_dict')")
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    out: dict[str, Any] = {"state_dict": state, **{k: ckpt[k] for k in KEPT_KEYS if k in ckpt}}
    out["mtrank_converted_from"] = {"path": str(src), "format": kind}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dst)
    return out


def main(argv: list[str] | None = None) -> int:
    """``mtrank convert-checkpoint SRC DST``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="mtrank convert-checkpoint",
        description="A training checkpoint (file, or DeepSpeed ZeRO folder) -> one float32 file for inference.",
    )
    parser.add_argument("src", help="checkpoint file or DeepSpeed checkpoint folder (<name>.ckpt/)")
    parser.add_argument("dst", help="output file")
    args = parser.parse_args(argv)
    out = convert_checkpoint(args.src, args.dst)
    numel = sum(v.numel() for v in out["state_dict"].values())
    source = out["mtrank_converted_from"]["format"]
    print(f"wrote {args.dst}: {len(out['state_dict'])} tensors, {numel:,} values, from a {source} checkpoint")
    return 0
