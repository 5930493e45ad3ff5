"""CDUM uplift branch: outputs, the observed-treatment objective with inverse-propensity weights,
refusals, the module and CLI wiring, and the planted treatment effect."""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer, small_model

from encoders import HSTUEncoder
from encoders.base import EncoderOutput
from heads import CDUM, MMoE
from mtrank.cli import main as cli_main
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.synth import SynthConfig, random_batch
from mtrank.module import RankingModule

ROOT = Path(__file__).resolve().parents[1]
CFG = SynthConfig(num_users=20, num_items=40, num_categories=5, max_len=16)
FEATURES = dataclasses.replace(CFG.features(), request_candidates=4)
TASKS = CFG.tasks()


def batch_with_labels(B: int = 6, seed: int = 0):
    batch = random_batch(FEATURES, [0, 1, 3, 16, 9, 12][:B], seed=seed)
    g = torch.Generator().manual_seed(seed)
    batch.labels = {t.label: torch.randint(0, 2, (B,), generator=g).float() for t in TASKS}
    batch.treatment = torch.randint(0, 2, (B,), generator=g)
    return batch


def branch(**kw) -> CDUM:
    torch.manual_seed(0)
    return CDUM(8, TASKS, FEATURES, user_dim=16, **kw)


def encoded(B: int = 6) -> EncoderOutput:
    return EncoderOutput(target=torch.randn(B, 8), user=torch.randn(B, 16))


def test_outputs_response_per_treatment_and_effect_against_control() -> None:
    b, batch = branch(), batch_with_labels()
    out = b(encoded(), batch)
    assert set(out.outputs) == {"response_t0", "response_t1", "effect_t1"}
    r0, r1 = out.outputs["response_t0"], out.outputs["response_t1"]
    assert r0.shape == (6,) and torch.all((r0 > 0) & (r0 < 1))  # probabilities of the binary click task
    torch.testing.assert_close(out.outputs["effect_t1"], r1 - r0)
    torch.testing.assert_close(out.outputs["effect_t1"], torch.zeros(6))  # uplift towers start at 0
    torch.testing.assert_close(torch.sigmoid(out.state["logits"]), torch.stack([r0, r1], -1))


def test_three_treatments_and_other_control() -> None:
    features = dataclasses.replace(FEATURES, num_treatments=3)
    b = CDUM(8, TASKS, features, control=1, user_dim=16, use_candidates=False)
    out = b(encoded(), batch_with_labels())
    assert set(out.outputs) == {"response_t0", "response_t1", "response_t2", "effect_t0", "effect_t2"}
    torch.testing.assert_close(out.outputs["effect_t2"], out.outputs["response_t2"] - out.outputs["response_t1"])


def test_loss_uses_only_the_observed_treatment() -> None:
    b, batch = branch(), batch_with_labels()
    out = b(encoded(), batch)
    logits = out.state["logits"]
    logits.retain_grad()
    loss = b.loss(out, batch)["uplift"]
    observed = logits.detach()[torch.arange(6), batch.treatment]
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(observed, batch.labels["click"]))
    loss.backward()
    grad = logits.grad
    unobserved = torch.ones_like(grad, dtype=torch.bool)
    unobserved[torch.arange(6), batch.treatment] = False
    assert torch.all(grad[unobserved] == 0) and torch.all(grad[~unobserved] != 0)


def test_inverse_propensity_weights() -> None:
    b, batch = branch(min_propensity=0.05), batch_with_labels()
    batch.propensity = torch.tensor([0.5, 0.25, 0.8, 0.01, 1.0, 0.5])
    out = b(encoded(), batch)
    observed = out.state["logits"].detach()[torch.arange(6), batch.treatment]
    per = F.binary_cross_entropy_with_logits(observed, batch.labels["click"], reduction="none")
    w = 1 / torch.tensor([0.5, 0.25, 0.8, 0.05, 1.0, 0.5])  # clipped at min_propensity
    torch.testing.assert_close(b.loss(out, batch)["uplift"], (w * per).sum() / w.sum())
    # uniform when the data has no propensity, or when told to ignore it
    plain = F.binary_cross_entropy_with_logits(observed, batch.labels["click"])
    torch.testing.assert_close(branch(propensity="ignore").loss(out, batch)["uplift"], plain)
    batch.propensity = None
    torch.testing.assert_close(b.loss(out, batch)["uplift"], plain)
    with pytest.raises(ValueError, match="propensity"):
        branch(propensity="required").loss(out, batch)


def test_regression_response_task() -> None:
    b = CDUM(8, TASKS, FEATURES, task="watch_time", user_dim=16)
    batch = batch_with_labels()
    batch.labels["watch_time"] = torch.rand(6) * 50
    out = b(encoded(), batch)
    torch.testing.assert_close(out.outputs["response_t0"], torch.expm1(out.state["logits"][:, 0]).clamp_min(0))
    assert b.loss(out, batch)["uplift"] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "share"}, "model.uplift.task 'share' is not in model.tasks"),
        ({"control": 2}, "control must be a treatment id"),
        ({"propensity": "maybe"}, "propensity must be"),
        ({"dim": 30, "num_heads": 4}, "not divisible"),
    ],
)
def test_bad_settings_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        branch(**change)


def test_data_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="num_treatments >= 2"):
        CDUM(8, TASKS, dataclasses.replace(FEATURES, num_treatments=0), user_dim=16)
    with pytest.raises(ValueError, match="request_candidates > 0"):
        CDUM(8, TASKS, dataclasses.replace(FEATURES, request_candidates=0), user_dim=16)
    CDUM(8, TASKS, dataclasses.replace(FEATURES, request_candidates=0), user_dim=16, use_candidates=False)
    b, batch = branch(), batch_with_labels()
    out = b(encoded(), batch)
    batch.treatment = None
    with pytest.raises(ValueError, match="no treatment column"):
        b.loss(out, batch)


def test_candidates_change_the_response() -> None:
    """FIC reads the request's candidates: other request mates, another response (position 0 is the sample)."""
    b, batch = branch(), batch_with_labels()
    b.eval()
    x = encoded()
    with torch.no_grad():
        for tower in b.uplift:
            torch.nn.init.normal_(tower.out.weight)
        before = b(x, batch).outputs["response_t1"]
        batch.request_item_id[:, 1:] = (batch.request_item_id[:, 1:] + 7) % FEATURES.num_items
        after = b(x, batch).outputs["response_t1"]
    several = batch.request_len > 1
    assert torch.all(before[several] != after[several])
    torch.testing.assert_close(before[~several], after[~several])


def test_module_metrics_and_predict_columns() -> None:
    torch.manual_seed(0)
    model = RankingModule(
        TASKS,
        dataclasses.replace(FEATURES, extra_columns=["true_effect"]),
        encoder=partial(HSTUEncoder, dim=16, num_layers=1, num_heads=2),
        heads=partial(MMoE, num_experts=2),
        uplift=partial(CDUM),
    )
    batch = batch_with_labels()
    batch.extras = {"true_effect": torch.rand(6) * 0.2}
    encoded_, head_out = model(batch)
    assert "loss/uplift" in model.losses(encoded_, head_out, batch)
    metrics = model.branch_metrics["val"]["uplift"]
    for seed in range(3):
        b = batch_with_labels(seed=seed)
        b.extras = {"true_effect": torch.rand(6) * 0.2}
        metrics.update(model(b)[1].branches["uplift"], b)
    values = metrics.compute()
    assert {"auuc", "qini", "uplift_at_k", "auc", "pehe"} <= set(values)
    assert 0 <= float(values["pehe"]) < 1
    preds = model.predict_step(batch, 0)
    assert {"uplift_response_t0", "uplift_response_t1", "uplift_effect_t1"} <= set(preds)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def test_predicted_effect_correlates_with_the_true_effect(tmp_path) -> None:
    """Planted treatment: click logit + (1.0, 0.4, 0.0, -0.6) by user segment; a short CPU run finds it."""
    cfg = SynthConfig(
        num_users=1200, num_items=500, num_categories=20, history_mean=60, samples_per_user=50, max_len=32, seed=2
    )
    features = dataclasses.replace(cfg.features(), request_candidates=8)
    tasks = [t for t in cfg.tasks() if t.name in ("click", "like")]
    L.seed_everything(0)
    data = RankingDataModule(str(tmp_path), features=features, tasks=tasks, synth=cfg, batch_size=256)
    model = small_model(tasks, features, uplift=partial(CDUM))
    trainer = quiet_trainer()
    trainer.fit(model, data)
    metrics = trainer.validate(model, data, verbose=False)[0]
    predictions = trainer.predict(model, data.val_dataloader())
    effect = torch.cat([p["uplift_effect_t1"] for p in predictions]).numpy()
    index = torch.cat([p["sample_index"] for p in predictions]).numpy()
    true = pq.read_table(tmp_path / "val.parquet", columns=["true_effect"]).column(0).to_numpy()[index]
    rho = spearman(effect, true)
    print(f"Spearman {rho:.3f}; AUUC {metrics['val/uplift/auuc']:.4f}, Qini {metrics['val/uplift/qini']:.4f}, "
          f"PEHE {metrics.get('val/uplift/pehe', math.nan):.4f}")  # fmt: skip
    assert rho > 0.3
    assert metrics["val/uplift/auuc"] > 0


def test_config_with_both_branches_trains(tmp_path) -> None:
    """configs/uplift_fatigue.yaml: HoME, FRec and CDUM on, a few steps through the CLI, predictions written."""
    data_dir = tmp_path / "data"
    args = [
        "--config", str(ROOT / "configs" / "uplift_fatigue.yaml"),
        "--data.data_dir", str(data_dir),
        "--data.synth.num_users", "60", "--data.synth.samples_per_user", "20",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--data.batch_size", "64",
    ]  # fmt: skip
    assert cli_main(["fit", *args]) == 0
    out = tmp_path / "pred.parquet"
    predict_args = [a for a in args if a not in ("--trainer.max_epochs", "1")]
    predict_args += ["--trainer.limit_predict_batches", "2", "--predict_output", str(out)]
    assert cli_main(["predict", *predict_args]) == 0
    columns = pq.read_schema(out).names
    assert {"click", "uplift_response_t0", "uplift_response_t1", "uplift_effect_t1", "fatigue_score"} <= set(columns)


def test_schema_refuses_data_without_treatment(tmp_path) -> None:
    cfg = SynthConfig(num_users=30, num_items=40, num_categories=5, samples_per_user=10, max_len=16)
    data = RankingDataModule(str(tmp_path), features=FEATURES, tasks=TASKS, synth=cfg, batch_size=32)
    data.prepare_data()
    table = pq.read_table(tmp_path / "train.parquet").drop_columns(["treatment"])
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(Exception, match="treatment"):
        data.setup("fit")
