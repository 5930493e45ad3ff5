"""What the data holds and what the model predicts: the two specs every part of mtrank shares.

`FeatureSpec` names the columns the loader reads and the vocabulary of every id column (the schema
check refuses ids outside it; the encoders size their embedding tables from it). `TaskSpec` is one
task of the task list: tasks are data, not code, so adding one touches a YAML file only.

Example:
    >>> features = FeatureSpec(num_users=1000, num_items=5000, max_len=256,
    ...                        history_sparse={"category": 32, "action": 4}, history_dense=["watch"],
    ...                        item_sparse={"category": 32}, item_dense=["duration"])
    >>> click = TaskSpec(name="click", label="click", kind="binary", weight=1.0, group="engagement")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["binary", "regression"]
RegressionLoss = Literal["mse", "huber", "log_mse"]


@dataclass
class FeatureSpec:
    """The columns mtrank reads and the vocabulary size of each id column.

    Ids of a column with vocabulary ``V`` must lie in ``[0, V)``. History side channels are the
    users table's list columns ``hist_<name>`` (for example ``hist_category``); item features are
    columns of the samples table; user features are scalar columns of the users table.

    Args:
        num_users: vocabulary of ``user_id``.
        num_items: vocabulary of ``item_id`` and ``hist_item_id``.
        max_len: the newest ``max_len`` behaviours before a sample's time are attached to it.
        history_sparse: name -> vocabulary of each integer history channel ``hist_<name>``.
        history_dense: names of float history channels ``hist_<name>``.
        item_sparse: name -> vocabulary of each integer item feature column of the samples table.
        item_dense: names of float item feature columns of the samples table.
        user_sparse: name -> vocabulary of each integer static user feature of the users table.
        user_dense: names of float static user features of the users table.
        num_treatments: number of treatments when a ``treatment`` column is used (0: not read).
        extra_columns: float columns of the samples table passed through to the batch for
            evaluation only (for example the synthetic data's ``true_effect``); never model input.
        request_candidates: the most candidates of a sample's request attached to it (0: not
            read). With ``C > 0`` every samples table needs an int ``request_id`` column; each
            sample then carries its request's candidate set (`Batch.request_item_id` and friends):
            itself first, then the other samples of the same table sharing its ``request_id``, in
            table row order, ``C`` in all at most. It never depends on which samples share a batch.
    """

    num_users: int
    num_items: int
    max_len: int = 256
    history_sparse: dict[str, int] = field(default_factory=dict)
    history_dense: list[str] = field(default_factory=list)
    item_sparse: dict[str, int] = field(default_factory=dict)
    item_dense: list[str] = field(default_factory=list)
    user_sparse: dict[str, int] = field(default_factory=dict)
    user_dense: list[str] = field(default_factory=list)
    num_treatments: int = 0
    extra_columns: list[str] = field(default_factory=list)
    request_candidates: int = 0

    def __post_init__(self) -> None:
        if self.num_users <= 0 or self.num_items <= 0:
            raise ValueError(
                f"features: num_users and num_items must be positive, got {self.num_users}, {self.num_items}"
            )
        if self.max_len <= 0:
            raise ValueError(f"features.max_len must be positive, got {self.max_len}")
        if self.request_candidates < 0:
            raise ValueError(
                f"features.request_candidates must be >= 0 (0: no request candidates), got {self.request_candidates}"
            )
        for group in ("history_sparse", "item_sparse", "user_sparse"):
            for name, vocab in getattr(self, group).items():
                if vocab <= 0:
                    raise ValueError(f"features.{group}.{name}: vocabulary must be positive, got {vocab}")


@dataclass
class TaskSpec:
    """One prediction task.

    Args:
        name: the task's name in logs and outputs (``click``, ``watch_time``, ...).
        label: the samples-table column holding its label (defaults to ``name``).
        kind: ``binary`` (label in {0, 1}, BCE on a logit) or ``regression`` (real-valued).
        loss: for regression: ``mse``, ``huber`` or ``log_mse`` (MSE on ``log1p(label)``, for
            heavy-tailed targets such as watch time; the prediction is then in log1p space).
            Ignored for binary tasks.
        weight: the task's weight in the total loss.
        group: task group name (HoME's task groups; MMoE ignores it).
    """

    name: str
    label: str = ""
    kind: TaskKind = "binary"
    loss: RegressionLoss = "mse"
    weight: float = 1.0
    group: str = "default"

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.name
        if self.kind not in ("binary", "regression"):
            raise ValueError(f"task {self.name!r}: kind must be 'binary' or 'regression', got {self.kind!r}")
        if self.loss not in ("mse", "huber", "log_mse"):
            raise ValueError(f"task {self.name!r}: loss must be 'mse', 'huber' or 'log_mse', got {self.loss!r}")
        if self.weight < 0:
            raise ValueError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")


def check_tasks(tasks: list[TaskSpec]) -> None:
    """Refuse an empty task list or two tasks with one name."""
    if not tasks:
        raise ValueError("model.tasks is empty: name at least one task")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"model.tasks: duplicate task names {dupes}")
