"""Smoke tests of the serving benchmark (`scripts/bench_serving.py`) on the CPU, tiny settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mtrank.serve import Candidates

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--history", "16", "--dim", "16", "--requests", "2", "--warmup", "1", "--threads", "1"]
TIMED = ("candidates_per_s", "mean_ms", "peak_mib")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_serving", ROOT / "scripts" / "bench_serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_serving_cpu_smoke(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "serving.json"
    # K = 6: C = 4 scores all its candidates naively (K clamped to C), C = 8 only its first 6
    assert bench.main([*TINY, "--candidates", "4", "8", "--naive-candidates", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cached cand/s |" in printed and "naive rate on the first 6 of 8 candidates" in printed
    assert "not measured (no C = 1000 in --candidates)" in printed

    result = json.loads(out.read_text())
    assert {"device", "torch", "threads", "dtype", "memory", "settings", "rows", "goals"} <= set(result)
    assert result["settings"]["history"] == [16] and result["dtype"] == "float32" and result["goals"] == []
    rows = {(r["encoder"], r["candidates"]): r for r in result["rows"]}
    assert set(rows) == {("HSTU", 4), ("HSTU", 8), ("LONGER", 4), ("LONGER", 8)}
    for (encoder, C), r in rows.items():
        assert r["status"] == "ok", r
        assert r["history"] == 16 and r["encoder_init_args"]["dim"] == 16
        assert r["path"] == {"HSTU": "hstu_prefix", "LONGER": "longer_cache"}[encoder]
        assert r["max_abs_diff"] < 1e-5 and set(r["max_abs_diff_by_task"]) == {
            "click", "like", "follow", "long_view", "watch_time"
        }  # fmt: skip
        for path in ("cached", "naive"):
            assert r[f"{path}_requests"] == 2 and len(r[f"{path}_request_ms"]) == 2
            assert r[f"{path}_warmup_requests"] == 1
            assert all(r[f"{path}_{key}"] > 0 for key in TIMED)
        assert r["cached_p50_ms"] <= r["cached_p99_ms"] and r["speedup"] > 0
        assert r["speedup"] == pytest.approx(r["cached_candidates_per_s"] / r["naive_candidates_per_s"])
        assert r["cached_candidates_per_s"] == pytest.approx(2 * C / (sum(r["cached_request_ms"]) * 1e-3))
        K = min(6, C)
        assert r["naive_candidates"] == K
        assert r["naive_candidates_per_s"] == pytest.approx(2 * K / (sum(r["naive_request_ms"]) * 1e-3))
        if K == C:  # a latency only where the naive path scored every candidate
            assert r["naive_rate_basis"] == "all candidates" and 0 < r["naive_p50_ms"] <= r["naive_p99_ms"]
        else:
            assert r["naive_rate_basis"] == "first 6 of 8 candidates per request"
            assert r["naive_p50_ms"] is None and r["naive_p99_ms"] is None


def test_bench_serving_refuses_to_time_disagreeing_scores(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A naive path that scores other candidates than the cached one fails the check: not timed, exit status 1."""
    first_candidates = bench.first_candidates

    def shifted(candidates: Candidates, k: int) -> Candidates:
        rolled = Candidates(
            candidates.item_id.roll(1, dims=1),
            {n: t.roll(1, dims=1) for n, t in candidates.item_sparse.items()},
            {n: t.roll(1, dims=1) for n, t in candidates.item_dense.items()},
        )
        return first_candidates(rolled, k)

    monkeypatch.setattr(bench, "first_candidates", shifted)
    out = tmp_path / "serving.json"
    assert bench.main([*TINY, "--encoders", "HSTU", "--candidates", "4", "--out", str(out)]) == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "scores disagree" and row["max_abs_diff"] > row["tolerance"]
    assert "cached_candidates_per_s" not in row


def test_goals_and_percentile(bench: ModuleType) -> None:
    rows = [
        {"encoder": "HSTU", "history": 1024, "candidates": 100, "status": "ok", "speedup": 5.0},
        {"encoder": "HSTU", "history": 1024, "candidates": 1000, "status": "ok", "speedup": 25.0,
         "naive_rate_basis": "all candidates"},
        {"encoder": "LONGER", "history": 1024, "candidates": 1000, "status": "ok", "speedup": 3.0,
         "naive_rate_basis": "first 4 of 1000 candidates per request"},
        {"encoder": "HSTU", "history": 8192, "candidates": 1000, "status": "out of memory"},
    ]  # fmt: skip
    assert [(g["encoder"], g["history"], g["met"]) for g in bench.goals(rows)] == [
        ("HSTU", 1024, True), ("LONGER", 1024, False), ("HSTU", 8192, None)
    ]  # fmt: skip
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([4.0, 1.0, 2.0, 3.0], 50) == 2.5
    assert bench.percentile([float(i) for i in range(101)], 99) == pytest.approx(99.0)
