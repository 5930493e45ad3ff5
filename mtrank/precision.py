"""Exact labels under precisions that cast the batch.

Lightning's DeepSpeed precision (``bf16-mixed`` and ``16-mixed`` under DeepSpeed too), its half
precision (``bf16-true``, ``16-true``), FSDP's true precisions and double precision convert every
floating tensor of the batch to the training dtype before the step (``Precision.convert_input``, called
by the training, evaluation and prediction loops). For model inputs that is what the bf16 weights need,
but a batch also carries values that are targets or weights, never model input, and bf16 keeps only 8
bits of mantissa: a watch time of 1,234.5 s becomes 1,232, a propensity of 0.3337 becomes 0.3340, a
metric-only column is perturbed before it is ever scored.

`keep_batch_exact` wraps the plugin's ``convert_input`` so that a `Batch`'s `EXACT_FIELDS` pass
through untouched (float32, as the loader made them) while every model-input field is converted as
before. `RankingModule.setup` applies it to whatever precision plugin the trainer has, so it holds for
every strategy and every way of choosing it (YAML, ``--trainer.strategy``, Python). Objects that are
not a `Batch` are converted as Lightning would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from lightning.pytorch.plugins.precision import Precision

from mtrank.batch import Batch

#: `Batch` fields never cast by a precision plugin: labels (loss targets and metrics), the treatment
#: propensity (an inverse-propensity weight) and the evaluation-only extras.
EXACT_FIELDS: tuple[str, ...] = ("labels", "propensity", "extras")

_WRAPPED = "_mtrank_keeps_batch_exact"


def convert_keeping_exact(convert: Callable[[Any], Any], data: Any) -> Any:
    """``convert(data)`` with the `EXACT_FIELDS` of a `Batch` (also inside tuples/lists/dicts, one level,
    as Lightning passes ``(args, kwargs)`` in Fabric) left as they are; anything else goes to ``convert``."""
    if isinstance(data, Batch):
        exact = {name: getattr(data, name) for name in EXACT_FIELDS}
        shell = dataclasses.replace(data, labels={}, propensity=None, extras={})
        return dataclasses.replace(convert(shell), **exact)
    if isinstance(data, (tuple, list)) and any(isinstance(x, Batch) for x in data):
        return type(data)(convert_keeping_exact(convert, x) for x in data)
    return convert(data)


def keep_batch_exact(plugin: Precision) -> bool:
    """Make ``plugin.convert_input`` leave a `Batch`'s `EXACT_FIELDS` unconverted (idempotent).

    Returns True when the plugin converts inputs at all (it overrides ``convert_input``) and is now
    wrapped, False for plugins that leave the batch alone (32-true, native AMP ``bf16-mixed``).
    """
    current = plugin.convert_input
    if getattr(current, _WRAPPED, False):
        return True
    if type(plugin).convert_input is Precision.convert_input:
        return False

    @functools.wraps(current)
    def convert_input(data: Any) -> Any:
        return convert_keeping_exact(current, data)

    setattr(convert_input, _WRAPPED, True)
    plugin.convert_input = convert_input  # type: ignore[method-assign]
    return True
