"""Train with the fatigue (FRec) and uplift (CDUM) branches off and on, same budget, and tabulate.

    python scripts/compare_branches.py --out compare_branches.json              # CPU, the quick-start data
    python scripts/compare_branches.py --heads-config quickstart.yaml           # MMoE heads instead of HoME
    python scripts/compare_branches.py --accelerator gpu --epochs 4 --batch-size 512

Every run starts from ``configs/uplift_fatigue.yaml`` (HSTU encoder, HoME heads, both branches, the
quick start's synthetic data with its planted treatment and fatigue effects) and differs only in
which branches are on: ``none``, ``fatigue``, ``uplift``, ``both``. Same samples in the same order,
same optimiser and schedule, same seed. Each run is a separate ``mtrank fit`` with a CSV logger.

Reported from the last validation: AUC / GAUC per binary task; the uplift branch's AUUC, Qini
coefficient, uplift@30% and PEHE (its predicted effect against the data's true effect; ``-`` with
the branch off); and AUC and logloss of ``click`` on the high-fatigue samples (at least 3 impressions
of the target's category in the hour before: the synthetic click logit drops by
``fatigue_strength`` per impression beyond 2 there), with that slice's share of the validation set.
Prints the table and writes JSON (settings and every run's metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparelib import (
    ROOT,
    add_training_args,
    binary_tasks,
    fit,
    fmt,
    quality_cells,
    read_metrics,
    set_trainer,
    settings,
    write_config,
)

VARIANTS: dict[str, tuple[bool, bool]] = {  # name -> (fatigue on, uplift on)
    "none": (False, False),
    "fatigue": (True, False),
    "uplift": (False, True),
    "both": (True, True),
}


def run_config(name: str, args: argparse.Namespace, run_dir: Path) -> Path:
    """Write variant ``name``'s config (uplift_fatigue.yaml with branches switched); return its path."""
    base = yaml.safe_load((ROOT / "configs" / "uplift_fatigue.yaml").read_text())
    model, data, trainer = base["model"], base["data"], base["trainer"]
    if args.heads_config:
        model["heads"] = yaml.safe_load((ROOT / "configs" / args.heads_config).read_text())["model"]["heads"]
    fatigue, uplift = VARIANTS[name]
    if not fatigue:
        model.pop("fatigue", None)
    if not uplift:
        model.pop("uplift", None)
    data.update(data_dir=str(args.data_dir), batch_size=args.batch_size, num_workers=0)
    for option, key in (("users", "num_users"), ("samples_per_user", "samples_per_user"), ("fatigue_strength",) * 2):
        if getattr(args, option) is not None:
            data["synth"][key] = getattr(args, option)
    base["seed_everything"] = args.seed
    loggers = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "lightning_logs"},
        }
    ]
    callbacks = [{"class_path": "mtrank.callbacks.ThroughputMonitor", "init_args": {"every_n_steps": 50}}]
    set_trainer(trainer, args, run_dir, loggers, callbacks)
    return write_config(base, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--heads-config", default=None, help="take model.heads from this config (default: HoME)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "quickstart")
    parser.add_argument("--users", type=int, default=None, help="synthetic users (default: the quick start's)")
    parser.add_argument("--samples-per-user", type=float, default=None, help="default: the quick start's")
    parser.add_argument("--fatigue-strength", type=float, default=None, help="synthetic fatigue effect (default 0.5)")
    add_training_args(parser, "compare_branches", batch_size=256, epochs=2)
    args = parser.parse_args(argv)

    results: list[dict[str, Any]] = []
    for name in args.variants:
        run_dir = (args.runs / name).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        code, wall = fit(name, run_config(name, args, run_dir))
        entry: dict[str, Any] = {"variant": name, "fatigue": VARIANTS[name][0], "uplift": VARIANTS[name][1]}
        entry["wall_s"] = wall
        if code:
            entry["failed"] = code
        else:
            entry["metrics"] = read_metrics(run_dir)
        results.append(entry)
        _write(args, results)

    print_table(args, results)
    _write(args, results)
    print(f"\nwrote {args.out}")
    return 1 if any("failed" in r for r in results) else 0


def print_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """One row per variant: AUC / GAUC per task, uplift metrics, high-fatigue click AUC / logloss."""
    tasks = binary_tasks(results)
    print(f"\n{args.data_dir.name}, batch {args.batch_size}, {args.epochs} epoch(s), {args.accelerator}")
    uplift_cols = ("auuc", "qini", "uplift_at_k", "pehe")
    header = (
        f"{'variant':<8} | "
        + " | ".join(f"{t + ' AUC/GAUC':>20}" for t in tasks)
        + "".join(f" | {c:>11}" for c in uplift_cols)
        + f" | {'exposed click AUC/logloss':>25} | {'exposed':>7} | {'samples/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "failed" in r:
            print(f"{r['variant']:<8} | failed (exit code {r['failed']})")
            continue
        m = r["metrics"]
        cells = quality_cells(m, tasks)
        uplift = "".join(f" | {fmt(m.get(f'val/uplift/{c}'), '.4f'):>11}" for c in uplift_cols)
        exposed = f"{fmt(m.get('val/exposed/click/auc'), '.4f')} / {fmt(m.get('val/exposed/click/logloss'), '.4f')}"
        share = fmt(m.get("val/exposed/fraction"), ".3f")
        rate = fmt(m.get("perf/epoch_train_samples_per_s"), ".0f")
        print(
            f"{r['variant']:<8} | "
            + " | ".join(f"{c:>20}" for c in cells)
            + f"{uplift} | {exposed:>25} | {share:>7} | {rate:>9}"
        )


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    args.out.write_text(json.dumps({"settings": settings(args), "results": results}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
