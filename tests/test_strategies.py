"""Strategy files (DDP, ZeRO 1/2/3, offload) parse and build through the CLI; DeepSpeed's config is completed
for mtrank's loaders; the checkpoint converter writes a float32 inference file that loads without DeepSpeed.
ZeRO itself runs on CUDA only: ``scripts/bench_strategies.py`` exercises it (and converts ZeRO folders) on a GPU."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from encoders import HSTUEncoder
from heads import MMoE
from mtrank.cli import TRAINER_DEFAULTS, MTRankCLI, main
from mtrank.convert import convert_checkpoint, is_zero_checkpoint
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.synth import SynthConfig
from mtrank.module import RankingModule
from mtrank.strategies import prepare_strategy, zero_stage

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {  # file -> (class, ZeRO stage (-1: not DeepSpeed), optimiser offload, parameter offload)
    "ddp": (DDPStrategy, -1, False, False),
    "zero1": (DeepSpeedStrategy, 1, False, False),
    "zero1_offload": (DeepSpeedStrategy, 1, True, False),
    "zero2": (DeepSpeedStrategy, 2, False, False),
    "zero2_offload": (DeepSpeedStrategy, 2, True, False),
    "zero3": (DeepSpeedStrategy, 3, False, False),
    "zero3_offload": (DeepSpeedStrategy, 3, True, True),
}


def test_every_strategy_file_is_tested() -> None:
    assert sorted(p.stem for p in (ROOT / "configs" / "strategies").glob("*.yaml")) == sorted(STRATEGIES)


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("model", ["hstu_mmoe_gpu", "ultra_hstu"])
def test_strategy_file_parses_and_builds_with_a_model_config(name: str, model: str) -> None:
    cls, stage, offload_optimizer, offload_params = STRATEGIES[name]
    args = [
        "--config",
        str(ROOT / "configs" / f"{model}.yaml"),
        "--config",
        str(ROOT / "configs/strategies" / f"{name}.yaml"),
    ]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false"]
    cli = MTRankCLI(
        RankingModule, RankingDataModule, run=False, args=args, trainer_defaults=TRAINER_DEFAULTS,
        auto_configure_optimizers=False,
    )  # fmt: skip
    strategy = cli.trainer.strategy
    assert type(strategy) is cls
    assert cli.trainer.precision == "bf16-mixed"
    assert zero_stage(strategy) == stage
    if stage >= 0:
        zero = strategy.config["zero_optimization"]
        assert ("offload_optimizer" in zero) == offload_optimizer
        assert ("offload_param" in zero) == offload_params
        assert strategy.config["train_micro_batch_size_per_gpu"] == 1


def test_registry_names_work_too_and_get_their_config_completed() -> None:
    """``--trainer.strategy deepspeed_stage_3_offload``: Lightning would infer the micro batch from a
    ``batch_sampler`` mtrank's loaders lack, and DeepSpeed would refuse the torch optimiser with offload."""
    trainer = quiet_trainer(strategy="deepspeed_stage_3_offload", precision="bf16-mixed")
    assert "train_micro_batch_size_per_gpu" not in trainer.strategy.config
    prepare_strategy(SimpleNamespace(strategy=trainer.strategy, datamodule=SimpleNamespace(batch_size=384)))
    assert trainer.strategy.config["train_micro_batch_size_per_gpu"] == 384
    assert trainer.strategy.config["zero_force_ds_cpu_optimizer"] is False
    no_offload = quiet_trainer(strategy="deepspeed_stage_2", precision="bf16-mixed").strategy
    prepare_strategy(SimpleNamespace(strategy=no_offload, datamodule=None))
    assert no_offload.config["train_micro_batch_size_per_gpu"] == 1
    assert "zero_force_ds_cpu_optimizer" not in no_offload.config
    ddp = quiet_trainer(strategy="ddp").strategy
    prepare_strategy(SimpleNamespace(strategy=ddp, datamodule=None))  # not DeepSpeed: nothing to do
    assert zero_stage(ddp) == -1


SYNTH = SynthConfig(num_users=30, num_items=40, history_mean=8, samples_per_user=6, max_len=8, seed=1)


def trained_checkpoint(tmp_path: Path) -> tuple[RankingModule, RankingDataModule, Path]:
    data = RankingDataModule(str(tmp_path / "data"), synth=SYNTH, batch_size=32, num_workers=0)
    model = RankingModule(
        SYNTH.tasks(), SYNTH.features(), encoder=partial(HSTUEncoder, dim=16, num_heads=1), heads=partial(MMoE)
    )
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "train.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, data, ckpt


def test_converter_writes_float32_weights_that_predict_like_the_checkpoint(tmp_path: Path) -> None:
    model, data, ckpt = trained_checkpoint(tmp_path)
    out = tmp_path / "export" / "model.ckpt"
    assert main(["convert-checkpoint", str(ckpt), str(out)]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=False)
    assert "optimizer_states" not in exported and "loops" not in exported and "callbacks" not in exported
    assert exported["mtrank_converted_from"]["format"] == "file" and exported["global_step"] == 3
    assert exported["state_dict"].keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(exported["state_dict"][name], value.float()), name

    restored = RankingModule.load_from_checkpoint(out, map_location="cpu", weights_only=False).eval()  # no DeepSpeed
    model.eval()
    data.setup("test")
    batch = data.dataset("test").get_batch(list(range(8)))
    with torch.no_grad():
        expected, got = model.predictions(model(batch)[1]), restored.predictions(restored(batch)[1])
    for task, value in expected.items():
        assert torch.equal(got[task], value), task


def test_converter_refuses_what_it_cannot_convert(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        convert_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out.ckpt")
    (tmp_path / "folder").mkdir()
    assert not is_zero_checkpoint(tmp_path / "folder")
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        convert_checkpoint(tmp_path / "folder", tmp_path / "out.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        convert_checkpoint(tmp_path / "plain.pt", tmp_path / "out.ckpt")
    zero = tmp_path / "zero.ckpt" / "checkpoint"
    zero.mkdir(parents=True)
    (zero / "latest").write_text("global_step3")
    assert is_zero_checkpoint(tmp_path / "zero.ckpt") and is_zero_checkpoint(zero)
