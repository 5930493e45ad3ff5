"""Activation memory and step time of ULTRA-HSTU's recomputation modes: none, selective, full.

    python scripts/bench_recompute.py --out recompute.json                 # CPU
    python scripts/bench_recompute.py --device cuda --batch 64 --max-len 2048 --out recompute.json

One `UltraHSTUEncoder` (same weights in every mode) on a batch of full histories. Measured per mode:

- ``activations``: the memory the forward pass leaves allocated for the backward pass (saved
  tensors + outputs): on CUDA ``memory_allocated`` after the forward minus before; on the CPU the
  net allocation of the forward pass recorded by `torch.profiler` with ``profile_memory``;
- ``peak`` (CUDA only): ``max_memory_allocated`` over forward + backward, minus the memory before;
- ``step``: median seconds of forward + backward over ``--repeats`` runs.

``selective`` saves the outputs of the linear projections and recomputes norms, activations, the
attention products, the relative-bias gather, masks and gates in the backward pass; ``full``
recomputes whole layers.
Prints a table (``none`` is the baseline) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from encoders import UltraHSTUEncoder
from mtrank.data.synth import SynthConfig, random_batch

MODES = ("none", "selective", "full")


def activation_bytes(encoder: UltraHSTUEncoder, batch: object, device: torch.device) -> tuple[int, int | None]:
    """(bytes the forward pass leaves allocated, peak bytes over forward + backward or None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = encoder(batch)
        torch.cuda.synchronize(device)
        kept = torch.cuda.memory_allocated(device) - before
        out.target.float().sum().backward()
        torch.cuda.synchronize(device)
        return kept, torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = encoder(batch)
    kept = sum(event.cpu_memory_usage for event in prof.events() if event.cpu_parent is None)
    out.target.sum().backward()
    return kept, None


def step_seconds(encoder: UltraHSTUEncoder, batch: object, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        encoder(batch).target.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        encoder.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--local-window", type=int, default=64)
    parser.add_argument("--global-prefix", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_recompute.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    features = SynthConfig(max_len=args.max_len).features()
    batch = random_batch(features, [args.max_len] * args.batch).to(device)
    settings = {
        "dim": args.dim,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "local_window": args.local_window,
        "global_prefix": args.global_prefix,
    }
    rows = []
    state = None
    for mode in MODES:
        torch.manual_seed(0)
        encoder = UltraHSTUEncoder(features, recompute=mode, **settings).to(device).train()
        if state is None:
            state = encoder.state_dict()
        encoder.load_state_dict(state)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            step_seconds(encoder, batch, device, 1)  # warm-up
            kept, peak = activation_bytes(encoder, batch, device)
            seconds = step_seconds(encoder, batch, device, args.repeats)
        rows.append({"mode": mode, "activation_bytes": kept, "peak_bytes": peak, "step_s": seconds})

    base = rows[0]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nULTRA-HSTU recomputation, {device_name}, batch {args.batch} x {args.max_len}, {settings}, {args.dtype}")
    vs = "vs none"
    print(f"{'mode':<10} | {'activations MiB':>15} | {vs:>8} | {'peak MiB':>9} | {'step ms':>8} | {vs:>8}")
    print("-" * 74)
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "-"
        print(
            f"{r['mode']:<10} | {r['activation_bytes'] / 2**20:>15.1f} | "
            f"{r['activation_bytes'] / base['activation_bytes']:>7.2f}x | {peak:>9} | "
            f"{r['step_s'] * 1e3:>8.1f} | {r['step_s'] / base['step_s']:>7.2f}x"
        )
    meta = {**vars(args), "out": str(args.out), "device_name": device_name, "torch": torch.__version__}
    args.out.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
