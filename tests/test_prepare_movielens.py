"""`mtrank prepare movielens` on a small MovieLens-100K look-alike written in the distributed format (``u.data``
tab-separated, ``u.item`` / ``u.user`` ``|``-separated Latin-1) and as Parquet copies; the shared core
(`mtrank.data.prepare.common`) through it; the real data set when ``../shared/data/movielens-100k`` is there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mtrank.data.datamodule import RankingDataModule
from mtrank.data.prepare import main
from mtrank.data.prepare.common import IdMap, PrepareError, Split
from mtrank.data.prepare.movielens import GENRES, TASKS, prepare_movielens
from mtrank.data.schema import check_schema
from mtrank.spec import FeatureSpec, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "movielens-100k"
SPLITS = ("train", "val", "test")
OCCUPATIONS = ["artist", "doctor", "educator", "engineer", "other"]


def write_ml100k(folder: Path, users: int = 20, items: int = 30, seed: int = 0) -> dict[str, list]:
    """A MovieLens-100K look-alike in the distributed format under ``folder``; returns its raw rows.

    Raw ids are 1-based and not contiguous for items (every other id), some ratings share a second,
    one movie has no genre and no release date, and one user has no ratings.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    item_ids = [2 * i + 1 for i in range(items)]
    item_rows = []
    for k, m in enumerate(item_ids):
        flags = [0] * len(GENRES)
        if k:  # movie 1 has no genre
            for g in rng.choice(np.arange(1, len(GENRES)), size=int(rng.integers(1, 4)), replace=False):
                flags[g] = 1
        date = "" if k == 0 else f"{int(rng.integers(1, 28)):02d}-Mar-{int(rng.integers(1925, 1998))}"
        item_rows.append([m, f"Movie {m} (1995)", date, "", f"http://us.imdb.com/M/title-exact?m{m}", *flags])
    (folder / "u.item").write_bytes(
        "\n".join("|".join(str(v) for v in row) for row in item_rows).encode("latin-1") + b"\n"
    )
    user_rows = [
        [u, int(rng.integers(7, 74)), "FM"[u % 2], OCCUPATIONS[u % len(OCCUPATIONS)], f"{10000 + u}"]
        for u in range(1, users + 1)
    ]
    (folder / "u.user").write_text("\n".join("|".join(str(v) for v in row) for row in user_rows) + "\n")
    ratings = []
    for u in range(1, users):  # the last user rates nothing
        t = 880_000_000 + int(rng.integers(0, 5_000_000))
        for _ in range(int(rng.integers(5, 25))):
            t += int(rng.choice([0, 1, 3600, 86_400]))  # 0: ratings in the same second
            ratings.append([u, int(rng.choice(item_ids)), int(rng.integers(1, 6)), t])
    order = rng.permutation(len(ratings))  # the file is not sorted
    ratings = [ratings[i] for i in order]
    (folder / "u.data").write_text("\n".join("\t".join(str(v) for v in row) for row in ratings) + "\n")
    return {"items": item_rows, "users": user_rows, "ratings": ratings}


def as_parquet(src: Path, dst: Path, raw: dict[str, list]) -> None:
    """The same data set as the Parquet copies (``ratings/items/users.parquet``, the shared copy's columns)."""
    dst.mkdir(parents=True, exist_ok=True)
    r = np.array(raw["ratings"])
    pq.write_table(
        pa.table({"user_id": r[:, 0], "movie_id": r[:, 1], "rating": r[:, 2], "timestamp": r[:, 3]}),
        dst / "ratings.parquet",
    )
    items = {"movie_id": [row[0] for row in raw["items"]], "movie_title": [row[1] for row in raw["items"]]}
    items["release_date"] = [row[2] or None for row in raw["items"]]
    items["video_release_date"] = pa.array([None] * len(raw["items"]), pa.float64())
    items["IMDb_URL"] = [row[4] for row in raw["items"]]
    for g, name in enumerate(GENRES):
        items[name] = [row[5 + g] for row in raw["items"]]
    pq.write_table(pa.table(items), dst / "items.parquet")
    users = {k: [row[i] for row in raw["users"]] for i, k in enumerate(["user_id", "age", "gender", "occupation"])}
    users["zip_code"] = [row[4] for row in raw["users"]]
    pq.write_table(pa.table(users), dst / "users.parquet")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list]]:
    src = tmp_path_factory.mktemp("ml-100k")
    return src, write_ml100k(src)


@pytest.fixture(scope="module")
def prepared(source: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("movielens")
    return out, prepare_movielens(source[0], out)


def read(out: Path, name: str) -> pa.Table:
    return pq.read_table(out / f"{name}.parquet")


def all_samples(out: Path) -> pa.Table:
    return pa.concat_tables([read(out, s) for s in SPLITS])


def test_passes_schema_check_and_loads(prepared: tuple[Path, dict]) -> None:
    out, record = prepared
    features = FeatureSpec(**record["features"])
    tasks = [TaskSpec(**t) for t in record["tasks"]]
    assert [t.name for t in tasks] == ["like", "love", "dislike", "rating"]
    check_schema(out / "users.parquet", [out / f"{s}.parquet" for s in SPLITS], features, tasks)
    dm = RankingDataModule(str(out), features=features, tasks=tasks, batch_size=16, prefetch=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch.labels) == {"like", "love", "dislike", "rating"}
    assert set(batch.history_sparse) == {"rating", "genre"}
    assert set(batch.item_sparse) == {"genre", "decade"} and set(batch.user_sparse) == {"age", "gender", "occupation"}
    assert (batch.history_ts < batch.ts[:, None])[batch.history_mask()].all()


def test_every_rating_is_one_sample_with_the_derived_labels(prepared: tuple[Path, dict], source) -> None:
    out, record = prepared
    raw = source[1]
    users, items = pq.read_table(out / "user_ids.parquet"), pq.read_table(out / "item_ids.parquet")
    raw_user = users.column("raw_user_id").to_numpy()[np.argsort(users.column("user_id").to_numpy())]
    raw_item = items.column("raw_movie_id").to_numpy()[np.argsort(items.column("item_id").to_numpy())]
    s = all_samples(out)
    assert s.num_rows == len(raw["ratings"]) == sum(record["summary"]["splits"][k]["samples"] for k in SPLITS)
    got = sorted(
        zip(
            raw_user[s.column("user_id").to_numpy()].tolist(),
            raw_item[s.column("item_id").to_numpy()].tolist(),
            s.column("rating").to_numpy().tolist(),
            s.column("ts").to_numpy().tolist(),
            strict=True,
        )
    )
    assert got == sorted(tuple(r) for r in raw["ratings"])
    rating = s.column("rating").to_numpy()
    np.testing.assert_array_equal(s.column("like").to_numpy(), rating >= 4)
    np.testing.assert_array_equal(s.column("love").to_numpy(), rating == 5)
    np.testing.assert_array_equal(s.column("dislike").to_numpy(), rating <= 2)
    assert record["features"]["num_users"] == 20 and record["features"]["num_items"] == 30


def test_item_and_user_features(prepared: tuple[Path, dict], source) -> None:
    out, _ = prepared
    raw = source[1]
    s = all_samples(out)
    genre_of = {}
    for k, row in enumerate(raw["items"]):
        flags = row[5:]
        genre_of[k] = flags.index(1) if 1 in flags else 0
    item = s.column("item_id").to_numpy()
    np.testing.assert_array_equal(s.column("genre").to_numpy(), [genre_of[i] for i in item])
    decade = s.column("decade").to_numpy()
    assert (decade[item == 0] == 0).all()  # no release date: unknown
    years = {k: int(row[2][-4:]) for k, row in enumerate(raw["items"]) if row[2]}
    want = {k: min(max((y - 1920) // 10 + 1, 1), 8) for k, y in years.items()}
    assert all(d == want[i] for i, d in zip(item, decade, strict=True) if i in want)
    u = read(out, "users")
    order = np.argsort(u.column("user_id").to_numpy())
    gender = u.column("gender").to_numpy()[order]
    assert gender.tolist() == [int(row[2] == "M") for row in raw["users"]]
    occupation = u.column("occupation").to_numpy()[order]
    assert occupation.tolist() == [OCCUPATIONS.index(row[3]) for row in raw["users"]]
    age = u.column("age").to_numpy()[order]
    assert age.tolist() == [
        int(np.searchsorted([18, 25, 35, 45, 50, 56], row[1], side="right")) for row in raw["users"]
    ]


def test_histories_sorted_and_counted_strictly_before(prepared: tuple[Path, dict], source) -> None:
    out, _ = prepared
    users = read(out, "users").to_pydict()
    by_user = {
        u: (ts, items) for u, ts, items in zip(users["user_id"], users["hist_ts"], users["hist_item_id"], strict=True)
    }
    assert len(by_user) == 20 and by_user[19][0] == []  # the user without ratings: an empty history
    for ts, _ in by_user.values():
        assert ts == sorted(ts)
    assert sum(len(ts) for ts, _ in by_user.values()) == len(source[1]["ratings"])
    # the loader's history of every sample: exactly the ratings of earlier seconds
    record = json.loads((out / "prepare.json").read_text())
    features, tasks = FeatureSpec(**{**record["features"], "max_len": 64}), [TaskSpec(**t) for t in record["tasks"]]
    dm = RankingDataModule(str(out), features=features, tasks=tasks, batch_size=64, prefetch=0)
    dm.setup("test")
    for batch in dm.test_dataloader():
        for b in range(batch.batch_size):
            ts = np.array(by_user[int(batch.user_id[b])][0])
            assert int(batch.history_len[b]) == int((ts < int(batch.ts[b])).sum())


def test_split_is_global_in_time(prepared: tuple[Path, dict]) -> None:
    out, record = prepared
    ts = {s: read(out, s).column("ts").to_numpy() for s in SPLITS}
    cut_train, cut_val = record["split"]["cuts_ts"]
    assert ts["train"].max() < cut_train <= ts["val"].min() and ts["val"].max() < cut_val <= ts["test"].min()
    n = sum(len(v) for v in ts.values())
    assert abs(len(ts["train"]) / n - 0.8) < 0.1


def test_parquet_copies_give_the_same_tables(prepared: tuple[Path, dict], source, tmp_path: Path) -> None:
    out, _ = prepared
    as_parquet(source[0], tmp_path / "src", source[1])
    prepare_movielens(tmp_path / "src", tmp_path / "out")
    for name in ("users", *SPLITS):
        assert read(tmp_path / "out", name).equals(read(out, name)), name


def test_partitions_and_chunks_do_not_change_the_tables(prepared: tuple[Path, dict], source, tmp_path: Path) -> None:
    out, _ = prepared
    prepare_movielens(source[0], tmp_path, partition_rows=40, chunk_rows=17)
    for name in ("users", *SPLITS):
        a, b = read(tmp_path, name), read(out, name)
        key = [("user_id", "ascending")] + ([("ts", "ascending"), ("item_id", "ascending")] if name != "users" else [])
        assert a.sort_by(key).equals(b.sort_by(key)), name


def test_cli_prints_the_summary(source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["movielens", "--src", str(source[0]), "--out", str(tmp_path), "--train-fraction", "0.7"]
    assert main([*argv, "--val-fraction", "0.15"]) == 0
    text = capsys.readouterr().out
    assert "users 20, items 30" in text and "history length per sample" in text and "num_items: 30" in text
    record = json.loads((tmp_path / "prepare.json").read_text())
    assert record["split"]["train_fraction"] == 0.7


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        ("u.data", lambda t: t.replace("\t1\t", "\t7\t", 1), "column 'rating': value 7 at row"),
        ("u.data", lambda t: "999\t1\t3\t880000000\n" + t, "user_id 999 at row 0 is not among the 20 known ids"),
        ("u.data", lambda t: "1\t2\t3\t880000000\n" + t, "movie_id 2 at row 0 is not among the 30 known ids"),
        ("u.user", lambda t: t.replace("|F|", "|X|", 1), "column 'gender': 'X' at row 1"),
        ("u.item", lambda t: t.replace("-Mar-", "-Foo-", 1), "column 'release_date': "),
        ("u.item", lambda t: t + t.splitlines()[0] + "\n", "movie 1 appears more than once"),
    ],
)
def test_bad_input_names_file_column_and_row(source, tmp_path: Path, capsys, file, edit, message) -> None:
    src = tmp_path / "src"
    write_ml100k(src)
    path = src / file
    path.write_text(edit(path.read_text(encoding="latin-1")), encoding="latin-1")
    assert main(["movielens", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err
    with pytest.raises(PrepareError, match=r"known ids|value|appears|gender|release_date"):
        prepare_movielens(src, tmp_path / "out2")


def test_missing_files_are_listed(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t1\t3\t880000000\n")
    with pytest.raises(PrepareError, match=r"expected MovieLens-100K .* found \['u.data'\]"):
        prepare_movielens(tmp_path, tmp_path / "out")


def test_bad_split_fractions() -> None:
    with pytest.raises(ValueError, match=r"train fraction 0\.9 and val fraction 0\.2"):
        Split(0.9, 0.2)


def test_id_map_collect_and_round_trip(tmp_path: Path) -> None:
    chunks = [(0, np.array([5, 3, 5])), (3, np.array([10, 3])), (5, np.array([7]))]
    ids = IdMap.collect(chunks, "user_id")
    np.testing.assert_array_equal(ids.raw, [3, 5, 7, 10])
    np.testing.assert_array_equal(ids.dense(np.array([10, 3]), tmp_path, 0), [3, 0])
    with pytest.raises(PrepareError, match="user_id 4 at row 8"):
        ids.dense(np.array([3, 4]), tmp_path, 7)


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/movielens-100k is not here")
def test_real_movielens_matches_the_config(tmp_path: Path) -> None:
    record = prepare_movielens(REAL, tmp_path)
    s = record["summary"]
    assert (s["users"], s["items"], s["events"]) == (943, 1682, 100_000)
    assert sum(s["splits"][k]["samples"] for k in SPLITS) == 100_000
    config = yaml.safe_load((ROOT / "configs" / "movielens.yaml").read_text())["model"]
    spec = {k: v for k, v in record["features"].items() if k != "max_len"}
    assert {k: v for k, v in FeatureSpec(**config["features"]).__dict__.items() if k != "max_len"} == spec
    assert [t["name"] for t in config["tasks"]] == [t.name for t in TASKS]
