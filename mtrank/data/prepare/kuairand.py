"""KuaiRand -> mtrank tables: ``mtrank prepare kuairand --src DIR --out DIR``.

KuaiRand (Gao et al., CIKM 2022, https://kuairand.com/; files on Zenodo, record 10439422) logs the
video feeds of the Kuaishou app with 12 feedback signals per impression and, inserted in the feeds,
*randomly exposed* videos. Each of its three versions (``KuaiRand-Pure``, ``KuaiRand-1K``,
``KuaiRand-27K``) ships as a ``data/`` folder of CSV files with a header line; point ``--src`` at
that folder (or at the version's folder that holds it). The version is told by the files' suffix
(``pure``, ``1k``, ``27k``); the converter reads

- every log file ``log_standard_4_08_to_4_21_<v>.csv``, ``log_standard_4_22_to_5_08_<v>.csv`` and
  ``log_random_4_22_to_5_08_<v>.csv`` (27K splits the standard logs into ``..._27k_part1.csv``,
  ``..._part2.csv``): ``user_id``, ``video_id``, ``time_ms``, ``is_click``, ``is_like``,
  ``is_follow``, ``is_comment``, ``is_forward``, ``is_hate``, ``long_view``, ``play_time_ms``,
  ``duration_ms``, ``is_rand``, ``tab`` (``date``, ``hourmin``, ``profile_stay_time``,
  ``comment_stay_time`` and ``is_profile_enter`` are not read);
- ``user_features_<v>.csv``: ``user_id``, ``user_active_degree``, ``is_lowactive_period``,
  ``is_live_streamer``, ``is_video_author``, the four ``*_range`` buckets and ``onehot_feat0`` ..
  ``onehot_feat17`` (the raw counts ``follow_user_num`` etc. are not read: their buckets are);
- ``video_features_basic_<v>.csv``: ``video_id``, ``video_type``, ``upload_type``, ``tag``
  (``video_features_statistic_*`` is not read: it aggregates the whole month, the future included).

Every log row, standard or random, is one event: a behaviour in its user's history and a sample
(`common.write_dataset`: histories hold only behaviours strictly before the sample's second, the
split is global in time). ``ts`` = ``time_ms // 1000`` (seconds) and the milliseconds order the
events of one second. Columns written:

- users: ``hist_item_id``, ``hist_ts`` (seconds) and the history channels ``hist_action`` (0 none,
  1 click, 2 like, 3 follow, comment or forward: the strongest engagement of the impression,
  vocabulary 4), ``hist_tab`` (the app scenario of the impression, ``tab``, vocabulary = largest
  ``tab`` in the logs + 1), ``hist_category`` (the video's category, below) and ``hist_watch``
  (float: seconds played, ``play_time_ms / 1000``); static features, every one an id with 0
  reserved for "missing" (an empty field; for the integer columns also a negative value, which the
  release uses as an "unknown" sentinel, e.g. ``is_live_streamer = -124``):

  - ``user_active_degree``, ``follow_user_num_range``, ``fans_user_num_range``,
    ``friend_user_num_range``, ``register_days_range`` (text): 1 + the index of the value in the
    sorted list of the file's distinct values (``UNKNOWN`` is a value like any other); the lists,
    index = id, are in ``prepare.json``'s ``source.vocabularies``;
  - ``is_lowactive_period``, ``is_live_streamer``, ``is_video_author``, ``onehot_feat0`` ..
    ``onehot_feat17`` (integers; the real files write the onehot columns that have empty fields,
    4 and 12-17, as floats such as ``1.0``): the value + 1, vocabulary = the file's largest value + 2.

- samples: ``user_id``, ``item_id``, ``ts``, ``treatment`` (= ``is_rand``: 1 for a randomly exposed
  video, 0 for the recommender's; ``num_treatments: 2``, no propensity column: the exposure
  probability is not published), item features ``category`` (shares the history channel's table),
  ``tab`` (the impression's scenario; shares ``hist_tab``'s table), ``video_type`` and
  ``upload_type`` (text ids as above, 0 missing), ``duration`` (float, seconds:
  ``duration_ms / 1000`` of the log row), and the labels:

  ==========  ==========  ============================================  ===========
  task        kind        label                                         group
  ==========  ==========  ============================================  ===========
  click       binary      ``is_click`` (a click, or in the single-      engagement
                          column UI a valid play)
  like        binary      ``is_like``                                   engagement
  follow      binary      ``is_follow``                                 engagement
  comment     binary      ``is_comment``                                engagement
  forward     binary      ``is_forward``                                engagement
  hate        binary      ``is_hate``                                   negative
  long_view   binary      ``long_view``                                 consumption
  watch_time  regression  ``play_time_ms / 1000`` (``log_mse``)         consumption
  ==========  ==========  ============================================  ===========

``category`` is the video's first tag (``tag`` is a comma-separated list of category ids, e.g.
``"12,65"``) + 1; 0 when the video has no tag (about 3% of the videos), a negative tag or no row in
the features file; vocabulary = the largest first tag + 2.

Ids are dense in raw-id order over the union of the ids of the logs and of the features files
(``user_ids.parquet`` and ``item_ids.parquet`` hold the maps; a user of the features file without
logs gets an empty history). A log id missing from its features file raises an error naming the
file, column and row (``--missing-features error``, the default: with the real files that means
files of different versions were mixed); with ``--missing-features unknown`` such ids get every
static feature 0 ("missing") and the counts go to ``prepare.json``. Values are checked (the error
names the file, column and row): ids and times integers, ``time_ms``, ``play_time_ms``,
``duration_ms`` and ``tab`` not negative, labels and ``is_rand`` in {0, 1}, an id at most once per
features file.

Memory: the id maps and one entry per distinct user and video (4 small ids per video) besides
`common.write_dataset`'s partition; the logs are streamed three times (pass 0 counts rows and
collects the distinct ids and the largest ``tab``, then `write_dataset`'s passes).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrank.data.prepare.common import (
    CHUNK_ROWS,
    IdMap,
    Layout,
    PrepareError,
    Split,
    check_range,
    column,
    format_summary,
    iter_chunks,
    sorted_unique_ids,
    write_dataset,
)
from mtrank.data.prepare.movielens import add_common_arguments
from mtrank.spec import FeatureSpec, TaskSpec

VARIANTS = ("pure", "1k", "27k")
LOG_PATTERN = re.compile(  # log_{standard,random}_<from>_to_<to>_<variant>[_part<k>].csv
    rf"^log_(?:standard|random)_\d+_\d+_to_\d+_\d+_(?P<variant>{'|'.join(VARIANTS)})(?:_part\d+)?\.csv$"
)
LABELS = {  # task (samples column) -> log column
    "click": "is_click",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "hate": "is_hate",
    "long_view": "long_view",
}
LOG_COLUMNS = ["user_id", "video_id", "time_ms", *LABELS.values(), "play_time_ms", "duration_ms", "is_rand", "tab"]
ACTIONS = ("none", "click", "like", "follow/comment/forward")
USER_TEXT = ["user_active_degree", "follow_user_num_range", "fans_user_num_range", "friend_user_num_range",
             "register_days_range"]  # fmt: skip
USER_INTS = ["is_lowactive_period", "is_live_streamer", "is_video_author", *[f"onehot_feat{i}" for i in range(18)]]
USER_COLUMNS = ["user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
                "follow_user_num_range", "fans_user_num_range", "friend_user_num_range", "register_days_range",
                *[f"onehot_feat{i}" for i in range(18)]]  # fmt: skip
VIDEO_TEXT = ["video_type", "upload_type"]
VIDEO_COLUMNS = ["video_id", "video_type", "upload_type", "tag"]
MAX_TAB = 1 << 15
MAX_MS = 1 << 62
TASKS = [
    TaskSpec(name="click", kind="binary", weight=1.0, group="engagement"),
    TaskSpec(name="like", kind="binary", weight=0.5, group="engagement"),
    TaskSpec(name="follow", kind="binary", weight=0.5, group="engagement"),
    TaskSpec(name="comment", kind="binary", weight=0.5, group="engagement"),
    TaskSpec(name="forward", kind="binary", weight=0.5, group="engagement"),
    TaskSpec(name="hate", kind="binary", weight=0.5, group="negative"),
    TaskSpec(name="long_view", kind="binary", weight=1.0, group="consumption"),
    TaskSpec(name="watch_time", kind="regression", loss="log_mse", weight=0.2, group="consumption"),
]
MISSING_FEATURES = ("error", "unknown")


@dataclass
class SourceFiles:
    """The files of one KuaiRand version under ``--src``."""

    variant: str
    logs: list[Path]
    users: Path
    videos: Path


def source_files(src: Path) -> SourceFiles:
    """Find the log files, ``user_features_<v>.csv`` and ``video_features_basic_<v>.csv`` of one version.

    ``src`` is the version's ``data/`` folder or the folder holding it. Raises `PrepareError` listing
    what was found when no version, two versions or a features file is missing.
    """
    src = Path(src)
    if not src.is_dir():
        raise PrepareError(f"--src {src}: not a folder")
    folder = src
    if not any(LOG_PATTERN.match(p.name) for p in src.iterdir()) and (src / "data").is_dir():
        folder = src / "data"
    names = sorted(p.name for p in folder.iterdir())
    logs = [n for n in names if LOG_PATTERN.match(n)]
    variants = sorted({LOG_PATTERN.match(n)["variant"] for n in logs})
    expected = "log_standard_4_08_to_4_21_<v>.csv, log_random_4_22_to_5_08_<v>.csv, ..., user_features_<v>.csv, "
    expected += "video_features_basic_<v>.csv with <v> one of pure, 1k, 27k"
    if len(variants) != 1:
        what = "no KuaiRand log file" if not variants else f"log files of several versions ({', '.join(variants)})"
        raise PrepareError(f"--src {folder}: {what}; expected {expected}; found {names}")
    variant = variants[0]
    users, videos = folder / f"user_features_{variant}.csv", folder / f"video_features_basic_{variant}.csv"
    missing = [p.name for p in (users, videos) if not p.is_file()]
    if missing:
        raise PrepareError(f"--src {folder}: KuaiRand-{variant} without {missing}; expected {expected}; found {names}")
    return SourceFiles(variant, [folder / n for n in logs], users, videos)


# ----------------------------------------------------------------------------------------------- reading


def _ints(path: Path, table: pa.Table, name: str, base: int) -> np.ndarray:
    """`common.column` (int64, checked), but a text column names its first non-integer row."""
    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        text = pc.utf8_trim_whitespace(col.combine_chunks())
        ok = pc.fill_null(pc.match_substring_regex(text, r"^-?\d+$"), False)
        bad = ~np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
        if bad.any():
            row = int(np.argmax(bad))
            raise PrepareError(
                f"{path}: column {name!r}: expected integers, got {text[row].as_py()!r} at row {base + row}"
            )
        table = pa.table({name: pc.cast(text, pa.int64())})
    return column(path, table, name, base)


def _ints_or_missing(path: Path, table: pa.Table, name: str, base: int) -> np.ndarray:
    """An integer column that may have empty fields (floats such as ``1.0`` accepted): int64, -1 for empty or < 0."""
    col = table.column(name)
    if pa.types.is_null(col.type):
        return np.full(table.num_rows, -1, dtype=np.int64)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        text = pc.utf8_trim_whitespace(col.combine_chunks())
        empty = pc.fill_null(pc.equal(text, ""), True)
        ok = pc.or_(empty, pc.fill_null(pc.match_substring_regex(text, r"^-?\d+(\.0*)?$"), False))
        bad = ~np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
        if bad.any():
            row = int(np.argmax(bad))
            raise PrepareError(
                f"{path}: column {name!r}: expected integers, got {text[row].as_py()!r} at row {base + row}"
            )
        col = pc.cast(pc.if_else(empty, pa.scalar(None, pa.string()), text), pa.float64())
    missing = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    filled = pc.fill_null(col, pa.scalar(0, col.type))
    values = column(path, pa.table({name: filled}), name, base).copy()
    values[missing | (values < 0)] = -1
    return values


def _first_tags(path: Path, table: pa.Table, base: int) -> np.ndarray:
    """``tag`` (comma-separated category ids) -> (n,) int64 first tag, -1 when empty or negative."""
    text = pc.fill_null(pc.utf8_trim_whitespace(table.column("tag").combine_chunks()), "")
    first = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, pattern=",.*$", replacement=""))
    number = np.asarray(pc.match_substring_regex(first, r"^-?\d+$").to_numpy(zero_copy_only=False), dtype=bool)
    empty = np.asarray(pc.equal(first, "").to_numpy(zero_copy_only=False), dtype=bool)
    bad = ~(number | empty)
    if bad.any():
        row = int(np.argmax(bad))
        raise PrepareError(
            f"{path}: column 'tag': {text[row].as_py()!r} at row {base + row} is not a comma-separated list of "
            "category ids"
        )
    values = np.full(table.num_rows, -1, dtype=np.int64)
    if number.any():
        values[number] = pc.cast(pc.filter(first, pa.array(number)), pa.int64()).to_numpy()
    values[values < 0] = -1
    return values


class _TextIds:
    """The distinct values of a text column, streamed: provisional codes per chunk, final ids at the end.

    Final id = 1 + index of the value in the sorted list of values; 0 = empty field.
    """

    def __init__(self) -> None:
        self.values: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, col: pa.ChunkedArray) -> np.ndarray:
        """(n,) int32 provisional codes of a chunk's column, -1 for empty fields."""
        text = pc.fill_null(pc.utf8_trim_whitespace(col.combine_chunks().cast(pa.string())), "")
        encoded = text.dictionary_encode()
        lut = np.array([self._code(v) for v in encoded.dictionary.to_pylist()] + [-1], dtype=np.int32)
        return lut[np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]

    def _code(self, value: str) -> int:
        if not value:
            return -1
        if value not in self.index:
            self.index[value] = len(self.values)
            self.values.append(value)
        return self.index[value]

    def finish(self, codes: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Provisional codes -> final ids (0 empty), and the sorted values (value of id k at k - 1)."""
        names = sorted(self.values)
        remap = np.zeros(len(self.values) + 1, dtype=np.int32)  # last slot: code -1
        remap[: len(self.values)] = 1 + np.searchsorted(np.array(names, dtype=object), np.array(self.values, object))
        return remap[codes], names


@dataclass
class UserFeatures:
    """The user features file: sorted raw ids and one id per user and feature (0 missing)."""

    raw: np.ndarray
    features: dict[str, np.ndarray]
    vocab: dict[str, int]
    vocabularies: dict[str, list[str | None]]
    missing: dict[str, int]


def read_users(path: Path, chunk_rows: int = CHUNK_ROWS) -> UserFeatures:
    """Read ``user_features_<v>.csv`` (module docstring: the id of every feature)."""
    ids: list[np.ndarray] = []
    texts = {name: _TextIds() for name in USER_TEXT}
    codes: dict[str, list[np.ndarray]] = {name: [] for name in USER_TEXT + USER_INTS}
    types = dict.fromkeys(USER_TEXT, pa.string())
    for base, chunk in iter_chunks(path, USER_COLUMNS, column_types=types, chunk_rows=chunk_rows):
        ids.append(_ints(path, chunk, "user_id", base))
        for name in USER_TEXT:
            codes[name].append(texts[name].add(chunk.column(name)))
        for name in USER_INTS:
            codes[name].append(_ints_or_missing(path, chunk, name, base))
    raw = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = sorted_unique_ids(path, raw, "user_id", "user_id")
    features, vocab, vocabularies, missing = {}, {}, {}, {}
    for name in USER_TEXT:
        values, names = texts[name].finish(np.concatenate(codes[name]) if ids else np.zeros(0, np.int32))
        features[name], vocab[name], vocabularies[name] = values[order], len(names) + 1, [None, *names]
        missing[name] = int((values == 0).sum())
    for name in USER_INTS:
        values = np.concatenate(codes[name]) if ids else np.zeros(0, np.int64)
        features[name] = (values[order] + 1).astype(np.int32)
        vocab[name] = max(2, int(values.max(initial=-1)) + 2)
        missing[name] = int((values < 0).sum())
    return UserFeatures(raw[order], features, vocab, vocabularies, missing)


@dataclass
class VideoFeatures:
    """The basic video features file: sorted raw ids, category, video_type and upload_type per video (0 missing)."""

    raw: np.ndarray
    features: dict[str, np.ndarray]
    vocab: dict[str, int]
    vocabularies: dict[str, list[str | None]]
    missing: dict[str, int]


def read_videos(path: Path, chunk_rows: int = CHUNK_ROWS) -> VideoFeatures:
    """Read ``video_features_basic_<v>.csv``: ``category`` (first tag + 1), ``video_type``, ``upload_type``."""
    ids: list[np.ndarray] = []
    tags: list[np.ndarray] = []
    texts = {name: _TextIds() for name in VIDEO_TEXT}
    codes: dict[str, list[np.ndarray]] = {name: [] for name in VIDEO_TEXT}
    types = dict.fromkeys([*VIDEO_TEXT, "tag"], pa.string())
    for base, chunk in iter_chunks(path, VIDEO_COLUMNS, column_types=types, chunk_rows=chunk_rows):
        ids.append(_ints(path, chunk, "video_id", base))
        tags.append(_first_tags(path, chunk, base).astype(np.int32))
        for name in VIDEO_TEXT:
            codes[name].append(texts[name].add(chunk.column(name)))
    raw = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = sorted_unique_ids(path, raw, "video_id", "video_id")
    tag = np.concatenate(tags) if ids else np.zeros(0, np.int32)
    features = {"category": (tag[order] + 1).astype(np.int32)}
    vocab = {"category": max(2, int(tag.max(initial=-1)) + 2)}
    vocabularies: dict[str, list[str | None]] = {}
    missing = {"category": int((tag < 0).sum())}
    for name in VIDEO_TEXT:
        values, names = texts[name].finish(np.concatenate(codes[name]) if ids else np.zeros(0, np.int32))
        features[name], vocab[name], vocabularies[name] = values[order], len(names) + 1, [None, *names]
        missing[name] = int((values == 0).sum())
    return VideoFeatures(raw[order], features, vocab, vocabularies, missing)


class _Distinct:
    """Distinct int64 ids of a stream of chunks; merges pending chunks only when they outgrow the set
    (O(n log n) overall, where `IdMap.collect` re-merges the whole set once per chunk)."""

    def __init__(self) -> None:
        self.seen = np.zeros(0, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.size = 0

    def add(self, ids: np.ndarray) -> None:
        u = np.unique(ids)
        self.pending.append(u)
        self.size += u.size
        if self.size > max(self.seen.size, 1 << 20):
            self.merge()

    def merge(self) -> np.ndarray:
        if self.pending:
            self.seen = np.unique(np.concatenate([self.seen, *self.pending]))
            self.pending, self.size = [], 0
        return self.seen


@dataclass
class LogScan:
    """Pass 0 over the logs: distinct ids, rows and the largest ``tab``."""

    users: np.ndarray
    videos: np.ndarray
    rows: dict[str, int] = field(default_factory=dict)
    max_tab: int = 0


def scan_logs(
    logs: list[Path],
    known_users: IdMap,
    known_videos: IdMap,
    strict: bool,
    chunk_rows: int = CHUNK_ROWS,
    feature_files: tuple[Path, Path] | None = None,
) -> LogScan:
    """Pass 0: count rows, collect distinct user / video ids and the largest ``tab``.

    With ``strict``, an id not in ``known_users`` / ``known_videos`` (the features files' ids)
    raises `PrepareError` naming the log file, column and row.
    """
    users, videos = _Distinct(), _Distinct()
    rows: dict[str, int] = {}
    max_tab = 0
    for path in logs:
        n = 0
        for base, chunk in iter_chunks(path, ["user_id", "video_id", "tab"], chunk_rows=chunk_rows):
            for name, known, distinct, k in (("user_id", known_users, users, 0), ("video_id", known_videos, videos, 1)):
                ids = _ints(path, chunk, name, base)
                if strict:
                    try:
                        known.dense(ids, path, base, name)
                    except PrepareError as err:
                        known_from = f"; the known ids are those of {feature_files[k].name}" if feature_files else ""
                        raise PrepareError(
                            f"{err}{known_from} (--missing-features unknown gives such ids the 'missing' static "
                            "features)"
                        ) from None
                distinct.add(ids)
            tab = _ints(path, chunk, "tab", base)
            check_range(path, "tab", tab, base, 0, MAX_TAB)
            max_tab = max(max_tab, int(tab.max(initial=0)))
            n += chunk.num_rows
        rows[path.name] = n
    return LogScan(users.merge(), videos.merge(), rows, max_tab)


def events(
    logs: list[Path], users: IdMap, items: IdMap, item_features: dict[str, np.ndarray], chunk_rows: int
) -> Iterator[pa.Table]:
    """Log chunks -> event chunks (dense ids, seconds, labels, channels); bad values raise `PrepareError`."""
    for path in logs:
        for base, chunk in iter_chunks(path, LOG_COLUMNS, chunk_rows=chunk_rows):
            user = users.dense(_ints(path, chunk, "user_id", base), path, base, "user_id")
            item = items.dense(_ints(path, chunk, "video_id", base), path, base, "video_id")
            time_ms = _ints(path, chunk, "time_ms", base)
            check_range(path, "time_ms", time_ms, base, 0, MAX_MS)
            flags = {}
            for task, name in LABELS.items():
                flags[task] = _ints(path, chunk, name, base)
                check_range(path, name, flags[task], base, 0, 1)
            is_rand = _ints(path, chunk, "is_rand", base)
            check_range(path, "is_rand", is_rand, base, 0, 1)
            millis = {}
            for name in ("play_time_ms", "duration_ms"):
                millis[name] = _ints(path, chunk, name, base)
                check_range(path, name, millis[name], base, 0, MAX_MS)
            tab = _ints(path, chunk, "tab", base)
            check_range(path, "tab", tab, base, 0, MAX_TAB)
            strong = (flags["follow"] | flags["comment"] | flags["forward"]) > 0
            action = np.where(strong, 3, np.where(flags["like"] > 0, 2, np.where(flags["click"] > 0, 1, 0)))
            watch = (millis["play_time_ms"] / 1000.0).astype(np.float32)
            yield pa.table(
                {
                    "user_id": user,
                    "item_id": item,
                    "ts": time_ms // 1000,
                    "order": time_ms,
                    "action": action.astype(np.int32),
                    "tab": tab.astype(np.int32),
                    **{name: values[item] for name, values in item_features.items()},
                    "watch": watch,
                    "duration": (millis["duration_ms"] / 1000.0).astype(np.float32),
                    "treatment": is_rand,
                    **{task: values.astype(np.float32) for task, values in flags.items()},
                    "watch_time": watch,
                }
            )


def _scatter(ids: IdMap, raw: np.ndarray, values: np.ndarray, path: Path, name: str) -> np.ndarray:
    """(V,) values by dense id of ``ids`` from the rows of a features file (0 where the file has no row)."""
    out = np.zeros(len(ids), dtype=values.dtype)
    out[ids.dense(raw, path, 0, name)] = values
    return out


def prepare_kuairand(
    src: str | Path,
    out: str | Path,
    split: Split | None = None,
    partition_rows: int = 4_000_000,
    chunk_rows: int = CHUNK_ROWS,
    missing_features: str = "error",
) -> dict[str, Any]:
    """Convert a KuaiRand version under ``src`` into ``out`` (module docstring); return the ``prepare.json`` record.

    Args:
        missing_features: ``error`` (a log id missing from its features file raises) or ``unknown``
            (such ids get the "missing" id 0 in every static feature).
    """
    if missing_features not in MISSING_FEATURES:
        raise ValueError(f"missing_features must be one of {MISSING_FEATURES}, got {missing_features!r}")
    files = source_files(Path(src))
    user_file = read_users(files.users, chunk_rows)
    video_file = read_videos(files.videos, chunk_rows)
    scan = scan_logs(
        files.logs,
        IdMap(user_file.raw, "user_id"),
        IdMap(video_file.raw, "video_id"),
        strict=missing_features == "error",
        chunk_rows=chunk_rows,
        feature_files=(files.users, files.videos),
    )
    user_map = IdMap(np.union1d(user_file.raw, scan.users), "user_id")
    item_map = IdMap(np.union1d(video_file.raw, scan.videos), "video_id")
    users = pa.table(
        {
            "user_id": np.arange(len(user_map), dtype=np.int64),
            **{n: _scatter(user_map, user_file.raw, v, files.users, "user_id") for n, v in user_file.features.items()},
        }
    )
    item_features = {
        n: _scatter(item_map, video_file.raw, v, files.videos, "video_id") for n, v in video_file.features.items()
    }
    num_tabs = scan.max_tab + 1
    vocab_category = video_file.vocab["category"]
    features = FeatureSpec(
        num_users=len(user_map),
        num_items=len(item_map),
        history_sparse={"action": len(ACTIONS), "tab": num_tabs, "category": vocab_category},
        history_dense=["watch"],
        item_sparse={"category": vocab_category, "tab": num_tabs, **{n: video_file.vocab[n] for n in VIDEO_TEXT}},
        item_dense=["duration"],
        user_sparse={n: user_file.vocab[n] for n in USER_COLUMNS[1:]},
        num_treatments=2,
    )
    layout = Layout(
        history_sparse=dict(features.history_sparse),
        history_dense=["watch"],
        sample_columns=["category", "tab", *VIDEO_TEXT, "duration", "treatment", *[t.label for t in TASKS]],
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    user_map.write(out / "user_ids.parquet", "user_id", "raw_user_id")
    item_map.write(out / "item_ids.parquet", "item_id", "raw_video_id")
    return write_dataset(
        events(files.logs, user_map, item_map, item_features, chunk_rows),
        out,
        layout=layout,
        users=users,
        num_items=len(item_map),
        features=features,
        tasks=TASKS,
        split=split or Split(),
        num_rows=sum(scan.rows.values()),
        partition_rows=partition_rows,
        source={
            "dataset": f"kuairand-{files.variant}",
            "files": {
                "logs": [str(p) for p in files.logs],
                "user_features": str(files.users),
                "video_features_basic": str(files.videos),
            },
            "log_rows": scan.rows,
            "missing_features": missing_features,
            "users_without_features": int(len(user_map) - user_file.raw.size),
            "videos_without_features": int(len(item_map) - video_file.raw.size),
            "users_without_logs": int(len(user_map) - scan.users.size),
            "actions": list(ACTIONS),
            "category": "first id of video_features_basic.tag + 1 (0: no tag)",
            "int_features": "value + 1 (0: empty or negative)",
            "vocabularies": {**user_file.vocabularies, **video_file.vocabularies},
            "missing_values": {
                Path(files.users).name: user_file.missing,
                Path(files.videos).name: video_file.missing,
            },
        },
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kuairand`` under ``mtrank prepare``."""
    p = subparsers.add_parser(
        "kuairand", help="KuaiRand (Pure / 1K / 27K: log_*.csv, user_features_*.csv, video_features_basic_*.csv)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--src", type=Path, required=True, help="the version's data/ folder (or the folder holding it)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--missing-features", choices=MISSING_FEATURES, default="error",
        help="a log id missing from its features file: error (default) or unknown (static features 0)",
    )  # fmt: skip
    add_common_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``mtrank prepare kuairand``: convert and print the summary."""
    record = prepare_kuairand(
        args.src,
        args.out,
        Split(args.train_fraction, args.val_fraction),
        args.partition_rows,
        args.chunk_rows,
        args.missing_features,
    )
    print(format_summary(record))
    print(f"wrote {args.out}")
    return 0
