"""How much a prepared data set's test split rests on users the training split never saw, and how far the user's
own past labels alone go: the context a quality table needs.

    python scripts/split_stats.py --data-dir data/movielens [--out split_stats.json]

Prints, for the test split (``--split``): the share of its samples (and users) whose user has training
samples; and for every binary task the AUC and GAUC of a score that needs no model: the user's positive
rate over their samples of every split strictly before the sample's ``ts``, shrunk towards the training
rate (``(positives + k·p) / (n + k)``, ``k`` = ``--prior-weight``). Within a user it moves only as the history
grows, so its GAUC stays near 0.5; its AUC is what knowing each user's label rate is worth in a global AUC. Reads the
task list from ``<data-dir>/prepare.json``; writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtrank.metrics import grouped_auc

SPLITS = ("train", "val", "test")


def auc(score: np.ndarray, label: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(AUC, sample-weighted GAUC over ``groups``) of ``score`` against binary ``label``."""
    s, y = torch.tensor(score), torch.tensor(label)
    total, _ = grouped_auc(s, y, torch.zeros(len(s), dtype=torch.long))
    per, count = grouped_auc(s, y, torch.tensor(groups))
    ok = ~torch.isnan(per)
    gauc = float((per[ok] * count[ok]).sum() / count[ok].sum()) if ok.any() else float("nan")
    return float(total[0]), gauc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--prior-weight", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    record = json.loads((args.data_dir / "prepare.json").read_text())
    binary = [t for t in record["tasks"] if t["kind"] == "binary"]
    cols = ["user_id", "ts", *[t["label"] or t["name"] for t in binary]]
    tables = {s: pq.read_table(args.data_dir / f"{s}.parquet", columns=cols) for s in SPLITS}
    every = pa.concat_tables(tables.values())
    target = tables[args.split]
    train_users = np.unique(tables["train"].column("user_id").to_numpy())
    user, ts = target.column("user_id").to_numpy(), target.column("ts").to_numpy()
    seen = np.isin(user, train_users)
    out = {
        "split": args.split,
        "samples": len(user),
        "samples_of_users_with_training_samples": float(seen.mean()),
        "users": int(np.unique(user).size),
        "users_with_training_samples": int(np.unique(user[seen]).size),
        "tasks": {},
    }
    # every split's samples sorted by (user, ts): earlier samples of a user are a prefix of its block
    eu, et = every.column("user_id").to_numpy(), every.column("ts").to_numpy()
    order = np.lexsort((et, eu))
    eu, et = eu[order], et[order]
    key = eu.astype(np.int64) * (int(et.max()) + 1) + et
    before = np.searchsorted(key, user.astype(np.int64) * (int(et.max()) + 1) + ts, side="left")
    first = np.searchsorted(eu, user, side="left")
    for t in binary:
        label_name = t["label"] or t["name"]
        labels = every.column(label_name).to_numpy().astype(np.float64)[order]
        cum = np.concatenate([[0.0], np.cumsum(labels)])
        prior = float(tables["train"].column(label_name).to_numpy().mean())
        n, pos = before - first, cum[before] - cum[first]
        score = (pos + args.prior_weight * prior) / (n + args.prior_weight)
        y = target.column(label_name).to_numpy().astype(np.float64)
        a, g = auc(score, y, user)
        out["tasks"][t["name"]] = {"auc": a, "gauc": g}
        out["tasks"][t["name"]].update(
            {f"auc_{k}": auc(score[m], y[m], user[m])[0] for k, m in (("seen", seen), ("unseen", ~seen)) if m.any()}
        )
    print(
        f"{args.split}: {out['samples']:,} samples of {out['users']} users; "
        f"{out['samples_of_users_with_training_samples']:.1%} of the samples "
        f"({out['users_with_training_samples']} users) belong to users with training samples"
    )
    print("the user's past positive rate alone (no model):")
    for name, m in out["tasks"].items():
        print(f"  {name:>10}: AUC {m['auc']:.4f}, GAUC {m['gauc']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
