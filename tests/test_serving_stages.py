"""The serving stages as plain classes, against a real Redis online store."""

import asyncio
import dataclasses
import datetime

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import _free_port
from helpers import copy_feature_repo, feast_apply, write_random_artifact
from serving.candidates import (
    CF,
    EMBEDDING,
    POPULAR,
    RECENT,
    TRENDING,
    BoughtItemPolicy,
    CandidateConfig,
    FilterConfig,
    bought_items,
    merge_candidates,
)
from serving.flow import RankBatcher, StageTimeouts, recommend
from serving.stages import (
    ONLINE_STORE_UNAVAILABLE,
    RANKING_TIMED_OUT,
    CandidateGenerator,
    FeatureLookup,
    OnlineStoreUnavailable,
    Ranker,
    RankedList,
    RankRequest,
    RecommendationPipeline,
    ServingModel,
    UserSequence,
)
from serving_support import PATIENT_TIMEOUTS, applied_redis_store, unreachable_redis_repo
from training.retrieval import INDEX_FILE, ItemIndex
from training.schema import (
    ITEM_NEIGHBORS_VIEW,
    SEQUENCE_BEHAVIORS,
    SEQUENCE_CATEGORY_IDS,
    SEQUENCE_ITEM_IDS,
    SEQUENCE_TIMESTAMPS_S,
    USER_SEQUENCE_VIEW,
)

NOW = datetime.datetime(2017, 12, 3, tzinfo=datetime.timezone.utc)
ITEMS = list(range(101, 121))
CATEGORIES = [1, 2, 3]
TRENDING_ITEMS = [115, 104, 119, 108]
REDIS_DB = 1
PATIENT = StageTimeouts(**PATIENT_TIMEOUTS)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("stack")
    repo, store = applied_redis_store(root / "feature_repo", redis_url, REDIS_DB)
    store.write_to_online_store(
        USER_SEQUENCE_VIEW,
        pd.DataFrame(
            {
                "user_id": [1, 2, 3],
                "event_timestamp": [NOW, NOW, NOW],
                "item_ids": [[101, 102, 103], [120], [104, 105, 106]],
                "category_ids": [[1, 1, 2], [3], [1, 1, 1]],
                "behaviors": [["pv", "cart", "pv"], ["buy"], ["buy", "pv", "pv"]],
                "timestamps_s": [[10, 20, 30], [40], [10, 20, 30]],
            }
        ),
    )
    store.write_to_online_store(
        ITEM_NEIGHBORS_VIEW,
        pd.DataFrame(
            {
                "item_id": [103, 102, 106],
                "event_timestamp": [NOW, NOW, NOW],
                "neighbor_ids": [[110, 111], [111, 112, 999], [104, 107]],
                "neighbor_scores": [[5.0, 1.0], [4.0, 2.0, 1.0], [3.0, 2.0]],
            }
        ),
    )
    counts = {item: 100 - index for index, item in enumerate(ITEMS)}
    location = write_random_artifact(root / "models", ITEMS, CATEGORIES, item_counts=counts, trending=TRENDING_ITEMS)
    broken = unreachable_redis_repo(repo, root / "broken_repo", _free_port())
    return {"repo": repo, "models": root / "models", "location": location, "broken_repo": broken}


@pytest.fixture(scope="module")
def model(stack):
    return ServingModel.load(stack["models"])


def pipeline_for(stack, model, repo=None, **kwargs):
    repo = repo or stack["repo"]
    kwargs.setdefault("timeouts", PATIENT)
    return RecommendationPipeline(
        FeatureLookup(repo), CandidateGenerator(repo, model), Ranker(model), **kwargs
    )


def test_lookup_returns_sequences_in_request_order(stack):
    lookup = FeatureLookup(stack["repo"])
    first, missing, second = lookup.lookup([2, 777, 1])
    assert first.item_ids == (120,)
    assert missing is None
    assert second.item_ids == (101, 102, 103)
    assert second.behaviors == ("pv", "cart", "pv")
    assert second.timestamps_s == (10, 20, 30)


def test_lookup_raises_when_store_unreachable(stack):
    with pytest.raises(OnlineStoreUnavailable, match="user sequences"):
        FeatureLookup(stack["broken_repo"]).lookup([1])


def test_repeated_lookups_read_the_same_fields(stack):
    lookup = FeatureLookup(stack["repo"])
    for _ in range(3):
        sequence = lookup.lookup([1])[0]
    assert sequence.item_ids == (101, 102, 103)
    assert lookup.reader.features == [SEQUENCE_ITEM_IDS, SEQUENCE_CATEGORY_IDS, SEQUENCE_BEHAVIORS, SEQUENCE_TIMESTAMPS_S]


def test_lookup_reads_sqlite_online_store(tmp_path):
    from feast import FeatureStore

    repo = copy_feature_repo(tmp_path / "feature_repo")
    feast_apply(repo)
    rows = {
        "user_id": [7],
        "event_timestamp": [NOW],
        "item_ids": [[104, 105]],
        "category_ids": [[1, 2]],
        "behaviors": [["pv", "buy"]],
        "timestamps_s": [[10, 20]],
    }
    FeatureStore(repo_path=str(repo)).write_to_online_store(USER_SEQUENCE_VIEW, pd.DataFrame(rows))
    known, unknown = FeatureLookup(repo).lookup([7, 8])
    assert known == UserSequence(7, (104, 105), (1, 2), ("pv", "buy"), (10, 20))
    assert unknown is None


def test_neighbors_merge_by_recency_weighted_score(stack, model):
    generator = CandidateGenerator(stack["repo"], model, CandidateConfig(recency_decay=0.5))
    # 103 is most recent (weight 1), 102 next (weight 0.5): 110 = 5, 111 = 1 + 2, 112 = 1, 999 = 0.5.
    assert generator.neighbors([103, 102], limit=10) == [110, 111, 112, 999]
    assert generator.neighbors([103, 102], limit=2) == [110, 111]


def test_merge_takes_quotas_then_fills_in_source_order():
    lists = {RECENT: [1, 2], CF: [2, 3, 4, 5], EMBEDDING: [6, 3, 7], POPULAR: [1, 8, 9]}
    quotas = {RECENT: 1, CF: 2, EMBEDDING: 1, POPULAR: 1}
    item_ids, sources = merge_candidates(lists, quotas, max_candidates=8, excluded=[4])
    # First pass: 1 | 2, 3 | 6 | 8. Second pass: recent has nothing new, then CF 5, embedding 7, popular 9.
    assert item_ids == [1, 2, 3, 6, 8, 5, 7, 9]
    assert sources == [RECENT, CF, CF, EMBEDDING, POPULAR, CF, EMBEDDING, POPULAR]


def test_merge_stops_at_max_candidates():
    lists = {CF: list(range(10)), POPULAR: list(range(5, 20))}
    item_ids, _ = merge_candidates(lists, {CF: 3, POPULAR: 3}, max_candidates=7)
    assert item_ids == [0, 1, 2, 5, 6, 7, 3]


def test_candidate_config_rejects_unknown_source():
    with pytest.raises(ValueError, match="unknown candidate sources"):
        CandidateConfig(quotas={"bestsellers": 5})


def test_generate_uses_every_source_without_duplicates(stack, model):
    quotas = {RECENT: 3, CF: 4, EMBEDDING: 3, TRENDING: 2, POPULAR: 3}
    generator = CandidateGenerator(stack["repo"], model, CandidateConfig(max_candidates=15, quotas=quotas))
    sequence = UserSequence(1, (101, 102, 103, 102), (1, 1, 2, 1), ("pv",) * 4, (1, 2, 3, 4))
    candidates = generator.generate(sequence)
    assert candidates.item_ids[:3] == (102, 103, 101)
    assert len(candidates.item_ids) == len(set(candidates.item_ids)) == 15
    assert {RECENT, CF, EMBEDDING, TRENDING, POPULAR} <= set(candidates.sources)


def test_trending_candidates_come_from_the_model_version(stack, model):
    quotas = {RECENT: 0, CF: 0, EMBEDDING: 0, TRENDING: 2, POPULAR: 0}
    generator = CandidateGenerator(stack["repo"], model, CandidateConfig(max_candidates=2, quotas=quotas))
    sequence = UserSequence(1, (101,), (1,), ("pv",), (1,))
    candidates = generator.generate(sequence, excluded={TRENDING_ITEMS[0]})
    assert candidates.item_ids == tuple(TRENDING_ITEMS[1:3])
    assert candidates.sources == (TRENDING, TRENDING)
    assert candidates.degraded == ()


def test_generate_drops_excluded_items(stack, model):
    generator = CandidateGenerator(stack["repo"], model)
    sequence = UserSequence(1, (101, 102, 103), (1, 1, 2), ("pv",) * 3, (1, 2, 3))
    candidates = generator.generate(sequence, excluded={103, 110, 105})
    assert not {103, 110, 105} & set(candidates.item_ids)
    assert 111 in candidates.item_ids


def test_generate_without_store_flags_and_still_fills(stack, model):
    generator = CandidateGenerator(stack["broken_repo"], model, CandidateConfig(max_candidates=10))
    sequence = UserSequence(1, (101, 102, 103), (1, 1, 2), ("pv",) * 3, (1, 2, 3))
    candidates = generator.generate(sequence)
    assert candidates.degraded == (ONLINE_STORE_UNAVAILABLE,)
    assert CF not in candidates.sources
    assert len(candidates.item_ids) == 10


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (FilterConfig(BoughtItemPolicy.KEEP), set()),
        (FilterConfig(BoughtItemPolicy.EXCLUDE), {7, 9}),
        (FilterConfig(BoughtItemPolicy.EXCLUDE_RECENT, bought_window_s=50), {9}),
    ],
    ids=["keep", "exclude", "exclude-recent"],
)
def test_bought_items_follow_policy(policy, expected):
    items, behaviors, times = (7, 8, 9, 10), ("buy", "pv", "buy", "pv"), (0, 10, 60, 100)
    assert bought_items(items, behaviors, times, policy) == expected


def test_ranker_orders_by_score_and_drops_unknown_items(model):
    ranker = Ranker(model)
    sequence = UserSequence(1, (101, 102), (1, 1), ("pv", "pv"), (1, 2))
    ranked = ranker.rank([sequence], [[110, 999, 111, 112]], k=10)[0]
    assert {item.item_id for item in ranked} == {110, 111, 112}
    assert [item.score for item in ranked] == sorted((item.score for item in ranked), reverse=True)
    assert all(item.source == "model" for item in ranked)


def test_ranker_scores_match_evaluation_path(model):
    ranker = Ranker(model)
    sequence = UserSequence(1, (101, 102, 103), (1, 1, 2), ("pv", "cart", "pv"), (1, 2, 3))
    ranked = ranker.rank([sequence], [[110, 111]], k=2)[0]
    net = ranker.artifact.model
    with torch.no_grad():
        full = net.score_all(net.encode(ranker.encode_inputs([sequence])))[0]
    for item in ranked:
        index = int(ranker.artifact.item_vocab.lookup([item.item_id])[0])
        assert item.score == pytest.approx(float(full[index]), abs=1e-5)


def test_rank_requests_gives_one_output_per_request(model):
    ranker = Ranker(model)
    sequence = UserSequence(1, (101, 102), (1, 1), ("pv", "pv"), (1, 2))
    requests = [
        RankRequest(sequence, (110, 111, 112), k=2),
        RankRequest(None, (), k=3),
        RankRequest(sequence, (), k=4, excluded=frozenset({101})),
        RankRequest(sequence, (110, 111), k=5, excluded=frozenset({110, 102})),
    ]
    outputs = ranker.rank_requests(requests)
    assert len(outputs) == 4
    assert [len(output.items) for output in outputs] == [2, 3, 4, 5]
    assert [output.backfilled for output in outputs] == [False, True, True, True]
    assert 101 not in {item.item_id for item in outputs[2].items}
    assert not {110, 102} & {item.item_id for item in outputs[3].items}
    assert outputs[3].items[0].item_id == 111
    assert {output.model_version for output in outputs} == {"v0"}


def test_rank_each_isolates_a_failing_request(model):
    ranker = Ranker(model)
    sequence = UserSequence(1, (101, 102), (1, 1), ("pv", "pv"), (1, 2))
    good = RankRequest(sequence, (110, 111, 112), k=2)
    overflowing = RankRequest(sequence, (2**70,), k=2)  # passes RankRequest's checks, fails in the model call
    outputs = ranker.rank_each([good, overflowing, good])
    assert [type(output) for output in outputs] == [RankedList, OverflowError, RankedList]
    assert outputs[0] == outputs[2] == ranker.rank_requests([good])[0]


class RecordingRanker:
    """A rank_each stand-in that records its batches; a request with k=13 fails."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, requests):
        self.batches.append([request.k for request in requests])
        outputs = []
        for request in requests:
            if request.k == 13:
                outputs.append(ValueError("k 13"))
            else:
                outputs.append(RankedList((), f"k{request.k}", backfilled=False))
        return outputs


def test_rank_batcher_one_output_per_request():
    recorder = RecordingRanker()
    batcher = RankBatcher(recorder, max_batch_size=16)

    async def rank_all(ks):
        return await asyncio.gather(*(batcher.rank(RankRequest(None, (), k=k)) for k in ks), return_exceptions=True)

    outputs = asyncio.run(rank_all(range(1, 41)))
    assert [len(batch) for batch in recorder.batches] == [16, 16, 8]
    assert [output.model_version for output in outputs if isinstance(output, RankedList)] == [
        f"k{k}" for k in range(1, 41) if k != 13
    ]
    assert isinstance(outputs[12], ValueError)

    recorder.batches.clear()
    assert asyncio.run(rank_all([5]))[0].model_version == "k5"  # alone, ranked at once
    assert recorder.batches == [[5]]


def test_rank_batcher_skips_abandoned_requests():
    recorder = RecordingRanker()
    batcher = RankBatcher(recorder, max_batch_size=16)

    async def abandon_some():
        tasks = [asyncio.create_task(batcher.rank(RankRequest(None, (), k=k))) for k in range(1, 7)]
        await asyncio.sleep(0)  # every task is now waiting for its batch
        for task in tasks[::2]:
            task.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outputs = asyncio.run(abandon_some())
    assert recorder.batches == [[2, 4, 6]]
    assert [type(output).__name__ for output in outputs] == ["CancelledError", "RankedList"] * 3
    assert asyncio.run(batcher.rank(RankRequest(None, (), k=3))).model_version == "k3"


@pytest.mark.parametrize("in_threads", [False, True])
def test_batched_ranking_matches_ranking_alone(stack, model, in_threads):
    def pipeline(max_batch_size):
        return pipeline_for(stack, model, in_threads=in_threads, max_batch_size=max_batch_size)

    batched, alone = pipeline(16), pipeline(1)
    sizes, rank_each = [], batched.calls.ranker.rank_each
    batched.calls.ranker.rank_each = lambda requests: sizes.append(len(requests)) or rank_each(requests)

    async def recommend_all(calls):
        requests = [(user, k) for user in (1, 2, 3, 777) for k in (3, 7)]
        return await asyncio.gather(*(recommend(calls, user, k, timeouts=PATIENT) for user, k in requests))

    together = asyncio.run(recommend_all(batched.calls))
    one_by_one = asyncio.run(recommend_all(alone.calls))
    assert [[(item.item_id, round(item.score, 5)) for item in result.items] for result in together] == [
        [(item.item_id, round(item.score, 5)) for item in result.items] for result in one_by_one
    ]
    assert all(result.degraded == () for result in together)
    assert sum(sizes) == 8
    if not in_threads:  # stages on the event loop: every request reaches ranking in the same turn
        assert sizes == [8]


def test_rank_request_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        RankRequest(None, (), k=0)


def test_pipeline_flags_cold_start_for_unknown_user(stack, model):
    result = pipeline_for(stack, model).recommend(777, k=3)
    assert result.cold_start
    assert result.degraded == ()
    assert [item.item_id for item in result.items] == ITEMS[:3]
    assert all(item.source == "popularity" for item in result.items)


def test_pipeline_backfills_short_candidate_lists(stack, model):
    config = CandidateConfig(quotas={RECENT: 10, CF: 10, EMBEDDING: 0, POPULAR: 0}, max_candidates=10)
    pipeline = RecommendationPipeline(
        FeatureLookup(stack["repo"]), CandidateGenerator(stack["repo"], model, config), Ranker(model),
        filters=FilterConfig(BoughtItemPolicy.KEEP),
        timeouts=PATIENT,
    )
    result = pipeline.recommend(2, k=5)  # one recent item, no neighbours; the free slots stay empty
    assert not result.cold_start
    assert result.backfilled
    assert len(result.items) == 5
    assert result.items[0].item_id == 120
    assert result.items[0].source == "model"
    assert len({item.item_id for item in result.items}) == 5


def test_pipeline_filters_bought_and_excluded_items(stack, model):
    result = pipeline_for(stack, model).recommend(3, k=10, exclude=[107, 101])
    returned = {item.item_id for item in result.items}
    assert len(returned) == 10
    assert 104 not in returned  # bought
    assert not {107, 101} & returned
    assert result.latest_event_timestamp_s == 30


def test_pipeline_degrades_when_store_unreachable(stack, model):
    result = pipeline_for(stack, model, repo=stack["broken_repo"]).recommend(1, k=4)
    assert result.degraded == (ONLINE_STORE_UNAVAILABLE,)
    assert not result.cold_start
    assert len(result.items) == 4


def test_pipeline_flags_slow_ranking(stack, model):
    timeouts = dataclasses.replace(PATIENT, ranking_s=1e-9)
    result = pipeline_for(stack, model, timeouts=timeouts).recommend(1, k=4, exclude=[101])
    assert result.degraded == (RANKING_TIMED_OUT,)
    assert len(result.items) == 4
    assert 101 not in {item.item_id for item in result.items}


def test_artifact_carries_index_of_item_embeddings(stack, model):
    from pathlib import Path

    assert (Path(stack["location"]) / INDEX_FILE).is_file()
    assert model.index.num_items == len(ITEMS)
    embeddings = model.artifact.model.item_embeddings().detach().numpy()
    # The nearest item to an item's own vector is that item.
    for index in (1, 7, 20):
        assert model.index.search(embeddings[index], 1).tolist() == [index]


def test_index_search_matches_exact_neighbors():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(301, 16)).astype(np.float32)
    index = ItemIndex.build(embeddings)
    query = embeddings[5] + embeddings[9]
    unit = embeddings[1:] / np.linalg.norm(embeddings[1:], axis=1, keepdims=True)
    exact = np.argsort(-(unit @ (query / np.linalg.norm(query))))[:10] + 1
    found = index.search(query, 10)
    assert len(set(found.tolist()) & set(exact.tolist())) >= 9


def test_local_app_serves_and_exports_metrics(stack):
    from fastapi.testclient import TestClient

    from serving.local import create_local_app

    client = TestClient(create_local_app(str(stack["repo"]), str(stack["models"])))
    response = client.post("/v1/recommend", json={"user_id": 1, "k": 3}, headers={"X-Request-ID": "local-1"})
    assert response.status_code == 200, response.text
    assert response.json()["request_id"] == "local-1"
    assert len(response.json()["items"]) == 3
    metrics = client.get("/metrics").text
    for stage in ("feature_lookup", "candidate_generation", "ranking", "request"):
        assert f'seqrec_stage_latency_s_bucket{{le="0.001",stage="{stage}"}}' in metrics
    assert 'seqrec_candidates_total{source="cf"}' in metrics
    assert 'seqrec_stage_errors_total' in metrics
