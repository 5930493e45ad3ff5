"""PLE and HoME heads: shapes and layout, the hierarchy's exactness, HoME's four switches, errors,
balance loss, learning a planted signal, and a few training batches from configs/ple.yaml and
configs/home.yaml."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from encoders.base import EncoderOutput
from heads import PLE, BalanceLoss, FeatureGate, HeadOutput, HoME, HoMEExpert, MultiTaskHead, SelfGate
from heads.base import GateSpec
from mtrank.batch import Batch
from mtrank.cli import main
from mtrank.data.synth import SynthConfig
from mtrank.spec import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
TASKS = [
    TaskSpec(name="click", group="engagement"),
    TaskSpec(name="like", group="engagement"),
    TaskSpec(name="watch.time", kind="regression", group="consumption"),
]
D, H = 16, 8
SMALL = {"expert_dims": (16, H), "tower_dims": (8,)}

HEADS: dict[str, Callable[[], MultiTaskHead]] = {
    "ple": lambda: PLE(D, TASKS, num_levels=3, **SMALL),
    "home": lambda: HoME(D, TASKS, **SMALL),
    "home-no-norm": lambda: HoME(D, TASKS, expert_norm=False, **SMALL),
    "home-flat": lambda: HoME(D, TASKS, hierarchy_mask=False, **SMALL),
    "home-no-feature-gate": lambda: HoME(D, TASKS, feature_gate=False, **SMALL),
    "home-no-self-gate": lambda: HoME(D, TASKS, self_gate=False, **SMALL),
    "home-all-off": lambda: HoME(
        D, TASKS, expert_norm=False, hierarchy_mask=False, feature_gate=False, self_gate=False, **SMALL
    ),
}


def make_batch(B: int) -> Batch:
    """A minimal `Batch` (heads read nothing from it but must accept it)."""
    zeros = torch.zeros(B, dtype=torch.int64)
    empty = torch.zeros(B, 0, dtype=torch.int64)
    return Batch(
        sample_index=torch.arange(B), user_id=zeros, item_id=zeros, ts=zeros, history_len=zeros,
        history_item_id=empty, history_ts=empty,
    )  # fmt: skip


def run(head: MultiTaskHead, x: torch.Tensor) -> HeadOutput:
    return head(EncoderOutput(target=x), make_batch(x.shape[0]))


# ----------------------------------------------------------------------------- shapes and layout
@pytest.mark.parametrize("kind", list(HEADS))
def test_shapes_gates_experts_and_backward(kind: str) -> None:
    torch.manual_seed(0)
    head = HEADS[kind]()
    out = run(head, torch.randn(5, D))
    assert set(out.logits) == {t.name for t in TASKS}
    assert all(v.shape == (5,) for v in out.logits.values())
    assert set(out.gates) == set(head.gate_specs) and set(out.experts) == set(head.expert_specs)
    for name, g in out.gates.items():
        spec = head.gate_specs[name]
        assert g.shape == (5, len(spec.experts)) and g.dtype == torch.float32, name
        assert torch.all(g >= 0) and torch.allclose(g.sum(-1), torch.ones(5)), name
        assert head.gate(name).out_features == len(spec.experts) == len(set(spec.experts)), name
    assert all(e.shape == (5, H) for e in out.experts.values())
    assert out.aux_loss is None
    sum(v.sum() for v in out.logits.values()).backward()
    unused = [n for n, p in head.named_parameters() if p.grad is None]
    assert not unused, unused  # every part is wired into the outputs
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_ple_level_structure() -> None:
    head = PLE(D, TASKS, num_levels=3, num_shared_experts=2, num_task_experts=2, **SMALL)
    tasks = [t.name for t in TASKS]
    expected = {f"l{level}/{t}" for level in range(3) for t in tasks} | {"l0/shared", "l1/shared"}
    assert set(head.gate_specs) == expected  # no shared gate at the last level: nothing would read it
    for level in range(3):
        shared = tuple(f"l{level}/shared/{i}" for i in range(2))
        for task in TASKS:
            spec = head.gate_specs[f"l{level}/{task.name}"]
            own = (f"l{level}/{task.name}/0", f"l{level}/{task.name}/1")
            assert spec == GateSpec(own + shared, task=task.name, group=task.group, level=level)
            for name in own:
                assert head.expert_specs[name].kind == "task" and head.expert_specs[name].owner == task.name
                assert head.expert_specs[name].level == level
        for name in shared:
            assert head.expert_specs[name].kind == "shared" and head.expert_specs[name].level == level
        # experts read x (width D) at level 0, the previous level's mixture (width H) above
        assert head.expert(shared[0])[0].in_features == (D if level == 0 else H)
    shared_gate = head.gate_specs["l1/shared"]
    assert shared_gate.task is None and shared_gate.level == 1
    assert set(shared_gate.experts) == {n for n, s in head.expert_specs.items() if s.level == 1}
    assert head.balanced_gates == tuple(n for n in head.gate_specs if n.split("/")[1] != "shared")


def test_ple_paths_are_separate() -> None:
    """A level-0 task expert of ``like`` reaches ``click`` only through the shared path."""
    torch.manual_seed(0)
    head = PLE(D, TASKS, num_levels=2, **SMALL).eval()
    x = torch.randn(6, D)
    mix0, gates0, experts0 = head.route(x)
    with torch.no_grad():
        for p in head.expert("l0/like/0").parameters():
            p.add_(torch.randn_like(p))
    mix1, gates1, experts1 = head.route(x)
    assert torch.equal(mix0["l0/click"], mix1["l0/click"])
    assert torch.equal(experts0["l1/click/0"], experts1["l1/click/0"])
    assert torch.equal(gates0["l1/click"], gates1["l1/click"])
    assert not torch.allclose(mix0["l0/like"], mix1["l0/like"])
    assert not torch.allclose(mix0["l0/shared"], mix1["l0/shared"])
    assert not torch.allclose(experts0["l1/shared/0"], experts1["l1/shared/0"])


def test_ple_refuses_a_task_named_shared() -> None:
    with pytest.raises(ValueError, match=r"model\.tasks\[1\]\.name 'shared'"):
        PLE(D, [TaskSpec(name="click"), TaskSpec(name="shared")])
    with pytest.raises(ValueError, match=r"model\.tasks\[0\]\.name 'shared'"):
        HoME(D, [TaskSpec(name="shared")], hierarchy_mask=False)


# ----------------------------------------------------------------------------- HoME hierarchy
def allowed_experts(head: HoME, spec: GateSpec) -> set[str]:
    """The experts HoME's hierarchy lets a gate weigh, from the expert specs alone."""
    group = {t.name: t.group for t in TASKS}
    out = set()
    for name, e in head.expert_specs.items():
        if e.level != spec.level:
            continue
        if spec.task is not None:  # a task gate: shared, its group's and its own experts of its level
            ok = e.kind == "shared" or e.owner == spec.task or (e.kind == "group" and e.owner == group[spec.task])
        elif spec.group is not None:  # a meta group gate: meta shared and that group's meta experts
            ok = e.kind == "shared" or e.owner == spec.group
        else:  # the meta shared gate: every meta expert
            ok = True
        if ok:
            out.add(name)
    return out


def test_home_gates_weigh_exactly_the_experts_of_their_branch() -> None:
    head = HoME(D, TASKS, meta_shared_experts=2, meta_group_experts=2, task_shared_experts=1, **SMALL)
    assert set(head.gate_specs) == {
        "meta/engagement", "meta/consumption", "meta/shared", "task/click", "task/like", "task/watch.time"
    }  # fmt: skip
    for name, spec in head.gate_specs.items():
        assert set(spec.experts) == allowed_experts(head, spec), name
        assert head.gate(name).out_features == len(spec.experts), name  # no masked columns
    assert head.gate_specs["meta/consumption"].experts == (
        "meta/shared/0", "meta/shared/1", "meta/consumption/0", "meta/consumption/1"
    )  # fmt: skip
    assert head.gate_specs["task/watch.time"] == GateSpec(
        ("task/shared/0", "task/consumption/0", "task/watch.time/0"),
        task="watch.time", group="consumption", level=1,
    )  # fmt: skip
    assert head.gate_specs["meta/shared"].task is None and head.gate_specs["meta/shared"].group is None
    kinds = {name: (s.kind, s.owner, s.level) for name, s in head.expert_specs.items()}
    assert kinds["meta/shared/1"] == ("shared", None, 0)
    assert kinds["meta/engagement/1"] == ("group", "engagement", 0)
    assert kinds["task/shared/0"] == ("shared", None, 1)
    assert kinds["task/consumption/0"] == ("group", "consumption", 1)
    assert kinds["task/like/0"] == ("task", "like", 1)
    # every gate with more than one expert is balanced
    assert set(head.balanced_gates) == set(head.gate_specs)


def test_home_hierarchy_is_exact_functionally() -> None:
    """Perturb experts a gate may not see: that gate, its mixture and other branches' tasks do not move."""
    torch.manual_seed(0)
    head = HoME(D, TASKS, **SMALL).eval()  # eval: BatchNorm on running statistics
    x = torch.randn(6, D)

    def snapshot():
        with torch.no_grad():
            mixtures, gates, experts = head.route(x)
            reps = head.represent(x)[0]
            logits = run(head, x).logits
        return mixtures, gates, experts, reps, logits

    def perturb(name: str) -> None:
        with torch.no_grad():
            for p in head.expert(name).parameters():
                p.add_(torch.randn_like(p))

    # the consumption group's meta expert: invisible to the engagement branch below meta/shared
    mix0, gates0, experts0, reps0, _ = snapshot()
    perturb("meta/consumption/0")
    mix1, gates1, experts1, reps1, _ = snapshot()
    assert torch.equal(gates0["meta/engagement"], gates1["meta/engagement"])
    assert torch.equal(mix0["meta/engagement"], mix1["meta/engagement"])
    for name in ("task/click", "task/like"):
        assert torch.equal(gates0[name], gates1[name]), name
    for name in ("task/engagement/0", "task/click/0", "task/like/0"):
        assert torch.equal(experts0[name], experts1[name]), name
    assert not torch.allclose(mix0["meta/consumption"], mix1["meta/consumption"])
    assert not torch.allclose(gates0["task/watch.time"], gates1["task/watch.time"])
    assert not torch.allclose(mix0["meta/shared"], mix1["meta/shared"])  # the shared path sees every meta expert
    # the consumption group's task-layer expert: engagement tasks' mixtures and outputs do not move
    _, gates0, _, reps0, logits0 = snapshot()
    perturb("task/consumption/0")
    _, gates1, _, reps1, logits1 = snapshot()
    for task in ("click", "like"):
        assert torch.equal(reps0[task], reps1[task]) and torch.equal(logits0[task], logits1[task]), task
    assert not torch.allclose(reps0["watch.time"], reps1["watch.time"])
    # like's own expert: click (same group) does not move, like does
    _, _, _, reps0, logits0 = snapshot()
    perturb("task/like/0")
    _, _, _, reps1, logits1 = snapshot()
    assert torch.equal(reps0["click"], reps1["click"]) and torch.equal(logits0["click"], logits1["click"])
    assert torch.equal(reps0["watch.time"], reps1["watch.time"])
    assert not torch.allclose(reps0["like"], reps1["like"])


def test_home_single_task_group_keeps_its_group_experts() -> None:
    head = HoME(D, TASKS, meta_group_experts=1, task_group_experts=2, **SMALL)
    assert "meta/consumption/0" in head.expert_specs
    assert {"task/consumption/0", "task/consumption/1"} <= set(head.gate_specs["task/watch.time"].experts)


# ----------------------------------------------------------------------------- HoME switches
def count(head: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in head.modules())


def test_home_expert_norm_switch() -> None:
    torch.manual_seed(0)
    on = HoME(D, TASKS, **SMALL)
    layers = len(SMALL["expert_dims"])
    assert count(on, nn.BatchNorm1d) == count(on, nn.SiLU) == layers * len(on.expert_specs)
    assert count(on, HoMEExpert) == len(on.expert_specs)
    # eval: running statistics, so a sample's output does not depend on the rest of its batch
    on.eval()
    x = torch.randn(7, D)
    full, alone = run(on, x).logits, run(on, x[2:3]).logits
    for task in full:
        assert torch.allclose(full[task][2:3], alone[task], atol=1e-6), task

    off = HoME(D, TASKS, expert_norm=False, **SMALL)
    assert count(off, nn.BatchNorm1d) == 0 and count(off, nn.SiLU) == 0
    assert count(off, nn.ReLU) >= layers * len(off.expert_specs)


def test_home_hierarchy_switch() -> None:
    head = HoME(D, TASKS, meta_shared_experts=2, task_shared_experts=1, task_experts=2, hierarchy_mask=False, **SMALL)
    shared = tuple(f"task/shared/{i}" for i in range(3))  # meta_shared_experts + task_shared_experts
    assert set(head.expert_specs) == set(shared) | {f"task/{t.name}/{i}" for t in TASKS for i in range(2)}
    assert not any(s.kind == "group" for s in head.expert_specs.values())
    assert all(s.level == 0 for s in (*head.expert_specs.values(), *head.gate_specs.values()))
    assert set(head.gate_specs) == {f"task/{t.name}" for t in TASKS}
    assert head.gate_specs["task/like"] == GateSpec(
        (*shared, "task/like/0", "task/like/1"), task="like", group="engagement", level=0
    )
    assert all(head.expert(name).mlp[0].in_features == D for name in head.expert_specs)  # all read x
    assert isinstance(head.residual, nn.Linear) and (head.residual.in_features, head.residual.out_features) == (D, H)
    # group names only matter in hierarchy mode
    HoME(D, [TaskSpec(name="click", group="shared")], hierarchy_mask=False, **SMALL)


def test_home_feature_gate_switch() -> None:
    torch.manual_seed(0)
    on = HoME(D, TASKS, feature_gate_rank=4, **SMALL)
    assert count(on, FeatureGate) == len(on.expert_specs)  # one view per expert
    for name in on.expert_specs:
        fg = on.expert(name).feature_gate
        v = torch.randn(3, fg.down.in_features)
        assert fg.down.out_features == 4
        assert torch.equal(fg.gate(v), torch.ones_like(v)) and torch.equal(fg(v), v)  # exactly 1 at init
    off = HoME(D, TASKS, feature_gate=False, feature_gate_rank=0, **SMALL)
    assert count(off, FeatureGate) == 0
    assert all(off.expert(name).feature_gate is None for name in off.expert_specs)


@pytest.mark.parametrize("hierarchy_mask", [True, False])
def test_home_self_gate_switch(hierarchy_mask: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, D)
    on = HoME(D, TASKS, hierarchy_mask=hierarchy_mask, **SMALL)
    assert count(on, SelfGate) == len(TASKS)
    mixtures = on.route(x)[0]
    reps = on.represent(x)[0]
    for i, task in enumerate(TASKS):
        v = mixtures[f"meta/{task.group}"] if hierarchy_mask else on.residual(x)
        expected = mixtures[f"task/{task.name}"] + torch.sigmoid(on.self_gates[i].proj(v)) * v
        assert torch.allclose(reps[task.name], expected, atol=1e-6), task.name

    off = HoME(D, TASKS, hierarchy_mask=hierarchy_mask, self_gate=False, **SMALL)
    assert count(off, SelfGate) == 0 and off.self_gates is None and off.residual is None
    mixtures = off.route(x)[0]
    reps = off.represent(x)[0]
    for task in TASKS:
        assert torch.equal(reps[task.name], mixtures[f"task/{task.name}"]), task.name


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: PLE(D, TASKS, num_levels=0), "num_levels"),
        (lambda: PLE(D, TASKS, num_shared_experts=0), "num_shared_experts"),
        (lambda: PLE(D, TASKS, num_task_experts=-1), "num_task_experts"),
        (lambda: PLE(D, TASKS, expert_dims=()), "expert_dims"),
        (lambda: PLE(D, TASKS, balance_loss_weight=-1.0), "balance_loss_weight"),
        (lambda: HoME(D, TASKS, meta_shared_experts=0), "meta_shared_experts"),
        (lambda: HoME(D, TASKS, task_shared_experts=0), "task_shared_experts"),
        (lambda: HoME(D, TASKS, meta_group_experts=-1), "meta_group_experts"),
        (lambda: HoME(D, TASKS, task_group_experts=-1), "task_group_experts"),
        (lambda: HoME(D, TASKS, task_experts=-1), "task_experts"),
        (lambda: HoME(D, TASKS, feature_gate_rank=0), "feature_gate_rank"),
        (lambda: HoME(D, TASKS, balance_loss="entropy"), "balance_loss"),
        (lambda: HoME(D, [TaskSpec(name="click", group="shared")]), r"model\.tasks\[0\]\.group 'shared'"),
        (
            lambda: HoME(D, [TaskSpec(name="click", group="a"), TaskSpec(name="like", group="click")]),
            r"model\.tasks\[1\]\.group 'click'",
        ),
        (lambda: HoME(D, [TaskSpec(name="click", group="")]), r"model\.tasks\[0\]\.group"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(factory: Callable[[], MultiTaskHead], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


# ----------------------------------------------------------------------------- balance loss
@pytest.mark.parametrize("kind", ["ple", "home"])
def test_balance_loss(kind: str) -> None:
    torch.manual_seed(0)
    cls = PLE if kind == "ple" else HoME
    x = torch.randn(6, D)
    assert run(cls(D, TASKS, balance_loss_weight=0.0, **SMALL), x).aux_loss is None
    head = cls(D, TASKS, balance_loss_weight=0.5, balance_loss="importance+load", **SMALL)
    out = run(head, x)
    assert out.aux_loss is not None and out.aux_loss.dim() == 0 and out.aux_loss >= 0
    if kind == "ple":  # the task gates of every level, not the shared gates
        covered = [n for n, s in head.gate_specs.items() if s.task is not None]
    else:  # every gate with more than one expert
        covered = [n for n, s in head.gate_specs.items() if len(s.experts) > 1]
    assert set(head.balanced_gates) == set(covered)
    expected = BalanceLoss(0.5, "importance+load")(out.gates[n] for n in covered)
    assert torch.allclose(out.aux_loss, expected)
    out.aux_loss.backward()
    assert head.gate(covered[0]).weight.grad.abs().sum() > 0


# learning a planted signal: tests/test_heads.py::test_head_learns_planted_two_task_signal


# ----------------------------------------------------------------------------- configs
def train_briefly(name: str, tmp_path: Path, data_dir: Path) -> dict[str, list[float]]:
    """configs/<name>.yaml for two training batches and one validation batch on the small synthetic
    set; returns the logged train/val losses (metric -> values)."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    config["data"].update(data_dir=str(data_dir), synth=None, batch_size=64)
    runs = str(tmp_path / "runs")
    config["trainer"].update(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, val_check_interval=1.0, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=runs,
        logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": runs, "name": "csv"}}],
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    (metrics_file,) = (tmp_path / "runs" / "csv").glob("version_*/metrics.csv")
    values: dict[str, list[float]] = {}
    for row in csv.DictReader(metrics_file.open()):
        for key, value in row.items():
            if value and key in ("train/loss", "val/loss"):
                values.setdefault(key, []).append(float(value))
    return values


@pytest.mark.parametrize(("name", "head"), [("ple", "heads.PLE"), ("home", "heads.HoME")])
def test_config_trains_a_few_batches(
    name: str, head: str, tmp_path: Path, small_synth: tuple[SynthConfig, dict[str, Path]]
) -> None:
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    assert config["model"]["heads"]["class_path"] == head
    assert [lg["init_args"]["name"] for lg in config["trainer"]["logger"]] == [name, name]
    assert config["data"] == quickstart["data"] and config["data"]["data_dir"] == "data/quickstart"
    assert {k: v for k, v in config["model"].items() if k != "heads"} == {
        k: v for k, v in quickstart["model"].items() if k != "heads"
    }
    _, paths = small_synth
    losses = train_briefly(name, tmp_path, paths["users"].parent)
    assert len(losses["train/loss"]) == 2 and len(losses["val/loss"]) == 1, losses
    assert all(math.isfinite(v) for values in losses.values() for v in values), losses
