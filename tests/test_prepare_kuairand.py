"""`mtrank prepare kuairand` on a small KuaiRand-Pure look-alike (``tests/fixtures/kuairand``: the real
file names, headers and value formats; ``make_fixture.py`` there wrote it)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mtrank.data.datamodule import RankingDataModule
from mtrank.data.prepare import main
from mtrank.data.prepare.common import PrepareError, Split
from mtrank.data.prepare.kuairand import TASKS, prepare_kuairand, source_files
from mtrank.data.schema import check_schema
from mtrank.spec import FeatureSpec, TaskSpec

FIXTURE = Path(__file__).parent / "fixtures" / "kuairand"
LOGS = ["log_random_4_22_to_5_08_pure.csv", "log_standard_4_08_to_4_21_pure.csv", "log_standard_4_22_to_5_08_pure.csv"]
SPLITS = ("train", "val", "test")
LABELS = {"click": "is_click", "like": "is_like", "follow": "is_follow", "comment": "is_comment",
          "forward": "is_forward", "hate": "is_hate", "long_view": "long_view"}  # fmt: skip


def read_csv(name: str, src: Path = FIXTURE) -> list[dict[str, str]]:
    with open(src / name, newline="") as f:
        return list(csv.DictReader(f))


def log_rows() -> list[dict[str, str]]:
    return [row for name in LOGS for row in read_csv(name)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kuairand")
    return out, prepare_kuairand(FIXTURE, out)


def table(out: Path, name: str) -> dict[str, np.ndarray]:
    t = pq.read_table(out / f"{name}.parquet")
    return {c: t.column(c).to_numpy() for c in t.column_names if not c.startswith("hist_")}


def samples(out: Path) -> dict[str, np.ndarray]:
    parts = [table(out, s) for s in SPLITS]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def test_source_files_finds_the_pure_version() -> None:
    files = source_files(FIXTURE)
    assert files.variant == "pure"
    assert [p.name for p in files.logs] == LOGS
    assert files.users.name == "user_features_pure.csv"
    assert files.videos.name == "video_features_basic_pure.csv"


def test_passes_schema_check_and_loads(prepared: tuple[Path, dict]) -> None:
    out, record = prepared
    features = FeatureSpec(**record["features"])
    tasks = [TaskSpec(**t) for t in record["tasks"]]
    assert [t.name for t in tasks] == [t.name for t in TASKS]
    assert {t.name: (t.kind, t.loss) for t in tasks}["watch_time"] == ("regression", "log_mse")
    assert features.num_treatments == 2
    check_schema(out / "users.parquet", [out / f"{s}.parquet" for s in SPLITS], features, tasks)
    dm = RankingDataModule(str(out), features=features, tasks=tasks, batch_size=16, prefetch=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.treatment is not None and set(batch.treatment.tolist()) <= {0, 1}
    assert set(batch.labels) == {t.label for t in tasks}
    assert set(batch.history_sparse) == {"action", "tab", "category"}
    assert set(batch.history_dense) == {"watch"}
    assert set(batch.item_sparse) == {"category", "tab", "video_type", "upload_type"}
    assert set(batch.item_dense) == {"duration"}
    assert set(batch.user_sparse) == set(features.user_sparse)


def test_every_log_row_is_one_sample_and_one_behaviour(prepared: tuple[Path, dict]) -> None:
    out, record = prepared
    rows = len(log_rows())
    s = record["summary"]
    assert s["events"] == rows
    assert sum(s["splits"][name]["samples"] for name in SPLITS) == rows
    assert sum(pq.read_table(out / f"{name}.parquet").num_rows for name in SPLITS) == rows
    users = pq.read_table(out / "users.parquet")
    assert sum(len(h) for h in users.column("hist_item_id").to_pylist()) == rows
    assert record["source"]["log_rows"] == {name: len(read_csv(name)) for name in LOGS}
    assert users.num_rows == len(read_csv("user_features_pure.csv")) == 12
    assert record["source"]["users_without_logs"] == 1


def test_samples_match_the_log_rows(prepared: tuple[Path, dict]) -> None:
    """Id maps round-trip; ts, treatment = is_rand, watch_time = play_time_ms / 1000, labels, duration."""
    out, _ = prepared
    raw_user = pq.read_table(out / "user_ids.parquet").column("raw_user_id").to_numpy()
    raw_video = pq.read_table(out / "item_ids.parquet").column("raw_video_id").to_numpy()
    assert np.array_equal(raw_user, sorted(int(r["user_id"]) for r in read_csv("user_features_pure.csv")))
    assert np.array_equal(raw_video, sorted(int(r["video_id"]) for r in read_csv("video_features_basic_pure.csv")))
    s = samples(out)
    got = sorted(
        zip(
            raw_user[s["user_id"]].tolist(),
            raw_video[s["item_id"]].tolist(),
            s["ts"].tolist(),
            s["treatment"].tolist(),
            np.round(s["watch_time"].astype(np.float64), 3).tolist(),
            np.round(s["duration"].astype(np.float64), 3).tolist(),
            *[s[task].astype(int).tolist() for task in LABELS],
            s["tab"].tolist(),
            strict=True,
        )
    )
    want = sorted(
        (
            int(r["user_id"]),
            int(r["video_id"]),
            int(r["time_ms"]) // 1000,
            int(r["is_rand"]),
            round(int(r["play_time_ms"]) / 1000, 3),
            round(int(r["duration_ms"]) / 1000, 3),
            *[int(r[col]) for col in LABELS.values()],
            int(r["tab"]),
        )
        for r in log_rows()
    )
    assert got == want
    assert set(s["treatment"].tolist()) == {0, 1}


def test_histories_sorted_and_strictly_before_each_sample(prepared: tuple[Path, dict]) -> None:
    out, record = prepared
    users = pq.read_table(out / "users.parquet")
    hist_ts = users.column("hist_ts").to_pylist()
    for ts in hist_ts:
        assert ts == sorted(ts)
    features = FeatureSpec(**{**record["features"], "max_len": 1024})  # no cut: compare whole histories
    tasks = [TaskSpec(**t) for t in record["tasks"]]
    dm = RankingDataModule(str(out), features=features, tasks=tasks, batch_size=64, prefetch=0, validate=False)
    dm.setup("fit")
    dm.setup("test")
    checked = 0
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            mask = np.arange(batch.history_ts.shape[1])[None, :] < batch.history_len.numpy()[:, None]
            ts = batch.ts.numpy()
            assert (np.where(mask, batch.history_ts.numpy(), -1) < ts[:, None]).all()
            for b in range(len(ts)):  # exactly the user's behaviours strictly before the sample's second
                user_ts = np.asarray(hist_ts[int(batch.user_id[b])])
                assert int(batch.history_len[b]) == int((user_ts < ts[b]).sum())
            checked += len(ts)
    assert checked == record["summary"]["events"]


def test_split_is_by_time(prepared: tuple[Path, dict]) -> None:
    out, record = prepared
    ts = {name: table(out, name)["ts"] for name in SPLITS}
    assert all(ts[name].size for name in SPLITS)
    assert ts["train"].max() < ts["val"].min() <= ts["val"].max() < ts["test"].min()
    cut_val, cut_test = record["split"]["cuts_ts"]
    assert ts["train"].max() < cut_val <= ts["val"].min() and ts["val"].max() < cut_test <= ts["test"].min()


def test_static_features(prepared: tuple[Path, dict]) -> None:
    """Text ids from sorted vocabularies, integer features value + 1, 0 for empty / negative; category = tag + 1."""
    out, record = prepared
    source = record["source"]
    raw_user = pq.read_table(out / "user_ids.parquet").column("raw_user_id").to_numpy().tolist()
    users = pq.read_table(out / "users.parquet").to_pydict()
    for row in read_csv("user_features_pure.csv"):
        u = raw_user.index(int(row["user_id"]))
        degree = source["vocabularies"]["user_active_degree"]
        assert degree[users["user_active_degree"][u]] == row["user_active_degree"]
        assert (
            source["vocabularies"]["follow_user_num_range"][users["follow_user_num_range"][u]]
            == row["follow_user_num_range"]
        )
        for i in range(18):
            name = f"onehot_feat{i}"
            want = 0 if row[name] == "" else int(float(row[name])) + 1
            assert users[name][u] == want, (row["user_id"], name)
        assert users["is_live_streamer"][u] == (0 if row["is_live_streamer"] == "-124" else 2)
    user_3333 = raw_user.index(3333)
    assert [users[f"onehot_feat{i}"][user_3333] for i in (4, 12, 17)] == [0, 0, 0]
    raw_video = pq.read_table(out / "item_ids.parquet").column("raw_video_id").to_numpy()
    s = samples(out)
    seen = {}
    for item, category, video_type in zip(s["item_id"], s["category"], s["video_type"], strict=True):
        seen[int(raw_video[item])] = (int(category), int(video_type))
    for row in read_csv("video_features_basic_pure.csv"):
        if int(row["video_id"]) in seen:
            category, video_type = seen[int(row["video_id"])]
            assert category == (int(row["tag"].split(",")[0]) + 1 if row["tag"] else 0)
            assert source["vocabularies"]["video_type"][video_type] == row["video_type"]
    assert any(c == 0 for c, _ in seen.values())  # the video without a tag is in the logs
    hist = pq.read_table(out / "users.parquet").column("hist_action").to_pylist()
    assert {a for h in hist for a in h} == {0, 1, 2, 3}
    assert record["features"]["history_sparse"]["category"] == record["features"]["item_sparse"]["category"]


def test_cli_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kuairand", "--src", str(FIXTURE), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "users 12, items 30" in text and "features:" in text and "num_treatments: 2" in text
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["source"]["dataset"] == "kuairand-pure"


def test_src_may_be_the_version_folder(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE, tmp_path / "KuaiRand-Pure" / "data")
    assert source_files(tmp_path / "KuaiRand-Pure").variant == "pure"


def test_partitions_and_chunks_do_not_change_the_tables(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    out, record = prepared
    small = prepare_kuairand(FIXTURE, tmp_path, partition_rows=20, chunk_rows=16)
    assert small["split"] == record["split"]
    assert small["features"] == record["features"]
    users = [pq.read_table(d / "users.parquet").sort_by("user_id") for d in (out, tmp_path)]
    assert users[0].equals(users[1])
    for name in SPLITS:
        a, b = (pq.read_table(d / f"{name}.parquet") for d in (out, tmp_path))
        keys = [(c, "ascending") for c in a.column_names]
        assert a.sort_by(keys).equals(b.sort_by(keys)), name


def test_split_fractions(tmp_path: Path) -> None:
    record = prepare_kuairand(FIXTURE, tmp_path, split=Split(0.5, 0.25))
    n = record["summary"]["events"]
    assert abs(record["summary"]["splits"]["train"]["samples"] / n - 0.5) < 0.15


# ----------------------------------------------------------------------------------------------- bad input


def copy_fixture(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return src


def edit_csv(path: Path, row: int, column: str, value: str | None) -> None:
    """Set ``column`` of data row ``row`` to ``value`` (None: drop the column)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    k = rows[0].index(column)
    if value is None:
        rows = [r[:k] + r[k + 1 :] for r in rows]
    else:
        rows[row + 1][k] = value
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def fails(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *words: str) -> str:
    assert main(["kuairand", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "out" / "prepare.json").exists()
    return err


def test_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(tmp_path)
    edit_csv(src / LOGS[1], 0, "is_click", None)
    fails(src, tmp_path, capsys, LOGS[1], "missing columns ['is_click']")
    with pytest.raises(PrepareError, match=r"log_standard_4_08_to_4_21_pure\.csv: missing columns \['is_click'\]"):
        prepare_kuairand(src, tmp_path / "out")


def test_label_outside_0_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(tmp_path)
    edit_csv(src / LOGS[2], 7, "is_click", "2")
    err = fails(src, tmp_path, capsys, LOGS[2], "column 'is_click': value", "at row 7 outside [0, 1]")
    assert re.search(r"value (np\.int64\()?2\)? at row 7", err)


def test_non_integer_user_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(tmp_path)
    edit_csv(src / LOGS[0], 3, "user_id", "u17")
    fails(src, tmp_path, capsys, LOGS[0], "column 'user_id': expected integers, got 'u17' at row 3")


def test_negative_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(tmp_path)
    edit_csv(src / LOGS[1], 5, "time_ms", "-1649351999602")
    fails(src, tmp_path, capsys, LOGS[1], "column 'time_ms'", "at row 5")


def test_bad_tag_and_duplicate_video(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(tmp_path)
    edit_csv(src / "video_features_basic_pure.csv", 4, "tag", "music;12")
    fails(src, tmp_path, capsys, "video_features_basic_pure.csv", "column 'tag'", "at row 4")
    src = copy_fixture(tmp_path / "again")
    first = read_csv("video_features_basic_pure.csv")[0]["video_id"]
    edit_csv(src / "video_features_basic_pure.csv", 9, "video_id", first)
    fails(src, tmp_path, capsys, "video_features_basic_pure.csv", f"column 'video_id': video_id {first} at row 9")


def test_non_integer_onehot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(tmp_path)
    edit_csv(src / "user_features_pure.csv", 2, "onehot_feat12", "yes")
    fails(src, tmp_path, capsys, "user_features_pure.csv", "column 'onehot_feat12'", "'yes' at row 2")


def test_log_video_missing_from_video_features(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(tmp_path)
    edit_csv(src / LOGS[2], 11, "video_id", "7582000")
    fails(src, tmp_path, capsys, LOGS[2], "column 'video_id': video_id 7582000 at row 11",
          "video_features_basic_pure.csv")  # fmt: skip
    # with --missing-features unknown the video gets a dense id and the 'missing' static features
    out = tmp_path / "unknown"
    assert main(["kuairand", "--src", str(src), "--out", str(out), "--missing-features", "unknown"]) == 0
    record = json.loads((out / "prepare.json").read_text())
    assert record["source"]["videos_without_features"] == 1
    raw_video = pq.read_table(out / "item_ids.parquet").column("raw_video_id").to_numpy().tolist()
    assert len(raw_video) == 31 and 7582000 in raw_video
    s = samples(out)
    rows = s["item_id"] == raw_video.index(7582000)
    assert rows.sum() == 1 and s["category"][rows][0] == 0 and s["video_type"][rows][0] == 0


def test_missing_files_and_mixed_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture(tmp_path)
    (src / "user_features_pure.csv").unlink()
    err = fails(src, tmp_path, capsys, "without ['user_features_pure.csv']", "log_random_4_22_to_5_08_pure.csv")
    assert "video_features_basic_pure.csv" in err  # the found files are listed
    src = copy_fixture(tmp_path / "mixed")
    shutil.copy(src / LOGS[0], src / "log_random_4_22_to_5_08_1k.csv")
    fails(src, tmp_path, capsys, "several versions (1k, pure)")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, tmp_path, capsys, "no KuaiRand log file")
