"""Names and schemas shared by the pipelines, the Feast repository and the serving graph.

Feast loads ``feature_repo/`` in its own process, so every name that both sides use lives here,
and ``tests/test_feature_repo.py`` checks that the registered definitions agree with it.
"""

from __future__ import annotations

import pyarrow as pa

# Behaviour types in the order of their codes. Code 0 is reserved for padding.
BEHAVIORS: tuple[str, ...] = ("pv", "cart", "fav", "buy")
BEHAVIOR_CODES: dict[str, int] = {name: code for code, name in enumerate(BEHAVIORS, start=1)}

# Padding id for items, categories and behaviours in every model input.
PADDING_ID = 0

# Number of most recent events kept in a user's online sequence.
SEQUENCE_LENGTH = 50

# Number of co-visitation neighbours kept per item.
NEIGHBORS_PER_ITEM = 20

# Trailing windows, in days, of the behaviour counts in user_stats and item_stats.
STATS_WINDOWS_DAYS: tuple[int, ...] = (1, 3, 7)
SECONDS_PER_DAY = 86_400

USER_ENTITY = "user"
ITEM_ENTITY = "item"
USER_ID = "user_id"
ITEM_ID = "item_id"
CATEGORY_ID = "category_id"
BEHAVIOR = "behavior"
EVENT_TIMESTAMP = "event_timestamp"
# Position of an event in its source file. It orders events with equal timestamps, so their
# order never depends on partitioning or on item ids.
EVENT_POSITION = "event_position"

USER_SEQUENCE_VIEW = "user_sequence"
USER_SEQUENCE_PUSH_SOURCE = "user_sequence_push"
USER_STATS_VIEW = "user_stats"
ITEM_STATS_VIEW = "item_stats"
ITEM_NEIGHBORS_VIEW = "item_neighbors"

# List features of the user_sequence feature view, oldest event first.
SEQUENCE_ITEM_IDS = "item_ids"
SEQUENCE_CATEGORY_IDS = "category_ids"
SEQUENCE_BEHAVIORS = "behaviors"
SEQUENCE_TIMESTAMPS_S = "timestamps_s"
SEQUENCE_FIELDS = (SEQUENCE_ITEM_IDS, SEQUENCE_CATEGORY_IDS, SEQUENCE_BEHAVIORS, SEQUENCE_TIMESTAMPS_S)



def count_field(behavior: str, days: int) -> str:
    """Name of the feature that counts ``behavior`` events over the trailing ``days``."""
    return f"{behavior}_count_{days}d"


def ratio_field(behavior: str, days: int) -> str:
    """Name of the feature ``behavior`` count / pv count over the trailing ``days``."""
    return f"{behavior}_per_pv_{days}d"


COUNT_FIELDS = tuple(count_field(behavior, days) for days in STATS_WINDOWS_DAYS for behavior in BEHAVIORS)
# Unix seconds of the user's latest event at the row's time.
LAST_EVENT_S = "last_event_s"
USER_STATS_FIELDS = (*COUNT_FIELDS, LAST_EVENT_S)
RATIO_FIELDS = tuple(ratio_field(behavior, days) for days in STATS_WINDOWS_DAYS for behavior in BEHAVIORS[1:])
ITEM_STATS_FIELDS = (*COUNT_FIELDS, *RATIO_FIELDS)

NEIGHBOR_IDS = "neighbor_ids"
NEIGHBOR_SCORES = "neighbor_scores"

# Feature views whose offline rows are written by the feature job, in the order it writes them.
OFFLINE_VIEWS = (USER_SEQUENCE_VIEW, USER_STATS_VIEW, ITEM_STATS_VIEW, ITEM_NEIGHBORS_VIEW)

# Feature services: what each serving stage reads.
RANKING_SERVICE = "ranking_features"
CANDIDATE_SERVICE = "candidate_features"

EVENTS_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(ITEM_ID, pa.int64(), nullable=False),
        pa.field(CATEGORY_ID, pa.int64(), nullable=False),
        pa.field(BEHAVIOR, pa.string(), nullable=False),
        pa.field(EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(EVENT_POSITION, pa.int64(), nullable=False),
    ]
)
"""Canonical events schema that every ingestion path produces."""
