from pathlib import Path

import numpy as np
import pytest

from helpers import write_random_artifact
from test_features import make_events
from training.artifacts import TRENDING_FILE, load_artifact
from training.trending import TrendingConfig, rank_trending, trending_items, trending_scores
from training.vocab import Vocabulary

DAY = 86_400


def test_scores_favour_rising_items():
    config = TrendingConfig(window_s=DAY, baseline_s=7 * DAY, min_recent_events=3)
    # Item 0 sells 10 a day every day, and item 1 went from nothing to 10. Item 2 has 2 recent events.
    scores = trending_scores(np.array([10, 10, 2]), np.array([70, 0, 0]), config)
    assert scores[1] > scores[0]
    assert scores[0] == pytest.approx(0.0)
    assert scores[2] == -np.inf


def test_rank_drops_unscored_items():
    ranked = rank_trending(np.array([7, 3, 5, 9]), np.array([1.0, 2.0, 1.0, -np.inf]), max_items=10)
    assert ranked.tolist() == [3, 5, 7]
    assert rank_trending(np.array([7, 3, 5]), np.array([1.0, 2.0, 1.0]), max_items=2).tolist() == [3, 5]


def test_config_rejects_empty_window():
    with pytest.raises(ValueError, match="window_s"):
        TrendingConfig(window_s=0)


def test_trending_items_from_events(ray_instance):
    newest = 10 * DAY
    rows = []
    # Item 11: a steady seller, 4 events a day for ten days. Item 12: new, 5 events in the last day,
    # the newest at ``newest``. Item 13: 8 events before the baseline window, 3 in the last day.
    # Item 14: 2 events in the last day only.
    rows += [(1, 11, 1, "pv", day * DAY + hour * 3600) for day in range(10) for hour in range(1, 5)]
    rows += [(2, 12, 1, "pv", newest - minute * 60) for minute in range(5)]
    rows += [(3, 13, 1, "pv", minute * 60) for minute in range(8)]
    rows += [(3, 13, 1, "buy", newest - minute * 60) for minute in range(3)]
    rows += [(4, 14, 1, "pv", newest - minute * 60) for minute in range(2)]
    events = make_events(rows)
    vocab = Vocabulary(np.array([11, 12, 13, 14]))
    ranked = trending_items(ray_instance.data.from_arrow(events), vocab, TrendingConfig(min_recent_events=3))
    # 12: (5 - 0) / 1 = 5; 13: (3 - 0) / 1 = 3; 11: 4 recent against 28 / 7 expected = 0.
    assert vocab.raw(ranked).tolist() == [12, 13, 11]


def test_artifact_stores_trending_list(tmp_path):
    location = write_random_artifact(tmp_path, [101, 102, 103], [1], trending=[103, 101])
    artifact = load_artifact(tmp_path)
    assert artifact.item_vocab.raw(artifact.trending_items).tolist() == [103, 101]

    (Path(location) / TRENDING_FILE).unlink()
    assert load_artifact(tmp_path).trending_items.size == 0
