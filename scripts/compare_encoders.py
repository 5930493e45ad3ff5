"""Train HSTU, LONGER and ULTRA-HSTU with the same budget on long synthetic histories and tabulate them.

    python scripts/compare_encoders.py --out compare.json            # CPU, history length 512
    python scripts/compare_encoders.py --accelerator gpu --precision bf16-mixed --max-len 1024 --epochs 3

Generates (once) a synthetic data set (`mtrank.data.synth`) whose users have about
``--history-mean`` behaviours before the sample window, so most samples carry a full history of
``--max-len`` behaviours. Each encoder's config is the repository's (``configs/quickstart.yaml``
for HSTU, ``configs/longer.yaml``, ``configs/ultra_hstu.yaml``) with the data, features, batch
size, epochs and loggers replaced so that all three see the same samples in the same order, and
with the long-sequence settings of `long_sequence_settings` (LONGER's recent queries and ULTRA-HSTU's
SLA window and truncation tail scaled to the longer history). Heads, optimiser and schedule are
unchanged. ``ULTRA-HSTU+SL`` is ULTRA-HSTU trained with load-balanced stochastic length sampling
(``data.length_sampling: {kind: hstu, alpha: 1.6}``); evaluation always sees whole histories.
Each run is a separate ``mtrank fit`` process.

Reported per encoder: the last validation's AUC and GAUC of every binary task, forward FLOPs per
sample at a full history (`scripts/encoder_flops.py`'s counter: total and attention), and training
samples/s (``perf/epoch_train_samples_per_s``, validation excluded). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparelib import (
    ROOT,
    add_training_args,
    binary_tasks,
    fit,
    quality_cells,
    read_metrics,
    set_trainer,
    settings,
    write_config,
)
from encoder_flops import count_flops

from mtrank.data.synth import SynthConfig, random_batch
from mtrank.spec import FeatureSpec

CONFIGS = {
    "HSTU": "quickstart.yaml",
    "LONGER": "longer.yaml",
    "ULTRA-HSTU": "ultra_hstu.yaml",
    "ULTRA-HSTU+SL": "ultra_hstu.yaml",  # plus load-balanced stochastic length sampling in training
}
LENGTH_SAMPLING = {"ULTRA-HSTU+SL": {"kind": "hstu", "alpha": 1.6}}


def long_sequence_settings(max_len: int) -> dict[str, dict[str, Any]]:
    """Encoder init_args replaced for a history of ``max_len`` behaviours (the configs are sized for 64)."""
    ultra = {
        "local_window": max(16, max_len // 8),  # 512 -> K1 = 64
        "global_prefix": 8,
        "full_layers": 1,
        "tail_len": max(32, max_len // 4),  # 512 -> the newest 128 tokens after layer 1
        "streams": [
            {"name": "all"},
            {"name": "engaged", "channel": "action", "values": [1, 2, 3], "max_len": max(32, max_len // 4)},
        ],
    }
    return {
        "HSTU": {},
        "LONGER": {"merge_k": 4, "num_recent_queries": max(8, max_len // 16)},  # 512 -> 128 merged, 32 queries
        "ULTRA-HSTU": ultra,
        "ULTRA-HSTU+SL": ultra,
    }


def run_config(name: str, args: argparse.Namespace, synth: dict[str, Any], run_dir: Path) -> Path:
    """Write the config of encoder ``name`` for this comparison; return its path."""
    config = yaml.safe_load((ROOT / "configs" / CONFIGS[name]).read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    model["features"].update(num_users=synth["num_users"], num_items=synth["num_items"], max_len=args.max_len)
    model["encoder"]["init_args"].update(long_sequence_settings(args.max_len)[name])
    data.update(data_dir=str(args.data_dir), synth=synth, batch_size=args.batch_size, num_workers=0)
    if name in LENGTH_SAMPLING:
        data["length_sampling"] = LENGTH_SAMPLING[name]
    config["seed_everything"] = args.seed
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}}]
    callbacks = [{"class_path": "mtrank.callbacks.ThroughputMonitor", "init_args": {"every_n_steps": 50}}]
    set_trainer(trainer, args, run_dir, loggers, callbacks)
    return write_config(config, run_dir)


def encoder_flops(config_path: Path) -> dict[str, int]:
    """Forward FLOPs per sample of the config's encoder on one full history."""
    config = yaml.safe_load(config_path.read_text())
    features = FeatureSpec(**config["model"]["features"])
    module, _, cls = config["model"]["encoder"]["class_path"].rpartition(".")
    torch.manual_seed(0)
    encoder = getattr(importlib.import_module(module), cls)(features, **config["model"]["encoder"]["init_args"])
    return count_flops(encoder.eval(), random_batch(features, [features.max_len]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--history-mean", type=float, default=700.0)
    parser.add_argument("--samples-per-user", type=float, default=40.0)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: data/long<max-len>")
    add_training_args(parser, "compare_encoders", batch_size=128, epochs=1)
    parser.set_defaults(runs=Path("runs/compare"))
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or ROOT / "data" / f"long{args.max_len}"
    synth = {
        "num_users": args.users,
        "num_items": args.items,
        "num_categories": 20,
        "history_mean": args.history_mean,
        "samples_per_user": args.samples_per_user,
        "max_len": args.max_len,
        "seed": args.seed,
    }
    SynthConfig(**synth)  # refuse bad sizes before any run

    results = []
    for name in args.encoders:
        run_dir = (args.runs / name.lower()).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_config(name, args, synth, run_dir)
        code, wall = fit(name, config)
        if code:
            results.append({"encoder": name, "wall_s": wall, "failed": code})
            continue
        metrics = read_metrics(run_dir)
        results.append({"encoder": name, "wall_s": wall, "flops": encoder_flops(config), "metrics": metrics})
        args.out.write_text(json.dumps({"settings": settings(args), "results": results}, indent=2))

    tasks = binary_tasks(results)
    header = f"{'encoder':<13} | " + " | ".join(f"{t + ' AUC/GAUC':>20}" for t in tasks)
    header += f" | {'GFLOP/sample':>12} | {'attn GFLOP':>10} | {'train samples/s':>15}"
    print(f"\nmax_len {args.max_len}, batch {args.batch_size}, {args.epochs} epoch(s), {args.accelerator}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "failed" in r:
            print(f"{r['encoder']:<13} | failed (exit code {r['failed']})")
            continue
        m = r["metrics"]
        cells = quality_cells(m, tasks)
        rate = m.get("perf/epoch_train_samples_per_s", float("nan"))
        print(
            f"{r['encoder']:<13} | "
            + " | ".join(f"{c:>20}" for c in cells)
            + f" | {r['flops']['total'] / 1e9:>12.3f} | {r['flops']['attention'] / 1e9:>10.3f} | {rate:>15.0f}"
        )
    args.out.write_text(json.dumps({"settings": settings(args), "results": results}, indent=2))
    print(f"\nwrote {args.out}")
    return 1 if any("failed" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
