"""``mtrank export``: a trained checkpoint -> one file that runs with plain torch, plus a model card.

    mtrank export --config configs/quickstart.yaml --ckpt runs/quickstart/version_0/checkpoints/last.ckpt \\
        --out exported/quickstart [--format auto|export|torchscript] [--metrics-csv PATH] [--model.KEY VALUE ...]

The module is built from the config's ``model:`` section exactly as ``mtrank fit`` builds it (Lightning's
argument parser; ``--model.KEY VALUE`` overrides as on the ``fit`` command line), its weights are loaded from
``--ckpt`` (a Lightning ``.ckpt`` file, a ``mtrank convert-checkpoint`` output, a bare ``state_dict`` file, or a
DeepSpeed ZeRO folder, consolidated through `mtrank.convert`), cast to float32 on the CPU, in eval mode.

**What is exported.** `FlatRanker`: ``forward(*inputs) -> (prediction_task_1, ..., prediction_task_T)``, each
(B,) float32 on the label's scale (the transform of `RankingModule.predictions`: ``sigmoid`` for binary tasks,
``expm1(·).clamp(0)`` for ``log_mse``, the raw output for ``mse``/``huber``), in task order. It runs the encoder,
the fatigue branch (when on) and the task heads; the uplift branch's outputs are not exported (they are not
task predictions). Attention runs on the CPU kernels (HSTU and ULTRA-HSTU ``reference``, LONGER ``sdpa`` unless
the config asks for ``reference``); the weights do not depend on the kernel.

**Inputs**, in this order (`input_layout`; the card lists them with dtypes and shapes):

    user_id, item_id, ts, history_len                      (B,)   int64
    history_item_id, history_ts                            (B, L) int64
    history_sparse.<name>  for each features.history_sparse   (B, L) int64
    history_dense.<name>   for each features.history_dense    (B, L) float32
    item_sparse.<name>     for each features.item_sparse      (B,)   int64
    item_dense.<name>      for each features.item_dense       (B,)   float32
    user_sparse.<name>     for each features.user_sparse      (B,)   int64
    user_dense.<name>      for each features.user_dense       (B,)   float32
    and with features.request_candidates = C > 0:
    request_len (B,) int64, request_item_id (B, C) int64,
    request_sparse.<name> (B, C) int64 per item_sparse, request_dense.<name> (B, C) float32 per item_dense

with each group's names in the feature spec's order as the config parser hands it over (the card's ``inputs``
is the reference: jsonargparse sorts the keys of the ``history_sparse``/``item_sparse``/``user_sparse`` dicts).
Histories are left-aligned and zero-padded, as in `mtrank.batch` (``history_len`` valid positions, 0 after them).

**Formats**, tried in this order (``--format auto``; ``export`` stops after the torch.export attempts,
``torchscript`` tries only the last):

1. ``torch.export`` (``model.pt2``, `torch.export.save`) with a dynamic batch size and a dynamic history
   width L in ``[1, max_len]``. Encoders that merge K behaviours per token (LONGER) get their histories
   zero-padded inside the program to a multiple of K (and to at least ``num_recent_queries`` groups), which
   does not change any prediction.
2. ``torch.export`` with a dynamic batch size and a fixed width L = ``max_len``.
3. TorchScript (``model.ts``, `torch.jit.trace`) at the fixed width ``max_len``, traced on full histories
   (the widest branch of any data-dependent test the encoder makes). Used when torch.export refuses the
   encoder's data-dependent Python control flow (ULTRA-HSTU's ``if bool(mask.any())``).

With a fixed width, `ExportedRanker` pads narrower histories with zeros (harmless: positions after
``history_len`` are masked). Every attempt is saved, loaded back and checked against the module on batches
of other sizes (B = 1 and 5, histories of length 0 to L) before it is accepted; the card records every
attempt, and why the ones before the chosen one failed.

What each model gets (torch 2.13, CPU; ``tests/test_export.py``):

    HSTU (reference kernel)            torch.export, dynamic width
    LONGER (sdpa or reference)         torch.export, dynamic width (padded inside to a multiple of merge_k)
    MeanPool, NoHistory baselines      torch.export, dynamic width
    ULTRA-HSTU                         TorchScript trace, fixed width (torch.export: data-dependent branch in
                                       `build_sla_layout`, ``if bool(gm.any())``)
    HSTU + FRec fatigue branch         torch.export, fixed width (FRec's recent window pins the width)

**Model card** (``DIR/model_card.json``, rendered as ``DIR/README.md``): the format and file, torch version,
the full config (``model:`` resolved with its defaults and overrides), tasks, feature spec, inputs and outputs,
parameter counts, the checkpoint (path, kind, epoch, step) and the metrics at training end: the ModelCheckpoint
states stored in the checkpoint (monitor, best and current score) and the last logged ``val/...`` and
``val_...`` values of the run's ``metrics.csv`` (CSVLogger: next to the checkpoint's run, or ``--metrics-csv``);
``"not available"`` when there are none.

**Loading** needs only torch: `load_exported` (this module imports nothing but torch and the standard library
at import time, so the file can even be copied next to the model), or by hand::

    import json, torch
    card = json.load(open("DIR/model_card.json"))
    model = torch.export.load("DIR/model.pt2").module()       # or torch.jit.load("DIR/model.ts")
    preds = model(*inputs)                                      # inputs in card["inputs"] order
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # only for annotations: loading an export needs no mtrank model code
    from mtrank.batch import Batch
    from mtrank.module import RankingModule
    from mtrank.spec import FeatureSpec

CARD_FILE = "model_card.json"
README_FILE = "README.md"
FILES = {"torch.export": "model.pt2", "torchscript": "model.ts"}
FORMAT_CHOICES = ("auto", "export", "torchscript")
NOT_AVAILABLE = "not available"
#: the scalar (B,) fields and the (B, L) history fields that lead the input order
LEADING_INPUTS = (
    ("user_id", "int64", ("B",)),
    ("item_id", "int64", ("B",)),
    ("ts", "int64", ("B",)),
    ("history_len", "int64", ("B",)),
    ("history_item_id", "int64", ("B", "L")),
    ("history_ts", "int64", ("B", "L")),
)
VERIFY_ATOL, VERIFY_RTOL = 1e-5, 1e-4


# ================================================================================ loading (torch only)


class ExportedRanker:
    """A loaded export: call it with the flat inputs, or `predict` on a `Batch`.

    ``ranker(*inputs)`` casts every input to its card dtype, pads the history width to the fixed width of a
    fixed-width export, and returns the tuple of (B,) predictions in task order.

    Attributes:
        card: the model card (``model_card.json``).
        program: the loaded callable (the `torch.export` program's module, or the TorchScript module).
        input_names: the inputs' names, in call order.
        task_names: the outputs' names (the tasks), in output order.
    """

    def __init__(self, program: Callable[..., Any], card: dict[str, Any]) -> None:
        self.program = program
        self.card = card
        self.input_names = [spec["name"] for spec in card["inputs"]]
        self.task_names = [spec["name"] for spec in card["outputs"]]
        self._dtypes = [getattr(torch, spec["dtype"]) for spec in card["inputs"]]
        self._history = [spec["shape"][1:] == ["L"] for spec in card["inputs"]]
        width = card["history_width"]
        self._fixed_width = None if width["dynamic"] else int(width["max"])
        self._max_width = int(width["max"])

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}"
            )
        flat = []
        for name, value, dtype, history in zip(self.input_names, inputs, self._dtypes, self._history, strict=True):
            value = torch.as_tensor(value).to(dtype)
            if history:
                width = value.shape[1]
                if width > self._max_width:
                    raise ValueError(f"{name}: history width {width} exceeds the export's maximum {self._max_width}")
                if self._fixed_width is not None and width < self._fixed_width:
                    value = torch.nn.functional.pad(value, (0, self._fixed_width - width))
            flat.append(value.contiguous())
        with torch.no_grad():
            out = self.program(*flat)
        return (out,) if isinstance(out, Tensor) else tuple(out)

    def flatten(self, batch: Any) -> list[Tensor]:
        """The inputs of ``batch`` in call order: ``batch`` is a `mtrank.batch.Batch` (or any object with its
        fields) or a mapping from input name (``user_id``, ``history_sparse.category``, ...) to tensor."""
        return [_field(batch, name) for name in self.input_names]

    def predict(self, batch: Any) -> dict[str, Tensor]:
        """Task name -> (B,) prediction for ``batch`` (a `Batch`, or a mapping name -> tensor; see `flatten`)."""
        return dict(zip(self.task_names, self(*self.flatten(batch)), strict=True))


def _field(batch: Any, name: str) -> Tensor:
    if isinstance(batch, Mapping):
        if name not in batch:
            raise KeyError(f"the inputs have no {name!r}")
        return batch[name]
    group, _, key = name.partition(".")
    value = getattr(batch, group, None)
    if key:
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(f"the batch has no {group}[{key!r}] (needed by the exported model)")
        return value[key]
    if value is None:
        raise KeyError(f"the batch has no {name!r} (needed by the exported model)")
    return value


def load_exported(directory: str | Path) -> ExportedRanker:
    """Load the export in ``directory`` (written by `export_checkpoint`) with torch alone.

    Raises:
        FileNotFoundError: no model card, or the file it names is missing.
    """
    directory = Path(directory)
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"{directory}: no {CARD_FILE} (not an mtrank export)")
    card = json.loads(card_path.read_text())
    path = directory / card["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: named by {card_path} but missing")
    if card["format"] == "torch.export":
        program: Callable[..., Any] = torch.export.load(str(path)).module()
    else:
        program = torch.jit.load(str(path), map_location="cpu").eval()
    return ExportedRanker(program, card)


# ================================================================================ input layout


def input_layout(features: FeatureSpec) -> list[dict[str, Any]]:
    """The exported model's inputs, in call order: ``{"name", "dtype", "shape"}`` each (see the module docstring).

    Shapes use ``B`` (batch), ``L`` (history width) and the request width ``C`` as a number.
    """
    layout = [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in LEADING_INPUTS]

    def group(prefix: str, names: Sequence[str], dtype: str, shape: Sequence[Any]) -> None:
        layout.extend({"name": f"{prefix}.{n}", "dtype": dtype, "shape": list(shape)} for n in names)

    group("history_sparse", list(features.history_sparse), "int64", ("B", "L"))
    group("history_dense", features.history_dense, "float32", ("B", "L"))
    group("item_sparse", list(features.item_sparse), "int64", ("B",))
    group("item_dense", features.item_dense, "float32", ("B",))
    group("user_sparse", list(features.user_sparse), "int64", ("B",))
    group("user_dense", features.user_dense, "float32", ("B",))
    C = features.request_candidates
    if C > 0:
        layout.append({"name": "request_len", "dtype": "int64", "shape": ["B"]})
        layout.append({"name": "request_item_id", "dtype": "int64", "shape": ["B", C]})
        group("request_sparse", list(features.item_sparse), "int64", ("B", C))
        group("request_dense", features.item_dense, "float32", ("B", C))
    return layout


def flatten_batch(batch: Batch, layout: Sequence[dict[str, Any]]) -> tuple[Tensor, ...]:
    """``batch``'s tensors in ``layout``'s order, cast to the layout's dtypes."""
    return tuple(_field(batch, spec["name"]).to(getattr(torch, spec["dtype"])) for spec in layout)


# ================================================================================ the exported module


@contextmanager
def _inline_autograd_functions() -> Iterator[None]:
    """Run every `torch.autograd.Function` as its plain forward (TorchScript cannot save Python ops such as
    HSTU's bucket gather); only for tracing under no_grad, where their backward is never needed."""

    class Ctx:
        def save_for_backward(self, *tensors: Tensor) -> None:
            pass

        def mark_non_differentiable(self, *tensors: Tensor) -> None:
            pass

        def set_materialize_grads(self, value: bool) -> None:
            pass

    own = "apply" in torch.autograd.Function.__dict__
    original = torch.autograd.Function.__dict__.get("apply")

    def apply(cls: Any, *args: Any, **kwargs: Any) -> Any:
        if cls.setup_context is torch.autograd.Function.setup_context:  # forward(ctx, *args)
            return cls.forward(Ctx(), *args, **kwargs)
        return cls.forward(*args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        if own:
            torch.autograd.Function.apply = original  # type: ignore[method-assign]
        else:
            del torch.autograd.Function.apply


_EXPORT_BATCH: type | None = None


def _export_batch_class() -> type:
    """`Batch` whose ``batch_size``/``max_len`` stay symbolic under torch.export (``int()`` would pin them)."""
    global _EXPORT_BATCH
    if _EXPORT_BATCH is None:
        from mtrank.batch import Batch

        class ExportBatch(Batch):
            @property
            def batch_size(self) -> Any:  # type: ignore[override]
                return self.item_id.shape[0]

            @property
            def max_len(self) -> Any:  # type: ignore[override]
                return self.history_item_id.shape[1]

        _EXPORT_BATCH = ExportBatch
    return _EXPORT_BATCH


class FlatRanker(nn.Module):
    """The exported module: flat tensors in `input_layout` order -> per-task (B,) predictions in task order.

    Runs the encoder, then `RankingModule.heads_and_branches` (the fatigue branch and the heads) of ``module``
    (the uplift branch is left out: its outputs are not task predictions), then each task's prediction transform.

    Args:
        module: the trained ranker (its submodules are shared, not copied).
        pad_multiple: pad the history width to a multiple of this inside the module (1: never).
        pad_min_groups: and to at least this many multiples.
    """

    def __init__(self, module: RankingModule, pad_multiple: int = 1, pad_min_groups: int = 1) -> None:
        super().__init__()
        self.encoder = module.encoder
        self.fatigue = module.fatigue
        self.heads = module.heads
        self.uplift = None
        self.tasks = list(module.tasks)
        self.features = module.features
        self.layout = input_layout(module.features)
        self.pad_multiple = pad_multiple
        self.pad_min_groups = pad_min_groups

    def _pad(self, t: Tensor) -> Tensor:
        K = self.pad_multiple
        groups = (t.shape[1] + K - 1) // K
        if self.pad_min_groups > 1:
            groups = torch.sym_max(self.pad_min_groups, groups)
        return nn.functional.pad(t, (0, K * groups - t.shape[1]))

    def to_batch(self, inputs: Sequence[Tensor]) -> Batch:
        """The `Batch` of the flat ``inputs`` (histories padded when asked)."""
        fields: dict[str, Any] = {}
        for spec, value in zip(self.layout, inputs, strict=True):
            if spec["shape"][1:] == ["L"] and (self.pad_multiple > 1 or self.pad_min_groups > 1):
                value = self._pad(value)
            group, _, key = spec["name"].partition(".")
            if key:
                fields.setdefault(group, {})[key] = value
            else:
                fields[group] = value
        user_id = fields["user_id"]
        return _export_batch_class()(sample_index=torch.arange(user_id.shape[0], device=user_id.device), **fields)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        from mtrank.losses import task_prediction
        from mtrank.module import RankingModule

        batch = self.to_batch(inputs)
        _, head_out = RankingModule.heads_and_branches(self, self.encoder(batch), batch)  # type: ignore[arg-type]
        return tuple(task_prediction(task, head_out.logits[task.name]) for task in self.tasks)


# ================================================================================ building and loading the module


def build_module(config: str | Path, overrides: Sequence[str] = ()) -> tuple[RankingModule, dict[str, Any]]:
    """The `RankingModule` of ``config``'s ``model:`` section, built as ``mtrank fit`` builds it.

    Args:
        config: a YAML config (other sections, such as ``trainer:`` and ``data:``, are kept for the card only).
        overrides: command-line overrides of the model, ``--model.KEY VALUE`` or ``--model.KEY=VALUE``.

    Returns:
        The module and the full config (a dict) with its ``model:`` section resolved (defaults filled in).

    Raises:
        FileNotFoundError: no such config file.
        ValueError: the file has no ``model:`` section, or the section (or an override) does not parse.
    """
    import yaml
    from lightning.pytorch.cli import LightningArgumentParser

    from mtrank.module import RankingModule

    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"config not found: {config}")
    try:
        full = yaml.safe_load(config.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{config}: not valid YAML ({err})") from err
    if not isinstance(full, dict) or not isinstance(full.get("model"), dict):
        raise ValueError(f"{config}: no 'model:' section")
    bad = [a for a in overrides if a.startswith("--") and not a.startswith("--model.")]
    if bad:
        raise ValueError(f"unknown option(s) {bad}: only --model.KEY VALUE overrides are accepted besides the flags")
    from jsonargparse import ActionConfigFile

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_lightning_class_args(RankingModule, "model", subclass_mode=False)
    try:
        parsed = parser.parse_args(["--config", yaml.safe_dump({"model": full["model"]}), *overrides])
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jsonargparse's deprecation notices
            module = instantiate(parsed).model
            resolved = yaml.safe_load(parser.dump(parsed, skip_none=False))
    except Exception as err:  # jsonargparse's ArgumentError, or the module's own ValueError
        raise ValueError(f"{config}: the model section does not build: {err}") from err
    full = {**full, "model": resolved["model"]}
    return module, full


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], str]:
    """The checkpoint at ``path`` as a dict with ``state_dict``, and its kind.

    Kinds: ``zero`` (a DeepSpeed folder, consolidated to float32 by `mtrank.convert`), ``converted`` (a
    ``mtrank convert-checkpoint`` output), ``lightning`` (a Lightning checkpoint file), ``state_dict`` (a file
    holding a bare state dict).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder that is not a DeepSpeed checkpoint, or a file torch cannot read or without weights.
    """
    from mtrank import convert

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if not convert.is_zero_checkpoint(path):
            raise ValueError(f"{path}: a folder but not a DeepSpeed checkpoint (no 'latest' or *model_states.pt)")
        ckpt, kind = convert._load_zero(path), "zero"
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"{path}: not a torch checkpoint ({type(err).__name__}: {err})") from err
        kind = "lightning"
        if isinstance(ckpt, dict) and "mtrank_converted_from" in ckpt:
            kind = "converted"
        elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
            ckpt, kind = {"state_dict": ckpt}, "state_dict"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return ckpt, kind


def load_module(config: str | Path, ckpt: str | Path, overrides: Sequence[str] = ()) -> RankingModule:
    """A trained `RankingModule` for inference: ``config``'s model with ``ckpt``'s weights, float32, CPU, eval.

    ``ckpt`` is any checkpoint `read_checkpoint` reads (Lightning file, ZeRO folder, converted file). Use it
    with `mtrank.serve.CandidateScorer` to score candidates with the user's sequence encoded once.

    Raises:
        FileNotFoundError: no such config or checkpoint.
        ValueError: the checkpoint cannot be read or does not fit the config (the message names both).
    """
    if not Path(config).is_file():
        raise FileNotFoundError(f"config not found: {config}")
    module, _ = build_module(config, overrides)
    checkpoint, _ = read_checkpoint(ckpt)
    load_weights(module, checkpoint["state_dict"], ckpt, config)
    return module.float().eval()


def load_weights(module: nn.Module, state: dict[str, Tensor], ckpt: str | Path, config: str | Path | None) -> None:
    """Load ``state`` (float tensors cast to float32) into ``module``, strictly.

    Raises:
        ValueError: naming ``ckpt`` (and ``config``) when keys are missing or unexpected or shapes differ.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        source = f"the model built from {config}" if config is not None else "the model"
        raise ValueError(f"{ckpt}: the checkpoint does not match {source}; " + "; ".join(parts))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def use_cpu_kernels(module: nn.Module) -> dict[str, str]:
    """Switch every attention kernel setting of ``module`` to a CPU implementation that exports.

    HSTU and ULTRA-HSTU: ``reference``; LONGER: ``sdpa`` (``reference`` is kept). Returns module name ->
    ``"<configured> -> <used>"`` for the modules that have a kernel setting.
    """
    from encoders.hstu import HSTUEncoder
    from encoders.longer import LongerBlock, LongerEncoder
    from encoders.ultra_hstu import UltraHSTUEncoder

    used: dict[str, str] = {}
    for name, sub in module.named_modules():
        configured = getattr(sub, "kernel", None)
        if isinstance(sub, HSTUEncoder | UltraHSTUEncoder):
            kernel = "reference"
        elif isinstance(sub, LongerBlock | LongerEncoder):
            kernel = "reference" if configured == "reference" else "sdpa"
        else:
            continue
        sub.kernel = kernel
        if not isinstance(sub, LongerBlock):  # one line per encoder; its blocks follow it
            used[name or type(sub).__name__] = f"{configured} -> {kernel}"
    return used


# ================================================================================ metrics at training end


def _number(value: Any) -> float | None:
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else None
    if isinstance(value, int | float) and math.isfinite(float(value)):
        return float(value)
    return None


def checkpoint_monitors(ckpt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ModelCheckpoint states stored in a Lightning checkpoint: monitor, best and current score, paths."""
    out = []
    for key, state in (ckpt.get("callbacks") or {}).items():
        if not isinstance(state, Mapping) or not state.get("monitor"):
            continue
        out.append(
            {
                "callback": str(key),
                "monitor": state["monitor"],
                "best_model_score": _number(state.get("best_model_score")),
                "current_score": _number(state.get("current_score")),
                "best_model_path": state.get("best_model_path") or None,
            }
        )
    return out


def find_metrics_csv(ckpt: str | Path) -> Path | None:
    """The ``metrics.csv`` of the run that wrote ``ckpt``: in its version folder (``<version>/checkpoints/x.ckpt``)
    or, for checkpoints written elsewhere in a run folder, its newest ``lightning_logs/version_*/metrics.csv``."""
    path = Path(ckpt).resolve()
    for folder in (path.parent, path.parent.parent):
        if (folder / "metrics.csv").is_file():
            return folder / "metrics.csv"
    for folder in (path.parent, path.parent.parent, path.parent.parent.parent):
        found = list(folder.glob("lightning_logs/version_*/metrics.csv"))
        if found:

            def version(p: Path) -> tuple[int, str]:
                match = re.fullmatch(r"version_(\d+)", p.parent.name)
                return (int(match.group(1)) if match else -1, p.parent.name)

            return max(found, key=version)
    return None


def csv_val_metrics(path: str | Path) -> dict[str, Any]:
    """The last logged value of every ``val/...`` and ``val_...`` column of a CSVLogger ``metrics.csv``,
    with the epoch and step of the last row holding any of them (empty ``values`` when none)."""
    values: dict[str, float] = {}
    epoch = step = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            seen = False
            for key, text in row.items():
                if key and (key.startswith("val/") or key.startswith("val_")) and text not in (None, ""):
                    try:
                        values[key] = float(text)
                    except ValueError:
                        continue
                    seen = True
            if seen:
                epoch, step = row.get("epoch") or None, row.get("step") or None
    as_int = lambda x: int(float(x)) if x not in (None, "") else None  # noqa: E731
    return {"values": dict(sorted(values.items())), "epoch": as_int(epoch), "step": as_int(step)}


def training_metrics(ckpt: Mapping[str, Any], ckpt_path: str | Path, metrics_csv: str | Path | None) -> Any:
    """The card's ``metrics``: the checkpoint's ModelCheckpoint states and the run's last ``val`` metrics, or
    `NOT_AVAILABLE`. ``metrics_csv`` (when given) replaces the search next to the checkpoint."""
    out: dict[str, Any] = {}
    monitors = checkpoint_monitors(ckpt)
    if monitors:
        out["checkpoint_callbacks"] = monitors
    if metrics_csv is not None:
        csv_path: Path | None = Path(metrics_csv)
        if not csv_path.is_file():
            raise FileNotFoundError(f"metrics file not found: {csv_path}")
    else:
        csv_path = find_metrics_csv(ckpt_path)
    if csv_path is not None:
        logged = csv_val_metrics(csv_path)
        if logged["values"]:
            out["logged"] = {"source": str(csv_path), **logged}
    return out or NOT_AVAILABLE


# ================================================================================ exporting


@dataclasses.dataclass
class _Attempt:
    format: str  # "torch.export" | "torchscript"
    dynamic_width: bool


def _plan(fmt: str) -> list[_Attempt]:
    if fmt not in FORMAT_CHOICES:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMAT_CHOICES)}")
    exports = [_Attempt("torch.export", True), _Attempt("torch.export", False)]
    trace = [_Attempt("torchscript", False)]
    return {"auto": exports + trace, "export": exports, "torchscript": trace}[fmt]


def _padding(encoder: nn.Module, max_len: int) -> tuple[int, int] | None:
    """(multiple, min groups) the history width is padded to inside a dynamic-width export, or None when a
    dynamic width cannot be offered (the widest padded width would exceed ``max_len``)."""
    K = int(getattr(encoder, "merge_k", 1) or 1)
    recent = getattr(encoder, "num_recent_queries", None)
    if recent is None:  # no token merge and no width-dependent query count: no padding
        return 1, 1
    groups = max(1, int(recent))
    if max_len % K or K * groups > max_len:
        return None
    return K, groups


def _example(features: FeatureSpec, lengths: Sequence[int], width: int, seed: int) -> Batch:
    from mtrank.data.synth import random_batch

    return random_batch(features, history_len=list(lengths), width=width, seed=seed)


def _verify(module: RankingModule, ranker: ExportedRanker, max_len: int, dynamic: bool) -> float:
    """Largest |exported - module| over check batches of 1 and 5 rows; AssertionError beyond tolerance."""
    features = module.features
    checks = [([max_len], max_len), ([0, 1, max_len, max(1, max_len // 2), max_len - 1], max_len)]
    if dynamic or max_len > 1:  # a narrower batch: the exported width (fixed: padded by the ranker) must not matter
        narrow = max(1, (max_len + 1) // 2)
        checks.append(([0, narrow, 1, narrow // 2 + 1, narrow], narrow))
    worst = 0.0
    for i, (lengths, width) in enumerate(checks):
        batch = _example(features, lengths, width, seed=100 + i)
        with torch.no_grad():
            expected = module.predictions(module(batch)[1])
        got = ranker.predict(batch)
        for task in module.tasks:
            e, g = expected[task.name].float(), got[task.name]
            if g.shape != e.shape:
                raise AssertionError(f"task {task.name}: shape {tuple(g.shape)}, expected {tuple(e.shape)}")
            diff = float((g - e).abs().max()) if e.numel() else 0.0
            worst = max(worst, diff)
            if not torch.allclose(g, e, atol=VERIFY_ATOL, rtol=VERIFY_RTOL):
                raise AssertionError(
                    f"task {task.name}: the export differs from the module by {diff:.3g} "
                    f"(batch of {len(lengths)} rows, width {width})"
                )
    return worst


def _export_once(module: RankingModule, attempt: _Attempt, out: Path) -> tuple[Path, dict[str, Any]]:
    """Write one attempt's file; returns it and the card's ``history_width``."""
    features = module.features
    max_len = features.max_len
    example_lengths = [max_len, max(1, max_len // 2), 0, max_len]
    path = out / FILES[attempt.format]
    if attempt.format == "torch.export":
        from torch.export import Dim

        if attempt.dynamic_width:
            if max_len < 2:
                raise ValueError(f"features.max_len={max_len}: nothing to make dynamic")
            padding = _padding(module.encoder, max_len)
            if padding is None:
                raise ValueError(
                    f"the encoder pads histories to a multiple of {getattr(module.encoder, 'merge_k', 1)} "
                    f"that features.max_len={max_len} does not allow"
                )
            wrapper = FlatRanker(module, *padding)
            width = {"dynamic": True, "min": 1, "max": max_len}
            if padding[0] > 1 or padding[1] > 1:
                width["padded_inside_to"] = f"a multiple of {padding[0]}, at least {padding[0] * padding[1]}"
        else:
            wrapper = FlatRanker(module)
            width = {"dynamic": False, "min": 1, "max": max_len}
        wrapper.eval()
        example = flatten_batch(_example(features, example_lengths, max_len, seed=0), wrapper.layout)
        batch_dim = Dim("batch", min=1)
        width_dim = Dim("history_width", min=1, max=max_len) if attempt.dynamic_width else None
        shapes = []
        for spec in wrapper.layout:
            dims: dict[int, Any] = {0: batch_dim}
            if spec["shape"][1:] == ["L"] and width_dim is not None:
                dims[1] = width_dim
            shapes.append(dims)
        with torch.no_grad(), warnings.catch_warnings(), _quiet_torch_export():
            warnings.simplefilter("ignore")
            program = torch.export.export(wrapper, example, dynamic_shapes=(tuple(shapes),))  # forward(*inputs)
        torch.export.save(program, str(path))
    else:
        wrapper = FlatRanker(module).eval()
        example = flatten_batch(_example(features, [max_len] * 4, max_len, seed=0), wrapper.layout)
        with _inline_autograd_functions(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: the checks below decide
            traced = torch.jit.trace(wrapper, example, check_trace=False, strict=False)
        torch.jit.save(traced, str(path))
        width = {"dynamic": False, "min": 1, "max": max_len}
    if not width["dynamic"]:
        width["padding"] = f"narrower histories are zero-padded to {max_len} (ExportedRanker does it)"
    return path, width


@contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """Silence what torch.export writes when it gives up (its partial graph, printed to stderr, and its log
    warnings): the error is recorded in the card instead, and the next format is tried."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _error_line(err: BaseException) -> str:
    """``Type: first line`` of ``err``, plus the user code it points at when torch names it."""
    text = str(err)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = f"{type(err).__name__}: {first[:300]}"
    calls = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', text)
    if calls:
        file, number, function, code = calls[-1]
        line += f" (at {Path(file).name}:{number} in {function}: {code.strip()[:120]})"
    fix = re.search(r"Suggested fixes:\s*\n\s*(.+)", text)
    if fix:
        line += f" (torch suggests: {fix.group(1).strip()[:120]})"
    return line


def export_module(
    module: RankingModule,
    out: str | Path,
    fmt: str = "auto",
    card_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``module`` (float32, eval, CPU afterwards) to ``out``; write the model card; return it.

    Args:
        module: the ranker (its weights already loaded).
        out: the output folder (created; a previous export's model files there are replaced).
        fmt: ``auto``, ``export`` (torch.export only) or ``torchscript`` (see the module docstring).
        card_extra: more card entries (config, checkpoint, metrics, ...), written as given.

    ``module`` is changed in place: float32, CPU, eval mode, CPU attention kernels (`use_cpu_kernels`).

    Raises:
        RuntimeError: no attempt of ``fmt`` exported and verified; the message lists each attempt's error.
    """
    plan = _plan(fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        (out / name).unlink(missing_ok=True)
    module = module.cpu().float().eval()
    kernels = use_cpu_kernels(module)
    base_card = _card(module, kernels, dict(card_extra or {}))
    attempts: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    for attempt in plan:
        record: dict[str, Any] = {"format": attempt.format, "dynamic_width": attempt.dynamic_width}
        path = out / FILES[attempt.format]
        try:
            path, width = _export_once(module, attempt, out)
            card = {**base_card, "format": attempt.format, "file": path.name, "history_width": width}
            ranker = load_exported_from(path, card)
            record["max_abs_diff"] = _verify(module, ranker, module.features.max_len, width["dynamic"])
            record["result"] = "ok"
            attempts.append(record)
            chosen = card
            break
        except Exception as err:  # each failure is recorded; the next attempt may still work
            path.unlink(missing_ok=True)
            record["result"] = "failed"
            record["error"] = _error_line(err)
            attempts.append(record)
    if chosen is None:
        lines = "\n".join(f"  {a['format']} (dynamic width: {a['dynamic_width']}): {a['error']}" for a in attempts)
        raise RuntimeError(f"no export of format {fmt!r} worked for {type(module.encoder).__name__}:\n{lines}")
    chosen["export_attempts"] = attempts
    _write_card(chosen, out)
    return chosen


def load_exported_from(path: Path, card: dict[str, Any]) -> ExportedRanker:
    """`ExportedRanker` of the file ``path`` described by ``card`` (before the card is written)."""
    if card["format"] == "torch.export":
        return ExportedRanker(torch.export.load(str(path)).module(), card)
    return ExportedRanker(torch.jit.load(str(path), map_location="cpu").eval(), card)


def export_checkpoint(
    config: str | Path,
    ckpt: str | Path,
    out: str | Path,
    fmt: str = "auto",
    metrics_csv: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Build the module of ``config``, load ``ckpt`` into it, export it to ``out`` (`export_module`).

    Raises:
        FileNotFoundError: the config, the checkpoint or ``metrics_csv`` does not exist.
        ValueError: a config that does not build, a checkpoint that cannot be read or does not fit the config.
        RuntimeError: no format worked (see `export_module`).
    """
    _plan(fmt)  # refuse an unknown format before the slow part
    ckpt_path = Path(ckpt)
    if not Path(config).is_file():
        raise FileNotFoundError(f"config not found: {config}")
    if not ckpt_path.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    if metrics_csv is not None and not Path(metrics_csv).is_file():
        raise FileNotFoundError(f"metrics file not found: {metrics_csv}")
    module, full_config = build_module(config, overrides)
    checkpoint, kind = read_checkpoint(ckpt_path)
    load_weights(module, checkpoint["state_dict"], ckpt_path, config)
    extra = {
        "checkpoint": {
            "path": str(ckpt_path.resolve()),
            "kind": kind,
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
        },
        "config_path": str(Path(config).resolve()),
        "config_overrides": list(overrides),
        "config": full_config,
        "metrics": training_metrics(checkpoint, ckpt_path, metrics_csv),
    }
    return export_module(module, out, fmt, extra)


# ================================================================================ the model card


def _prediction_transform(task: Any) -> str:
    if task.kind == "binary":
        return "sigmoid(logit): a probability"
    if task.loss == "log_mse":
        return "expm1(output).clamp(min=0): a value on the label's scale"
    return "the raw output: a value on the label's scale"


def _card(module: RankingModule, kernels: dict[str, str], extra: dict[str, Any]) -> dict[str, Any]:
    wrapper = FlatRanker(module)
    exported_params = sum(p.numel() for p in wrapper.parameters())
    branches = [name for name in ("fatigue", "uplift") if getattr(module, name, None) is not None]
    card: dict[str, Any] = {
        "format": None,
        "file": None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "encoder": f"{type(module.encoder).__module__}.{type(module.encoder).__name__}",
        "heads": f"{type(module.heads).__module__}.{type(module.heads).__name__}",
        "branches": {name: ("exported" if name == "fatigue" else "not exported") for name in branches},
        "attention_kernels": kernels,
        "parameters": {"exported": exported_params, "module": sum(p.numel() for p in module.parameters())},
        "tasks": [
            {
                "name": t.name,
                "kind": t.kind,
                "loss": "bce" if t.kind == "binary" else t.loss,
                "label": t.label,
                "weight": t.weight,
                "group": t.group,
            }
            for t in module.tasks
        ],
        "features": dataclasses.asdict(module.features),
        "batch_size": "dynamic, at least 1",
        "inputs": wrapper.layout,
        "outputs": [
            {"name": t.name, "dtype": "float32", "shape": ["B"], "transform": _prediction_transform(t)}
            for t in module.tasks
        ],
        "checkpoint": None,
        "config_path": None,
        "config_overrides": [],
        "config": None,
        "metrics": NOT_AVAILABLE,
    }
    card.update(extra)
    return card


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings (``"nan"``, ``"inf"``): the card stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_card(card: dict[str, Any], out: Path) -> None:
    text = json.dumps(_json_safe(card), indent=2, default=str, allow_nan=False)
    (out / CARD_FILE).write_text(text + "\n")
    (out / README_FILE).write_text(render_card(card))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value)


def render_card(card: Mapping[str, Any]) -> str:
    """The card as a short Markdown page (``README.md``)."""
    width = card["history_width"]
    if width["dynamic"]:
        width_text = f"dynamic, 1 to {width['max']}"
        if "padded_inside_to" in width:
            width_text += f" (padded inside the program to {width['padded_inside_to']})"
    else:
        width_text = f"fixed at {width['max']}: {width.get('padding', 'pad with zeros')}"
    ckpt = card.get("checkpoint") or {}
    lines = [
        f"# Exported ranker: {card['encoder'].rsplit('.', 1)[-1]} + {card['heads'].rsplit('.', 1)[-1]}",
        "",
        f"- format: **{card['format']}** (`{card['file']}`), torch {card['torch_version']}",
    ]
    if ckpt:
        lines.append(
            f"- checkpoint: `{ckpt.get('path')}` ({ckpt.get('kind')}, epoch {_fmt(ckpt.get('epoch'))}, "
            f"step {_fmt(ckpt.get('global_step'))})"
        )
    if card.get("config_path"):
        overrides = card.get("config_overrides")
        lines.append(f"- config: `{card['config_path']}`" + (f" with `{' '.join(overrides)}`" if overrides else ""))
    lines += [
        f"- parameters: {card['parameters']['exported']:,} exported ({card['parameters']['module']:,} in the module)",
        f"- batch size B: dynamic (at least 1); history width L: {width_text}",
        f"- attention kernels: {', '.join(f'{k}: {v}' for k, v in card['attention_kernels'].items()) or '—'}",
    ]
    if card.get("branches"):
        lines.append(f"- branches: {', '.join(f'{k} ({v})' for k, v in card['branches'].items())}")
    lines += ["", "## Tasks (outputs, in this order)", "", "| # | task | kind | loss | label | prediction |"]
    lines.append("|---|---|---|---|---|---|")
    for i, (task, output) in enumerate(zip(card["tasks"], card["outputs"], strict=True)):
        lines.append(
            f"| {i} | {task['name']} | {task['kind']} | {task['loss']} | {task['label']} | {output['transform']} |"
        )
    lines += ["", "## Inputs (in this order)", "", "| # | name | dtype | shape |", "|---|---|---|---|"]
    for i, spec in enumerate(card["inputs"]):
        shape = ", ".join(map(str, spec["shape"])) + ("," if len(spec["shape"]) == 1 else "")
        lines.append(f"| {i} | {spec['name']} | {spec['dtype']} | ({shape}) |")
    lines += [
        "",
        "Histories are left-aligned: `history_len[b]` valid positions, then zeros.",
        "",
        "## Metrics at training end",
        "",
    ]
    metrics = card.get("metrics")
    if not isinstance(metrics, Mapping):
        lines.append(str(metrics or NOT_AVAILABLE))
    else:
        for cb in metrics.get("checkpoint_callbacks", []):
            lines.append(
                f"- {cb['callback'].split('{')[0]} `{cb['monitor']}`: best {_fmt(cb['best_model_score'])}, "
                f"current {_fmt(cb['current_score'])}"
            )
        logged = metrics.get("logged")
        if logged:
            lines.append(
                f"- last logged (`{logged['source']}`, epoch {_fmt(logged['epoch'])}, step {_fmt(logged['step'])}):"
            )
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in logged["values"].items()]
    lines += [
        "",
        "## Loading (torch only)",
        "",
        "```python",
        "import json, torch",
        "card = json.load(open('model_card.json'))",
        (
            f"model = torch.export.load('{card['file']}').module()"
            if card["format"] == "torch.export"
            else f"model = torch.jit.load('{card['file']}')"
        ),
        "predictions = model(*inputs)  # inputs in card['inputs'] order; one (B,) tensor per task",
        "```",
        "",
        "or `mtrank.export.load_exported(DIR)` (imports only torch): `ranker.predict(batch)` -> task -> (B,).",
        "",
    ]
    return "\n".join(lines)


# ================================================================================ command line


def main(argv: list[str] | None = None) -> int:
    """``mtrank export --config FILE --ckpt PATH --out DIR [--format F] [--metrics-csv PATH] [--model.KEY V ...]``;
    returns the exit status (2 with a one-line error for bad input)."""
    parser = argparse.ArgumentParser(
        prog="mtrank export",
        description="A trained checkpoint (file or DeepSpeed ZeRO folder) -> one file that loads with plain torch "
        "(torch.export or TorchScript) plus a model card. Extra --model.KEY VALUE arguments override the config.",
    )
    parser.add_argument("--config", required=True, help="the YAML config the model was trained with")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint, convert-checkpoint output or ZeRO folder")
    parser.add_argument("--out", required=True, help="output folder (model.pt2 or model.ts, model_card.json, README)")
    parser.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="auto: torch.export, else TorchScript")
    parser.add_argument("--metrics-csv", default=None, help="the run's metrics.csv (default: found next to --ckpt)")
    args, overrides = parser.parse_known_args(argv)
    try:
        card = export_checkpoint(args.config, args.ckpt, args.out, args.format, args.metrics_csv, overrides)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"mtrank export: error: {err}", file=sys.stderr)
        return 2
    width = card["history_width"]
    shape = f"L 1..{width['max']}" if width["dynamic"] else f"L fixed {width['max']}"
    print(
        f"wrote {Path(args.out) / card['file']} ({card['format']}, dynamic batch, {shape}; "
        f"{len(card['inputs'])} inputs -> {len(card['outputs'])} tasks) and {Path(args.out) / CARD_FILE}"
    )
    return 0
