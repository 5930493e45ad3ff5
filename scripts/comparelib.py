"""What the comparison scripts share: run one ``mtrank fit`` per config, read its CSV log, describe the run.

Used by `compare_encoders.py` and `compare_heads.py`; not a public API.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def fit(name: str, config: Path) -> tuple[int, float]:
    """Run ``mtrank fit --config config`` in a fresh process (W&B offline); return (exit code, wall seconds)."""
    print(f"== {name}: mtrank fit --config {config}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline"}
    # a wandb-core service started by this process (wandb.init sets WANDB_SERVICE) must not take the
    # child's run: the child would exit before that service had written its run file
    env.pop("WANDB_SERVICE", None)
    proc = subprocess.run([sys.executable, "-m", "mtrank", "fit", "--config", str(config)], env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode:
        print(f"{name}: mtrank fit failed with exit code {proc.returncode}", file=sys.stderr)
    return proc.returncode, wall


def set_trainer(
    trainer: dict[str, Any], args: argparse.Namespace, run_dir: Path, loggers: list[dict], callbacks: list[dict]
) -> None:
    """Make a config's ``trainer:`` block a comparison run: one device, ``args.epochs`` epochs, validation
    at each epoch's end, no checkpoints or progress bar, logs under ``run_dir``, and the script's
    ``--precision`` / ``--limit-train-batches`` / ``--limit-val-batches`` when given."""
    trainer.update(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        val_check_interval=1.0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
    )
    for option in ("precision", "limit_train_batches", "limit_val_batches"):
        if getattr(args, option, None):
            trainer[option] = getattr(args, option)


def add_training_args(parser: argparse.ArgumentParser, name: str, batch_size: int, epochs: int) -> None:
    """The options every comparison script has: budget (``--batch-size``, ``--epochs``, ``--limit-*``),
    device (``--accelerator``, ``--precision``), ``--seed``, and where runs and results go
    (``--runs runs/<name>``, ``--out <name>.json``)."""
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--limit-train-batches", type=float, default=None)
    parser.add_argument("--limit-val-batches", type=float, default=None)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed on a GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path(f"runs/{name}"))
    parser.add_argument("--out", type=Path, default=Path(f"{name}.json"))


def write_config(config: dict[str, Any], run_dir: Path) -> Path:
    """Write a run's full config to ``<run_dir>/config.yaml``; return the path."""
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every ``val/`` and ``perf/epoch`` metric of the run's CSV log.

    ``perf/epoch_train_samples_per_s`` is the mean over epochs. Reads the newest
    ``<run_dir>/lightning_logs/version_*/metrics.csv``.
    """
    files = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no lightning_logs/version_*/metrics.csv (did the run log?)")
    values: dict[str, list[float]] = {}
    for row in csv.DictReader(files[-1].open()):
        for key, value in row.items():
            if value and key.startswith(("val/", "perf/epoch")):
                values.setdefault(key, []).append(float(value))
    out = {k: v[-1] for k, v in values.items()}
    if "perf/epoch_train_samples_per_s" in values:
        rates = values["perf/epoch_train_samples_per_s"]
        out["perf/epoch_train_samples_per_s"] = sum(rates) / len(rates)
    return out


def binary_tasks(results: list[dict[str, Any]]) -> list[str]:
    """Task names with a validation AUC (``val/<task>/auc``) in any result's ``metrics``, sorted.

    Slices and branches (``val/exposed/<task>/auc``, ``val/uplift/auc``) are not tasks.
    """
    keys = {k for r in results for k in r.get("metrics", {})}
    return sorted({k.split("/")[1] for k in keys if k.endswith("/auc") and k.count("/") == 2} - {"uplift"})


def fmt(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted, or ``-`` when it is missing or NaN."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def quality_cells(metrics: dict[str, float], tasks: list[str]) -> list[str]:
    """``"AUC / GAUC"`` of each binary task (``read_metrics`` output), 4 decimals, ``-`` when missing."""
    return [f"{fmt(metrics.get(f'val/{t}/auc'), '.4f')} / {fmt(metrics.get(f'val/{t}/gauc'), '.4f')}" for t in tasks]


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The script's arguments plus the machine: CPU, core count, GPU name (when used) and torch version."""
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" and torch.cuda.is_available() else None
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta.update(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), device=device)
    meta["torch"] = torch.__version__
    return meta
