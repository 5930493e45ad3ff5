"""Labels, propensities and extras stay exact float32 under precisions that cast the batch to bf16."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, MixedPrecision, Precision
from torch.utils.data import DataLoader

from encoders import HSTUEncoder
from heads import MMoE
from mtrank.batch import Batch
from mtrank.data.synth import SynthConfig, random_batch
from mtrank.module import RankingModule
from mtrank.precision import EXACT_FIELDS, keep_batch_exact

SYNTH = SynthConfig(num_users=20, num_items=30, history_mean=6, samples_per_user=4, max_len=8, seed=3)
EXACT_VALUES = torch.tensor([1234.5, 0.3337, 7.0001, 86_399.25])  # none of them is a bf16 number


def batch_with_exact_values() -> Batch:
    batch = random_batch(SYNTH.features(), history_len=[3, 0, 8, 5], seed=0)
    for task in SYNTH.tasks():
        batch.labels[task.label] = EXACT_VALUES.clone()
    batch.propensity = EXACT_VALUES.clone()
    batch.extras = {"score": EXACT_VALUES.clone()}
    return batch


def test_exact_values_are_not_bf16_numbers() -> None:
    assert not torch.equal(EXACT_VALUES.bfloat16().float(), EXACT_VALUES)  # else the test below proves nothing


@pytest.mark.parametrize("plugin", [DeepSpeedPrecision("bf16-mixed"), DeepSpeedPrecision("16-mixed")], ids=str)
def test_deepspeed_precision_keeps_exact_fields_and_casts_inputs(plugin: Precision) -> None:
    batch = batch_with_exact_values()
    raw = plugin.convert_input(batch_with_exact_values())
    assert raw.labels["click"].dtype != torch.float32  # Lightning alone casts the labels
    assert keep_batch_exact(plugin) is True
    assert keep_batch_exact(plugin) is True  # idempotent: wrapped once
    out = plugin.convert_input(batch)
    for name in EXACT_FIELDS:
        before, after = getattr(batch, name), getattr(out, name)
        pairs = before.items() if isinstance(before, dict) else [(name, before)]
        for key, value in pairs:
            got = after[key] if isinstance(after, dict) else after
            assert got.dtype == torch.float32 and torch.equal(got, value), (name, key)
    dtype = torch.bfloat16 if plugin.precision == "bf16-mixed" else torch.float16
    assert all(t.dtype == dtype for t in out.history_dense.values())  # model inputs are still converted
    assert all(t.dtype == dtype for t in out.item_dense.values())
    assert torch.equal(out.history_item_id, batch.history_item_id)  # integers untouched
    assert plugin.convert_input([1.5, "x"]) == [1.5, "x"]  # non-batches go to Lightning's conversion


def test_plugins_that_do_not_convert_are_left_alone() -> None:
    for plugin in (Precision(), MixedPrecision("bf16-mixed", "cpu")):
        assert keep_batch_exact(plugin) is False
        assert "convert_input" not in vars(plugin)


class RecordLabels(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[torch.dtype, torch.dtype, dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Batch, idx: int) -> None:
        dense = next(iter(batch.history_dense.values()))
        self.seen.append((batch.labels["watch_time"].dtype, dense.dtype, dict(batch.labels)))


def test_bf16_true_training_sees_exact_labels(tmp_path) -> None:
    """A real Trainer with a casting precision (``bf16-true``, Lightning's HalfPrecision: the same
    ``convert_input`` path as DeepSpeed's, and available on the CPU): the step gets float32 labels."""
    L.seed_everything(0)
    batches = [batch_with_exact_values() for _ in range(2)]
    model = RankingModule(
        SYNTH.tasks(), SYNTH.features(), encoder=partial(HSTUEncoder, dim=16, num_heads=1), heads=partial(MMoE)
    )
    record = RecordLabels()
    quiet_trainer(precision="bf16-true", max_epochs=1, callbacks=[record], default_root_dir=str(tmp_path)).fit(
        model, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    )
    assert len(record.seen) == 2
    for label_dtype, dense_dtype, labels in record.seen:
        assert label_dtype == torch.float32 and dense_dtype == torch.bfloat16
        assert all(torch.equal(v, EXACT_VALUES) for v in labels.values())


MODELS = {
    "hstu+mmoe": ("HSTUEncoder", "MMoE"),
    "hstu+home": ("HSTUEncoder", "HoME"),
    "hstu+ple": ("HSTUEncoder", "PLE"),
    "longer+mmoe": ("LongerEncoder", "MMoE"),
    "ultra+mmoe": ("UltraHSTUEncoder", "MMoE"),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_trains_with_bf16_weights(model: str) -> None:
    """DeepSpeed's bf16 (and ``bf16-true``) hold the weights in bf16 and hand the model a bf16-cast
    batch: every encoder, head and both branches must run forward and backward so, losses in float32."""
    import encoders
    import heads

    encoder_name, heads_name = MODELS[model]
    features = SYNTH.features()
    features.request_candidates = 3
    module = RankingModule(
        SYNTH.tasks(),
        features,
        encoder=partial(getattr(encoders, encoder_name), dim=16),
        heads=partial(getattr(heads, heads_name)),
        fatigue=partial(heads.FRec, recent=4),
        uplift=partial(heads.CDUM),
    ).bfloat16()
    batch = random_batch(features, history_len=[3, 0, 8, 5], seed=0)
    for task in SYNTH.tasks():
        batch.labels[task.label] = torch.rand(4)
    batch.treatment, batch.request_id = torch.tensor([0, 1, 0, 1]), torch.arange(4)
    plugin = DeepSpeedPrecision("bf16-mixed")
    keep_batch_exact(plugin)
    batch = plugin.convert_input(batch)
    encoded, head_out = module(batch)
    losses = module.losses(encoded, head_out, batch)
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
