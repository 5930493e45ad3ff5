"""Expert balance monitoring (`mtrank.balance`): the statistics on hand-built gates and activations, their
accumulation across batches and processes, the offline W&B reader, and the callback on a tiny real run
with a CSV and an offline W&B logger."""

from __future__ import annotations

import csv
import json
import math
import struct
import zlib
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.loggers import CSVLogger

from encoders import HSTUEncoder
from heads import MMoE
from heads.base import ExpertSpec, GateSpec, MultiTaskHead
from mtrank.balance import BalanceAccumulator, ExpertBalanceMonitor, read_offline_wandb_history, render_heatmap
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.synth import SynthConfig
from mtrank.module import RankingModule
from mtrank.spec import TaskSpec

SHARED4 = {f"expert_{i}": ExpertSpec() for i in range(4)}


def mmoe_layout(tasks: tuple[str, ...] = ("a", "b")) -> dict[str, GateSpec]:
    return {t: GateSpec(tuple(SHARED4), task=t) for t in tasks}


def home_layout() -> tuple[dict[str, GateSpec], dict[str, ExpertSpec]]:
    """Two levels, HoME-like: level 0 shared + group experts under non-task gates, level 1 shared + task
    experts under task gates."""
    experts = {
        "l0/shared/0": ExpertSpec("shared"),
        "l0/shared/1": ExpertSpec("shared"),
        "l0/engagement/0": ExpertSpec("group", "engagement"),
        "l1/shared/0": ExpertSpec("shared", level=1),
        "l1/click/0": ExpertSpec("task", "click", level=1),
        "l1/like/0": ExpertSpec("task", "like", level=1),
    }
    gates = {
        "meta/engagement": GateSpec(("l0/shared/0", "l0/shared/1", "l0/engagement/0"), group="engagement"),
        "l0/shared": GateSpec(("l0/shared/0", "l0/shared/1")),
        "task/click": GateSpec(("l1/shared/0", "l1/click/0"), task="click", group="engagement", level=1),
        "task/like": GateSpec(("l1/shared/0", "l1/like/0"), task="like", group="engagement", level=1),
    }
    return gates, experts


def rows(*weights: list[float], repeat: int = 1) -> torch.Tensor:
    return torch.tensor(weights, dtype=torch.float32).repeat(repeat, 1)


# ==================================================================================== statistics
def test_uniform_gate_has_entropy_one_cv_zero_and_one_hot_entropy_zero() -> None:
    acc = BalanceAccumulator(mmoe_layout(), SHARED4, bins=20)
    acc.update({"a": torch.full((6, 4), 0.25), "b": torch.eye(4).repeat(3, 1)})
    stats = acc.compute()
    a, b = stats.gates["a"], stats.gates["b"]
    assert a.samples == 6 and b.samples == 12
    assert a.entropy == pytest.approx(1.0, abs=1e-12) and a.usage_cv == pytest.approx(0.0, abs=1e-12)
    assert a.mean_weights == pytest.approx([0.25] * 4)
    assert b.entropy == 0.0  # one-hot: every sample routes to one expert ...
    assert b.usage_cv == pytest.approx(0.0, abs=1e-12)  # ... but to a different one each: balanced usage
    # histograms over [0, 1] in 20 bins: 0.25 -> bin 5; one-hot -> 36 zeros in bin 0, 12 ones in the last bin
    assert a.hist == [24 if i == 5 else 0 for i in range(20)]
    assert b.hist[0] == 36 and b.hist[-1] == 12 and sum(b.hist) == 48
    assert stats.bin_edges[0] == 0.0 and stats.bin_edges[-1] == 1.0 and len(stats.bin_edges) == 21


def test_known_mean_weights_entropy_and_cv() -> None:
    acc = BalanceAccumulator(mmoe_layout(("a",)), SHARED4, bins=4)
    w = rows([0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1])
    acc.update({"a": w})
    g = acc.compute().gates["a"]
    assert g.mean_weights == pytest.approx([0.4, 0.4, 0.1, 0.1])
    # population std of (.4, .4, .1, .1) is .15 around a mean of .25
    assert g.usage_cv == pytest.approx(0.6)
    per_row = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1)) / math.log(4)
    assert g.entropy == pytest.approx(per_row, rel=1e-6)
    assert g.hist == [6, 0, 2, 0]  # bins of width .25
    # a gate collapsed onto one expert: cv = sqrt(E - 1)
    acc.reset()
    acc.update({"a": rows([1.0, 0.0, 0.0, 0.0], repeat=5)})
    g = acc.compute().gates["a"]
    assert g.usage_cv == pytest.approx(math.sqrt(3)) and g.entropy == 0.0 and g.samples == 5


def test_single_expert_gate_has_entropy_zero() -> None:
    acc = BalanceAccumulator({"t": GateSpec(("e",), task="t")}, {"e": ExpertSpec()})
    acc.update({"t": torch.ones(3, 1)})
    g = acc.compute().gates["t"]
    assert g.entropy == 0.0 and g.usage_cv == 0.0 and g.mean_weights == [1.0]


def test_degradation_share_one_when_a_task_takes_an_expert_and_half_when_two_split_it() -> None:
    experts = {name: ExpertSpec() for name in ("e0", "e1", "e2")}
    gates = {t: GateSpec(("e0", "e1", "e2"), task=t) for t in ("a", "b")}
    acc = BalanceAccumulator(gates, experts)
    acc.update({"a": rows([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]), "b": rows([0.0, 0.5, 0.5], [0.0, 0.5, 0.5])})
    deg = acc.compute().degradation
    assert deg["e0"].by == "task" and deg["e0"].top == "a" and deg["e0"].top_share == pytest.approx(1.0)
    assert deg["e1"].top == "b" and deg["e1"].top_share == pytest.approx(1.0)
    assert deg["e2"].masses == pytest.approx({"a": 0.5, "b": 0.5}) and deg["e2"].top_share == pytest.approx(0.5)


def test_home_layout_own_vs_shared_mass_degradation_by_gate_and_matrix() -> None:
    gates, experts = home_layout()
    acc = BalanceAccumulator(gates, experts, tasks=["click", "like"])
    acc.update(
        {
            "meta/engagement": rows([0.6, 0.2, 0.2], [0.6, 0.2, 0.2]),
            "l0/shared": rows([0.2, 0.8], [0.2, 0.8]),
            "task/click": rows([0.9, 0.1], [0.7, 0.3]),  # click: 20 % on its own expert
            "task/like": rows([0.2, 0.8], [0.4, 0.6]),  # like: 70 % on its own expert
        }
    )
    stats = acc.compute(sparse={"click": False, "like": True})
    click, like = stats.tasks["click"], stats.tasks["like"]
    assert click.gate == "task/click" and click.own_experts == ["l1/click/0"]
    assert click.own_mass == pytest.approx(0.2) and click.shared_mass == pytest.approx(0.8)
    assert like.own_mass == pytest.approx(0.7) and like.shared_mass == pytest.approx(0.3)
    assert (click.sparse, like.sparse) == (False, True)
    assert click.positive_rate is None
    # level-1 shared expert: seen by two task gates -> by task; .8 of its mass from click
    assert stats.degradation["l1/shared/0"].by == "task"
    assert stats.degradation["l1/shared/0"].top == "click"
    assert stats.degradation["l1/shared/0"].top_share == pytest.approx(0.8 / (0.8 + 0.3))
    # level-0 shared experts: seen only by two non-task gates -> by gate
    share = stats.degradation["l0/shared/1"]
    assert share.by == "gate" and share.top == "l0/shared" and share.top_share == pytest.approx(0.8 / 1.0)
    assert stats.degradation["l0/shared/0"].top == "meta/engagement"
    # experts with one consumer have no entry
    assert set(stats.degradation) == {"l0/shared/0", "l0/shared/1", "l1/shared/0"}

    assert stats.matrix_rows == ["task/click", "task/like", "meta/engagement", "l0/shared"]
    assert stats.matrix_cols == list(experts)
    for i, gate in enumerate(stats.matrix_rows):
        for j, expert in enumerate(stats.matrix_cols):
            cell = stats.matrix[i][j]
            assert math.isnan(cell) == (expert not in gates[gate].experts), (gate, expert)
    assert stats.matrix[0][stats.matrix_cols.index("l1/click/0")] == pytest.approx(0.2)
    # the task order decides the order of the task rows
    other = BalanceAccumulator(gates, experts, tasks=["like", "click"])
    assert other.matrix_rows() == ["task/like", "task/click", "meta/engagement", "l0/shared"]

    as_json = json.loads(json.dumps(stats.to_dict(), allow_nan=False))  # strict JSON: NaN cells -> null
    assert as_json["matrix"][0][0] is None and as_json["tasks"]["like"]["sparse"] is True
    scalars = stats.scalars("balance/val")
    assert scalars["balance/val/task/click/own_mass"] == pytest.approx(0.2)
    assert scalars["balance/val/gate/meta/engagement/weight/l0/engagement/0"] == pytest.approx(0.2)
    assert scalars["balance/val/expert/l1/shared/0/top_share"] == pytest.approx(0.8 / 1.1)
    assert scalars["balance/val/task/like/sparse"] == 1.0
    assert not any("/hist/" in k for k in scalars)


def test_expert_zero_fraction_mean_and_std() -> None:
    acc = BalanceAccumulator(mmoe_layout(("a",)), SHARED4, zero_eps=1e-3)
    a = torch.tensor([[0.0, 5e-4, -2e-3], [1.0, 2.0, -3.0]])
    acc.update(experts={"expert_0": a})
    x = acc.compute().experts["expert_0"]
    assert x.elements == 6 and x.zero_frac == pytest.approx(2 / 6)
    assert x.mean == pytest.approx(a.double().mean().item())
    assert x.std == pytest.approx(a.double().std(unbiased=False).item())
    assert x.kind == "shared" and x.owner is None
    assert math.isnan(acc.compute().experts["expert_1"].mean)  # never seen


def random_batch(generator: torch.Generator, batch: int) -> tuple[dict, dict, dict]:
    gates = {t: torch.softmax(3 * torch.randn(batch, 4, generator=generator), -1) for t in ("a", "b")}
    experts = {e: torch.relu(torch.randn(batch, 8, generator=generator)) for e in SHARED4}
    labels = {"a": (torch.rand(batch, generator=generator) < 0.1).float()}
    return gates, experts, labels


def assert_same_stats(x: dict, y: dict) -> None:
    flat_x, flat_y = _flatten(x), _flatten(y)
    assert flat_x.keys() == flat_y.keys()
    for key, value in flat_x.items():
        if isinstance(value, float):
            assert value == pytest.approx(flat_y[key], rel=1e-9, abs=1e-12), key
        else:
            assert value == flat_y[key], key


def _flatten(value: object, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def test_two_batches_accumulate_to_the_concatenated_batch_and_states_add_across_processes() -> None:
    generator = torch.Generator().manual_seed(0)
    first, second = random_batch(generator, 7), random_batch(generator, 13)
    make = partial(BalanceAccumulator, mmoe_layout(), SHARED4, 1e-3, 20, label_names=["a"])

    streamed = make()
    streamed.update(*first)
    streamed.update(*second)
    whole = make()
    whole.update(*({k: torch.cat([first[i][k], second[i][k]]) for k in first[i]} for i in range(3)))
    assert_same_stats(streamed.compute().to_dict(), whole.compute().to_dict())
    assert streamed.positive_rates()["a"] == pytest.approx(whole.positive_rates()["a"])

    # two "processes": merge, and a summing collective over the packed state, give the same
    one, two = make(), make()
    one.update(*first)
    two.update(*second)
    merged = make()
    merged.merge(one)
    merged.merge(two.state())
    assert_same_stats(merged.compute().to_dict(), whole.compute().to_dict())
    flat_two = two.flat()
    one.sync(lambda t: t + flat_two)  # what trainer.strategy.reduce(t, reduce_op="sum") does on 2 ranks
    assert_same_stats(one.compute().to_dict(), whole.compute().to_dict())
    one.reset()
    assert all((v == 0).all() for v in one.state().values())
    restored = make()
    restored.load_state(merged.state())
    assert_same_stats(restored.compute().to_dict(), whole.compute().to_dict())


def test_accumulator_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        BalanceAccumulator({}, SHARED4)
    with pytest.raises(ValueError, match="unknown experts"):
        BalanceAccumulator({"a": GateSpec(("nope",), task="a")}, SHARED4)
    acc = BalanceAccumulator(mmoe_layout(("a",)), SHARED4)
    with pytest.raises(KeyError, match="gate 'z'"):
        acc.update({"z": torch.full((2, 4), 0.25)})
    with pytest.raises(ValueError, match="3 columns"):
        acc.update({"a": torch.full((2, 3), 1 / 3)})


def test_monitor_refuses_a_head_without_gates_naming_it() -> None:
    class Gateless(MultiTaskHead):
        pass

    module = torch.nn.Module()
    module.heads = Gateless(8, [TaskSpec("click")])
    module.tasks = [TaskSpec("click")]
    with pytest.raises(ValueError, match="Gateless"):
        ExpertBalanceMonitor().setup(None, module, "fit")  # type: ignore[arg-type]


def test_heatmap_renders_nan_cells_grey() -> None:
    image = render_heatmap([[0.5, float("nan")], [0.0, 1.0]], ["task/click", "meta/x"], ["e0", "e1"])
    assert image.mode == "RGB" and image.width > 60 and image.height > 40
    assert (170, 170, 170) in {c for _, c in image.getcolors(1 << 16)}


# ==================================================================================== offline W&B reader
def _leveldb_log(records: list[bytes]) -> bytes:
    """W&B's transaction-log format, written by hand (records split across 32 KiB blocks)."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))

    def put(kind: int, chunk: bytes) -> None:
        out.extend(struct.pack("<IHB", zlib.crc32(chunk, zlib.crc32(bytes([kind]))), len(chunk), kind) + chunk)

    for data in records:
        first = True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out.extend(b"\0" * left)
                continue
            room = left - 7
            if len(data) <= room:
                put(1 if first else 4, data)
                break
            put(2 if first else 3, data[:room])
            data, first = data[room:], False
    return bytes(out)


def test_read_offline_wandb_history_decodes_records_spanning_blocks(tmp_path: Path) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    def history(step: int, **values: object) -> bytes:
        record = pb.Record()
        for key, value in values.items():
            item = record.history.item.add()
            item.nested_key.extend(key.split("."))
            item.value_json = json.dumps(value)
        record.history.item.add(nested_key=["_step"], value_json=str(step))
        return record.SerializeToString()

    big = {f"balance/val/gate/g{i}/entropy": i / 1000 for i in range(2500)}  # ~100 kB: FIRST, MIDDLE, LAST
    other = pb.Record()
    other.summary.SetInParent()
    raw = [history(0, **{"a/b": 1.5}), other.SerializeToString(), history(1, **{"h._type": "histogram"})]
    raw.append(pb.Record(history=pb.HistoryRecord(item=[pb.HistoryItem(key=k, value_json=json.dumps(v))
                                                        for k, v in big.items()])).SerializeToString())  # fmt: skip
    raw.append(history(3, x=[1, 2]))
    run = tmp_path / "offline-run-x"
    run.mkdir()
    (run / "run-x.wandb").write_bytes(_leveldb_log(raw) + b"\x01\x02\x03")  # a torn tail is ignored
    rows_ = read_offline_wandb_history(run)
    assert len(rows_) == 4
    assert rows_[0] == {"a/b": 1.5, "_step": 0}
    assert rows_[1] == {"h": {"_type": "histogram"}, "_step": 1}
    assert rows_[2] == big
    assert rows_[3] == {"x": [1, 2], "_step": 3}
    with pytest.raises(FileNotFoundError):
        read_offline_wandb_history(tmp_path)


# ==================================================================================== tiny real run
SYNTH = SynthConfig(num_users=60, num_items=50, history_mean=12, samples_per_user=20, max_len=8, seed=7)


def test_monitor_on_a_tiny_run_logs_to_csv_json_and_offline_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from mtrank.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    L.seed_everything(0)
    data = RankingDataModule(str(tmp_path / "data"), synth=SYNTH, batch_size=64, num_workers=0, prefetch=0)
    model = RankingModule(
        SYNTH.tasks(),
        SYNTH.features(),
        encoder=partial(HSTUEncoder, dim=16, num_layers=1, num_heads=1),
        heads=partial(MMoE, num_experts=3, expert_dims=(16,), tower_dims=(8,)),
    )
    monitor = ExpertBalanceMonitor(every_n_steps=2, bins=10)
    wandb_logger = WandbLogger(project="balance-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=4,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
        logger=[CSVLogger(str(tmp_path), name="csv"), wandb_logger],
        callbacks=[monitor],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=data)
    wandb.finish()
    assert not model.heads._forward_hooks  # the hook is gone after fit

    # JSON and CSV next to the CSV logger's metrics (trainer.log_dir); the sanity check left no record
    out_dir = Path(trainer.log_dir)
    summary = json.loads((out_dir / "expert_balance.json").read_text())
    stages = [(r["stage"], r["step"]) for r in summary["records"]]
    assert stages == [("train", 0), ("val", 2), ("train", 2), ("val", 4)]
    last = summary["last_val"]
    assert last == summary["records"][-1]["stats"]
    assert set(last["gates"]) == {t.name for t in SYNTH.tasks()}
    assert last["matrix_cols"] == ["expert_0", "expert_1", "expert_2"]
    for gate in last["gates"].values():
        assert sum(gate["mean_weights"]) == pytest.approx(1.0, abs=1e-5) and 0 <= gate["entropy"] <= 1
        assert sum(gate["hist"]) == gate["samples"] * 3
    assert last["gates"]["click"]["samples"] == sum(len(b.item_id) for b in _val_batches(data, 2))
    for task in ("click", "like", "follow", "long_view"):  # binary: a measured positive rate decides `sparse`
        rate = last["tasks"][task]["positive_rate"]
        assert 0 <= rate <= 1 and last["tasks"][task]["sparse"] == (rate < 0.05)
    assert last["tasks"]["watch_time"]["sparse"] is False
    assert summary["records"][0]["stats"]["tasks"]["click"]["sparse"] is None  # before any validation
    with (out_dir / "expert_balance.csv").open() as f:
        long = list(csv.DictReader(f))
    assert {"stage", "step", "epoch", "kind", "name", "stat", "value"} == set(long[0])
    assert {"train", "val"} == {r["stage"] for r in long}
    entropy = [r for r in long if (r["stage"], r["step"], r["name"], r["stat"]) == ("val", "4", "click", "entropy")]
    assert float(entropy[0]["value"]) == pytest.approx(last["gates"]["click"]["entropy"])

    # the CSV logger got the scalars
    (metrics_file,) = (tmp_path / "csv").glob("version_*/metrics.csv")
    with metrics_file.open() as f:
        columns = set(next(csv.reader(f)))
    for key in (
        "balance/val/gate/click/entropy",
        "balance/val/gate/click/usage_cv",
        "balance/val/gate/click/weight/expert_0",
        "balance/val/expert/expert_0/zero_frac",
        "balance/val/expert/expert_1/top_share",
        "balance/val/task/like/shared_mass",
        "balance/train/gate/follow/entropy",
    ):
        assert key in columns, key

    # the offline W&B run itself holds the scalars, the heatmap, the table and the histograms
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = read_offline_wandb_history(run_dir)
    val_rows = [row for row in history if "balance/val/heatmap" in row]
    assert [row["trainer/global_step"] for row in val_rows] == [2, 4]
    row = val_rows[-1]
    assert row["balance/val/heatmap"]["_type"] == "image-file"
    assert row["balance/val/gate_weights"]["_type"] == "table-file"
    assert row["balance/val/hist/click"]["_type"] == "histogram" and len(row["balance/val/hist/click"]["bins"]) == 11
    assert row["balance/val/gate/click/entropy"] == pytest.approx(last["gates"]["click"]["entropy"])
    assert any("balance/train/hist/like" in r and "balance/train/gate/like/entropy" in r for r in history)
    logs = "".join(p.read_text(errors="replace") for p in run_dir.glob("logs/*.log"))
    assert "monotonically" not in logs


def _val_batches(data: RankingDataModule, limit: int) -> list:
    return [batch for i, batch in zip(range(limit), data.val_dataloader(), strict=False)]


@pytest.mark.slow
def test_validation_statistics_summed_over_two_processes_equal_one_process(tmp_path: Path) -> None:
    """Real DDP (2 gloo processes, each validating its shard): the summed accumulator gives the
    single-process statistics; a stand-alone ``validate`` writes the JSON too."""
    L.seed_everything(0)
    data = RankingDataModule(str(tmp_path / "data"), synth=SYNTH, batch_size=64, num_workers=0, prefetch=0)
    data.prepare_data()
    model = RankingModule(
        SYNTH.tasks(),
        SYNTH.features(),
        encoder=partial(HSTUEncoder, dim=16, num_layers=1, num_heads=1),
        heads=partial(MMoE, num_experts=3, expert_dims=(16,), tower_dims=(8,)),
    )
    last = {}
    for devices in (2, 1):
        out_dir = tmp_path / f"devices{devices}"
        quiet_trainer(devices, callbacks=[ExpertBalanceMonitor(output_dir=str(out_dir))]).validate(
            model, datamodule=data, verbose=False
        )
        last[devices] = json.loads((out_dir / "expert_balance.json").read_text())["last_val"]
    assert last[1]["gates"]["click"]["samples"] == len(data.dataset("val"))
    assert_same_stats(last[2], last[1])
