"""Training throughput, peak GPU memory and MFU of one model config under DDP and DeepSpeed ZeRO 1/2/3 (+ offload),
the exact-resume check under a ZeRO stage, and the ZeRO checkpoint converter, on every GPU of the machine.

On a GPU machine, from the repository root (one call; the device count comes from the environment:
``CUDA_VISIBLE_DEVICES`` / all visible GPUs, or ``--devices``):

    python scripts/bench_strategies.py --out bench_strategies.json
    # the same, spelled out (these are the defaults):
    python scripts/bench_strategies.py --config configs/hstu_mmoe_gpu.yaml \\
        --strategies ddp,zero1,zero2,zero3,zero3_offload --steps 40 --warmup 20 --resume-check zero2 \\
        --out bench_strategies.json
    # a large id-embedding table (tens of millions of rows), memory per rank under each strategy:
    python scripts/bench_strategies.py --num-items 20000000 --strategies ddp,zero2,zero3,zero3_offload \\
        --resume-check none --out bench_embeddings.json

CPU smoke test (DDP with one process; DeepSpeed runs on CUDA only):

    python scripts/bench_strategies.py --accelerator cpu --strategies ddp --steps 2 --warmup 1 --resume-check none \\
        --batch-size 64 --out /tmp/s.json

What it does:

- **Throughput rows**, one per strategy (``configs/strategies/<name>.yaml`` added to ``--config``), each in a
  fresh process (Lightning launches one per GPU): ``--warmup`` untimed steps, then ``--steps`` timed steps
  (wall time between two ``torch.cuda.synchronize``, validation off). ``samples/s``: training samples of all
  ranks per second; ``peak GiB/rank``: the largest ``torch.cuda.max_memory_allocated`` over the ranks, reset
  after warm-up (weights, gradients, optimiser state on the GPU, activations); ``MFU``: model FLOPs per
  second over the GPUs' dense bf16 peak. Model FLOPs per sample are counted once by
  `torch.utils.flop_counter.FlopCounterMode` on one training step (forward + loss + backward) of the same
  model on a real batch, with the encoder's PyTorch reference attention (the fused kernels are opaque to the
  counter; the arithmetic is the same, masked attention positions included as the reference computes them).
- **Resume check** (``--resume-check zero2``): run A trains 2K steps without stopping; run B trains K steps
  (mid-epoch) and saves a checkpoint; run C resumes from it to 2K steps. Reported: whether C's training
  batches after the stop are exactly A's (sample indices), the largest difference of C's and A's validation
  predictions and AUCs on validation rows, and of their float32 weights (both converted from their ZeRO folders);
  beside them the same differences between A and a second uninterrupted run A' (the noise floor: CUDA's atomic
  adds in embedding and bias-table backward passes make two identical runs differ by float rounding).
- **Converter**: A's ZeRO checkpoint folder converted with `mtrank.convert.convert_checkpoint`, loaded into a
  fresh `RankingModule` on the CPU in float32, and its predictions on validation batches compared with
  A's own (bf16 weights, on the GPU).

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

STRATEGIES = ("ddp", "zero1", "zero1_offload", "zero2", "zero2_offload", "zero3", "zero3_offload")
#: dense bf16 tensor-core peak, FLOP/s, by a substring of the device name (None: MFU not reported)
PREDICT_ROWS = 2048  # validation samples predicted by the resume check's runs
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ------------------------------------------------------------------------------------------ one run (a worker)


class Recorder(L.Callback):
    """Times steps ``warmup+1 ..``, records per step the sum and count of the batch's sample indices, saves a
    checkpoint (every rank) at the end of step ``save_at`` (inside the loop, where a resume is exact), and at the
    end of training, before Lightning's teardown moves the model off the GPU, gathers the figures over ranks and
    predicts ``predict_rows`` validation samples; rank 0 writes them to ``result`` as JSON."""

    def __init__(self, warmup: int, result: str, info: dict[str, Any], save_at: int = 0, save_to: str = "",
                 predict_rows: int = 0) -> None:  # fmt: skip
        self.warmup, self.result, self.info = warmup, result, info
        self.save_at, self.save_to, self.predict_rows = save_at, save_to, predict_rows
        self.start: float | None = None
        self.samples = 0
        self.steps: list[list[int]] = []  # [global_step, sum of sample_index, batch size] on this rank

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(module)
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(module.device)
            self.start = time.perf_counter()
        index = batch.sample_index
        self.steps.append([trainer.global_step, int(index.sum()), int(index.numel())])
        if self.start is not None:
            self.samples += int(index.numel())

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: Any, batch: Any, i: int) -> None:
        if self.save_at and trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.save_to)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._sync(module)
        elapsed = time.perf_counter() - self.start if self.start is not None else 0.0
        cuda = module.device.type == "cuda"
        out = dict(self.info, world_size=trainer.world_size, steps=self.steps)
        out["peak_gib_per_rank"] = gather(
            trainer, torch.cuda.max_memory_allocated(module.device) / 2**30 if cuda else 0
        )
        out["samples"] = sum(gather(trainer, self.samples))
        out["elapsed_s"] = max(gather(trainer, elapsed))
        if self.predict_rows:
            data = trainer.datamodule
            module.eval()
            preds: dict[str, list[float]] = {}
            with torch.no_grad(), torch.autocast(module.device.type, dtype=torch.bfloat16, enabled=cuda):
                for lo in range(0, self.predict_rows, 512):
                    batch = data.dataset("val").get_batch(list(range(lo, lo + 512))).to(module.device)
                    for k, v in module.predictions(module(batch)[1]).items():
                        preds.setdefault(k, []).extend(v.float().cpu().tolist())
            module.train()
            out["predictions"] = preds
        if trainer.global_rank == 0:
            Path(self.result).write_text(json.dumps(out))


def build_cli(args: argparse.Namespace, strategy: str, root: Path, max_steps: int, extra: list[str] | None = None):
    from mtrank.cli import TRAINER_DEFAULTS, MTRankCLI
    from mtrank.data.datamodule import RankingDataModule
    from mtrank.module import RankingModule

    cli_args = ["--config", str(args.config), "--config", str(ROOT / "configs" / "strategies" / f"{strategy}.yaml")]
    cli_args += ["--trainer.accelerator", args.accelerator, "--trainer.devices", str(args.devices)]
    cli_args += ["--trainer.max_steps", str(max_steps), "--trainer.max_epochs", "-1", "--trainer.logger", "false"]
    cli_args += ["--trainer.limit_val_batches", "20", "--trainer.check_val_every_n_epoch", "100000"]  # val: only asked
    cli_args += ["--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false"]
    cli_args += ["--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(root)]
    cli_args += ["--trainer.num_sanity_val_steps", "0"]
    if args.accelerator == "cpu":
        cli_args += ["--trainer.precision", "32-true"]
    if args.batch_size:
        cli_args += ["--data.batch_size", str(args.batch_size)]
    if args.num_items:
        cli_args += ["--model.features.num_items", str(args.num_items)]
    if args.data_dir:
        cli_args += ["--data.data_dir", str(args.data_dir)]
    cli_args += list(extra or [])
    return MTRankCLI(
        RankingModule, RankingDataModule, run=False, args=cli_args, trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0, auto_configure_optimizers=False,
    )  # fmt: skip


def gather(trainer: L.Trainer, value: float) -> list[float]:
    """``value`` of every rank (a list on every rank)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=trainer.strategy.root_device)
    return [float(x) for x in trainer.strategy.all_gather(t).reshape(-1).cpu()]


def worker(args: argparse.Namespace) -> None:
    """One training run of ``args.worker`` (a strategy name) in ``args.mode``; rank 0 writes ``args.result``."""
    root, mode, K = Path(args.run_dir), args.mode, args.resume_steps
    if mode == "flops":  # in its own process, so that its GPU memory is gone before the timed runs
        Path(args.result).write_text(json.dumps({"flops_per_sample": count_flops_per_sample(args)}))
        return
    steps_total = {"throughput": args.warmup + args.steps, "stopped": K}.get(mode, 2 * K)  # full, resumed, again
    cli = build_cli(args, args.worker, root, steps_total)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    info = {"strategy": args.worker, "mode": mode}
    if mode == "throughput":
        trainer.callbacks.append(Recorder(args.warmup, args.result, info))
    else:
        save_to = str(root.parent / f"{mode}.ckpt")
        rows = PREDICT_ROWS if mode != "stopped" else 0
        trainer.callbacks.append(Recorder(0, args.result, info, steps_total, save_to, rows))
    trainer.fit(model, datamodule=data, ckpt_path=str(root.parent / "stopped.ckpt") if mode == "resumed" else None)


# ------------------------------------------------------------------------------------------ orchestration


def run_worker(args: argparse.Namespace, strategy: str, mode: str, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", strategy, "--mode", mode]
    cmd += ["--run-dir", str(run_dir), "--result", str(result)]
    flags = (
        "config",
        "accelerator",
        "devices",
        "steps",
        "warmup",
        "batch_size",
        "num_items",
        "resume_steps",
        "data_dir",
    )
    for flag in flags:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if not result.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        oom = "out of memory" in tail.lower()
        return {"strategy": strategy, "mode": mode, "status": "oom" if oom else "error", "error": tail, "wall_s": wall}
    out = json.loads(result.read_text())
    out.update(status="ok", wall_s=wall, exit_code=proc.returncode)
    if proc.returncode != 0:  # the figures were written at the end of training; the process died after it
        out["note"] = f"exit code {proc.returncode} after training: " + (proc.stdout + proc.stderr)[-300:].strip()
    return out


def count_flops_per_sample(args: argparse.Namespace) -> float | None:
    """Model FLOPs of one training step per sample (reference attention), on one real batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from mtrank.strategies import is_deepspeed

    with tempfile.TemporaryDirectory() as tmp:
        cli = build_cli(args, "ddp", Path(tmp), 1, ["--model.encoder.init_args.kernel", "reference"])
        assert not is_deepspeed(cli.trainer.strategy)
        data, model = cli.datamodule, cli.model
        data.prepare_data()
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
        model, batch = model.to(device).train(), batch.to(device)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                encoded, head_out = model(batch)
                loss = model.losses(encoded, head_out, batch)["loss"]
            loss.backward()
        return counter.get_total_flops() / batch.batch_size


def val_aucs(args: argparse.Namespace, predictions: dict[str, list[float]]) -> dict[str, float]:
    """AUC of each binary task's predictions on the first validation rows (`PREDICT_ROWS`)."""
    from torchmetrics.functional.classification import binary_auroc

    with tempfile.TemporaryDirectory() as tmp:
        cli = build_cli(argparse.Namespace(**{**vars(args), "accelerator": "cpu"}), "ddp", Path(tmp), 1)
    data = cli.datamodule
    data.setup("validate")
    batch = data.dataset("val").get_batch(list(range(PREDICT_ROWS)))
    out = {}
    for task in cli.model.tasks:
        if task.kind == "binary" and task.name in predictions:
            out[task.name] = float(binary_auroc(torch.tensor(predictions[task.name]), batch.labels[task.label].long()))
    return out


def converter_check(args: argparse.Namespace, base: Path, full: dict[str, Any]) -> dict[str, Any]:
    """Convert A's ZeRO folder, load it on the CPU in float32, compare predictions with A's (bf16, GPU)."""
    from mtrank.convert import convert_checkpoint

    src = base / "full.ckpt"
    start = time.perf_counter()
    exported = convert_checkpoint(src, base / "full_fp32.ckpt")
    seconds = time.perf_counter() - start
    cli = build_cli(argparse.Namespace(**{**vars(args), "accelerator": "cpu"}), "ddp", base / "convert", 1)
    model, data = cli.model, cli.datamodule
    model.load_state_dict(exported["state_dict"], strict=True)
    model.eval()
    data.prepare_data()
    data.setup("validate")
    batch = data.dataset("val").get_batch(list(range(512)))
    with torch.no_grad():
        preds = {k: v.tolist() for k, v in model.predictions(model(batch)[1]).items()}
    diffs = {k: max(abs(x - y) for x, y in zip(preds[k], full["predictions"][k][:512], strict=True)) for k in preds}
    return {
        "source": str(src),
        "format": exported["mtrank_converted_from"]["format"],
        "tensors": len(exported["state_dict"]),
        "values": sum(v.numel() for v in exported["state_dict"].values()),
        "seconds": seconds,
        "max_abs_prediction_diff_fp32_cpu_vs_bf16_gpu": diffs,
    }


def weights_diff(base: Path, other: str) -> float:
    """Largest |difference| of A's float32 weights and run ``other``'s (both converted from their checkpoints)."""
    from mtrank.convert import convert_checkpoint

    a = convert_checkpoint(base / "full.ckpt", base / "full_fp32.ckpt")["state_dict"]
    c = convert_checkpoint(base / f"{other}.ckpt", base / f"{other}_fp32.ckpt")["state_dict"]
    return max(float((a[k].detach() - c[k].detach()).abs().max()) for k in a if a[k].is_floating_point())


def prediction_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest |difference| of two runs' validation predictions, over tasks and rows."""
    return max(
        max(abs(x - y) for x, y in zip(a["predictions"][k], b["predictions"][k], strict=True)) for k in a["predictions"]
    )


def resume_check(args: argparse.Namespace, strategy: str, base: Path) -> dict[str, Any]:
    full = run_worker(args, strategy, "full", base / "full")
    stopped = run_worker(args, strategy, "stopped", base / "stopped")
    resumed = run_worker(args, strategy, "resumed", base / "resumed")
    again = run_worker(args, strategy, "again", base / "again")  # A once more: the run-to-run noise floor
    runs = {"full": full, "stopped": stopped, "resumed": resumed, "again": again}
    bad = {k: v for k, v in runs.items() if v["status"] != "ok"}
    if bad:
        return {
            "strategy": strategy,
            "status": "error",
            "errors": {k: v.get("error", "")[-1500:] for k, v in bad.items()},
        }
    K = args.resume_steps
    after_a = [s for s in full["steps"] if s[0] >= K]
    after_c = [s for s in resumed["steps"] if s[0] >= K]
    out = {
        "strategy": strategy,
        "status": "ok",
        "stop_step": K,
        "total_steps": 2 * K,
        "batches_after_stop_identical": after_a == after_c and len(after_a) == K,
        "batches_before_stop_identical": [s for s in full["steps"] if s[0] < K] == stopped["steps"],
        "val_auc_full": val_aucs(args, full["predictions"]),
        "val_auc_resumed": val_aucs(args, resumed["predictions"]),
        "max_abs_val_prediction_diff": prediction_diff(full, resumed),
        "max_abs_weight_diff": weights_diff(base, "resumed"),
        "noise_floor_max_abs_val_prediction_diff": prediction_diff(full, again),
        "noise_floor_max_abs_weight_diff": weights_diff(base, "again"),
        "batches_of_again_identical": again["steps"] == full["steps"],
        "converter": converter_check(args, base, full),
    }
    return out


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "hstu_mmoe_gpu.yaml")
    parser.add_argument("--strategies", default="ddp,zero1,zero2,zero3,zero3_offload", help="comma list")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--devices", type=int, default=None, help="default: every visible GPU (1 on the CPU)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=0, help="per-rank batch (0: the config's)")
    parser.add_argument("--num-items", type=int, default=0, help="item-id table rows (0: the config's)")
    parser.add_argument("--data-dir", default="", help="the data set's folder (default: the config's data.data_dir)")
    parser.add_argument("--resume-check", default="zero2", help="strategy of the resume check, or none")
    parser.add_argument("--resume-steps", type=int, default=30, help="K: stop after K steps, resume to 2K")
    parser.add_argument("--out", type=Path, default=Path("bench_strategies.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="throughput", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices is None or args.devices == "None":
        args.devices = torch.cuda.device_count() if args.accelerator == "gpu" else 1
    args.devices = int(args.devices)
    if args.worker:
        worker(args)
        return 0

    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"--strategies: unknown {unknown}; known: {', '.join(STRATEGIES)}")
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else platform.processor() or "cpu"
    peak = peak_flops(device) if args.accelerator == "gpu" else None
    print(f"device: {args.devices} x {device}; torch {torch.__version__}; config {args.config}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        counted = run_worker(args, "ddp", "flops", Path(tmp) / "flops")
    if counted["status"] != "ok":
        print(f"counting FLOPs failed:\n{counted['error']}", file=sys.stderr)
        return 1
    flops = counted["flops_per_sample"]
    print(f"model FLOPs per training sample: {flops / 1e9:.2f} GFLOP", flush=True)
    report: dict[str, Any] = {
        "device": device,
        "devices": args.devices,
        "torch": torch.__version__,
        "config": str(args.config),
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "mode", "run_dir", "result")},
        "flops_per_sample": flops,
        "peak_bf16_flops_per_gpu": peak,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in strategies:
            row = run_worker(args, strategy, "throughput", Path(tmp) / strategy)
            if row["status"] == "ok":
                row["samples_per_s"] = row["samples"] / row["elapsed_s"] if row["elapsed_s"] else None
                row["peak_gib"] = max(row["peak_gib_per_rank"])
                rate = row["samples_per_s"]
                row["mfu"] = flops * rate / (peak * args.devices) if (peak and rate) else None
                row.pop("steps", None)
            print(f"{strategy}: {row['status']} {fmt(row.get('samples_per_s'), '.0f')} samples/s", flush=True)
            report["rows"].append(row)
            args.out.write_text(json.dumps(report, indent=2))
        if args.resume_check != "none":
            report["resume"] = resume_check(args, args.resume_check, Path(tmp) / "resume")
            args.out.write_text(json.dumps(report, indent=2))

    base = next((r["samples_per_s"] for r in report["rows"] if r["status"] == "ok"), None)
    print(f"\n{device} x {args.devices} — {args.config.name}, {args.steps} timed steps after {args.warmup}\n")
    header = "| strategy | samples/s | vs first | peak GiB/rank | MFU | run s | note |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        rate = r.get("samples_per_s")
        ratio = f"{rate / base:.2f}x" if (rate and base) else "—"
        note = r["status"] if r["status"] != "ok" else ""
        print(
            f"| {r['strategy']} | {fmt(rate, '.0f')} | {ratio} | {fmt(r.get('peak_gib'), '.2f')} | "
            f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') else ''} | {r['wall_s']:.0f} | {note} |"
        )
    if "resume" in report:
        res = report["resume"]
        print(
            f"\nresume check ({res['strategy']}):",
            json.dumps(
                {k: v for k, v in res.items() if k.startswith(("batches", "max", "noise", "status", "stop", "val"))}
            ),
        )
        if "converter" in res:
            print("converter:", json.dumps(res["converter"]))
    print(f"\nwrote {args.out}")
    failed = [r for r in report["rows"] if r["status"] == "error"] + (
        [report["resume"]] if report.get("resume", {}).get("status") == "error" else []
    )
    for r in failed:
        print(f"\n--- {r['strategy']} failed:\n{r.get('error') or r.get('errors')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
