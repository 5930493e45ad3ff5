"""Train MMoE, PLE and HoME (and HoME with each part off) with the same budget and tabulate quality and balance.

    python scripts/compare_heads.py --out compare_heads.json                  # CPU, the quick-start data
    python scripts/compare_heads.py --accelerator gpu --epochs 4 --batch-size 512

Every run trains the quick start's encoder (``configs/quickstart.yaml``: HSTU) on the quick-start
synthetic data (generated once into ``--data-dir``) with the same samples in the same order, the
same optimiser and schedule; only the head differs: MMoE from ``configs/quickstart.yaml``, PLE from
``configs/ple.yaml``, HoME from ``configs/home.yaml``, and the HoME ablations ``HoME-<part>`` with
one of its four parts switched off (``expert_norm``, ``hierarchy_mask``, ``feature_gate``,
``self_gate``). Each run is a separate ``mtrank fit`` process with a CSV logger, an offline W&B
logger and `mtrank.balance.ExpertBalanceMonitor`; its W&B run directory stays under
``--runs/<head>/wandb/offline-run-*`` (upload later with ``wandb sync`` if you want it online).

Reported per head, from the last validation: per-task AUC/GAUC, and the balance statistics of HoME's
three failure modes (arXiv 2408.05430):
- collapse: the largest fraction of near-zero activations of any expert, and the spread of expert
  output scales (largest / smallest output std);
- gate health: mean normalised gate entropy and coefficient of variation of expert usage over the
  task gates;
- degradation: over the experts that several task gates see, the largest share of an expert's gate
  mass taken by one task (1/T: evenly shared, 1: occupied by one task);
- under-fitting: for each sparse task (positive rate < 5 % on the validation set), the gate mass on
  its own task experts (0 for MMoE, which has none).
Prints two tables and writes JSON (settings, per-run metrics, the full balance statistics, the W&B
run directory and the history keys read back from it).
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

from mtrank.balance import read_offline_wandb_history

HOME_PARTS = ("expert_norm", "hierarchy_mask", "feature_gate", "self_gate")
HEADS: dict[str, tuple[str, dict[str, Any]]] = {
    "MMoE": ("quickstart.yaml", {}),
    "PLE": ("ple.yaml", {}),
    "HoME": ("home.yaml", {}),
    **{f"HoME-{part}": ("home.yaml", {part: False}) for part in HOME_PARTS},
}


def run_config(name: str, args: argparse.Namespace, run_dir: Path) -> Path:
    """Write head ``name``'s config for this comparison (quick-start encoder, data and schedule); return its path."""
    base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    file, overrides = HEADS[name]
    heads = yaml.safe_load((ROOT / "configs" / file).read_text())["model"]["heads"]
    heads.setdefault("init_args", {}).update(overrides)
    model, data, trainer = base["model"], base["data"], base["trainer"]
    model["heads"] = heads
    data.update(data_dir=str(args.data_dir), batch_size=args.batch_size, num_workers=0)
    if args.users:
        data["synth"]["num_users"] = args.users  # a subset of the quick start's user vocabulary
    if args.samples_per_user:
        data["synth"]["samples_per_user"] = args.samples_per_user
    base["seed_everything"] = args.seed
    loggers = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "lightning_logs"},
        },
        {
            "class_path": "mtrank.loggers.WandbLogger",
            "init_args": {"project": "mtrank-heads", "name": name, "save_dir": str(run_dir), "offline": True},
        },
    ]
    callbacks = [
        {"class_path": "mtrank.callbacks.ThroughputMonitor", "init_args": {"every_n_steps": 50}},
        {
            "class_path": "mtrank.balance.ExpertBalanceMonitor",
            "init_args": {"every_n_steps": args.balance_every, "output_dir": str(run_dir)},
        },
    ]
    set_trainer(trainer, args, run_dir, loggers, callbacks)
    return write_config(base, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "quickstart")
    parser.add_argument("--users", type=int, default=None, help="synthetic users (default: the quick start's)")
    parser.add_argument("--samples-per-user", type=float, default=None, help="default: the quick start's")
    parser.add_argument("--balance-every", type=int, default=50, help="training steps between balance logs")
    add_training_args(parser, "compare_heads", batch_size=256, epochs=2)
    args = parser.parse_args(argv)

    results: list[dict[str, Any]] = []
    for name in args.heads:
        run_dir = (args.runs / name.lower()).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        code, wall = fit(name, run_config(name, args, run_dir))
        if code:
            results.append({"head": name, "wall_s": wall, "failed": code})
            continue
        balance = json.loads((run_dir / "expert_balance.json").read_text())["last_val"]
        results.append(
            {
                "head": name,
                "wall_s": wall,
                "metrics": read_metrics(run_dir),
                "summary": summarize(balance),
                "balance": balance,
                "wandb": wandb_keys(run_dir),
            }
        )
        _write(args, results)

    print_tables(args, results)
    _write(args, results)
    print(f"\nwrote {args.out}")
    return 1 if any("failed" in r for r in results) else 0


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """One validation's balance statistics (`BalanceStats.to_dict`) -> the few numbers of the table.

    ``max_zero_frac`` (and its expert), ``std_ratio`` (largest / smallest expert output std),
    ``entropy`` and ``usage_cv`` (means over task gates), ``max_top_share`` (and its expert and
    task) over experts shared by several tasks, and ``sparse`` task -> own-expert gate mass.
    """
    experts = stats["experts"]
    zero = max(experts, key=lambda e: experts[e]["zero_frac"] or 0.0)
    stds = [x["std"] for x in experts.values() if x["std"] is not None]
    task_gates = [g for g in stats["gates"].values() if g["task"] is not None]
    shared = {e: d for e, d in stats["degradation"].items() if d["by"] == "task"}
    top = max(shared, key=lambda e: shared[e]["top_share"]) if shared else None
    return {
        "max_zero_frac": experts[zero]["zero_frac"],
        "max_zero_expert": zero,
        "std_ratio": max(stds) / max(min(stds), 1e-12) if stds else None,
        "entropy": _mean([g["entropy"] for g in task_gates]),
        "usage_cv": _mean([g["usage_cv"] for g in task_gates]),
        "max_top_share": shared[top]["top_share"] if top else None,
        "max_top_expert": top,
        "max_top_task": shared[top]["top"] if top else None,
        "shared_by": len(shared[top]["masses"]) if top else None,
        "sparse": {t: x["own_mass"] for t, x in stats["tasks"].items() if x["sparse"]},
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def wandb_keys(run_dir: Path) -> dict[str, Any]:
    """The run's offline W&B directory and the balance keys of its history, read back from the run file."""
    dirs = sorted(run_dir.glob("wandb/offline-run-*"))
    if not dirs:
        return {"run_dir": None, "balance_keys": 0}
    keys = sorted({k for row in read_offline_wandb_history(dirs[-1]) for k in row if k.startswith("balance/")})
    return {
        "run_dir": str(dirs[-1]),
        "balance_keys": len(keys),
        "heatmap": "balance/val/heatmap" in keys,
        "example_keys": keys[:5],
    }


def print_tables(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """The quality table (AUC / GAUC per binary task) and the balance table."""
    tasks = binary_tasks(results)
    print(f"\n{args.data_dir.name}, batch {args.batch_size}, {args.epochs} epoch(s), {args.accelerator}")
    header = f"{'head':<19} | " + " | ".join(f"{t + ' AUC/GAUC':>20}" for t in tasks) + f" | {'samples/s':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        if "failed" in r:
            print(f"{r['head']:<19} | failed (exit code {r['failed']})")
            continue
        m = r["metrics"]
        cells = quality_cells(m, tasks)
        rate = fmt(m.get("perf/epoch_train_samples_per_s"), ".0f")
        print(f"{r['head']:<19} | " + " | ".join(f"{c:>20}" for c in cells) + f" | {rate:>9}")

    sparse = sorted({t for r in results for t in r.get("summary", {}).get("sparse", {})})
    print("\nbalance at the last validation (task gates; sparse: own-expert gate mass)")
    header = (
        f"{'head':<19} | {'max zero frac':>28} | {'std max/min':>11} | {'entropy':>7} | {'usage CV':>8} | "
        f"{'max top-task share':>46}" + "".join(f" | {'own ' + t:>10}" for t in sparse)
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "failed" in r:
            continue
        b = r["summary"]
        zero = f"{fmt(b['max_zero_frac'])} ({b['max_zero_expert']})"
        top = (
            "-"
            if b["max_top_expert"] is None
            else (f"{fmt(b['max_top_share'])} ({b['max_top_expert']}: {b['max_top_task']}, 1/{b['shared_by']})")
        )
        own = "".join(f" | {fmt(b['sparse'].get(t)):>10}" for t in sparse)
        print(
            f"{r['head']:<19} | {zero:>28} | {fmt(b['std_ratio'], '.1f'):>11} | {fmt(b['entropy']):>7} | "
            f"{fmt(b['usage_cv']):>8} | {top:>46}{own}"
        )


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    args.out.write_text(json.dumps({"settings": settings(args), "results": results}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
