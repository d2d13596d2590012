"""Feast definitions of seqrec's entities, feature views and feature services.

The offline sources are written by ``python -m training.features`` into ``data/offline/``, or
into the folder or URI that ``SEQREC_OFFLINE_DIR`` names when ``feast apply`` runs (for example
``s3://bucket/seqrec/offline`` on a cluster). Names and the sequence length come from
``training.schema``, which the pipelines and the serving graph share.
"""

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float64, Int64, String

from training import schema

user = Entity(
    name=schema.USER_ENTITY,
    join_keys=[schema.USER_ID],
    value_type=ValueType.INT64,
    description="A shopper, keyed by the raw user id of the event log.",
)
item = Entity(
    name=schema.ITEM_ENTITY,
    join_keys=[schema.ITEM_ID],
    value_type=ValueType.INT64,
    description="A catalogue item, keyed by the raw item id of the event log.",
)


OFFLINE_DIR = os.environ.get("SEQREC_OFFLINE_DIR", "data/offline").rstrip("/")


def _offline_source(view_name: str) -> FileSource:
    return FileSource(
        name=f"{view_name}_source",
        path=f"{OFFLINE_DIR}/{view_name}",
        timestamp_field=schema.EVENT_TIMESTAMP,
    )


user_sequence_push = PushSource(
    name=schema.USER_SEQUENCE_PUSH_SOURCE,
    batch_source=_offline_source(schema.USER_SEQUENCE_VIEW),
    description="Real-time updates of a user's sequence, pushed by the serving graph.",
)

user_sequence = FeatureView(
    name=schema.USER_SEQUENCE_VIEW,
    entities=[user],
    # A zero TTL keeps the latest row of every user, however old.
    ttl=timedelta(0),
    schema=[
        Field(name=schema.SEQUENCE_ITEM_IDS, dtype=Array(Int64), description="item ids, oldest first"),
        Field(name=schema.SEQUENCE_CATEGORY_IDS, dtype=Array(Int64), description="category id of each item"),
        Field(name=schema.SEQUENCE_BEHAVIORS, dtype=Array(String), description="pv, cart, fav or buy"),
        Field(name=schema.SEQUENCE_TIMESTAMPS_S, dtype=Array(Int64), description="event times, Unix seconds"),
    ],
    source=user_sequence_push,
    description=f"The last {schema.SEQUENCE_LENGTH} events of each user at each of its event times.",
)

user_stats = FeatureView(
    name=schema.USER_STATS_VIEW,
    entities=[user],
    ttl=timedelta(0),
    schema=[
        *[Field(name=name, dtype=Int64) for name in schema.COUNT_FIELDS],
        Field(name=schema.LAST_EVENT_S, dtype=Int64, description="time of the user's latest event, Unix seconds"),
    ],
    source=_offline_source(schema.USER_STATS_VIEW),
    description="Event counts of each user by behaviour over the 1, 3 and 7 days up to the latest event.",
)

item_stats = FeatureView(
    name=schema.ITEM_STATS_VIEW,
    entities=[item],
    ttl=timedelta(0),
    schema=[
        *[Field(name=name, dtype=Int64) for name in schema.COUNT_FIELDS],
        *[
            Field(name=name, dtype=Float64, description="count divided by the pv count of the window, 0 without pv")
            for name in schema.RATIO_FIELDS
        ],
    ],
    source=_offline_source(schema.ITEM_STATS_VIEW),
    description="Event counts of each item by behaviour over the 1, 3 and 7 days before each UTC midnight.",
)

item_neighbors = FeatureView(
    name=schema.ITEM_NEIGHBORS_VIEW,
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name=schema.NEIGHBOR_IDS, dtype=Array(Int64), description="co-visited items, best first"),
        Field(name=schema.NEIGHBOR_SCORES, dtype=Array(Float64), description="co-visitation score of each"),
    ],
    source=_offline_source(schema.ITEM_NEIGHBORS_VIEW),
    description=f"Top {schema.NEIGHBORS_PER_ITEM} co-visited items of each item, weighted by behaviour and time gap.",
)

ranking_features = FeatureService(name=schema.RANKING_SERVICE, features=[user_sequence, user_stats])
candidate_features = FeatureService(name=schema.CANDIDATE_SERVICE, features=[item_neighbors, item_stats])
