"""MovieLens-100K -> mtrank tables: ``mtrank prepare movielens --src DIR --out DIR``.

Reads the data set as GroupLens distributes it (``u.data``: tab-separated user id, item id, rating,
timestamp; ``u.item`` and ``u.user``: ``|``-separated, Latin-1) or as Parquet copies with the same
content (``ratings.parquet``: user_id, movie_id, rating, timestamp; ``items.parquet``: movie_id,
release_date and the 19 genre flags; ``users.parquet``: user_id, age, gender, occupation). The data
is not bundled (GroupLens's terms forbid redistribution): get ``ml-100k.zip`` from
https://grouplens.org/datasets/movielens/100k/ and point ``--src`` at its folder.

Every rating is one event: a behaviour in its user's history and a sample (`common.write_dataset`:
histories hold only earlier ratings, the split is global in time). Columns written:

- users: ``hist_item_id``, ``hist_ts`` (seconds), ``hist_rating`` (the action channel: the rating
  1..5, vocabulary 6), ``hist_genre`` (the movie's genre, vocabulary 19); static ``age`` (7 buckets:
  <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``gender`` (0 F, 1 M), ``occupation`` (index in the
  sorted list of the file's occupations, written to ``prepare.json``).
- samples: ``user_id``, ``item_id``, ``ts``, item features ``genre`` (shares the history channel's
  table) and ``decade`` (of the release date: 0 unknown, 1 before 1930, 2 the 1930s, ... 8 the
  1990s), and the labels:

  ========  ==========  =============================================
  task      kind        label
  ========  ==========  =============================================
  like      binary      rating >= 4
  love      binary      rating == 5
  dislike   binary      rating <= 2
  rating    regression  the rating (MSE)
  ========  ==========  =============================================

A movie has up to 6 genre flags; ``genre`` is the first set flag in the file's order (``unknown``,
Action, Adventure, Animation, Children's, Comedy, Crime, Documentary, Drama, Fantasy, Film-Noir,
Horror, Musical, Mystery, Romance, Sci-Fi, Thriller, War, Western), 0 when none is. Ids are dense
in raw-id order (raw id ``k`` -> ``k - 1`` for the real files; ``user_ids.parquet`` and
``item_ids.parquet`` hold the maps).
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrank.data.prepare.common import (
    CHUNK_ROWS,
    IdMap,
    Layout,
    PrepareError,
    Split,
    check_range,
    column,
    format_summary,
    iter_chunks,
    require_columns,
    sorted_unique_ids,
    write_dataset,
)
from mtrank.spec import FeatureSpec, TaskSpec

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # bucket b holds ages in [AGE_EDGES[b-1], AGE_EDGES[b])
NUM_DECADES = 9
TASKS = [
    TaskSpec(name="like", kind="binary", weight=1.0, group="positive"),
    TaskSpec(name="love", kind="binary", weight=0.5, group="positive"),
    TaskSpec(name="dislike", kind="binary", weight=0.5, group="negative"),
    TaskSpec(name="rating", kind="regression", loss="mse", weight=0.2, group="positive"),
]
TEXT_FILES = {"ratings": "u.data", "items": "u.item", "users": "u.user"}
PARQUET_FILES = {"ratings": "ratings.parquet", "items": "items.parquet", "users": "users.parquet"}
TEXT_COLUMNS = {
    "ratings": ["user_id", "movie_id", "rating", "timestamp"],
    "items": ["movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL", *GENRES],
    "users": ["user_id", "age", "gender", "occupation", "zip_code"],
}
_MONTHS = {
    m: i + 1 for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"))
}


def source_files(src: Path) -> tuple[dict[str, Path], bool]:
    """The ratings, items and users files under ``src`` and whether they are text (``u.*``) or Parquet."""
    src = Path(src)
    for files, text in ((TEXT_FILES, True), (PARQUET_FILES, False)):
        paths = {k: src / v for k, v in files.items()}
        if all(p.is_file() for p in paths.values()):
            return paths, text
    found = sorted(p.name for p in src.iterdir()) if src.is_dir() else "not a folder"
    raise PrepareError(
        f"--src {src}: expected MovieLens-100K as distributed ({', '.join(TEXT_FILES.values())}) or as Parquet "
        f"({', '.join(PARQUET_FILES.values())}); found {found}"
    )


def _chunks(path: Path, text: bool, kind: str, columns: list[str], chunk_rows: int) -> Iterator[tuple[int, pa.Table]]:
    if not text:
        yield from iter_chunks(path, columns, chunk_rows=chunk_rows)
        return
    types = {"release_date": pa.string(), "zip_code": pa.string(), "gender": pa.string(), "occupation": pa.string()}
    yield from iter_chunks(
        path,
        columns,
        delimiter="\t" if kind == "ratings" else "|",
        column_names=TEXT_COLUMNS[kind],
        column_types={k: v for k, v in types.items() if k in TEXT_COLUMNS[kind]},
        encoding="latin-1",
        chunk_rows=chunk_rows,
    )


def decade_of(release_date: str | None, path: Path, row: int) -> int:
    """``dd-Mon-yyyy`` (MovieLens's format) -> decade bucket (0 for an empty date); other text raises."""
    if release_date is None or not release_date.strip():
        return 0
    try:
        day, month, year = release_date.strip().split("-")
        dt.date(int(year), _MONTHS[month], int(day))
    except (ValueError, KeyError) as err:
        raise PrepareError(
            f"{path}: column 'release_date': {release_date!r} at row {row} is not a date like 01-Jan-1995"
        ) from err
    return int(np.clip((int(year) - 1920) // 10 + 1, 1, NUM_DECADES - 1))


def read_items(path: Path, text: bool, chunk_rows: int = CHUNK_ROWS) -> tuple[IdMap, np.ndarray, np.ndarray]:
    """Item map, (V,) genre and (V,) decade per dense item id."""
    ids, genre, decade = [], [], []
    for base, chunk in _chunks(path, text, "items", ["movie_id", "release_date", *GENRES], chunk_rows):
        ids.append(column(path, chunk, "movie_id", base))
        flags = np.stack([column(path, chunk, g, base) for g in GENRES], axis=1)  # (n, 19)
        for g, name in enumerate(GENRES):
            check_range(path, name, flags[:, g], base, 0, 1)
        genre.append(np.where(flags.any(axis=1), np.argmax(flags, axis=1), 0))
        dates = chunk.column("release_date").to_pylist()
        decade.append(np.array([decade_of(d, path, base + i) for i, d in enumerate(dates)], dtype=np.int64))
    raw = np.concatenate(ids)
    order = sorted_unique_ids(path, raw, "movie_id", "movie")
    return IdMap(raw[order], "movie_id"), np.concatenate(genre)[order], np.concatenate(decade)[order]


def read_users(path: Path, text: bool, chunk_rows: int = CHUNK_ROWS) -> tuple[IdMap, pa.Table, list[str]]:
    """User map, the static users table (dense ``user_id``, ``age``, ``gender``, ``occupation``), occupations."""
    ids, age, gender, occupation = [], [], [], []
    for base, chunk in _chunks(path, text, "users", ["user_id", "age", "gender", "occupation"], chunk_rows):
        ids.append(column(path, chunk, "user_id", base))
        a = column(path, chunk, "age", base)
        check_range(path, "age", a, base, 1, 120)
        age.append(np.searchsorted(AGE_EDGES, a, side="right"))
        for name in ("gender", "occupation"):
            if chunk.column(name).null_count:
                row = chunk.column(name).to_pylist().index(None)
                raise PrepareError(f"{path}: column {name!r}: empty value at row {base + row}")
        g = np.array(chunk.column("gender").to_pylist(), dtype=object)
        bad = ~np.isin(g, ["F", "M"])
        if bad.any():
            row = int(np.argmax(bad))
            raise PrepareError(f"{path}: column 'gender': {g[row]!r} at row {base + row} is neither 'F' nor 'M'")
        gender.append((g == "M").astype(np.int64))
        occupation.append(np.array(chunk.column("occupation").to_pylist(), dtype=object))
    raw = np.concatenate(ids)
    order = sorted_unique_ids(path, raw, "user_id", "user")
    occ = np.concatenate(occupation)[order]
    names = sorted(set(occ.tolist()))
    table = pa.table(
        {
            "user_id": np.arange(raw.size, dtype=np.int64),
            "age": np.concatenate(age)[order].astype(np.int64),
            "gender": np.concatenate(gender)[order],
            "occupation": np.searchsorted(np.array(names, dtype=object), occ).astype(np.int64),
        }
    )
    return IdMap(raw[order], "user_id"), table, names


def events(
    path: Path, text: bool, users: IdMap, items: IdMap, genre: np.ndarray, decade: np.ndarray, chunk_rows: int
) -> Iterator[pa.Table]:
    """Rating chunks -> event chunks (dense ids, labels, channels); bad values raise `PrepareError`."""
    for base, chunk in _chunks(path, text, "ratings", TEXT_COLUMNS["ratings"], chunk_rows):
        user = users.dense(column(path, chunk, "user_id", base), path, base)
        item = items.dense(column(path, chunk, "movie_id", base), path, base)
        rating = column(path, chunk, "rating", base)
        check_range(path, "rating", rating, base, 1, 5)
        ts = column(path, chunk, "timestamp", base)
        check_range(path, "timestamp", ts, base, 0, 2**62)
        yield pa.table(
            {
                "user_id": user,
                "item_id": item,
                "ts": ts,
                "rating": rating,
                "genre": genre[item],
                "decade": decade[item],
                "like": (rating >= 4).astype(np.float32),
                "love": (rating == 5).astype(np.float32),
                "dislike": (rating <= 2).astype(np.float32),
            }
        )


def _num_rows(path: Path, text: bool) -> int:
    if not text:
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))


def prepare_movielens(
    src: str | Path,
    out: str | Path,
    split: Split | None = None,
    partition_rows: int = 4_000_000,
    chunk_rows: int = CHUNK_ROWS,
) -> dict[str, Any]:
    """Convert MovieLens-100K under ``src`` into ``out`` (module docstring); return the ``prepare.json`` record."""
    paths, text = source_files(Path(src))
    item_map, genre, decade = read_items(paths["items"], text, chunk_rows)
    user_map, users, occupations = read_users(paths["users"], text, chunk_rows)
    require_columns(paths["ratings"], TEXT_COLUMNS["ratings"] if text else pq.read_schema(paths["ratings"]).names,
                    TEXT_COLUMNS["ratings"])  # fmt: skip
    features = FeatureSpec(
        num_users=len(user_map),
        num_items=len(item_map),
        history_sparse={"rating": 6, "genre": len(GENRES)},
        item_sparse={"genre": len(GENRES), "decade": NUM_DECADES},
        user_sparse={"age": len(AGE_EDGES) + 1, "gender": 2, "occupation": len(occupations)},
    )
    layout = Layout(
        history_sparse={"rating": 6, "genre": len(GENRES)},
        sample_columns=["genre", "decade", "like", "love", "dislike", "rating"],
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    user_map.write(out / "user_ids.parquet", "user_id", "raw_user_id")
    item_map.write(out / "item_ids.parquet", "item_id", "raw_movie_id")
    return write_dataset(
        events(paths["ratings"], text, user_map, item_map, genre, decade, chunk_rows),
        out,
        layout=layout,
        users=users,
        num_items=len(item_map),
        features=features,
        tasks=TASKS,
        split=split or Split(),
        num_rows=_num_rows(paths["ratings"], text),
        partition_rows=partition_rows,
        source={
            "dataset": "movielens-100k",
            "files": {k: str(v) for k, v in paths.items()},
            "occupations": occupations,
            "genres": list(GENRES),
        },
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``movielens`` under ``mtrank prepare``."""
    p = subparsers.add_parser(
        "movielens", help="MovieLens-100K (u.data/u.item/u.user or Parquet copies)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--src", type=Path, required=True, help="folder of u.data, u.item, u.user (or the Parquet copies)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_common_arguments(p)
    p.set_defaults(run=run)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every converter has: the split fractions and the memory bounds."""
    p.add_argument("--train-fraction", type=float, default=0.8, help="earliest share of samples for training")
    p.add_argument("--val-fraction", type=float, default=0.1, help="next share for validation (the rest tests)")
    p.add_argument("--partition-rows", type=int, default=4_000_000, help="events per on-disk partition (memory)")
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows per chunk read from a source file")


def run(args: argparse.Namespace) -> int:
    """``mtrank prepare movielens``: convert and print the summary."""
    record = prepare_movielens(
        args.src, args.out, Split(args.train_fraction, args.val_fraction), args.partition_rows, args.chunk_rows
    )
    print(format_summary(record))
    print(f"wrote {args.out}")
    return 0
