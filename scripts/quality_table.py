"""Train every model variant on one prepared data set with the same budget and seeds; tabulate test quality.

    mtrank prepare movielens --src ml-100k --out data/movielens          # once
    python scripts/quality_table.py --data-dir data/movielens             # CPU: slow, see --max-len / --limit-*
    python scripts/quality_table.py --data-dir data/movielens --accelerator gpu --precision bf16-mixed \\
        --seeds 0 1 2 --epochs 4 --parallel 6 --out quality.json          # the README's table (one H100/H200)

Variants (``--variants`` picks some; all by default):

- ``no-history``: the non-sequential baseline: user and candidate item embeddings (with their static
  features) into an MLP (`encoders.NoHistoryEncoder`), MMoE heads.
- ``mean-pool``: the average-pooled history model (`encoders.MeanPoolEncoder`), MMoE heads.
- every encoder (HSTU, LONGER, ULTRA-HSTU) x every head family (MMoE, PLE, HoME): ``HSTU/MMoE`` ...
- branches where the data supports them, each encoder with HoME heads: ``+FRec`` (fatigue; needs a
  category history channel, ``--category``) and ``+CDUM`` (uplift; needs a treatment column,
  ``features.num_treatments`` > 0 in the data's ``prepare.json``).

Every run starts from ``configs/movielens.yaml`` (trainer, optimiser, schedule) with the data's feature
spec and task list from ``<data-dir>/prepare.json`` (``--max-len`` caps the history), the encoder block of
``configs/quickstart.yaml`` / ``longer.yaml`` / ``ultra_hstu.yaml`` (LONGER's and ULTRA-HSTU's long-sequence
settings scaled to ``--max-len`` as in `compare_encoders.py`) and the heads block of ``quickstart.yaml`` /
``ple.yaml`` / ``home.yaml``. Same samples in the same order per seed (``seed_everything`` and the data
seed both set to the seed). Each run is ``mtrank fit`` (validation after every epoch, the checkpoint with
the best first-task validation AUC kept) then ``mtrank test`` on that checkpoint, in their own processes;
``--parallel N`` runs N at once (each with ``cores / N`` threads).

Reported per variant, mean ± standard deviation over the seeds: per task AUC, GAUC (per-user AUC
weighted by the user's samples) and logloss on the test split (RMSE for regression tasks), training
time (the ``fit`` process's wall seconds, validation included) and trainable parameters. Prints a
Markdown table, writes it next to ``--out`` (``.md``) and every run's numbers to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_encoders import long_sequence_settings
from comparelib import ROOT, settings

ENCODERS = {  # name -> config whose model.encoder block is taken
    "HSTU": "quickstart.yaml",
    "LONGER": "longer.yaml",
    "ULTRA-HSTU": "ultra_hstu.yaml",
}
HEADS = {"MMoE": "quickstart.yaml", "PLE": "ple.yaml", "HoME": "home.yaml"}
BASELINES = {
    "no-history": {"class_path": "encoders.NoHistoryEncoder", "init_args": {"dim": 64, "hidden_dims": [128]}},
    "mean-pool": {"class_path": "encoders.MeanPoolEncoder", "init_args": {"dim": 64}},
}
FATIGUE = {  # FRec settings of configs/uplift_fatigue.yaml; `category` filled in from --category
    "class_path": "heads.FRec",
    "init_args": {"recent": 20, "num_interests": 4, "cl_weight": 0.1, "cl_temperature": 1.0, "num_augment": 4},
}
UPLIFT = {
    "class_path": "heads.CDUM",
    "init_args": {"control": 0, "dim": 32, "hidden_dims": [64], "propensity": "auto", "loss_weight": 1.0},
}


def variants(features: dict[str, Any], category: str | None) -> dict[str, dict[str, Any]]:
    """Variant name -> {encoder, heads, fatigue, uplift} (config names / blocks) the data supports."""
    out: dict[str, dict[str, Any]] = {}
    for name, block in BASELINES.items():
        out[name] = {"encoder": block, "heads": "MMoE", "fatigue": False, "uplift": False}
    for enc in ENCODERS:
        for heads in HEADS:
            out[f"{enc}/{heads}"] = {"encoder": enc, "heads": heads, "fatigue": False, "uplift": False}
    if category:
        for enc in ENCODERS:
            out[f"{enc}/HoME+FRec"] = {"encoder": enc, "heads": "HoME", "fatigue": True, "uplift": False}
    if features.get("num_treatments", 0) > 0:
        for enc in ENCODERS:
            out[f"{enc}/HoME+CDUM"] = {"encoder": enc, "heads": "HoME", "fatigue": False, "uplift": True}
    return out


def _config_block(config: str, key: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / config).read_text())["model"][key]


def encoder_block(name: str | dict[str, Any], features: dict[str, Any]) -> dict[str, Any]:
    """The ``model.encoder`` block of encoder ``name`` (or a baseline's block) for these features."""
    if isinstance(name, dict):
        return json.loads(json.dumps(name))
    block = _config_block(ENCODERS[name], "encoder")
    block["init_args"].update(long_sequence_settings(features["max_len"])[name])
    if name == "ULTRA-HSTU":  # the "engaged" stream: behaviours with a positive action on the data's channel
        channels = features.get("history_sparse", {})
        if "rating" in channels:
            engaged = {"channel": "rating", "values": [4, 5]}
        elif "action" in channels:
            engaged = {"channel": "action", "values": list(range(1, channels["action"]))}
        else:
            engaged = None
        streams = [{"name": "all"}]
        if engaged:
            streams.append({"name": "engaged", **engaged, "max_len": max(32, features["max_len"] // 4)})
        block["init_args"]["streams"] = streams
    return block


def run_config(name: str, variant: dict[str, Any], seed: int, args: argparse.Namespace, prepared: dict) -> dict:
    """The full config of one (variant, seed) run."""
    config = yaml.safe_load((ROOT / "configs" / "movielens.yaml").read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    features = dict(prepared["features"])
    features["max_len"] = args.max_len or features["max_len"]
    model["features"] = features
    model["tasks"] = prepared["tasks"]
    model["encoder"] = encoder_block(variant["encoder"], features)
    model["heads"] = _config_block(HEADS[variant["heads"]], "heads")
    if variant["fatigue"]:
        model["fatigue"] = json.loads(json.dumps(FATIGUE))
        model["fatigue"]["init_args"]["category"] = args.category
    if variant["uplift"]:
        model["uplift"] = json.loads(json.dumps(UPLIFT))
        model["uplift"]["init_args"]["task"] = prepared["tasks"][0]["name"]
    config["seed_everything"] = seed
    data.update(data_dir=str(args.data_dir.resolve()), batch_size=args.batch_size, num_workers=0, seed=seed)
    run_dir = run_path(args, name, seed)
    trainer.update(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        val_check_interval=1.0,
        enable_progress_bar=False,
        default_root_dir=str(run_dir),
        logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}}],
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(run_dir / "ckpt"),
                    "filename": "best",
                    "monitor": "val_auc",
                    "mode": "max",
                    "save_top_k": 1,
                    "enable_version_counter": False,
                },
            },
            {"class_path": "mtrank.callbacks.ThroughputMonitor", "init_args": {"every_n_steps": 100}},
        ],
    )
    for option in ("precision", "limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if getattr(args, option, None):
            trainer[option] = getattr(args, option)
    return config


def run_path(args: argparse.Namespace, name: str, seed: int) -> Path:
    return (args.runs / name.replace("/", "_").replace("+", "_") / f"seed{seed}").resolve()


def _mtrank(command: list[str], log: Path, threads: int) -> tuple[int, float]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("WANDB_SERVICE", None)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run([sys.executable, "-m", "mtrank", *command], env=env, cwd=ROOT, stdout=f, stderr=f)
    return code.returncode, time.perf_counter() - start


def train_and_test(name: str, seed: int, config: dict, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """``mtrank fit`` then ``mtrank test`` on the best checkpoint; the run's numbers (or its failure)."""
    run_dir = run_path(args, name, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    entry: dict[str, Any] = {"variant": name, "seed": seed, "run_dir": str(run_dir)}
    code, wall = _mtrank(["fit", "--config", str(path)], run_dir / "fit.log", threads)
    entry["train_s"] = wall
    best = run_dir / "ckpt" / "best.ckpt"
    if code or not best.is_file():
        entry["failed"] = f"fit exit code {code} (log: {run_dir / 'fit.log'})"
        return entry
    test_dir = run_dir / "test"
    test_config = json.loads(json.dumps(config))
    test_config["trainer"]["logger"][0]["init_args"]["save_dir"] = str(test_dir)
    test_config["trainer"]["callbacks"] = []
    test_path = run_dir / "test.yaml"
    test_path.write_text(yaml.safe_dump(test_config, sort_keys=False))
    command = ["test", "--config", str(test_path), "--ckpt_path", str(best)]
    code, _ = _mtrank(command, run_dir / "test.log", threads)
    if code:
        entry["failed"] = f"test exit code {code} (log: {run_dir / 'test.log'})"
        return entry
    entry["test"] = read_last(test_dir, "test/")
    entry["val"] = read_last(run_dir, "val/")
    entry["params"] = count_params(best)
    if args.delete_checkpoints:
        best.unlink()
    return entry


def read_last(run_dir: Path, prefix: str) -> dict[str, float]:
    """The last logged value of every metric starting with ``prefix`` in the run's newest CSV log."""
    import csv

    files = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no lightning_logs/version_*/metrics.csv")
    out: dict[str, float] = {}
    for row in csv.DictReader(files[-1].open()):
        out.update({k: float(v) for k, v in row.items() if v and k.startswith(prefix)})
    return out


def count_params(checkpoint: Path) -> int:
    """Floating-point values in the checkpoint's ``state_dict`` (the model's parameters and float buffers)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return sum(v.numel() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def aggregate(results: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: mean and standard deviation over seeds of every reported number."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name and "test" in r]
        failed = [r["failed"] for r in results if r["variant"] == name and "failed" in r]
        row: dict[str, Any] = {"variant": name, "seeds": [r["seed"] for r in runs], "failed": failed, "cells": {}}
        keys = [f"test/{t['name']}/{m}" for t in tasks for m in metrics_of(t)] + ["train_s", "params"]
        for key in keys:
            values = [r["test"].get(key) if key.startswith("test/") else r.get(key) for r in runs]
            values = [v for v in values if v is not None and not math.isnan(v)]
            if values:
                row["cells"][key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def metrics_of(task: dict[str, Any]) -> tuple[str, ...]:
    return ("auc", "gauc", "logloss") if task["kind"] == "binary" else ("rmse",)


def markdown(rows: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> str:
    """The table: one row per variant, ``mean ± std`` cells (``±`` left out for one seed)."""
    header = ["variant"]
    for t in tasks:
        header += [f"{t['name']} {m.upper() if m != 'logloss' else m}" for m in metrics_of(t)]
    header += ["train s", "params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"]]
        for t in tasks:
            for m in metrics_of(t):
                cells.append(_cell(row["cells"].get(f"test/{t['name']}/{m}"), ".4f"))
        cells.append(_cell(row["cells"].get("train_s"), ".0f"))
        params = row["cells"].get("params")
        cells.append(f"{params[0] / 1e3:.0f}K" if params else "-")
        if row["failed"] and not row["seeds"]:
            cells = [row["variant"], f"failed: {row['failed'][0]}"] + [""] * (len(header) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: tuple[float, float] | None, spec: str) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:{spec}} ± {std:{spec}}" if std else f"{mean:{spec}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "movielens", help="a prepared data set")
    parser.add_argument("--variants", nargs="+", default=None, help="variant names (default: all the data supports)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=None, help="history length (default: prepare.json's)")
    parser.add_argument("--category", default=None, help="FRec's category channel (default: genre or category)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed on a GPU")
    parser.add_argument("--limit-train-batches", type=float, default=None)
    parser.add_argument("--limit-val-batches", type=float, default=None)
    parser.add_argument("--limit-test-batches", type=float, default=None)
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=Path("quality.json"))
    parser.add_argument("--delete-checkpoints", action="store_true", help="delete each run's checkpoint once tested")
    parser.add_argument(
        "--table-from", type=Path, nargs="+", default=None, help="train nothing: tabulate the runs of these --out files"
    )
    args = parser.parse_args(argv)
    if args.table_from:
        return table_from(args.table_from, args.out)

    summary_file = args.data_dir / "prepare.json"
    if not summary_file.is_file():
        parser.error(f"--data-dir {args.data_dir}: no prepare.json; run `mtrank prepare ...` first")
    prepared = json.loads(summary_file.read_text())
    channels = prepared["features"].get("history_sparse", {})
    args.category = args.category or next((c for c in ("genre", "category") if c in channels), None)
    if args.category and args.category not in channels:
        parser.error(f"--category {args.category}: not a history channel of the data ({sorted(channels)})")
    table = variants(prepared["features"], args.category)
    names = args.variants or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; the data supports {list(table)}")

    jobs = [(n, s) for n in names for s in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    print(f"{len(jobs)} runs ({len(names)} variants x {len(args.seeds)} seeds), {args.parallel} at once", flush=True)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = {
            pool.submit(train_and_test, n, s, run_config(n, table[n], s, args, prepared), args, threads): (n, s)
            for n, s in jobs
        }
        for future in cf.as_completed(futures):
            entry = future.result()
            results.append(entry)
            status = entry.get("failed") or f"{entry['train_s']:.0f} s"
            print(
                f"[{time.perf_counter() - start:6.0f} s] {entry['variant']} seed {entry['seed']}: {status}", flush=True
            )
            _write(args, prepared, results, None)
    order = {job: i for i, job in enumerate(jobs)}
    results.sort(key=lambda r: order[(r["variant"], r["seed"])])
    rows = aggregate(results, prepared["tasks"])
    text = markdown(rows, prepared["tasks"])
    setup = (
        f"{prepared['source'].get('dataset', args.data_dir.name)}, test split; seeds {args.seeds}; "
        f"{args.epochs} epochs, batch {args.batch_size}, max_len {args.max_len or prepared['features']['max_len']}, "
        f"{args.accelerator}" + (f" {args.precision}" if args.precision else "")
    )
    print(f"\n{setup}\n\n{text}")
    _write(args, prepared, results, rows)
    args.out.with_suffix(".md").write_text(f"{setup}\n\n{text}\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if any("failed" in r for r in results) else 0


def table_from(files: list[Path], out: Path) -> int:
    """Tabulate the runs of earlier ``--out`` files together (for example seeds run in separate calls)."""
    docs = [json.loads(f.read_text()) for f in files]
    runs = [r for d in docs for r in d["runs"]]
    # rows in the order the variants were asked for (each file's --variants, files in turn), not as runs finished
    settings_list = [s for d in docs for s in (d["settings"] if isinstance(d["settings"], list) else [d["settings"]])]
    order = list(
        dict.fromkeys([v for s in settings_list for v in s.get("variants") or []] + [r["variant"] for r in runs])
    )
    runs.sort(key=lambda r: (order.index(r["variant"]), r["seed"]))
    tasks = docs[0]["data"].get("tasks") or _tasks_of(runs)
    rows = aggregate(runs, tasks)
    text = markdown(rows, tasks)
    seeds = sorted({r["seed"] for r in runs})
    meta = settings_list[0]
    setup = (
        f"{docs[0]['data']['source'].get('dataset', '')}, test split; seeds {seeds}; {meta['epochs']} epochs, "
        f"batch {meta['batch_size']}, max_len {meta['max_len']}, {meta['accelerator']} {meta.get('precision') or ''}"
        f"{' on ' + meta['device'] if meta.get('device') else ''}"
    )
    print(f"{setup}\n\n{text}")
    doc = {"settings": [d["settings"] for d in docs], "data": docs[0]["data"], "runs": runs, "table": rows}
    out.write_text(json.dumps(doc, indent=2, default=str))
    out.with_suffix(".md").write_text(f"{setup}\n\n{text}\n")
    return 1 if any("failed" in r for r in runs) else 0


def _tasks_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks from the metric names (older --out files without the task list): AUC -> binary, RMSE -> regression."""
    keys = {k for r in runs for k in r.get("test", {}) if k.count("/") == 2}
    names = sorted({k.split("/")[1] for k in keys if k.endswith(("/auc", "/rmse"))})
    return [{"name": n, "kind": "binary" if f"test/{n}/auc" in keys else "regression"} for n in names]


def _write(args: argparse.Namespace, prepared: dict, results: list[dict], rows: list[dict] | None) -> None:
    meta = settings(args)
    meta["device"] = torch.cuda.get_device_name() if args.accelerator == "gpu" and torch.cuda.is_available() else None
    meta["max_len"] = args.max_len or prepared["features"]["max_len"]
    data = {"source": prepared["source"], "summary": prepared["summary"], "tasks": prepared["tasks"]}
    doc = {"settings": meta, "data": data, "runs": results}
    if rows is not None:
        doc["table"] = rows
    args.out.write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
