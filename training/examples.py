"""Ray Data job that turns canonical events into training and evaluation examples.

Split rule (leave-one-out by time): for a user with n >= 3 events, sorted by time, the last event
is the test target, the one before it the validation target, and the first n - 2 events are the
training sequence. Users with fewer than 3 events are too short to evaluate: all their events go
to training, and their number is reported.

Every example has the same columns: left-padded ``item_ids``, ``category_ids``, ``behaviors``
and ``targets`` of length L, as vocabulary indices. A training example predicts the next item at
every position (target 0 where there is none). A validation or test example has one target, in the
last position, and its inputs are the events before that target.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from training import storage
from training.features import _add_bucket, _BUCKET, sort_user_events
from training.schema import BEHAVIOR, BEHAVIORS, CATEGORY_ID, ITEM_ID, PADDING_ID, USER_ID
from training.vocab import Vocabulary

logger = logging.getLogger(__name__)

TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
SPLIT = "split"
INPUT_COLUMNS = ("item_ids", "category_ids", "behaviors")
TARGETS = "targets"
MIN_EVENTS_TO_EVALUATE = 3


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
    num_events: int


def gather_left_padded(values: np.ndarray, ends: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Take ``values[max(start, end - length):end]`` for each row, left-padded to (R, length) with 0."""
    index = ends[:, None] - length + np.arange(length)[None, :]
    valid = index >= starts[:, None]
    return np.where(valid, values[np.where(valid, index, 0)], PADDING_ID)


def split_user_examples(
    events: pa.Table, item_vocab: Vocabulary, category_vocab: Vocabulary, length: int
) -> pa.Table:
    """Build the examples of one user bucket, for all three splits."""
    events = sort_user_events(events)
    user_ids = events[USER_ID].to_numpy()
    items = item_vocab.lookup(events[ITEM_ID].to_numpy())
    categories = category_vocab.lookup(events[CATEGORY_ID].to_numpy())
    behaviors = (
        pc.fill_null(pc.index_in(events[BEHAVIOR], pa.array(BEHAVIORS)), -1).to_numpy(zero_copy_only=False) + 1
    )
    columns = {"item_ids": items, "category_ids": categories, "behaviors": behaviors}

    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if len(user_ids) else np.array([], int)
    ends = np.r_[starts[1:], len(user_ids)].astype(np.int64)
    evaluated = ends - starts >= MIN_EVENTS_TO_EVALUATE
    train_ends = np.where(evaluated, ends - 2, ends)

    # Training windows cut the training sequence from its end in steps of L, so every event is a
    # target exactly once. Each window contains L inputs and the L targets that follow them.
    num_windows = np.maximum(0, -(-(train_ends - starts - 1) // length))
    window_user = np.repeat(np.arange(len(starts)), num_windows)
    window_rank = np.arange(num_windows.sum()) - np.repeat(np.cumsum(num_windows) - num_windows, num_windows)
    target_ends = train_ends[window_user] - window_rank * length
    window_starts = starts[window_user]
    train = {name: gather_left_padded(values, target_ends - 1, window_starts, length) for name, values in columns.items()}
    train[TARGETS] = gather_left_padded(items, target_ends, window_starts + 1, length)

    parts = [_rows(TRAIN, user_ids[starts][window_user], train)]
    for split, offset in ((VALIDATION, 2), (TEST, 1)):
        eval_starts, target_index = starts[evaluated], ends[evaluated] - offset
        inputs = {name: gather_left_padded(values, target_index, eval_starts, length) for name, values in columns.items()}
        targets = np.zeros((len(target_index), length), dtype=np.int64)
        targets[:, -1] = items[target_index]
        inputs[TARGETS] = targets
        parts.append(_rows(split, user_ids[eval_starts], inputs))
    return pa.concat_tables(parts)


def _rows(split: str, user_ids: np.ndarray, arrays: dict[str, np.ndarray]) -> pa.Table:
    length = next(iter(arrays.values())).shape[1]
    columns = {SPLIT: pa.array([split] * len(user_ids), pa.string()), USER_ID: pa.array(user_ids, pa.int64())}
    for name, matrix in arrays.items():
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.int64()), length)
    return pa.table(columns)


def build_examples(events_path: str, sequence_length: int, rows_per_bucket: int = 2_000_000) -> Examples:
    """Build the examples of all splits from canonical events Parquet with Ray Data."""
    events_path = storage.normalize(events_path)
    events = ray.data.read_parquet(events_path)
    num_events = events.count()
    if num_events == 0:
        raise ValueError(f"no events in {events_path}; ingest a non-empty events file first")
    item_counts = events.groupby(ITEM_ID).count().to_pandas()
    item_vocab = Vocabulary(item_counts[ITEM_ID].to_numpy())
    category_vocab = Vocabulary(np.asarray(events.unique(CATEGORY_ID)))
    num_buckets = max(1, -(-num_events // rows_per_bucket))

    examples = (
        events.map_batches(_add_bucket, fn_kwargs={"key": USER_ID, "num_buckets": num_buckets}, batch_format="pyarrow")
        .groupby(_BUCKET)
        .map_groups(
            lambda bucket: split_user_examples(
                bucket.drop_columns([_BUCKET]), item_vocab, category_vocab, sequence_length
            ),
            batch_format="pyarrow",
        )
        .materialize()
    )
    splits = {name: examples.filter(expr=col(SPLIT) == name).materialize() for name in (TRAIN, VALIDATION, TEST)}

    # Training events per item: all events, less the validation and test targets.
    counts = np.zeros(item_vocab.size_with_padding, dtype=np.int64)
    counts[item_vocab.lookup(item_counts[ITEM_ID].to_numpy())] = item_counts["count()"].to_numpy()
    held_out = (
        examples.filter(expr=col(SPLIT) != TRAIN)
        .map_batches(_last_targets, batch_format="pyarrow")
        .groupby(TARGETS)
        .count()
        .to_pandas()
    )
    np.subtract.at(counts, held_out[TARGETS].to_numpy(), held_out["count()"].to_numpy())

    num_users = events.groupby(USER_ID).count().count()
    num_short_users = num_users - splits[TEST].count()
    logger.info(
        "Built examples: %d events, %d users (%d with fewer than %d events, used for training only), %d items",
        num_events,
        num_users,
        num_short_users,
        MIN_EVENTS_TO_EVALUATE,
        len(item_vocab),
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
    )


def _last_targets(batch: pa.Table) -> pa.Table:
    targets = np.asarray(batch[TARGETS].combine_chunks().flatten()).reshape(batch.num_rows, -1)[:, -1]
    return pa.table({TARGETS: targets})
