import datetime
import threading

import pandas as pd
import pytest
import torch
from feast import FeatureStore

from helpers import copy_feature_repo, feast_apply, write_random_artifact
from serving.stages import (
    BehaviorEvent,
    CandidateConfig,
    CandidateGenerator,
    FeatureLookup,
    Ranker,
    RecommendationPipeline,
    SequenceUpdater,
    UserSequence,
)
from training.schema import ITEM_NEIGHBORS_VIEW, USER_SEQUENCE_VIEW

NOW = datetime.datetime(2017, 12, 3, tzinfo=datetime.timezone.utc)
ITEMS = list(range(101, 121))
CATEGORIES = [1, 2, 3]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    repo = copy_feature_repo(root / "feature_repo")
    feast_apply(repo)
    store = FeatureStore(repo_path=str(repo))
    store.write_to_online_store(
        USER_SEQUENCE_VIEW,
        pd.DataFrame(
            {
                "user_id": [1, 2],
                "event_timestamp": [NOW, NOW],
                "item_ids": [[101, 102, 103], [120]],
                "category_ids": [[1, 1, 2], [3]],
                "behaviors": [["pv", "cart", "pv"], ["buy"]],
                "timestamps_s": [[10, 20, 30], [40]],
            }
        ),
    )
    store.write_to_online_store(
        ITEM_NEIGHBORS_VIEW,
        pd.DataFrame(
            {
                "item_id": [103, 102],
                "event_timestamp": [NOW, NOW],
                "neighbor_ids": [[110, 111], [111, 112, 999]],
                "neighbor_scores": [[5.0, 1.0], [4.0, 2.0, 1.0]],
            }
        ),
    )
    counts = {item: 100 - index for index, item in enumerate(ITEMS)}
    write_random_artifact(root / "models", ITEMS, CATEGORIES, item_counts=counts)
    return {"repo": repo, "models": root / "models"}


def test_lookup_returns_sequences_in_request_order(stack):
    lookup = FeatureLookup(stack["repo"])
    first, missing, second = lookup.lookup([2, 777, 1])
    assert first.item_ids == (120,)
    assert missing is None
    assert second.item_ids == (101, 102, 103)
    assert second.behaviors == ("pv", "cart", "pv")
    assert second.timestamps_s == (10, 20, 30)


def test_candidates_merge_neighbors_by_recency_weighted_score(stack):
    generator = CandidateGenerator(stack["repo"], CandidateConfig(include_recent_items=False, recency_decay=0.5))
    sequence = FeatureLookup(stack["repo"]).lookup([1])[0]
    # 103 is most recent (weight 1), 102 next (weight 0.5): 110 = 5, 111 = 1 + 2, 112 = 1, 999 = 0.5.
    assert generator.generate(sequence) == [110, 111, 112, 999]


def test_candidates_start_with_recent_items_without_duplicates(stack):
    generator = CandidateGenerator(stack["repo"], CandidateConfig(max_candidates=5))
    sequence = UserSequence(1, (101, 102, 103, 102), (1, 1, 2, 1), ("pv",) * 4, (1, 2, 3, 4))
    candidates = generator.generate(sequence)
    assert candidates[:3] == [102, 103, 101]
    assert len(candidates) == len(set(candidates)) == 5


def test_ranker_orders_by_score_and_drops_unknown_items(stack):
    ranker = Ranker.from_model_dir(stack["models"])
    sequence = UserSequence(1, (101, 102), (1, 1), ("pv", "pv"), (1, 2))
    ranked = ranker.rank([sequence], [[110, 999, 111, 112]], k=10)[0]
    assert {item.item_id for item in ranked} == {110, 111, 112}
    assert [item.score for item in ranked] == sorted((item.score for item in ranked), reverse=True)
    assert all(item.source == "model" for item in ranked)


def test_ranker_scores_match_evaluation_path(stack):
    ranker = Ranker.from_model_dir(stack["models"])
    sequence = UserSequence(1, (101, 102, 103), (1, 1, 2), ("pv", "cart", "pv"), (1, 2, 3))
    ranked = ranker.rank([sequence], [[110, 111]], k=2)[0]
    model = ranker.artifact.model
    with torch.no_grad():
        full = model.score_all(model.encode(ranker.encode_inputs([sequence])))[0]
    for item in ranked:
        index = int(ranker.artifact.item_vocab.lookup([item.item_id])[0])
        assert item.score == pytest.approx(float(full[index]), abs=1e-5)


def test_pipeline_flags_cold_start_for_unknown_user(stack):
    pipeline = RecommendationPipeline(
        FeatureLookup(stack["repo"]), CandidateGenerator(stack["repo"]), Ranker.from_model_dir(stack["models"])
    )
    result = pipeline.recommend(777, k=3)
    assert result.cold_start
    assert [item.item_id for item in result.items] == ITEMS[:3]
    assert all(item.source == "popularity" for item in result.items)


def test_pipeline_backfills_short_candidate_lists(stack):
    pipeline = RecommendationPipeline(
        FeatureLookup(stack["repo"]), CandidateGenerator(stack["repo"]), Ranker.from_model_dir(stack["models"])
    )
    result = pipeline.recommend(2, k=5)  # user 2 has one recent item and no neighbours
    assert not result.cold_start
    assert result.backfilled
    assert len(result.items) == 5
    assert result.items[0].item_id == 120
    assert result.items[0].source == "model"
    assert len({item.item_id for item in result.items}) == 5


def event(user_id, item_id, timestamp_s, behavior="pv"):
    return BehaviorEvent(user_id, item_id, 1, behavior, timestamp_s)


def test_updater_appends_and_truncates_like_batch(stack):
    updater = SequenceUpdater(stack["repo"], sequence_length=4)
    lengths = updater.append([event(11, 105, 50), event(11, 104, 40), event(11, 106, 50, "buy")])
    assert lengths == {11: 3}
    lengths = updater.append([event(11, 107, 60), event(11, 108, 70)])
    assert lengths == {11: 4}
    stored = FeatureLookup(stack["repo"]).lookup([11])[0]
    # Ordered by time; the two events at t=50 keep request order; the oldest (104) is cut.
    assert stored.item_ids == (105, 106, 107, 108)
    assert stored.behaviors == ("pv", "buy", "pv", "pv")
    assert stored.timestamps_s == (50, 50, 60, 70)


def test_updater_extends_existing_sequence(stack):
    updater = SequenceUpdater(stack["repo"])
    updater.append([event(2, 101, 100)])
    assert FeatureLookup(stack["repo"]).lookup([2])[0].item_ids == (120, 101)


def test_concurrent_appends_for_one_user_all_land(stack):
    updater = SequenceUpdater(stack["repo"], sequence_length=500)
    threads = [
        threading.Thread(target=updater.append, args=([event(12, 1000 + n, 1000 + n)],)) for n in range(40)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = FeatureLookup(stack["repo"]).lookup([12])[0]
    assert sorted(stored.item_ids) == [1000 + n for n in range(40)]
