"""The comparison scripts end to end on a tiny budget. compare_heads.py: its table's numbers, its JSON,
and the offline W&B runs it leaves behind, read back from the run files themselves (not a mock).
compare_encoders.py: one row per encoder with metrics, FLOPs and throughput."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from mtrank.balance import read_offline_wandb_history

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str = "compare_heads"):  # -> the script as a module
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_heads_writes_table_json_and_offline_wandb_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script()
    out = tmp_path / "compare.json"
    argv = ["--heads", "MMoE", "HoME", "--epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "2"]
    argv += [
        "--balance-every",
        "1",
        "--users",
        "300",
        "--samples-per-user",
        "20",
        "--data-dir",
        str(tmp_path / "data"),
        "--runs",
        str(tmp_path / "runs"),
    ]
    assert script.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max top-task share" in printed and "HoME" in printed

    results = {r["head"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"MMoE", "HoME"}
    for name, result in results.items():
        assert 0 <= result["metrics"]["val/click/auc"] <= 1
        summary = result["summary"]
        assert 0 <= summary["entropy"] <= 1 and 0 <= summary["max_zero_frac"] <= 1
        assert summary["std_ratio"] >= 1
        # the summary is the full statistics' extreme
        shares = [d["top_share"] for d in result["balance"]["degradation"].values() if d["by"] == "task"]
        assert math.isclose(summary["max_top_share"], max(shares))
        # the offline W&B run, read back from its .wandb file
        run_dir = Path(result["wandb"]["run_dir"])
        assert run_dir.parent == tmp_path / "runs" / name.lower() / "wandb"
        keys = {k for row in read_offline_wandb_history(run_dir) for k in row}
        assert "balance/val/heatmap" in keys and "balance/val/gate_weights" in keys, sorted(keys)[:20]
        task_gate = "click" if name == "MMoE" else "task/click"
        assert f"balance/val/gate/{task_gate}/entropy" in keys
        assert f"balance/train/gate/{task_gate}/usage_cv" in keys
        assert any(k.startswith("balance/val/expert/") and k.endswith("/zero_frac") for k in keys)
        assert any(k.startswith("balance/val/hist/") for k in keys)
        assert "val/click/auc" in keys
    # MMoE has no task experts: every task's gate mass is on shared experts
    assert all(t["own_mass"] == 0 for t in results["MMoE"]["balance"]["tasks"].values())
    assert all(t["own_mass"] > 0 for t in results["HoME"]["balance"]["tasks"].values())


@pytest.mark.slow
def test_compare_encoders_tabulates_every_encoder(tmp_path: Path) -> None:
    script = load_script("compare_encoders")
    out = tmp_path / "compare.json"
    argv = ["--encoders", "HSTU", "LONGER", "--max-len", "32", "--users", "60", "--history-mean", "40"]
    argv += ["--samples-per-user", "10", "--batch-size", "32", "--limit-train-batches", "2", "--limit-val-batches", "2"]
    argv += ["--data-dir", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert script.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["max_len"] == 32 and report["settings"]["cpus"] >= 1
    rows = {r["encoder"]: r for r in report["results"]}
    assert set(rows) == {"HSTU", "LONGER"}
    for row in rows.values():
        assert 0 <= row["metrics"]["val/click/auc"] <= 1
        assert row["metrics"]["perf/epoch_train_samples_per_s"] > 0
        assert 0 < row["flops"]["attention"] < row["flops"]["total"]


@pytest.mark.slow
def test_compare_branches_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both branches off and on: the uplift columns only where the uplift branch runs, the exposure slice everywhere."""
    script = load_script("compare_branches")
    out = tmp_path / "branches.json"
    argv = ["--variants", "none", "both", "--epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "3"]
    argv += ["--users", "300", "--samples-per-user", "20", "--batch-size", "128"]
    argv += ["--data-dir", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "exposed click AUC/logloss" in printed and "both" in printed
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"none", "both"}
    none, both = results["none"]["metrics"], results["both"]["metrics"]
    assert "val/uplift/auuc" not in none and "val/uplift/auuc" in both
    assert {"val/uplift/qini", "val/uplift/pehe", "val/loss/uplift", "val/loss/fatigue_cl"} - set(both) == {
        "val/loss/fatigue_cl"  # the contrastive loss is a training loss only
    }
    for metrics in (none, both):
        assert 0 < metrics["val/exposed/fraction"] < 1
        assert 0 <= metrics["val/exposed/click/auc"] <= 1
