"""End to end through the ``mtrank`` CLI: the quick-start config learns the planted signal, and
validate / test / predict run from a checkpoint. Small data, a short run on 2 CPU cores."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mtrank.cli import main
from mtrank.module import RankingModule

ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path: Path, wandb: bool = False) -> Path:
    """configs/quickstart.yaml on a smaller synthetic set, logging under ``tmp_path``."""
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["data"]["data_dir"] = str(tmp_path / "data")
    config["data"]["synth"].update(num_users=800, samples_per_user=40, seed=1)
    config["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    config["trainer"]["val_check_interval"] = 1.0
    config["data"]["batch_size"] = 128
    config["trainer"]["enable_progress_bar"] = False
    runs = str(tmp_path / "runs")
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": runs, "name": "csv"}}]
    if wandb:
        loggers.append({"class_path": "mtrank.loggers.WandbLogger", "init_args": {"save_dir": runs}})
    config["trainer"]["logger"] = loggers
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def last_metrics(tmp_path: Path) -> dict[str, float]:
    (metrics_file,) = sorted((tmp_path / "runs" / "csv").glob("version_*/metrics.csv"))[-1:]
    values: dict[str, float] = {}
    for row in csv.DictReader(metrics_file.open()):
        values.update({k: float(v) for k, v in row.items() if v and k.startswith(("val/", "test/", "perf/"))})
    return values


@pytest.mark.slow
def test_quickstart_learns_planted_click_signal_then_tests_and_predicts(tmp_path: Path) -> None:
    config = small_config(tmp_path, wandb=True)
    assert main(["fit", "--config", str(config)]) == 0
    metrics = last_metrics(tmp_path)
    # the planted category-interest effect is learned: click AUC well above chance
    assert metrics["val/click/auc"] >= 0.65, metrics
    assert metrics["val/click/gauc"] >= 0.6, metrics
    for task in ("like", "follow", "long_view"):
        assert metrics[f"val/{task}/auc"] > 0.55, (task, metrics)
    assert metrics["val/watch_time/rmse"] > 0
    assert metrics["perf/epoch_train_samples_per_s"] > 0 and metrics["perf/train_samples_per_s"] > 0
    # W&B wrote an offline run and needed no network
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))

    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    restored = RankingModule.load_from_checkpoint(ckpt, map_location="cpu")  # no config needed
    assert [t.name for t in restored.tasks] == ["click", "like", "follow", "long_view", "watch_time"]
    assert main(["test", "--config", str(config), "--ckpt_path", str(ckpt)]) == 0
    assert last_metrics(tmp_path)["test/click/auc"] >= 0.65

    out = tmp_path / "predictions.parquet"
    assert main(["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--predict_output", str(out)]) == 0
    table = pq.read_table(out)
    test_rows = pq.read_metadata(tmp_path / "data" / "test.parquet").num_rows
    assert table.num_rows == test_rows
    assert table.column("sample_index").to_pylist() == list(range(test_rows))
    assert {"user_id", "item_id", "click", "like", "follow", "long_view", "watch_time"} <= set(table.column_names)
    click = table.column("click").to_numpy()
    assert ((click > 0) & (click < 1)).all()
    assert (table.column("watch_time").to_numpy() >= 0).all()


def test_every_config_parses(capsys: pytest.CaptureFixture[str]) -> None:
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for config in configs:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), "--print_config"])
        assert exit_info.value.code in (0, None), config
        printed = capsys.readouterr().out
        assert "class_path: encoders." in printed and "tasks:" in printed, config


def test_bad_override_is_refused_with_the_setting_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.tasks.0.kind", "ordinal"])
    assert "kind" in capsys.readouterr().err
