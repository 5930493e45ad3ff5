"""End-to-end training step time with the fused attention kernels on and off, for HSTU, LONGER and ULTRA-HSTU.

On a GPU (one H100 for the issue's numbers), from the repository root:

    python scripts/bench_kernels_e2e.py --out bench_kernels_e2e.json
    # the same, spelled out (these are the defaults):
    python scripts/bench_kernels_e2e.py --device cuda --encoders HSTU,LONGER,ULTRA-HSTU --kernels reference,auto \\
        --max-len 1024 --batch-size 64 --steps 20 --warmup 5 --seed 0 --out bench_kernels_e2e.json
    # longer histories as well:
    python scripts/bench_kernels_e2e.py --max-len 1024,4096 --out bench_kernels_e2e.json

CPU smoke test:

    python scripts/bench_kernels_e2e.py --device cpu --max-len 32 --batch-size 4 --steps 2 --warmup 1 --out /tmp/e.json

For every encoder, history length and kernel: the `RankingModule` of the encoder's config (``model:`` of
``configs/hstu_mmoe_gpu.yaml`` for HSTU, ``configs/longer.yaml``, ``configs/ultra_hstu.yaml``), built through
the same jsonargparse parser as ``mtrank fit`` (class_path / init_args), with

- ``model.encoder.init_args.kernel`` set to the ``--kernels`` entry, passed through as is (HSTU and ULTRA-HSTU
  take ``reference | triton | auto``, LONGER ``reference | sdpa | flex | auto``);
- ``model.features.max_len`` set to ``--max-len`` and the encoder's long-sequence settings of
  ``scripts/compare_encoders.py``'s `long_sequence_settings` (ULTRA-HSTU's SLA window, global prefix and
  truncation tail, LONGER's recent queries, scaled to the history length; HSTU unchanged);
- the same seed for every kernel, so reference and kernel start from the same weights.

One batch of ``--batch-size`` samples with full histories of ``--max-len`` behaviours
(`mtrank.data.synth.random_batch`) plus random labels for every task, moved to the device once. A training step
is: forward and the module's objective (`RankingModule.losses`, what ``training_step`` returns, without
logging) under bf16 autocast on CUDA (float32 on the CPU), backward, the config's optimiser step (AdamW,
constant learning rate: no schedule), gradients set to None. ``--warmup`` untimed steps (they absorb Triton's
autotuning), then ``--steps`` timed steps, each between two ``torch.cuda.synchronize`` calls
(``time.perf_counter``).

Columns: ``ms/step`` median milliseconds per training step; ``samples/s`` batch size / median step time;
``peak GiB`` ``torch.cuda.max_memory_allocated`` over the timed steps (everything: weights, gradients, AdamW
state, batch, activations; "—" on the CPU); ``speed-up`` the reference kernel's ms/step over this row's, same
encoder and history length; ``warmup s`` wall seconds of the ``--warmup`` steps together (the first call's Triton
autotuning and compilation land here: the one-off cost a training run pays before its first logged step);
``note`` why a row has no numbers. A configuration that runs out of GPU memory is
reported as such; one that fails otherwise (for example a kernel an encoder does not accept) is reported with its
error and makes the exit status 1. Prints a table and writes JSON (``--out``, rewritten after every row).

Where the time goes (``--profile-steps K``, default 0): after the timed steps, K more steps run under
``torch.profiler`` (CPU and, on CUDA, device activity) and each row gets a ``profile``: ``device_ms_per_step``
(the kernels' own time summed, per step), ``device_busy`` (that over the unprofiled median step: well below 1
means the step waits on the host, i.e. it is bound by Python and kernel launches, not by the GPU),
``launches_per_step`` (kernel launches, CUDA runtime and driver calls together: Triton launches through the
driver), ``host_ms_per_step`` (the profiled step's wall time, profiler overhead included) and ``top``: the
``--profile-top`` operators by their own device time (CPU time on the CPU) with calls and milliseconds per step.
A short summary is printed under the table. Profiled steps are not part of ``ms/step``.

    python scripts/bench_kernels_e2e.py --encoders HSTU --kernels auto --max-len 256 --batch-size 512 \
        --profile-steps 5 --out e2e_profile.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_encoders import long_sequence_settings

from mtrank.batch import Batch
from mtrank.data.synth import random_batch
from mtrank.module import RankingModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"HSTU": "hstu_mmoe_gpu.yaml", "LONGER": "longer.yaml", "ULTRA-HSTU": "ultra_hstu.yaml"}


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    return [int(x) for x in str_list(text.replace(" ", ","))]


def encoder_list(text: str) -> list[str]:
    names = str_list(text)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown encoder(s) {unknown}; choose from {', '.join(CONFIGS)}")
    return names


def model_config(encoder: str, max_len: int, kernel: str) -> dict[str, Any]:
    """The ``model:`` section of ``encoder``'s config for a history of ``max_len`` with ``kernel``."""
    model = copy.deepcopy(yaml.safe_load((ROOT / "configs" / CONFIGS[encoder]).read_text())["model"])
    model["features"]["max_len"] = max_len
    init_args = model["encoder"].setdefault("init_args", {})
    init_args.update(long_sequence_settings(max_len)[encoder])
    init_args["kernel"] = kernel
    return model


def build_module(model: dict[str, Any]) -> RankingModule:
    """A `RankingModule` from a ``model:`` section, through the parser ``mtrank fit --config`` uses."""
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(RankingModule, "model", subclass_mode=False)
    config = parser.parse_object({"model": model})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    return instantiate(config).model


def make_batch(module: RankingModule, batch_size: int, max_len: int, seed: int) -> Batch:
    """Full histories of ``max_len`` (`random_batch`) plus random labels: 0/1 for binary tasks, >= 0 else."""
    batch = random_batch(module.features, history_len=[max_len] * batch_size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for task in module.tasks:
        if task.kind == "binary":
            batch.labels[task.label] = (torch.rand(batch_size, generator=g) < 0.3).float()
        else:
            batch.labels[task.label] = torch.rand(batch_size, generator=g) * 100.0
    return batch


def train_step(module: RankingModule, optimizer: torch.optim.Optimizer, batch: Batch, autocast: bool) -> None:
    device_type = batch.item_id.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        encoded, head_out = module(batch)
        loss = module.losses(encoded, head_out, batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(encoder: str, max_len: int, kernel: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time one configuration; raises what building or stepping raises."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = model_config(encoder, max_len, kernel)
    torch.manual_seed(args.seed)
    module = build_module(model).to(device).train()
    optimizer = module.optimizer_factory(module.parameters())
    batch = make_batch(module, args.batch_size, max_len, args.seed).to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    for _ in range(args.warmup):
        train_step(module, optimizer, batch, cuda)
    sync()
    warmup_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        train_step(module, optimizer, batch, cuda)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    profiled = profile_steps(module, optimizer, batch, args.profile_steps, args.profile_top, ms, sync)
    return {
        "status": "ok",
        "ms_per_step": ms,
        "samples_per_s": args.batch_size / (ms * 1e-3),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "step_ms": times,
        "warmup_s": warmup_s,
        "parameters": sum(p.numel() for p in module.parameters()),
        "optimizer": type(optimizer).__name__,
        "encoder_init_args": model["encoder"]["init_args"],
        **({"profile": profiled} if profiled else {}),
    }


LAUNCHES = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel",
)


def profile_steps(
    module: RankingModule,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    steps: int,
    top: int,
    step_ms: float,
    sync: Any,
) -> dict[str, Any] | None:
    """``steps`` training steps under ``torch.profiler``: device time, launches and the top operators per step.

    ``step_ms`` is the unprofiled median step time, the denominator of ``device_busy``. None when ``steps`` is 0.
    """
    if steps <= 0:
        return None
    cuda = batch.item_id.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(module, optimizer, batch, cuda)
        sync()
        host_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if cuda else None
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    ops = sorted((e for e in events if key(e) > 0), key=key, reverse=True)[:top]
    return {
        "steps": steps,
        "host_ms_per_step": host_ms,
        "device_ms_per_step": device_us / steps / 1e3 if cuda else None,
        "device_busy": device_us / steps / 1e3 / step_ms if cuda else None,
        "launches_per_step": launches / steps,
        "cpu_ops_ms_per_step": sum(e.self_cpu_time_total for e in events) / steps / 1e3,
        "sorted_by": "self device time" if cuda else "self CPU time",
        "top": [
            {
                "name": e.key,
                "calls_per_step": e.count / steps,
                "self_device_ms_per_step": e.self_device_time_total / steps / 1e3 if cuda else None,
                "self_cpu_ms_per_step": e.self_cpu_time_total / steps / 1e3,
            }
            for e in ops
        ],
    }


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"| {'encoder':<10} | {'max_len':>7} | {'kernel':<9} | {'ms/step':>8} | {'samples/s':>9} | "
        f"{'peak GiB':>8} | {'speed-up':>8} | {'warmup s':>8} | note"
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|------|")
    for r in rows:
        speedup = fmt(r.get("speedup_vs_reference"), ".2f") + ("x" if r.get("speedup_vs_reference") else "")
        print(
            f"| {r['encoder']:<10} | {r['max_len']:>7} | {r['kernel']:<9} | {fmt(r.get('ms_per_step'), '.1f'):>8} | "
            f"{fmt(r.get('samples_per_s'), '.0f'):>9} | {fmt(r.get('peak_gib'), '.2f'):>8} | {speedup:>8} | "
            f"{fmt(r.get('warmup_s'), '.1f'):>8} | "
            f"{r.get('error', '')}"
        )


def print_profiles(rows: list[dict[str, Any]], top: int = 5) -> None:
    """One paragraph per profiled row: device busy fraction, launches per step and the heaviest operators."""
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        busy = "" if prof["device_busy"] is None else f"device busy {prof['device_busy']:.0%} of the step, "
        print(
            f"\n{r['encoder']} max_len={r['max_len']} kernel={r['kernel']}: {busy}"
            f"{prof['launches_per_step']:.0f} kernel launches/step, {prof['cpu_ops_ms_per_step']:.1f} ms/step of "
            f"host operator time; top by {prof['sorted_by']}:"
        )
        for op in prof["top"][:top]:
            ms = (
                op["self_device_ms_per_step"]
                if op["self_device_ms_per_step"] is not None
                else op["self_cpu_ms_per_step"]
            )
            print(f"  {ms:8.3f} ms/step  {op['calls_per_step']:6.0f} calls/step  {op['name'][:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoders", type=encoder_list, default=list(CONFIGS), help="comma list")
    parser.add_argument("--kernels", type=str_list, default=["reference", "auto"], help="comma list, passed through")
    parser.add_argument("--max-len", type=int_list, default=[1024], help="history length(s), comma list")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-steps", type=int, default=0, help="steps under torch.profiler after timing")
    parser.add_argument("--profile-top", type=int, default=15, help="operators listed per profiled row")
    parser.add_argument("--out", type=Path, default=Path("bench_kernels_e2e.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    meta = {
        "device": name,
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "configs": {e: f"configs/{CONFIGS[e]}" for e in args.encoders},
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
    }
    print(f"device: {name}; torch {torch.__version__}; {meta['precision']}", flush=True)
    rows: list[dict[str, Any]] = []

    def write() -> None:
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))

    for encoder in args.encoders:
        for max_len in args.max_len:
            for kernel in args.kernels:
                row: dict[str, Any] = {"encoder": encoder, "max_len": max_len, "kernel": kernel}
                try:
                    row.update(measure(encoder, max_len, kernel, args))
                    print(f"{encoder} max_len={max_len} kernel={kernel}: {row['ms_per_step']:.1f} ms/step", flush=True)
                except torch.cuda.OutOfMemoryError as exc:
                    row.update(status="out of memory", error=f"OutOfMemoryError: {str(exc).splitlines()[0]}")
                    print(f"{encoder} max_len={max_len} kernel={kernel}: out of memory", flush=True)
                except Exception as exc:
                    traceback.print_exc()
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}")
                    print(f"{encoder} max_len={max_len} kernel={kernel}: !!! {row['error']}", flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                write()
            base = next(
                (r for r in rows if (r["encoder"], r["max_len"], r["kernel"]) == (encoder, max_len, "reference")),
                None,
            )
            for r in rows:
                if (r["encoder"], r["max_len"]) == (encoder, max_len) and r["status"] == "ok":
                    ok = base is not None and base["status"] == "ok"
                    r["speedup_vs_reference"] = base["ms_per_step"] / r["ms_per_step"] if ok else None

    print(f"\n{name} — training step, batch {args.batch_size}, {meta['precision']}, median of {args.steps} steps\n")
    print_table(rows)
    print_profiles(rows)
    write()
    print(f"\nwrote {args.out}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
