"""Ray Data job that turns canonical events into training and evaluation examples.

Two split rules, chosen by ``SplitConfig.kind``; each user's events are sorted by time:

- ``leave-one-out``: for a user with n >= 3 events, the last event is the test target, the one
  before it the validation target, and the first n - 2 events are the training sequence. Users with
  fewer than 3 events are too short to evaluate: all their events go to training.
- ``temporal`` (global temporal split): two cut times, validation before test, hold out what
  happens after them. Events before the validation cut are the training sequences. A user is
  evaluated on the validation split when it has an event before the validation cut and one before
  the test cut but at or after the validation cut; the target is the first such event, and the
  inputs are all events before it. Likewise for the test split, with the first event at or after
  the test cut as the target. Users without such a pair are not evaluated on that split.

The number of users not evaluated on each split is reported. Every example has the same columns:
left-padded ``item_ids``, ``category_ids``, ``behaviors``, ``timestamps_s`` (Unix seconds) and
``targets`` of length L, as vocabulary indices. A training example predicts the next item at every
position (target 0 where there is none). A validation or test example has one target, in the
last position, and its inputs are the events before that target.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from training import storage
from training.features import _add_bucket, _BUCKET, sort_user_events
from training.schema import BEHAVIOR, BEHAVIORS, CATEGORY_ID, EVENT_TIMESTAMP, ITEM_ID, PADDING_ID, USER_ID
from training.vocab import Vocabulary

logger = logging.getLogger(__name__)

TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
SPLIT = "split"
INPUT_COLUMNS = ("item_ids", "category_ids", "behaviors", "timestamps_s")
TARGETS = "targets"
MIN_EVENTS_TO_EVALUATE = 3
# Events per hash-shuffle partition of a groupby. Ray Data's default of 200 partitions makes
# each groupby on a small data set slow, and this keeps large data sets at up to 200.
EVENTS_PER_PARTITION = 500_000
MAX_PARTITIONS = 200
LEAVE_ONE_OUT = "leave-one-out"
TEMPORAL = "temporal"
_TIMESTAMP_S = "_timestamp_s"


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Which split rule builds the validation and test examples (see the module docstring).

    For the temporal split, each cut is a given Unix time in seconds or, where that is None, the
    quantile of all event times given by ``*_quantile``.
    """

    kind: Literal["leave-one-out", "temporal"] = LEAVE_ONE_OUT
    validation_quantile: float = 0.8
    test_quantile: float = 0.9
    validation_time_s: int | None = None
    test_time_s: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in (LEAVE_ONE_OUT, TEMPORAL):
            raise ValueError(f"split kind must be {LEAVE_ONE_OUT!r} or {TEMPORAL!r}, got {self.kind!r}")
        if not 0.0 < self.validation_quantile < self.test_quantile < 1.0:
            raise ValueError(
                "temporal split quantiles must satisfy 0 < validation_quantile < test_quantile < 1, got "
                f"{self.validation_quantile} and {self.test_quantile}"
            )
        if (self.validation_time_s is None) != (self.test_time_s is None):
            raise ValueError("give both validation_time_s and test_time_s, or neither to cut at quantiles")
        if self.test_time_s is not None and self.validation_time_s >= self.test_time_s:
            raise ValueError(
                f"the validation cut {self.validation_time_s} must come before the test cut {self.test_time_s}"
            )

    def describe(self, cuts_s: tuple[int, int] | None) -> str:
        """One line that names the rule, for metrics and configs."""
        if cuts_s is None:
            return f"leave-one-out; users with fewer than {MIN_EVENTS_TO_EVALUATE} events train only"
        validation, test = (
            datetime.datetime.fromtimestamp(cut, datetime.timezone.utc).isoformat() for cut in cuts_s
        )
        return (
            f"global temporal; training events before {validation}, validation targets from {validation}, "
            f"test targets from {test}; users without an event on both sides of a cut are not evaluated on it"
        )


@dataclasses.dataclass
class Examples:
    """Examples of the three splits with the vocabularies they are indexed by."""

    train: ray.data.Dataset
    validation: ray.data.Dataset
    test: ray.data.Dataset
    item_vocab: Vocabulary
    category_vocab: Vocabulary
    train_item_counts: np.ndarray
    """Training events per item index (index 0 is padding and counts 0)."""
    num_users: int
    num_short_users: int
    """Users without a test example: too short for leave-one-out, or not on both sides of the test cut."""
    num_events: int
    num_users_not_validated: int = 0
    split_rule: str = ""
    cuts_s: tuple[int, int] | None = None
    """Validation and test cut times of a temporal split, Unix seconds; None for leave-one-out."""
    stride: int | None = None
    """Step between training windows; None means the sequence length."""


def gather_left_padded(values: np.ndarray, ends: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Take ``values[max(start, end - length):end]`` for each row, left-padded to (R, length) with 0."""
    index = ends[:, None] - length + np.arange(length)[None, :]
    valid = index >= starts[:, None]
    return np.where(valid, values[np.where(valid, index, 0)], PADDING_ID)


def timestamps_seconds(events: pa.Table) -> np.ndarray:
    """Event times as int64 Unix seconds, rounded down as the ``user_sequence`` feature view does."""
    micros = pc.cast(events[EVENT_TIMESTAMP], pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
    return np.floor_divide(micros, 1_000_000)


def split_user_examples(
    events: pa.Table,
    item_vocab: Vocabulary,
    category_vocab: Vocabulary,
    length: int,
    cuts_s: tuple[int, int] | None = None,
    stride: int | None = None,
) -> pa.Table:
    """Build the examples of one user bucket, for all three splits.

    ``cuts_s`` contains the validation and test cut times of a temporal split in Unix seconds; None
    selects leave-one-out. ``stride`` (default ``length``) is the step between training windows.
    """
    stride = length if stride is None else stride
    events = sort_user_events(events)
    user_ids = events[USER_ID].to_numpy()
    items = item_vocab.lookup(events[ITEM_ID].to_numpy())
    categories = category_vocab.lookup(events[CATEGORY_ID].to_numpy())
    behaviors = (
        pc.fill_null(pc.index_in(events[BEHAVIOR], pa.array(BEHAVIORS)), -1).to_numpy(zero_copy_only=False) + 1
    )
    timestamps_s = timestamps_seconds(events)
    columns = {"item_ids": items, "category_ids": categories, "behaviors": behaviors, "timestamps_s": timestamps_s}

    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if len(user_ids) else np.array([], int)
    ends = np.r_[starts[1:], len(user_ids)].astype(np.int64)
    if cuts_s is None:
        evaluated = ends - starts >= MIN_EVENTS_TO_EVALUATE
        train_ends = np.where(evaluated, ends - 2, ends)
        held_out = {VALIDATION: (evaluated, ends - 2), TEST: (evaluated, ends - 1)}
    else:
        # Events are sorted by time within a user, so the first event at or after a cut sits at
        # the user's start plus the number of the user's events before the cut.
        train_ends = _first_at_or_after(timestamps_s, starts, cuts_s[0])
        test_starts = _first_at_or_after(timestamps_s, starts, cuts_s[1])
        held_out = {
            VALIDATION: ((train_ends > starts) & (test_starts > train_ends), train_ends),
            TEST: ((test_starts > starts) & (ends > test_starts), test_starts),
        }

    # Training windows cut the training sequence from its end in steps of S (the stride). Each
    # window contains L inputs, and targets only at its last S positions, so every event is a
    # target exactly once and, with S < L, each target attends to at least L - S earlier events.
    num_windows = np.maximum(0, -(-(train_ends - starts - 1) // stride))
    window_user = np.repeat(np.arange(len(starts)), num_windows)
    window_rank = np.arange(num_windows.sum()) - np.repeat(np.cumsum(num_windows) - num_windows, num_windows)
    target_ends = train_ends[window_user] - window_rank * stride
    window_starts = starts[window_user]
    train = {name: gather_left_padded(values, target_ends - 1, window_starts, length) for name, values in columns.items()}
    train[TARGETS] = gather_left_padded(items, target_ends, window_starts + 1, length)
    train[TARGETS][:, : length - stride] = PADDING_ID

    parts = [_rows(TRAIN, user_ids[starts][window_user], train)]
    for split, (evaluated, targets_at) in held_out.items():
        eval_starts, target_index = starts[evaluated], targets_at[evaluated]
        inputs = {name: gather_left_padded(values, target_index, eval_starts, length) for name, values in columns.items()}
        targets = np.zeros((len(target_index), length), dtype=np.int64)
        targets[:, -1] = items[target_index]
        inputs[TARGETS] = targets
        parts.append(_rows(split, user_ids[eval_starts], inputs))
    return pa.concat_tables(parts)


def _first_at_or_after(timestamps_s: np.ndarray, starts: np.ndarray, cut_s: int) -> np.ndarray:
    """Index of each user's first event at or after ``cut_s``; the user's end where there is none."""
    before = (timestamps_s < cut_s).astype(np.int64)
    counts = np.add.reduceat(before, starts) if len(starts) else np.array([], np.int64)
    return starts + counts


def _rows(split: str, user_ids: np.ndarray, arrays: dict[str, np.ndarray]) -> pa.Table:
    length = next(iter(arrays.values())).shape[1]
    columns = {SPLIT: pa.array([split] * len(user_ids), pa.string()), USER_ID: pa.array(user_ids, pa.int64())}
    for name, matrix in arrays.items():
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.int64()), length)
    return pa.table(columns)


def build_examples(
    events_path: str,
    sequence_length: int,
    rows_per_bucket: int = 2_000_000,
    split: SplitConfig | None = None,
    stride: int | None = None,
) -> Examples:
    """Build the examples of all splits from canonical events Parquet with Ray Data.

    ``stride`` is the step between training windows, from 1 to ``sequence_length`` (the default).
    """
    stride = sequence_length if stride is None else stride
    if not 1 <= stride <= sequence_length:
        raise ValueError(f"window stride must be from 1 to the sequence length {sequence_length}, got {stride}")
    split = split or SplitConfig()
    events_path = storage.normalize(events_path)
    events = ray.data.read_parquet(events_path)
    num_events = events.count()
    if num_events == 0:
        raise ValueError(f"no events in {events_path}; ingest a non-empty events file first")
    partitions = shuffle_partitions(num_events)
    item_counts = events.groupby(ITEM_ID, num_partitions=partitions).count().to_pandas()
    item_vocab = Vocabulary(item_counts[ITEM_ID].to_numpy())
    category_vocab = Vocabulary(np.asarray(events.unique(CATEGORY_ID)))
    num_buckets = max(1, -(-num_events // rows_per_bucket))
    cuts_s = _temporal_cuts(events, split, partitions) if split.kind == TEMPORAL else None

    examples = (
        events.map_batches(_add_bucket, fn_kwargs={"key": USER_ID, "num_buckets": num_buckets}, batch_format="pyarrow")
        .groupby(_BUCKET, num_partitions=min(partitions, num_buckets))
        .map_groups(
            lambda bucket: split_user_examples(
                bucket.drop_columns([_BUCKET]), item_vocab, category_vocab, sequence_length, cuts_s, stride
            ),
            batch_format="pyarrow",
        )
        .materialize()
    )
    splits = {name: examples.filter(expr=col(SPLIT) == name).materialize() for name in (TRAIN, VALIDATION, TEST)}
    counts = _training_item_counts(events, examples, item_counts, item_vocab, cuts_s, partitions)

    num_users = events.groupby(USER_ID, num_partitions=partitions).count().count()
    num_short_users = num_users - splits[TEST].count()
    num_users_not_validated = num_users - splits[VALIDATION].count()
    split_rule = split.describe(cuts_s)
    logger.info(
        "Built examples: %d events, %d users, %d items; split %s; %d users without a test example, "
        "%d without a validation example",
        num_events,
        num_users,
        len(item_vocab),
        split_rule,
        num_short_users,
        num_users_not_validated,
    )
    return Examples(
        train=splits[TRAIN],
        validation=splits[VALIDATION],
        test=splits[TEST],
        item_vocab=item_vocab,
        category_vocab=category_vocab,
        train_item_counts=counts,
        num_users=num_users,
        num_short_users=num_short_users,
        num_events=num_events,
        num_users_not_validated=num_users_not_validated,
        split_rule=split_rule,
        cuts_s=cuts_s,
        stride=stride,
    )


def timestamp_quantile_s(seconds: np.ndarray, counts: np.ndarray, quantile: float) -> int:
    """Return the smallest event time t (seconds) with at least ``quantile`` of all events at or before t.

    ``seconds`` are distinct event times and ``counts`` the events at each.
    """
    order = np.argsort(seconds)
    seconds, cumulative = np.asarray(seconds)[order], np.cumsum(np.asarray(counts)[order])
    index = int(np.searchsorted(cumulative, quantile * cumulative[-1], side="left"))
    return int(seconds[min(index, len(seconds) - 1)])


def shuffle_partitions(num_events: int) -> int:
    """Number of hash-shuffle partitions for a groupby over ``num_events`` rows."""
    return max(1, min(MAX_PARTITIONS, -(-num_events // EVENTS_PER_PARTITION)))


def _temporal_cuts(events: ray.data.Dataset, split: SplitConfig, partitions: int) -> tuple[int, int]:
    """Resolve the validation and test cut times in Unix seconds."""
    if split.test_time_s is not None:
        return int(split.validation_time_s), int(split.test_time_s)
    # One row per distinct second reaches the driver, never one per event.
    per_second = (
        events.map_batches(
            lambda batch: pa.table({_TIMESTAMP_S: timestamps_seconds(batch)}), batch_format="pyarrow"
        )
        .groupby(_TIMESTAMP_S, num_partitions=partitions)
        .count()
        .to_pandas()
    )
    seconds, counts = per_second[_TIMESTAMP_S].to_numpy(), per_second["count()"].to_numpy()
    cuts = (
        timestamp_quantile_s(seconds, counts, split.validation_quantile),
        timestamp_quantile_s(seconds, counts, split.test_quantile),
    )
    if cuts[0] >= cuts[1]:
        raise ValueError(
            f"the validation and test quantiles {split.validation_quantile} and {split.test_quantile} fall on "
            f"the same event time {cuts[0]}; choose quantiles further apart or give the cut times"
        )
    return cuts


def _training_item_counts(events, examples, item_counts, item_vocab: Vocabulary, cuts_s, partitions: int) -> np.ndarray:
    """Training events per item index (index 0 counts 0)."""
    counts = np.zeros(item_vocab.size_with_padding, dtype=np.int64)
    if cuts_s is not None:
        # Temporal split: the events before the validation cut.
        before = (
            events.map_batches(
                lambda batch: batch.select([ITEM_ID]).filter(pa.array(timestamps_seconds(batch) < cuts_s[0])),
                batch_format="pyarrow",
            )
            .groupby(ITEM_ID, num_partitions=partitions)
            .count()
            .to_pandas()
        )
        if len(before):
            counts[item_vocab.lookup(before[ITEM_ID].to_numpy())] = before["count()"].to_numpy()
        return counts
    # Leave-one-out: all events, less the validation and test targets.
    counts[item_vocab.lookup(item_counts[ITEM_ID].to_numpy())] = item_counts["count()"].to_numpy()
    held_out = (
        examples.filter(expr=col(SPLIT) != TRAIN)
        .map_batches(_last_targets, batch_format="pyarrow")
        .groupby(TARGETS, num_partitions=partitions)
        .count()
        .to_pandas()
    )
    if len(held_out):
        np.subtract.at(counts, held_out[TARGETS].to_numpy(), held_out["count()"].to_numpy())
    return counts


def _last_targets(batch: pa.Table) -> pa.Table:
    targets = np.asarray(batch[TARGETS].combine_chunks().flatten()).reshape(batch.num_rows, -1)[:, -1]
    return pa.table({TARGETS: targets})
