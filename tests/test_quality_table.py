"""scripts/quality_table.py end to end on a tiny budget: a MovieLens look-alike converted by `mtrank prepare`,
two variants (a baseline and a sequential model with the fatigue branch) over two seeds, the test-split table
read back from its JSON and Markdown, and ``--table-from`` merging two result files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from test_prepare_movielens import write_ml100k

from mtrank.data.prepare.movielens import prepare_movielens

ROOT = Path(__file__).resolve().parents[1]


def load_script():  # -> scripts/quality_table.py as a module
    spec = importlib.util.spec_from_file_location("quality_table", ROOT / "scripts" / "quality_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_follow_the_data() -> None:
    script = load_script()
    plain = script.variants({"history_sparse": {"rating": 6}}, None)
    assert {"no-history", "mean-pool", "HSTU/MMoE", "LONGER/PLE", "ULTRA-HSTU/HoME"} <= set(plain)
    assert len(plain) == 2 + 9 and not any("+" in n for n in plain)
    both = script.variants({"history_sparse": {"category": 5}, "num_treatments": 2}, "category")
    assert {"HSTU/HoME+FRec", "LONGER/HoME+CDUM", "ULTRA-HSTU/HoME+CDUM"} <= set(both) and len(both) == 2 + 9 + 6
    ultra = script.encoder_block("ULTRA-HSTU", {"max_len": 64, "history_sparse": {"rating": 6}})
    assert ultra["init_args"]["streams"][1] == {"name": "engaged", "channel": "rating", "values": [4, 5], "max_len": 32}


def test_table_from_orders_rows_as_the_variants_were_asked_for(tmp_path: Path) -> None:
    script = load_script()
    tasks = [{"name": "like", "kind": "binary"}]

    def run(variant: str, seed: int, auc: float) -> dict:
        return {"variant": variant, "seed": seed, "train_s": 1.0, "params": 10, "test": {"test/like/auc": auc}}

    def doc(variants: list[str], runs: list[dict]) -> dict:
        settings = {"variants": variants, "epochs": 1, "batch_size": 8, "max_len": 4, "accelerator": "cpu"}
        return {"settings": settings, "data": {"source": {"dataset": "toy"}, "tasks": tasks}, "runs": runs}

    # runs stored as they finished: the later variant and seed first
    first = doc(
        ["no-history", "mean-pool"], [run("mean-pool", 1, 0.7), run("no-history", 0, 0.6), run("mean-pool", 0, 0.8)]
    )
    second = doc(["HSTU/MMoE"], [run("HSTU/MMoE", 0, 0.9)])
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    merged = tmp_path / "all.json"
    assert script.table_from([tmp_path / "b.json", tmp_path / "a.json"], merged) == 0
    out = json.loads(merged.read_text())
    assert [r["variant"] for r in out["table"]] == ["HSTU/MMoE", "no-history", "mean-pool"]
    assert [(r["variant"], r["seed"]) for r in out["runs"]][1:] == [
        ("no-history", 0),
        ("mean-pool", 0),
        ("mean-pool", 1),
    ]
    assert out["table"][2]["cells"]["test/like/auc"][0] == pytest.approx(0.75)
    # a merged file merges again: its settings are a list
    again = tmp_path / "again.json"
    assert script.table_from([merged], again) == 0
    assert [r["variant"] for r in json.loads(again.read_text())["table"]] == ["HSTU/MMoE", "no-history", "mean-pool"]


def test_aggregate_and_markdown() -> None:
    script = load_script()
    tasks = [{"name": "like", "kind": "binary"}, {"name": "rating", "kind": "regression"}]
    runs = [
        {"variant": "a", "seed": s, "train_s": 10.0 + s, "params": 1000, "test": {"test/like/auc": 0.6 + 0.1 * s}}
        for s in (0, 1)
    ]
    runs.append({"variant": "b", "seed": 0, "failed": "fit exit code 1"})
    rows = script.aggregate(runs, tasks)
    mean, std = rows[0]["cells"]["test/like/auc"]
    assert math.isclose(mean, 0.65) and math.isclose(std, math.sqrt(0.005))
    text = script.markdown(rows, tasks)
    assert "| a | 0.6500 ± 0.0707 | - | - | - | 10 ± 1 | 1K |" in text
    assert "| b | failed: fit exit code 1 |" in text


@pytest.mark.slow
def test_quality_table_trains_tests_and_tabulates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_ml100k(tmp_path / "src", users=40, items=30)
    prepare_movielens(tmp_path / "src", tmp_path / "data")
    script = load_script()
    argv = ["--data-dir", str(tmp_path / "data"), "--epochs", "1", "--max-len", "16", "--batch-size", "32"]
    argv += ["--limit-train-batches", "2", "--limit-val-batches", "1", "--limit-test-batches", "1"]
    argv += ["--runs", str(tmp_path / "runs"), "--delete-checkpoints"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert (
        script.main([*argv, "--variants", "no-history", "HSTU/HoME+FRec", "--seeds", "0", "1", "--out", str(first)])
        == 0
    )
    assert script.main([*argv, "--variants", "mean-pool", "--seeds", "3", "--out", str(second)]) == 0
    doc = json.loads(first.read_text())
    assert [(r["variant"], r["seed"]) for r in doc["runs"]] == [
        ("no-history", 0), ("no-history", 1), ("HSTU/HoME+FRec", 0), ("HSTU/HoME+FRec", 1)
    ]  # fmt: skip
    for run in doc["runs"]:
        assert 0 <= run["test"]["test/like/auc"] <= 1 and run["test"]["test/rating/rmse"] > 0
        assert run["params"] > 0 and run["train_s"] > 0
        assert not (Path(run["run_dir"]) / "ckpt" / "best.ckpt").exists()  # --delete-checkpoints
    frec = [r for r in doc["runs"] if r["variant"] == "HSTU/HoME+FRec"]
    assert frec[0]["params"] > doc["runs"][0]["params"]
    assert "| no-history |" in first.with_suffix(".md").read_text()
    capsys.readouterr()
    merged = tmp_path / "all.json"
    assert script.main(["--table-from", str(first), str(second), "--out", str(merged)]) == 0
    text = capsys.readouterr().out
    assert "seeds [0, 1, 3]" in text and "| mean-pool |" in text and "| HSTU/HoME+FRec |" in text
    assert len(json.loads(merged.read_text())["runs"]) == 5


def test_split_stats_counts_cold_users_and_scores_the_label_rate(tmp_path: Path) -> None:
    write_ml100k(tmp_path / "src", users=40, items=30)
    prepare_movielens(tmp_path / "src", tmp_path / "data")
    spec = importlib.util.spec_from_file_location("split_stats", ROOT / "scripts" / "split_stats.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "stats.json"
    assert script.main(["--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    stats = json.loads(out.read_text())
    import pyarrow.parquet as pq

    train = set(pq.read_table(tmp_path / "data" / "train.parquet").column("user_id").to_pylist())
    test = pq.read_table(tmp_path / "data" / "test.parquet").column("user_id").to_pylist()
    assert stats["samples"] == len(test)
    assert math.isclose(stats["samples_of_users_with_training_samples"], sum(u in train for u in test) / len(test))
    assert set(stats["tasks"]) == {"like", "love", "dislike"}
    assert all(0 <= m["auc"] <= 1 for m in stats["tasks"].values())
