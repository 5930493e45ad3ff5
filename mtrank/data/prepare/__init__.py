"""Converters from public data sets to mtrank's users and samples tables: ``mtrank prepare NAME --src DIR --out DIR``.

    mtrank prepare movielens --src ml-100k --out data/movielens     (`mtrank.data.prepare.movielens`)
    mtrank prepare kuairand --src KuaiRand-Pure/data --out data/kuairand   (`mtrank.data.prepare.kuairand`)

Each streams its input (memory bounded by one partition of ``--partition-rows`` events), checks it
with errors naming the file, column and row, splits it globally in time, prints a summary and
writes ``prepare.json`` (the feature spec for a config; `mtrank.data.prepare.common`).
"""

from __future__ import annotations

import argparse
import sys

from mtrank.data.prepare.common import PrepareError, Split, write_dataset

__all__ = ["PrepareError", "Split", "main", "write_dataset"]


def main(argv: list[str] | None = None) -> int:
    """``mtrank prepare``: returns the exit status (2 with a one-line error for bad input)."""
    from mtrank.data.prepare import kuairand, movielens

    parser = argparse.ArgumentParser(prog="mtrank prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    subparsers = parser.add_subparsers(dest="dataset", required=True)
    movielens.add_parser(subparsers)
    kuairand.add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (PrepareError, ValueError) as err:
        print(f"mtrank prepare {args.dataset}: {err}", file=sys.stderr)
        return 2
