import datetime

import numpy as np
import pyarrow as pa
import pytest
import torch

from test_features import T0, make_events
from training.artifacts import load_artifact, write_artifact
from training.evaluation import (
    NegativeSampler,
    SampledMetricsConfig,
    evaluate_batch,
    sampled_metric_sums,
    target_ranks,
)
from training.examples import TEST, split_user_examples
from training.models import PopularityRanker, SASRec, SASRecConfig, SequenceBatch
from training.train import _inputs, _matrix
from training.vocab import Vocabulary

LENGTH = 8


def test_uniform_sampler_never_draws_target_or_padding():
    sampler = NegativeSampler(SampledMetricsConfig("uniform", num_negatives=500, seed=3), np.ones(6))
    targets = np.array([1, 3, 5])
    negatives = sampler.sample(np.array([10, 11, 12]), targets)
    assert negatives.shape == (3, 500)
    assert (negatives >= 1).all()
    assert (negatives <= 5).all()
    assert not (negatives == targets[:, None]).any()
    # Every other item is drawn for some user.
    assert set(negatives[0].tolist()) == {2, 3, 4, 5}


def test_sampler_draws_depend_only_on_user_and_seed():
    sampler = NegativeSampler(SampledMetricsConfig("uniform", num_negatives=20, seed=7), np.ones(100))
    together = sampler.sample(np.array([5, 6, 7]), np.array([1, 2, 3]))
    alone = sampler.sample(np.array([6]), np.array([2]))
    assert np.array_equal(together[1], alone[0])
    other_seed = NegativeSampler(SampledMetricsConfig("uniform", num_negatives=20, seed=8), np.ones(100))
    assert not np.array_equal(other_seed.sample(np.array([6]), np.array([2])), alone)


def test_popularity_sampler_follows_counts():
    counts = np.array([0, 0, 1, 3, 0])
    sampler = NegativeSampler(SampledMetricsConfig("popularity", num_negatives=4000, seed=0), counts)
    negatives = sampler.sample(np.array([1]), np.array([4]))[0]
    assert set(negatives.tolist()) == {2, 3}
    assert (negatives == 3).mean() == pytest.approx(0.75, abs=0.03)
    # A draw equal to the target is dropped, as the padding index.
    dropped = sampler.sample(np.array([1]), np.array([3]))[0]
    assert set(dropped.tolist()) == {0, 2}


def test_sampled_config_needs_a_named_sampler():
    with pytest.raises(ValueError, match="sampler"):
        SampledMetricsConfig("random")


def test_sampled_metrics_rank_target_among_negatives():
    scores = torch.tensor([[float("-inf"), 5.0, 4.0, 3.0, 2.0, 1.0]])
    # Target 3 beats 4 and 5 but loses to 1; the dropped draw (0) counts for nothing.
    sums = sampled_metric_sums(scores, torch.tensor([3]), torch.tensor([[1, 4, 5, 0]]))
    assert sums["sampled_mrr"] == pytest.approx(0.5)
    assert sums["sampled_hr@10"] == 1
    assert target_ranks(scores, torch.tensor([3])).item() == 2.0


def _events_for_two_users():
    rows = []
    for user, offset in ((101, 0), (202, 5)):
        for step in range(9):
            item = 1000 + (step * 7 + offset) % 13
            behavior = ("pv", "cart", "fav", "buy")[(step + offset) % 4]
            rows.append((user, item, 50 + item % 3, behavior, offset * 1000 + step * (step + 1) * 37))
    return make_events(rows)


def test_evaluation_scores_a_user_as_serving_does(tmp_path):
    from serving.stages import Ranker, ServingModel, UserSequence

    events = _events_for_two_users()
    item_vocab = Vocabulary(events["item_id"].to_numpy())
    category_vocab = Vocabulary(events["category_id"].to_numpy())
    config = SASRecConfig(
        num_items=item_vocab.size_with_padding,
        num_categories=category_vocab.size_with_padding,
        max_length=LENGTH,
        hidden_size=16,
        use_time_gap=True,
    )
    torch.manual_seed(0)
    write_artifact(
        tmp_path, "v1", SASRec(config).state_dict(), config, item_vocab, category_vocab,
        np.ones(item_vocab.size_with_padding, dtype=np.int64), metrics={}, run_info={},
    )
    artifact = load_artifact(tmp_path)
    ranker = Ranker(ServingModel.load(tmp_path))

    # Evaluation path: the test examples, encoded and scored against all items.
    examples = split_user_examples(events, item_vocab, category_vocab, LENGTH)
    test = examples.filter(pa.compute.equal(examples["split"], TEST))
    with torch.no_grad():
        evaluation_scores = artifact.model.score_all(artifact.model.encode(_inputs(test)))
    targets = _matrix(test, "targets")[:, -1]

    # Serving path: each user's events before the test target, as the online store returns them.
    all_items = item_vocab.raw(np.arange(1, item_vocab.size_with_padding)).tolist()
    users = events.to_pandas().sort_values(["user_id", "event_timestamp", "event_position"])
    for row, user_id in enumerate(test["user_id"].to_pylist()):
        history = users[users["user_id"] == user_id].iloc[:-1]
        sequence = UserSequence(
            user_id=user_id,
            item_ids=tuple(history["item_id"]),
            category_ids=tuple(history["category_id"]),
            behaviors=tuple(history["behavior"]),
            timestamps_s=tuple(int(t.timestamp()) for t in history["event_timestamp"]),
        )
        served = ranker.rank([sequence], [all_items], k=len(all_items))[0]
        served_scores = {item.item_id: item.score for item in served}
        assert len(served_scores) == len(all_items)
        for raw_id, index in zip(all_items, item_vocab.lookup(np.array(all_items))):
            assert served_scores[raw_id] == pytest.approx(evaluation_scores[row, index].item(), abs=1e-5), raw_id

        # The target's full-ranking rank is its position in the served list.
        target_raw = int(item_vocab.raw(np.array([targets[row].item()]))[0])
        served_order = [item.item_id for item in served]
        expected_rank = target_ranks(evaluation_scores[row : row + 1], targets[row : row + 1]).item()
        assert served_order.index(target_raw) == expected_rank


def test_evaluate_batch_adds_sampled_metrics_only_on_request():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=20, num_categories=3, max_length=4, hidden_size=8)).eval()
    items = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    batch = _inputs(
        pa.table(
            {
                name: pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 4)
                for name, values in {
                    "item_ids": items.numpy(),
                    "category_ids": (items.numpy() > 0).astype(np.int64),
                    "behaviors": (items.numpy() > 0).astype(np.int64),
                    "timestamps_s": items.numpy() * 10,
                }.items()
            }
        )
    )
    targets = torch.tensor([9, 11])
    plain = evaluate_batch(model, batch, targets)
    assert not any(name.startswith("sampled_") for name in plain)
    sampler = NegativeSampler(SampledMetricsConfig("uniform", num_negatives=10), np.ones(20))
    both = evaluate_batch(model, batch, targets, np.array([1, 2]), sampler)
    assert both["ndcg@10"] == plain["ndcg@10"]
    assert "sampled_ndcg@10" in both
    # A sampled rank is never worse than the full rank.
    assert both["sampled_mrr"] >= plain["mrr"]


def test_exclude_seen_drops_input_items():
    # Popularity scores item i by counts[i], so items 9, 8, 7, ... rank first for every user.
    ranker = PopularityRanker(np.arange(10, dtype=np.float32))
    batch = SequenceBatch.from_numpy(
        np.array([[0, 9, 8], [0, 0, 9]]), np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64)
    )
    targets = torch.tensor([7, 9])
    plain = evaluate_batch(ranker, batch, targets)
    excluded = evaluate_batch(ranker, batch, targets, exclude_seen=True)
    # Sums over the two users. User 1's target 7 ranks third among all items, and first once 9 and
    # 8 are left out. User 2's target 9 ranks first, and is a miss once its input items are left out.
    assert plain["mrr@10"] == pytest.approx(1 / 3 + 1)
    assert excluded["mrr@10"] == pytest.approx(1 + 0)
    assert excluded["hr@20"] == 1.0
    # The seen target is a miss against sampled negatives too.
    sampler = NegativeSampler(SampledMetricsConfig("uniform", num_negatives=5), np.ones(10))
    sampled = evaluate_batch(ranker, batch, targets, np.array([1, 2]), sampler, exclude_seen=True)
    assert sampled["sampled_hr@20"] == 1.0


def test_timestamps_round_down_to_seconds_as_features_do():
    from training.examples import timestamps_seconds

    moment = datetime.datetime.fromtimestamp(T0 + 5.75, datetime.timezone.utc)
    table = pa.table({"event_timestamp": pa.array([moment], pa.timestamp("us", tz="UTC"))})
    assert timestamps_seconds(table).tolist() == [T0 + 5]


def test_command_line_maps_switches_and_split():
    from training.train import parse_run

    args, model_options, config, split = parse_run(
        [
            "--events", "e.parquet", "--model-dir", "models", "--no-category", "--time-gap",
            "--split", "temporal", "--validation-time", "2017-12-01T00:00", "--test-time", "1512172800",
            "--sampled-metrics", "popularity", "--sampled-seed", "5", "--use-gpu", "no", "--exclude-seen",
        ]
    )
    assert model_options["use_category"] is False
    assert model_options["use_behavior"] is True
    assert model_options["use_time_gap"] is True
    assert split.kind == "temporal"
    assert split.validation_time_s == 1512086400
    assert split.test_time_s == 1512172800
    assert config.sampled_metrics == SampledMetricsConfig("popularity", 100, 5)
    assert config.use_gpu == "no"
    assert config.exclude_seen is True


def test_command_line_rejects_invalid_split(capsys):
    from training.train import parse_run

    with pytest.raises(SystemExit):
        parse_run(["--events", "e", "--model-dir", "m", "--split", "temporal", "--test-time", "100"])
    assert "give both" in capsys.readouterr().err
