"""On a CUDA GPU (skipped elsewhere): the model gives the CPU's outputs, and trains in bf16-mixed."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from encoders import HSTUEncoder, LongerEncoder, UltraHSTUEncoder
from heads import MMoE
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.synth import SynthConfig
from mtrank.module import RankingModule

pytestmark = pytest.mark.gpu
SYNTH = SynthConfig(num_users=600, num_items=400, history_mean=60, samples_per_user=40, max_len=32, seed=4)


ENCODERS = {
    "hstu": partial(HSTUEncoder, dim=32, num_heads=2),
    "longer": partial(LongerEncoder, dim=32, num_heads=2, merge_k=4, num_recent_queries=4),
    "ultra_hstu": partial(
        UltraHSTUEncoder,
        dim=32,
        num_heads=2,
        local_window=8,
        global_prefix=2,
        full_layers=1,
        tail_len=16,
        streams=[{"name": "all"}, {"name": "engaged", "channel": "action", "values": [1, 2, 3], "max_len": 16}],
    ),
}


def build(tmp_path: Path, encoder: str = "hstu") -> tuple[RankingModule, RankingDataModule]:
    torch.manual_seed(0)
    data = RankingDataModule(str(tmp_path / "data"), synth=SYNTH, batch_size=256, num_workers=0, pin_memory=True)
    model = RankingModule(SYNTH.tasks(), SYNTH.features(), encoder=ENCODERS[encoder], heads=partial(MMoE))
    return model, data


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_cuda_forward_matches_cpu(tmp_path: Path, encoder: str) -> None:
    model, data = build(tmp_path, encoder)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        _, cpu = model(batch)
        _, gpu = model.cuda()(batch.to("cuda"))
    for task, logit in cpu.logits.items():
        torch.testing.assert_close(gpu.logits[task].cpu(), logit, atol=2e-4, rtol=1e-3)


LONGER_LEARNS_LESS = pytest.mark.xfail(reason="LONGER does not yet learn the planted interest signal to 0.65 AUC")


@pytest.mark.parametrize(
    "encoder", [pytest.param(e, marks=LONGER_LEARNS_LESS) if e == "longer" else e for e in sorted(ENCODERS)]
)
def test_bf16_mixed_training_on_cuda(tmp_path: Path, encoder: str) -> None:
    model, data = build(tmp_path, encoder)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=3,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=data)
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["val/click/auc"] > 0.65  # the planted interest signal, learned in bf16
