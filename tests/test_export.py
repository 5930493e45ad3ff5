"""``mtrank export``: checkpoint -> plain-torch file + model card (`mtrank.export`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from encoders import HSTUEncoder, LongerEncoder, MeanPoolEncoder, NoHistoryEncoder, UltraHSTUEncoder
from heads import CDUM, FRec, MMoE
from mtrank import convert
from mtrank.batch import Batch
from mtrank.cli import main as cli_main
from mtrank.data.synth import SynthConfig, random_batch
from mtrank.export import (
    CARD_FILE,
    NOT_AVAILABLE,
    build_module,
    export_checkpoint,
    export_module,
    input_layout,
    load_exported,
    training_metrics,
)
from mtrank.module import RankingModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MAX_LEN = 16
SMALL = [  # quickstart.yaml, shrunk: what `mtrank fit` would take as overrides
    "--model.encoder.init_args.dim=16",
    "--model.encoder.init_args.num_layers=1",
    "--model.encoder.init_args.output_dim=16",
    "--model.heads.init_args.num_experts=2",
    "--model.heads.init_args.expert_dims=[16]",
    "--model.heads.init_args.tower_dims=[8]",
    f"--model.features.max_len={MAX_LEN}",
]
TASKS = ["click", "like", "follow", "long_view", "watch_time"]


def labelled(module: RankingModule, lengths: list[int], seed: int) -> Batch:
    """`random_batch` plus random labels (0/1 for binary tasks, >= 0 for regression)."""
    batch = random_batch(module.features, lengths, width=MAX_LEN, seed=seed)
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    for task in module.tasks:
        if task.kind == "binary":
            batch.labels[task.label] = (torch.arange(B) % 2).float()[torch.randperm(B, generator=g)]
        else:
            batch.labels[task.label] = torch.rand(B, generator=g) * 100
    return batch


def lengths(B: int, seed: int, width: int = MAX_LEN) -> list[int]:
    """B random history lengths in [0, width]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, width + 1, (B,), generator=g).tolist()


def expected(module: RankingModule, batch: Batch) -> dict[str, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        return module.predictions(module(batch)[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """quickstart.yaml (small) trained 2 steps by Lightning, validated once: the checkpoint and its run."""
    tmp = tmp_path_factory.mktemp("export_run")
    module, _ = build_module(QUICKSTART, SMALL)
    train = [labelled(module, lengths(32, s), s) for s in range(2)]
    val = [labelled(module, lengths(64, 10), 10)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=CSVLogger(str(tmp / "runs"), name="exp"),
        callbacks=[ModelCheckpoint(monitor="val_auc", mode="max", save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp),
    )
    trainer.fit(module, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    run = tmp / "runs" / "exp" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.csv").is_file()
    return {"module": module.eval(), "ckpt": run / "checkpoints" / "last.ckpt", "run": run, "tmp": tmp}


@pytest.fixture(scope="module")
def exported(trained: dict[str, Any]) -> Path:
    """``mtrank export`` of the trained checkpoint (through the ``mtrank`` command)."""
    out = trained["tmp"] / "exported"
    args = ["export", "--config", str(QUICKSTART), "--ckpt", str(trained["ckpt"]), "--out", str(out), *SMALL]
    assert cli_main(args) == 0
    return out


# ------------------------------------------------------------------------------------------ the card


def test_the_command_writes_the_program_and_a_card(trained: dict[str, Any], exported: Path) -> None:
    card = json.loads((exported / CARD_FILE).read_text())
    assert card["format"] == "torch.export" and card["file"] == "model.pt2" and (exported / "model.pt2").is_file()
    assert not (exported / "model.ts").exists()
    assert card["history_width"] == {"dynamic": True, "min": 1, "max": MAX_LEN}
    assert card["torch_version"] == torch.__version__
    assert [t["name"] for t in card["tasks"]] == TASKS == [o["name"] for o in card["outputs"]]
    watch = card["tasks"][-1]
    assert (watch["kind"], watch["loss"], watch["label"]) == ("regression", "log_mse", "watch_time")
    assert card["tasks"][0] == {
        "name": "click", "kind": "binary", "loss": "bce", "label": "click", "weight": 1.0, "group": "engagement"
    }  # fmt: skip
    names = [spec["name"] for spec in card["inputs"]]
    assert list(trained["module"].features.history_sparse) == ["action", "category"]  # as the parser hands it over
    assert names == [
        "user_id", "item_id", "ts", "history_len", "history_item_id", "history_ts",
        "history_sparse.action", "history_sparse.category", "history_dense.watch",
        "item_sparse.category", "item_dense.duration", "user_sparse.segment", "user_dense.activity",
    ]  # fmt: skip
    assert card["inputs"][4] == {"name": "history_item_id", "dtype": "int64", "shape": ["B", "L"]}
    assert card["inputs"][8] == {"name": "history_dense.watch", "dtype": "float32", "shape": ["B", "L"]}
    assert card["inputs"][10] == {"name": "item_dense.duration", "dtype": "float32", "shape": ["B"]}
    assert card["inputs"] == input_layout(trained["module"].features)
    assert card["features"]["max_len"] == MAX_LEN and card["features"]["num_items"] == 1000

    model = card["config"]["model"]  # the full config, the model section resolved with the overrides
    assert model["encoder"]["class_path"] == "encoders.HSTUEncoder" and model["encoder"]["init_args"]["dim"] == 16
    assert card["config"]["trainer"]["max_epochs"] == 2 and card["config_overrides"] == SMALL
    assert card["checkpoint"]["kind"] == "lightning" and card["checkpoint"]["global_step"] == 2
    n_params = sum(p.numel() for p in trained["module"].parameters())
    assert card["parameters"] == {"exported": n_params, "module": n_params}
    assert card["attention_kernels"] == {"encoder": "auto -> reference"}

    metrics = card["metrics"]
    (monitor,) = metrics["checkpoint_callbacks"]
    assert monitor["monitor"] == "val_auc" and 0.0 <= monitor["best_model_score"] <= 1.0
    logged = metrics["logged"]
    assert Path(logged["source"]) == (trained["run"] / "metrics.csv").resolve()
    assert logged["values"]["val_auc"] == pytest.approx(monitor["best_model_score"])
    assert {"val/loss", "val/loss/watch_time", "val/click/auc", "val/watch_time/mae"} <= set(logged["values"])
    assert all(k.startswith(("val/", "val_")) for k in logged["values"]) and (logged["epoch"], logged["step"]) == (0, 1)
    json.loads((exported / CARD_FILE).read_text(), parse_constant=pytest.fail)  # strict JSON: a NaN is "nan"

    readme = (exported / "README.md").read_text()
    assert "torch.export" in readme and "| 4 | watch_time | regression | log_mse |" in readme
    assert "| 4 | history_item_id | int64 | (B, L) |" in readme and "val_auc" in readme


# ------------------------------------------------------------------------------------------ loading


def test_loads_with_torch_alone_in_a_fresh_process(trained: dict[str, Any], exported: Path, tmp_path: Path) -> None:
    """``python -I`` (no PYTHONPATH, no cwd on the path) with mtrank, the encoders, heads and Lightning blocked:
    the program runs, and so does `load_exported` from mtrank/export.py loaded as a lone file."""
    module = trained["module"]
    card = json.loads((exported / CARD_FILE).read_text())
    batches = [random_batch(module.features, lengths(B, B, w), width=w, seed=B) for B, w in ((3, MAX_LEN), (9, 7))]
    flat = [[getattr_path(b, spec["name"]) for spec in card["inputs"]] for b in batches]
    torch.save(flat, tmp_path / "inputs.pt")
    code = textwrap.dedent(
        """
        import importlib.abc, importlib.util, json, sys
        BLOCKED = ("mtrank", "encoders", "heads", "lightning", "jsonargparse", "torchmetrics")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import torch

        out_dir, inputs, result, loader = sys.argv[1:5]
        card = json.load(open(f"{out_dir}/model_card.json"))
        program = torch.export.load(f"{out_dir}/{card['file']}").module()
        spec = importlib.util.spec_from_file_location("lone_export", loader)
        lone = sys.modules["lone_export"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lone)
        ranker = lone.load_exported(out_dir)
        outputs = []
        for flat in torch.load(inputs):
            with torch.no_grad():
                direct = program(*flat)
            assert all(torch.equal(a, b) for a, b in zip(direct, ranker(*flat), strict=True))
            outputs.append([t.clone() for t in direct])
        torch.save(outputs, result)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] == "lone_export"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [str(exported), str(tmp_path / "inputs.pt"), str(tmp_path / "result.pt"), str(ROOT / "mtrank/export.py")]
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
    results = torch.load(tmp_path / "result.pt")
    for batch, got in zip(batches, results, strict=True):
        want = expected(module, batch)
        assert len(got) == len(TASKS)
        for name, value in zip(TASKS, got, strict=True):
            assert value.shape == (batch.batch_size,)
            torch.testing.assert_close(value, want[name], atol=1e-5, rtol=0)


def getattr_path(batch: Batch, name: str) -> torch.Tensor:
    group, _, key = name.partition(".")
    value = getattr(batch, group)
    return value[key] if key else value


def test_predict_flattens_a_batch_and_casts_its_dtypes(trained: dict[str, Any], exported: Path) -> None:
    module = trained["module"]
    ranker = load_exported(exported)
    assert ranker.task_names == TASKS and ranker.input_names[0] == "user_id"
    for B, width in ((1, MAX_LEN), (6, 5)):
        batch = random_batch(module.features, lengths(B, 7, width), width=width, seed=B + 20)
        narrow = dataclasses.replace(  # int32 ids, as a loader may give them
            batch,
            user_id=batch.user_id.int(),
            item_id=batch.item_id.int(),
            history_item_id=batch.history_item_id.int(),
            history_sparse={k: v.int() for k, v in batch.history_sparse.items()},
        )
        got = ranker.predict(narrow)
        for name, value in expected(module, batch).items():
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exceeds the export's maximum"):
        ranker.predict(random_batch(module.features, [MAX_LEN + 1], seed=0))


# ------------------------------------------------------------------------------------------ encoders

SYNTH = SynthConfig(num_users=40, num_items=50, num_categories=5, max_len=MAX_LEN)
HEADS = partial(MMoE, num_experts=2, expert_dims=(16,), tower_dims=(8,))
ENCODERS = {  # name -> (factory, format `auto` picks, dynamic history width)
    "hstu": (partial(HSTUEncoder, dim=16, num_heads=2, kernel="reference"), "torch.export", True),
    "longer_sdpa": (
        partial(LongerEncoder, dim=16, num_heads=2, merge_k=4, num_recent_queries=2, kernel="sdpa"),
        "torch.export",
        True,
    ),
    "longer_reference": (
        partial(LongerEncoder, dim=16, num_heads=2, merge_k=4, num_recent_queries=2, kernel="reference"),
        "torch.export",
        True,
    ),
    "ultra_hstu": (
        partial(
            UltraHSTUEncoder,
            dim=16,
            num_heads=2,
            num_context_tokens=1,
            local_window=4,
            global_prefix=2,
            full_layers=1,
            tail_len=8,
            streams=[{"name": "all"}, {"name": "engaged", "channel": "action", "values": [1, 2, 3], "max_len": 8}],
        ),
        "torchscript",
        False,
    ),
    "mean_pool": (partial(MeanPoolEncoder, dim=16), "torch.export", True),
    "no_history": (partial(NoHistoryEncoder, dim=16), "torch.export", True),
}


def small_module(encoder: Any, seed: int = 0) -> RankingModule:
    torch.manual_seed(seed)
    return RankingModule(SYNTH.tasks(), SYNTH.features(), encoder=encoder, heads=HEADS).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENCODERS))
def test_each_encoder_exports_and_predicts_like_the_module(name: str, tmp_path: Path) -> None:
    factory, fmt, dynamic = ENCODERS[name]
    module = small_module(factory)
    card = export_module(module, tmp_path)
    assert card["format"] == fmt and card["history_width"]["dynamic"] is dynamic
    assert card["export_attempts"][-1]["result"] == "ok"
    if fmt == "torchscript":  # why torch.export was not used: the encoder's data-dependent branch
        failed = card["export_attempts"][:-1]
        assert [a["format"] for a in failed] == ["torch.export", "torch.export"]
        assert all("data-dependent" in a["error"] and "ultra_hstu.py" in a["error"] for a in failed)
    ranker = load_exported(tmp_path)
    for B, width in ((2, MAX_LEN), (5, 9), (1, 3)):  # the example had 4 rows of width MAX_LEN
        batch = random_batch(module.features, lengths(B, B, width), width=width, seed=B)
        got = ranker.predict(batch)
        for task, value in expected(module, batch).items():
            torch.testing.assert_close(got[task], value, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_branches_and_request_candidates_export_at_a_fixed_width(tmp_path: Path) -> None:
    """Fatigue (exported) and uplift (left out) branches, request candidates among the inputs: FRec's recent window
    pins the history width, so the fixed-width torch.export is taken."""
    features = dataclasses.replace(SYNTH.features(), request_candidates=3)
    torch.manual_seed(0)
    module = RankingModule(
        SYNTH.tasks(), features, encoder=partial(HSTUEncoder, dim=16, num_heads=2), heads=HEADS,
        fatigue=partial(FRec, recent=6, interest_window=8), uplift=partial(CDUM),
    ).eval()  # fmt: skip
    card = export_module(module, tmp_path)
    assert card["format"] == "torch.export" and card["history_width"]["dynamic"] is False
    assert [a["result"] for a in card["export_attempts"]] == ["failed", "ok"]
    assert card["branches"] == {"fatigue": "exported", "uplift": "not exported"}
    assert card["parameters"]["exported"] < card["parameters"]["module"]
    assert [s["name"] for s in card["inputs"]][-4:] == [
        "request_len", "request_item_id", "request_sparse.category", "request_dense.duration"
    ]  # fmt: skip
    assert card["inputs"][-3]["shape"] == ["B", 3]
    ranker = load_exported(tmp_path)
    for B, width in ((1, MAX_LEN), (6, 10)):
        batch = random_batch(features, lengths(B, B + 1, width), width=width, seed=B)
        got = ranker.predict(batch)
        for task, value in expected(module, batch).items():
            torch.testing.assert_close(got[task], value, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_format_export_refuses_an_encoder_it_cannot_export(tmp_path: Path) -> None:
    module = small_module(ENCODERS["ultra_hstu"][0])
    with pytest.raises(
        RuntimeError, match=r"(?s)no export of format 'export' worked for UltraHSTUEncoder.*data-dependent"
    ):
        export_module(module, tmp_path, fmt="export")
    assert not (tmp_path / "model.pt2").exists() and not (tmp_path / CARD_FILE).exists()


# ------------------------------------------------------------------------------------------ checkpoint kinds


ZERO_WRITER = textwrap.dedent(
    """
    import sys, torch
    import deepspeed
    from mtrank.export import build_module

    ckpt, folder, stage, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    module, _ = build_module("configs/quickstart.yaml", overrides)
    source = torch.load(ckpt, map_location="cpu", weights_only=False)
    module.load_state_dict(source["state_dict"])

    class LightningWrapper(torch.nn.Module):  # what Lightning hands DeepSpeed: parameters named _forward_module.*
        def __init__(self, module):
            super().__init__()
            self._forward_module = module

    wrapper = LightningWrapper(module)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
    config["zero_allow_untested_optimizer"] = True
    optimizer = torch.optim.AdamW(wrapper.parameters())
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=config)
    client = {k: v for k, v in source.items() if k not in ("state_dict", "optimizer_states")}
    engine.save_checkpoint(folder, client_state=client, tag="checkpoint")  # as Lightning's DeepSpeedStrategy does
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_a_zero3_folder_exports_through_mtrank_convert(trained: dict[str, Any], tmp_path: Path) -> None:
    """A real DeepSpeed ZeRO-3 folder (written on the CPU by a DeepSpeed engine laid out as Lightning's strategy
    lays it out: ``<run>/checkpoints/last.ckpt/checkpoint/``) is consolidated by `mtrank.convert` and exported;
    its client state gives the monitor, and the run's metrics.csv is found above it."""
    run = tmp_path / "runs" / "zero" / "version_3"
    folder = run / "checkpoints" / "last.ckpt"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained["run"] / "metrics.csv", run / "metrics.csv")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    args = [sys.executable, "-c", ZERO_WRITER, str(trained["ckpt"]), str(folder), "3", *SMALL]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert convert.is_zero_checkpoint(folder)

    out = tmp_path / "out"
    card = export_checkpoint(QUICKSTART, folder, out, fmt="auto", overrides=SMALL)
    assert card["format"] == "torch.export"
    assert card["checkpoint"]["kind"] == "zero" and card["checkpoint"]["path"] == str(folder.resolve())
    assert card["checkpoint"]["global_step"] == 2
    assert card["metrics"]["checkpoint_callbacks"][0]["monitor"] == "val_auc"
    assert Path(card["metrics"]["logged"]["source"]) == (run / "metrics.csv").resolve()
    batch = random_batch(trained["module"].features, lengths(4, 3), width=MAX_LEN, seed=3)
    got = load_exported(out).predict(batch)
    for task, value in expected(trained["module"], batch).items():
        torch.testing.assert_close(got[task], value, atol=1e-5, rtol=0)


def test_a_converted_checkpoint_without_a_run_has_no_metrics(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    converted = tmp_path / "model.ckpt"
    convert.convert_checkpoint(trained["ckpt"], converted)
    out = tmp_path / "out"
    args = ["export", "--config", str(QUICKSTART), "--ckpt", str(converted), "--out", str(out), "--format", "export"]
    assert cli_main([*args, *SMALL]) == 0
    assert "model.pt2" in capsys.readouterr().out
    card = json.loads((out / CARD_FILE).read_text())
    assert card["checkpoint"]["kind"] == "converted" and card["metrics"] == NOT_AVAILABLE
    assert "## Metrics at training end\n\nnot available" in (out / "README.md").read_text()
    # the same checkpoint with its run's metrics named by hand (what --metrics-csv passes)
    metrics = training_metrics(torch.load(converted, weights_only=False), converted, trained["run"] / "metrics.csv")
    assert "checkpoint_callbacks" not in metrics and "val_auc" in metrics["logged"]["values"]


# ------------------------------------------------------------------------------------------ bad input


def run_export(capsys: pytest.CaptureFixture, config: Path, ckpt: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = cli_main(["export", "--config", str(config), "--ckpt", str(ckpt), "--out", str(out), *extra])
    return code, capsys.readouterr().err


def test_bad_input_gives_a_clear_error_naming_the_file(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code, err = run_export(capsys, QUICKSTART, tmp_path / "missing.ckpt", out, *SMALL)
    assert code == 2 and "checkpoint not found" in err and "missing.ckpt" in err
    code, err = run_export(capsys, tmp_path / "nope.yaml", trained["ckpt"], out)
    assert code == 2 and "config not found" in err and "nope.yaml" in err
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    code, err = run_export(capsys, QUICKSTART, tmp_path / "notes.txt", out, *SMALL)
    assert code == 2 and "notes.txt" in err and "not a torch checkpoint" in err
    (tmp_path / "folder").mkdir()
    code, err = run_export(capsys, QUICKSTART, tmp_path / "folder", out, *SMALL)
    assert code == 2 and "folder" in err and "not a DeepSpeed checkpoint" in err
    # config/checkpoint mismatch: the checkpoint was trained with dim 16
    code, err = run_export(capsys, QUICKSTART, trained["ckpt"], out, *SMALL, "--model.encoder.init_args.dim=32")
    assert code == 2 and "last.ckpt" in err and "quickstart.yaml" in err and "shape mismatch" in err
    code, err = run_export(capsys, QUICKSTART, trained["ckpt"], out)  # quickstart's own sizes: dim 64, max_len 64
    assert code == 2 and "does not match the model built from" in err
    code, err = run_export(capsys, QUICKSTART, trained["ckpt"], out, *SMALL, "--model.encoder.init_args.bogus=1")
    assert code == 2 and "quickstart.yaml" in err and "bogus" in err
    code, err = run_export(capsys, QUICKSTART, trained["ckpt"], out, *SMALL, "--trainer.max_epochs=1")
    assert code == 2 and "--model.KEY VALUE" in err
    assert not out.exists()


def test_load_module_gives_the_trained_module_for_serving(trained: dict[str, Any]) -> None:
    from mtrank.export import load_module
    from mtrank.serve import CandidateScorer

    module = load_module(QUICKSTART, trained["ckpt"], SMALL)
    assert not module.training
    batch = labelled(module, lengths(6, 3), 3)
    with torch.no_grad():
        want = expected(trained["module"], batch)
        got = module.predictions(module(batch)[1])
    for task, value in want.items():
        torch.testing.assert_close(got[task], value, atol=1e-6, rtol=1e-6)
    scores = CandidateScorer(module).score_user(
        batch, item_id=batch.item_id, item_sparse=batch.item_sparse, item_dense=batch.item_dense, row=2
    )
    assert scores["click"].shape == (6,)
    torch.testing.assert_close(scores["click"][2], want["click"][2], atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="config not found"):
        load_module(trained["tmp"] / "nope.yaml", trained["ckpt"])
