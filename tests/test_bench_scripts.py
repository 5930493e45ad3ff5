"""Smoke tests of the kernel benchmarks (`scripts/bench_attention.py`, `scripts/bench_kernels_e2e.py`) on the CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"N", "B", "impl", "status"}
TIMED_KEYS = {"fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops", "peak_gib"}
E2E_KEYS = {"encoder", "max_len", "kernel", "status"}
E2E_TIMED_KEYS = {"ms_per_step", "samples_per_s", "peak_gib", "speedup_vs_reference"}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def kernel_module_exists() -> bool:
    try:
        return importlib.util.find_spec("encoders.kernels.hstu_attention") is not None
    except ImportError:
        return False


def test_bench_attention_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    cmd = [sys.executable, "scripts/bench_attention.py", "--device", "cpu", "--lengths", "64", "--tokens", "128"]
    cmd += ["--impls", "eager,sdpa", "--warmup", "1", "--reps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| fwd TFLOP/s |" in proc.stdout and "goals at N=8192" in proc.stdout
    result = json.loads(out.read_text())
    assert {"device", "torch", "triton", "settings", "checks", "rows", "goals"} <= set(result)
    assert result["settings"]["lengths"] == [64] and result["settings"]["tokens"] == 128
    rows = {(r["N"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(64, "eager"), (64, "sdpa")}
    for r in rows.values():
        assert set(r) >= ROW_KEYS and r["B"] == 2
    expected = ["sdpa", "eager"] if kernel_module_exists() else ["sdpa"]
    for impl in expected:
        r = rows[64, impl]
        assert r["status"] == "ok", r
        assert set(r) >= TIMED_KEYS and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_tflops"] > 0
        assert r["peak_gib"] is None  # CUDA only
    if not kernel_module_exists():
        assert rows[64, "eager"]["status"] == "not available"
    assert [g["met"] for g in result["goals"]] == [None, None, None]  # no N=8192 here


def test_bench_attention_reports_missing_peer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_attention")
    out = tmp_path / "attention.json"
    missing = tmp_path / "no-peer"
    argv = ["--device", "cpu", "--lengths", "32", "--tokens", "32", "--impls", "sdpa,gr,gr-semi"]
    assert bench.main([*argv, "--warmup", "0", "--reps", "1", "--gr-path", str(missing), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "generative-recommenders: not available" in printed and str(missing) in printed
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["sdpa"]["status"] == "ok"
    for impl in ("gr", "gr-semi"):
        assert rows[impl]["status"] == "not available" and str(missing) in rows[impl]["note"]


def test_bench_attention_refuses_to_skip_our_kernel_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script("bench_attention")
    monkeypatch.setitem(sys.modules, "encoders.kernels.hstu_attention", None)  # the import fails
    with pytest.raises(ImportError):
        bench.load_ours(torch.device("cuda"))
    ours, ref, why = bench.load_ours(torch.device("cpu"))
    assert ours is None and ref is None and "encoders.kernels.hstu_attention" in why


def test_bench_attention_goals_verdicts() -> None:
    bench = load_script("bench_attention")
    args = bench.argparse.Namespace(window=512)

    def row(impl: str, fwd_bwd_ms: float, tflops: float | None) -> dict:
        return {"N": 8192, "impl": impl, "status": "ok", "fwd_bwd_ms": fwd_bwd_ms, "fwd_bwd_tflops": tflops}

    rows = [row("ours", 3.0, 300.0), row("gr", 6.0, 150.0), row("sdpa", 2.5, 400.0), row("ours-semi", 0.5, None)]
    assert [g["met"] for g in bench.goals(rows, args)] == [True, True, True]
    rows = [row("ours", 5.0, 200.0), row("gr", 6.0, 150.0), row("sdpa", 2.5, 400.0), row("ours-semi", 2.0, None)]
    assert [g["met"] for g in bench.goals(rows, args)] == [False, False, False]


def test_bench_kernels_e2e_cpu_smoke(tmp_path: Path) -> None:
    bench = load_script("bench_kernels_e2e")
    out = tmp_path / "e2e.json"
    argv = ["--device", "cpu", "--max-len", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1"]
    code = bench.main([*argv, "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "torch", "settings", "configs", "precision", "rows"} <= set(result)
    rows = {(r["encoder"], r["max_len"], r["kernel"]): r for r in result["rows"]}
    encoders = ("HSTU", "LONGER", "ULTRA-HSTU")
    assert set(rows) == {(e, 32, k) for e in encoders for k in ("reference", "auto")}
    for (_, _, kernel), r in rows.items():
        assert set(r) >= E2E_KEYS
        assert r["status"] == "ok", r
        assert set(r) >= E2E_TIMED_KEYS and r["ms_per_step"] > 0 and r["samples_per_s"] > 0
        assert r["peak_gib"] is None and r["encoder_init_args"]["kernel"] == kernel
        assert r["speedup_vs_reference"] > 0
    assert rows["ULTRA-HSTU", 32, "reference"]["encoder_init_args"]["tail_len"] == 32  # long_sequence_settings
    assert code == 0


def test_bench_kernels_e2e_profile_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_kernels_e2e")
    out = tmp_path / "e2e.json"
    argv = ["--device", "cpu", "--encoders", "HSTU", "--kernels", "reference", "--max-len", "16", "--batch-size", "4"]
    argv += ["--steps", "1", "--warmup", "1", "--out", str(out)]
    assert bench.main([*argv, "--profile-steps", "2", "--profile-top", "4"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    prof = row["profile"]
    assert prof["steps"] == 2 and prof["sorted_by"] == "self CPU time"
    assert prof["device_ms_per_step"] is None and prof["device_busy"] is None  # no device on the CPU
    assert prof["launches_per_step"] == 0 and prof["host_ms_per_step"] > 0 and prof["cpu_ops_ms_per_step"] > 0
    assert len(prof["top"]) == 4
    times = [op["self_cpu_ms_per_step"] for op in prof["top"]]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    names = {op["name"] for op in prof["top"]}
    assert any(name.startswith("aten::") for name in names)
    assert "kernel launches/step" in capsys.readouterr().out
    # without --profile-steps no row has a profile
    assert bench.main(argv) == 0
    assert "profile" not in json.loads(out.read_text())["rows"][0]


@pytest.mark.slow
def test_bench_strategies_cpu_smoke_with_an_exact_resume_check(tmp_path: Path) -> None:
    """DDP with one CPU process (DeepSpeed needs CUDA): a throughput row, and the resume check, whose resumed
    run sees exactly the uninterrupted run's batches and ends with identical weights and predictions."""
    out = tmp_path / "strategies.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_strategies.py"), "--accelerator", "cpu"]
    cmd += ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--data-dir", str(tmp_path / "data")]
    cmd += ["--strategies", "ddp", "--steps", "1", "--warmup", "1", "--batch-size", "32"]
    cmd += ["--resume-check", "ddp", "--resume-steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["flops_per_sample"] > 0 and report["devices"] == 1
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["samples_per_s"] > 0 and row["exit_code"] == 0
    resume = report["resume"]
    assert (
        resume["status"] == "ok" and resume["batches_after_stop_identical"] and resume["batches_before_stop_identical"]
    )
    assert resume["max_abs_weight_diff"] == 0 and resume["max_abs_val_prediction_diff"] == 0
    assert resume["converter"]["format"] == "file" and resume["converter"]["tensors"] > 0
    assert "| ddp |" in proc.stdout
