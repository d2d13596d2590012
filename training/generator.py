"""Synthetic behaviour events in the Taobao UserBehavior CSV format.

The generator is the embedded default for the demo and for scale tests. Its statistics follow the
shape of real e-commerce logs:

- item popularity follows a power law inside each category, and category popularity does too;
- users act in sessions, and a session browses one category, stepping to the next item of that
  category, revisiting the current item, or jumping to another popular one;
- behaviour types are pv far above cart and fav, with buy the rarest (Taobao's UserBehavior is
  about 89% pv, 6% cart, 3% fav, 2% buy);
- timestamps span a window of days, with gaps of seconds to minutes inside a session.

Everything is vectorized with NumPy, so tens of millions of events take seconds, not minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from training.schema import BEHAVIORS

logger = logging.getLogger(__name__)

_SECONDS_PER_DAY = 86_400


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Size and shape of a generated event log."""

    num_users: int = 2_000
    num_items: int = 20_000
    num_categories: int = 200
    mean_events_per_user: float = 60.0
    session_continue_prob: float = 0.9
    revisit_prob: float = 0.25
    next_item_prob: float = 0.45
    behavior_probs: tuple[float, float, float, float] = (0.89, 0.06, 0.03, 0.02)
    popularity_exponent: float = 2.5
    start_timestamp_s: int = 1_511_539_200  # 2017-11-25 00:00 in China time (UTC+8)
    window_days: int = 9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_categories"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_categories > self.num_items:
            raise ValueError(
                f"num_categories ({self.num_categories}) must not exceed num_items ({self.num_items})"
            )
        if self.mean_events_per_user < 1:
            raise ValueError(f"mean_events_per_user must be at least 1, got {self.mean_events_per_user}")
        for name in ("session_continue_prob", "revisit_prob", "next_item_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.revisit_prob + self.next_item_prob >= 1.0:
            raise ValueError("revisit_prob + next_item_prob must be below 1 so that sessions can jump")
        if len(self.behavior_probs) != len(BEHAVIORS) or abs(sum(self.behavior_probs) - 1.0) > 1e-6:
            raise ValueError(f"behavior_probs must be {len(BEHAVIORS)} probabilities summing to 1")


def generate_events(config: GeneratorConfig) -> pa.Table:
    """Generate an event log as a table with the Taobao CSV columns, grouped by user in time order."""
    rng = np.random.default_rng(config.seed)

    # Catalogue: category sizes follow a power law, item ids are contiguous within a category,
    # and an item's rank inside its category sets its popularity.
    category_weights = 1.0 / np.arange(1, config.num_categories + 1) ** 0.8
    extra = rng.multinomial(config.num_items - config.num_categories, category_weights / category_weights.sum())
    category_sizes = extra + 1
    category_starts = np.concatenate([[0], np.cumsum(category_sizes)[:-1]])
    category_popularity = rng.permutation(category_weights / category_weights.sum())

    # Users: event counts are long-tailed, as in real logs, with at least 3 events each.
    counts = np.maximum(3, rng.lognormal(np.log(config.mean_events_per_user) - 0.5, 1.0, config.num_users))
    counts = counts.astype(np.int64)
    num_events = int(counts.sum())
    user_index = np.repeat(np.arange(config.num_users), counts)
    user_first = np.concatenate([[0], np.cumsum(counts)[:-1]])

    # Sessions: a new one starts at each user's first event and with the complement of the
    # continue probability elsewhere.
    new_session = rng.random(num_events) > config.session_continue_prob
    new_session[user_first] = True
    session_id = np.cumsum(new_session) - 1
    num_sessions = int(session_id[-1]) + 1
    session_category = rng.choice(config.num_categories, size=num_sessions, p=category_popularity)
    event_category = session_category[session_id]

    # Moves inside a session: revisit the item (step 0), step to the next item (+1), or jump.
    move = rng.random(num_events)
    jump = (move >= config.revisit_prob + config.next_item_prob) | new_session
    step = (move >= config.revisit_prob) & ~jump
    segment_id = np.cumsum(jump) - 1
    segment_first = np.flatnonzero(jump)
    steps_so_far = np.cumsum(step)
    offset = steps_so_far - steps_so_far[segment_first][segment_id]
    sizes = category_sizes[event_category]
    anchor_rank = np.floor(sizes * rng.random(num_events) ** config.popularity_exponent).astype(np.int64)
    rank = (anchor_rank[segment_first][segment_id] + offset) % sizes
    item_index = category_starts[event_category] + rank

    behavior = rng.choice(len(BEHAVIORS), size=num_events, p=np.asarray(config.behavior_probs))

    # Timestamps: events follow at gaps of 5 s to several minutes, and each session starts
    # uniformly at a time that ends it inside the window, so every event is in the window.
    window_s = config.window_days * _SECONDS_PER_DAY
    gaps = np.where(new_session, 0, rng.exponential(60.0, num_events).astype(np.int64) + 5)
    elapsed = np.cumsum(gaps)
    session_first = np.flatnonzero(new_session)
    session_last = np.r_[session_first[1:], num_events] - 1
    duration_s = np.minimum(elapsed[session_last] - elapsed[session_first], window_s - 1)
    session_start = config.start_timestamp_s + (rng.random(num_sessions) * (window_s - duration_s)).astype(np.int64)
    timestamp = session_start[session_id] + np.minimum(
        elapsed - elapsed[session_first][session_id], window_s - 1
    )

    # Raw ids are sparse and shuffled, as in real logs, so that no code can rely on dense ids.
    user_ids = rng.choice(np.arange(1, 20 * config.num_users + 1), size=config.num_users, replace=False)
    item_ids = rng.choice(np.arange(1, 20 * config.num_items + 1), size=config.num_items, replace=False)
    category_ids = rng.choice(np.arange(1, 20 * config.num_categories + 1), size=config.num_categories, replace=False)

    order = np.lexsort((timestamp, user_index))
    return pa.table(
        {
            "user_id": user_ids[user_index][order],
            "item_id": item_ids[item_index][order],
            "category_id": category_ids[event_category][order],
            "behavior_type": np.asarray(BEHAVIORS)[behavior][order],
            "timestamp": timestamp[order],
        }
    )


def write_taobao_csv(table: pa.Table, path: str | Path) -> None:
    """Write generated events as a headerless Taobao UserBehavior CSV."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, path, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic events in the Taobao UserBehavior CSV format.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="CSV file to write")
    parser.add_argument("--users", type=int, default=GeneratorConfig.num_users, help="number of users")
    parser.add_argument("--items", type=int, default=GeneratorConfig.num_items, help="number of items")
    parser.add_argument("--categories", type=int, default=GeneratorConfig.num_categories, help="number of categories")
    parser.add_argument(
        "--events-per-user", type=float, default=GeneratorConfig.mean_events_per_user, help="mean events per user"
    )
    parser.add_argument("--seed", type=int, default=GeneratorConfig.seed, help="random seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = GeneratorConfig(
        num_users=args.users,
        num_items=args.items,
        num_categories=args.categories,
        mean_events_per_user=args.events_per_user,
        seed=args.seed,
    )
    table = generate_events(config)
    write_taobao_csv(table, args.output)
    logger.info("Wrote %d events for %d users to %s", table.num_rows, config.num_users, args.output)


if __name__ == "__main__":
    main()
