"""FLOPs per sample of each encoder at history lengths N, counted by `torch.utils.flop_counter`.

    python scripts/encoder_flops.py --lengths 256 1024 4096 8192 --out flops.json

For each N, one sample with a full history of N behaviours goes through each encoder's forward
pass under `FlopCounterMode`; FLOPs are split by the op that did them:

- ``attention``: batched matrix products (``bmm``/``baddbmm``: QKᵀ and AV over heads) and fused
  attention ops; softmax attention runs on the math backend, so it is counted as its products;
- ``total``: everything the counter counts (attention + ``mm``/``addmm``: projections, MLPs).

The encoders share width, depth and heads (``--dim``, ``--layers``, ``--heads``):

- ``full self-attention``: a pre-LN softmax transformer over the whole sequence with causal
  attention — `LongerEncoder` with token merge off (K = 1) and every token a query (k = N), i.e.
  LONGER's hybrid attention switched off: the baseline both papers start from;
- ``HSTU``: `HSTUEncoder`, full causal pointwise attention;
- ``LONGER``: `LongerEncoder`, K = 4 token merge with a 1-layer InnerTransformer, 2 learned
  global tokens, k = 64 recent queries after the first (cross-attention) layer;
- ``ULTRA-HSTU``: `UltraHSTUEncoder`, 1 contextual token, SLA with K1 = 256, K2 = 16, the first layer on
  the whole sequence and the rest on the newest 1,024 tokens; one transducer.

``ratio`` is full self-attention's attention FLOPs over the encoder's (the goal: >= 5 at N = 8k).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from encoders import HSTUEncoder, LongerEncoder, SequenceEncoder, UltraHSTUEncoder
from mtrank.data.synth import SynthConfig, random_batch
from mtrank.spec import FeatureSpec

ATTENTION_OPS = ("bmm", "baddbmm", "scaled_dot_product", "flash_attention", "efficient_attention")

EncoderFactory = Callable[[FeatureSpec, int, int, int], SequenceEncoder]

ENCODERS: dict[str, EncoderFactory] = {
    "full self-attention": lambda f, dim, layers, heads: LongerEncoder(
        f, dim=dim, num_layers=layers, num_heads=heads, num_learned_global_tokens=0, merge_k=1,
        num_recent_queries=f.max_len,
    ),
    "HSTU": lambda f, dim, layers, heads: HSTUEncoder(f, dim=dim, num_layers=layers, num_heads=heads),
    "LONGER": lambda f, dim, layers, heads: LongerEncoder(
        f, dim=dim, num_layers=layers, num_heads=heads, num_learned_global_tokens=2, merge_k=4, inner_layers=1,
        num_recent_queries=64,
    ),
    "ULTRA-HSTU": lambda f, dim, layers, heads: UltraHSTUEncoder(
        f, dim=dim, num_layers=layers, num_heads=heads, num_context_tokens=1, local_window=256, global_prefix=16,
        full_layers=1, tail_len=1024,
    ),
}  # fmt: skip


def count_flops(encoder: SequenceEncoder, batch: object, backward: bool = False) -> dict[str, int]:
    """``{"total", "attention"}`` FLOPs of one forward (and backward) pass of ``encoder`` on ``batch``."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        out = encoder(batch)
        if backward:
            out.target.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if any(name in str(op) for name in ATTENTION_OPS))
    return {"total": int(sum(counts.values())), "attention": int(attention)}


def flops_per_sample(name: str, n: int, dim: int, layers: int, heads: int, backward: bool = False) -> dict[str, int]:
    """FLOPs of encoder ``name`` (a key of `ENCODERS`) on one sample with ``n`` behaviours."""
    torch.manual_seed(0)
    features = SynthConfig(max_len=n).features()
    encoder = ENCODERS[name](features, dim, layers, heads).eval()
    return count_flops(encoder, random_batch(features, [n]), backward)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--out", type=Path, default=Path("encoder_flops.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rows = []
    for n in args.lengths:
        base = None
        for name in args.encoders:
            flops = flops_per_sample(name, n, args.dim, args.layers, args.heads)
            if name == "full self-attention":
                base = flops["attention"]
            ratio = base / flops["attention"] if base and flops["attention"] else None
            rows.append({"encoder": name, "N": n, **flops, "attention_ratio_vs_full": ratio})
            r = f"{ratio:8.1f}x" if ratio else " " * 9
            print(
                f"N={n:<6} {name:<22} total {flops['total'] / 1e9:10.3f} GFLOP   "
                f"attention {flops['attention'] / 1e9:10.3f} GFLOP  {r}",
                flush=True,
            )

    print(f"\nForward FLOPs per sample (dim {args.dim}, {args.layers} layers, {args.heads} heads)")
    print(f"{'N':>6} | {'encoder':<22} | {'total GFLOP':>12} | {'attention GFLOP':>15} | {'full/this (attn)':>16}")
    print("-" * 84)
    for row in rows:
        ratio = f"{row['attention_ratio_vs_full']:.1f}x" if row["attention_ratio_vs_full"] else "-"
        print(
            f"{row['N']:>6} | {row['encoder']:<22} | {row['total'] / 1e9:>12.3f} | "
            f"{row['attention'] / 1e9:>15.3f} | {ratio:>16}"
        )
    meta = {"dim": args.dim, "layers": args.layers, "heads": args.heads, "torch": torch.__version__}
    meta["machine"] = platform.processor() or platform.machine()
    args.out.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
