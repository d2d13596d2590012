import numpy as np
import pytest
import torch

from training.evaluation import metric_sums, target_ranks
from training.models import PopularityRanker, SASRec, SASRecConfig, SequenceBatch
from training.sequences import behavior_codes, pad_left
from training.vocab import Vocabulary


def small_model(**overrides) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=30, num_categories=6, max_length=8, hidden_size=16, **overrides))
    return model.eval()


def batch_of(items: list[list[int]], length: int = 8) -> SequenceBatch:
    padded = pad_left([np.asarray(row) for row in items], length)
    categories = np.where(padded > 0, padded % 5 + 1, 0)
    behaviors = np.where(padded > 0, 1, 0)
    return SequenceBatch.from_numpy(padded, categories, behaviors)


def test_pad_left_keeps_most_recent_at_end():
    padded = pad_left([np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8, 9]), np.array([], dtype=np.int64)], 4)
    assert padded.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9], [0, 0, 0, 0]]


def test_behavior_codes_reject_unknown_name():
    assert behavior_codes(["pv", "buy"]).tolist() == [1, 4]
    with pytest.raises(ValueError, match="click"):
        behavior_codes(["click"])


def test_vocabulary_maps_unknown_to_padding():
    vocab = Vocabulary(np.array([50, 10, 30, 10]))
    assert vocab.lookup(np.array([10, 30, 50, 20, 99])).tolist() == [1, 2, 3, 0, 0]
    assert vocab.raw(np.array([3, 1])).tolist() == [50, 10]
    with pytest.raises(IndexError):
        vocab.raw(np.array([0]))


def test_causal_mask_hides_later_positions():
    model = small_model(dropout=0.0)
    base = batch_of([[1, 2, 3, 4, 5, 6, 7, 8]])
    changed = batch_of([[1, 2, 3, 4, 20, 21, 22, 23]])
    with torch.no_grad():
        before, after = model(base), model(changed)
    # Positions 0-3 see only items 1-4, which are the same in both inputs.
    assert torch.allclose(before[0, :4], after[0, :4], atol=1e-6)
    assert not torch.allclose(before[0, 4:], after[0, 4:], atol=1e-3)


def test_training_prefix_matches_served_state():
    model = small_model(dropout=0.0)
    with torch.no_grad():
        in_window = model(batch_of([[1, 2, 3, 4, 5, 6, 7, 8]]))[0, 2]
        served = model.encode(batch_of([[1, 2, 3]]))[0]
    # The state that predicts item 4 in training is the state served after items 1-3.
    assert torch.allclose(in_window, served, atol=1e-5)


def test_padding_amount_does_not_change_scores():
    model = small_model()
    with torch.no_grad():
        short = model.score_all(model.encode(batch_of([[3, 4, 5]], length=4)))
        long = model.score_all(model.encode(batch_of([[3, 4, 5]], length=8)))
    assert torch.allclose(short, long, atol=1e-5)


def test_padding_embedding_is_zero_and_gets_no_gradient():
    model = SASRec(SASRecConfig(num_items=30, num_categories=6, max_length=8, hidden_size=16))
    assert torch.count_nonzero(model.item_embedding.weight[0]) == 0
    hidden = model(batch_of([[1, 2], [3, 4, 5]]))
    hidden.sum().backward()
    assert torch.count_nonzero(model.item_embedding.weight.grad[0]) == 0


def test_score_matches_score_all_and_masks_padding():
    model = small_model()
    with torch.no_grad():
        state = model.encode(batch_of([[1, 2, 3], [4, 5]]))
        full = model.score_all(state)
        candidates = torch.tensor([[7, 0, 3], [2, 9, 11]])
        picked = model.score(state, candidates)
    assert torch.isinf(full[:, 0]).all()
    assert torch.allclose(picked[0, [0, 2]], full[0, [7, 3]], atol=1e-5)
    assert torch.isneginf(picked[0, 1])
    assert torch.allclose(picked[1], full[1, [2, 9, 11]], atol=1e-5)


def test_sasrec_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(num_items=10, num_categories=2, hidden_size=10, num_heads=3)


def test_feedforward_settings_reach_blocks():
    model = small_model(feedforward_size=24, activation="relu")
    block = model.encoder.layers[0]
    assert block.linear1.out_features == 24
    assert block.linear2.in_features == 24
    assert block.activation is torch.nn.functional.relu
    assert small_model().encoder.layers[0].linear1.out_features == 4 * 16
    with pytest.raises(ValueError, match="activation"):
        SASRecConfig(num_items=10, num_categories=2, activation="tanh")
    with pytest.raises(ValueError, match="feedforward_size"):
        SASRecConfig(num_items=10, num_categories=2, feedforward_size=0)


def test_initializer_range_draws_block_weights():
    model = small_model(initializer_range=0.05)
    linears = [module for module in model.encoder.modules() if isinstance(module, torch.nn.Linear)]
    assert len(linears) == 3 * model.config.num_layers  # attention output and two feed-forward layers
    weights = torch.cat([module.weight.flatten() for module in linears])
    assert abs(weights.std().item() - 0.05) < 0.005
    assert all(not module.bias.any() for module in linears)
    # PyTorch's own draw for a width-16 feed-forward layer is uniform with a standard deviation near 0.14.
    assert small_model().encoder.layers[0].linear1.weight.std().item() > 0.1
    with pytest.raises(ValueError, match="initializer_range"):
        SASRecConfig(num_items=10, num_categories=2, initializer_range=0.0)


def test_popularity_ranks_by_count_and_skips_padding():
    ranker = PopularityRanker(np.array([0, 5, 9, 1, 9]))
    assert ranker.top_items(3).tolist() == [2, 4, 1]
    scores = ranker.score(ranker.encode(batch_of([[1]])), torch.tensor([[2, 0, 3]]))
    assert scores[0, 0] == 9
    assert torch.isneginf(scores[0, 1])


def test_target_ranks_split_ties_evenly():
    scores = torch.tensor([[float("-inf"), 3.0, 1.0, 1.0, 1.0, 0.5]])
    assert target_ranks(scores, torch.tensor([1])).item() == 0.0
    # Target 2 ties with items 3 and 4 behind one better item: expected rank 1 + 2 / 2.
    assert target_ranks(scores, torch.tensor([2])).item() == 2.0


def test_metric_sums_for_known_ranks():
    sums = metric_sums(torch.tensor([0.0, 9.0, 10.0], dtype=torch.float64))
    assert sums["count"] == 3
    assert sums["hr@10"] == 2
    assert sums["ndcg@10"] == pytest.approx(1.0 + 1.0 / np.log2(11))
    assert sums["hr@20"] == 3
    assert sums["mrr"] == pytest.approx(1.0 + 0.1 + 1.0 / 11)
    assert sums["mrr@10"] == pytest.approx(1.0 + 0.1)
    assert sums["mrr@20"] == pytest.approx(1.0 + 0.1 + 1.0 / 11)


def full_model(**overrides) -> SASRec:
    """A small SASRec with every side-information embedding on."""
    return small_model(dropout=0.0, use_category=True, use_behavior=True, use_time_gap=True, **overrides)


def timed_batch_of(items: list[list[int]], times: list[list[int]], length: int = 8) -> SequenceBatch:
    batch = batch_of(items, length)
    timestamps = pad_left([np.asarray(row) for row in times], length)
    return SequenceBatch(batch.item_ids, batch.category_ids, batch.behaviors, torch.as_tensor(timestamps))


def test_causal_mask_hides_each_target_from_its_position():
    model = full_model()
    items = [1, 2, 3, 4, 5, 6, 7, 8]
    times = [100 * (i + 1) for i in range(8)]
    with torch.no_grad():
        base = model(timed_batch_of([items], [times]))
        for target in range(1, 8):
            # Position target - 1 predicts the item at position target; change only that event.
            changed_items, changed_times = list(items), list(times)
            changed_items[target] = 29
            changed_times[target] += 50_000
            changed = model(timed_batch_of([changed_items], [changed_times]))
            assert torch.allclose(base[0, :target], changed[0, :target], atol=1e-6), target
            assert not torch.allclose(base[0, target], changed[0, target], atol=1e-4), target


def test_causal_mask_blocks_gradient_from_later_inputs():
    model = full_model()
    batch = timed_batch_of([[1, 2, 3, 4, 5]], [[10, 20, 30, 40, 50]])
    inputs = model.item_embedding(batch.item_ids).detach().requires_grad_(True)
    original = model.item_embedding.forward
    model.item_embedding.forward = lambda ids: inputs
    try:
        hidden = model(batch)
    finally:
        model.item_embedding.forward = original
    # Rows are left-padded to 8: the five events sit in positions 3-7. A plain sum of a layer-norm
    # output has zero gradient, so the state is projected on a fixed random direction.
    (hidden[0, 5] * torch.randn(hidden.shape[-1])).sum().backward()
    assert torch.count_nonzero(inputs.grad[0, 6:]) == 0
    assert torch.count_nonzero(inputs.grad[0, 3:6]) > 0


def test_right_padded_batch_is_rejected():
    items = torch.tensor([[1, 2, 3, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        SequenceBatch(items, items.clone(), items.clone())


def test_padding_between_events_is_rejected():
    items = torch.tensor([[0, 1, 0, 3]])
    with pytest.raises(ValueError, match="left-padded"):
        SequenceBatch(items, items.clone(), items.clone())


def test_sequence_batch_rejects_mismatched_timestamps():
    items = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="timestamps_s"):
        SequenceBatch(items, items.clone(), items.clone(), torch.zeros(1, 4, dtype=torch.long))


def test_padding_amount_does_not_change_scores_with_side_information():
    model = full_model()
    with torch.no_grad():
        short = model.score_all(model.encode(timed_batch_of([[3, 4, 5]], [[10, 70, 4000]], length=4)))
        long = model.score_all(model.encode(timed_batch_of([[3, 4, 5]], [[10, 70, 4000]], length=8)))
    assert torch.allclose(short, long, atol=1e-5)


def test_batch_neighbours_do_not_change_scores():
    model = full_model()
    with torch.no_grad():
        alone = model.score_all(model.encode(timed_batch_of([[3, 4, 5]], [[10, 70, 4000]])))
        together = model.score_all(
            model.encode(timed_batch_of([[1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5]], [list(range(8)), [10, 70, 4000]]))
        )
    assert torch.allclose(alone[0], together[1], atol=1e-5)


def test_side_padding_embeddings_are_zero_and_get_no_gradient():
    model = SASRec(
        SASRecConfig(num_items=30, num_categories=6, max_length=8, hidden_size=16, use_time_gap=True)
    )
    hidden = model(timed_batch_of([[1, 2], [3, 4, 5]], [[5, 9], [1, 2, 3]]))
    hidden.sum().backward()
    for embedding in (model.item_embedding, model.category_embedding, model.behavior_embedding, model.time_gap_embedding):
        assert torch.count_nonzero(embedding.weight[0]) == 0
        assert torch.count_nonzero(embedding.weight.grad[0]) == 0


def test_input_embeddings_start_small():
    model = SASRec(SASRecConfig(num_items=30, num_categories=6, max_length=8, hidden_size=16, use_time_gap=True))
    tables = model.input_embeddings()
    assert len(tables) == 5
    for table in tables:
        # N(0, 0.02) draws; PyTorch's own N(0, 1) would give a standard deviation near 1.
        assert table.weight.std().item() < 0.05


def test_time_gap_buckets_for_known_gaps():
    from training.models.sasrec import time_gap_buckets

    items = torch.tensor([[0, 0, 1, 2, 3, 4, 5]])
    times = torch.tensor([[0, 0, 100, 100, 103, 1_000_103, 2**40]])
    buckets = time_gap_buckets(items, times, num_buckets=32)
    # Padding 0; first event 1; gap g lands in 2 + floor(log2(g + 1)), capped at 31.
    assert buckets.tolist() == [[0, 0, 1, 2, 4, 2 + 19, 31]]
    assert time_gap_buckets(items, None, num_buckets=32).tolist() == [[0, 0, 1, 1, 1, 1, 1]]


def test_time_gap_switch_changes_scores():
    with_gaps, without_gaps = full_model(), small_model(dropout=0.0, use_time_gap=False)
    batch_a = timed_batch_of([[3, 4, 5]], [[10, 20, 30]])
    batch_b = timed_batch_of([[3, 4, 5]], [[10, 20, 10_000_000]])
    with torch.no_grad():
        assert not torch.allclose(with_gaps.encode(batch_a), with_gaps.encode(batch_b), atol=1e-4)
        assert torch.allclose(without_gaps.encode(batch_a), without_gaps.encode(batch_b), atol=1e-6)


@pytest.mark.parametrize("switch", ["use_category", "use_behavior", "use_time_gap"])
def test_each_side_information_switch_removes_its_embedding(switch):
    model = SASRec(SASRecConfig(num_items=30, num_categories=6, max_length=8, hidden_size=16, **{switch: False}))
    name = {"use_category": "category_embedding", "use_behavior": "behavior_embedding", "use_time_gap": "time_gap_embedding"}
    assert getattr(model, name[switch]) is None
    assert not any(key.startswith(name[switch]) for key in model.state_dict())


def test_sampled_loss_masks_negatives_equal_to_target():
    from training.train import next_item_loss

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(3, 4, padding_idx=0)
    hidden = torch.randn(1, 2, 4)
    targets = torch.tensor([[0, 1]])
    # With two items, every negative is item 1 or 2; draws equal to the target 1 are masked.
    loss = next_item_loss(hidden, targets, embedding, num_negatives=64)
    assert torch.isfinite(loss)
    full = next_item_loss(hidden, targets, embedding, num_negatives=None)
    assert torch.isfinite(full)


def test_itemcf_counts_pairs_within_window():
    from training.models.itemcf import count_cooccurrences

    items, neighbors, counts = count_cooccurrences(np.array([[0, 1, 2, 3], [0, 0, 1, 2]]), window=1)
    pairs = {(int(a), int(b)): int(c) for a, b, c in zip(items, neighbors, counts)}
    assert pairs == {(1, 2): 2, (2, 1): 2, (2, 3): 1, (3, 2): 1}


def test_itemcf_scores_neighbours_of_recent_items():
    from training.models import ItemCFConfig, ItemCFRanker

    sequences = np.array([[1, 2, 3], [1, 2, 4], [0, 3, 4]])
    item_counts = np.array([0, 2, 2, 2, 2])
    ranker = ItemCFRanker.from_sequences(sequences, item_counts, ItemCFConfig(window=1, recent_items=2, recency_decay=0.5))
    with torch.no_grad():
        scores = ranker.score_all(ranker.encode(batch_of([[4, 2]], length=3)))
    # sim(i, j) = c_ij / sqrt(n_i n_j) = c_ij / 2; the last item (2) weighs 1 and item 4 weighs 0.5.
    expected = {1: 1.0 * 2 / 2, 2: 0.5 * 1 / 2, 3: 1.0 * 1 / 2 + 0.5 * 1 / 2, 4: 1.0 * 1 / 2}
    assert torch.isneginf(scores[0, 0])
    for item, value in expected.items():
        assert scores[0, item].item() == pytest.approx(value), item


def test_itemcf_keeps_top_neighbours_per_item():
    from training.models.itemcf import top_similarities

    items, neighbors, similarities = top_similarities(
        np.array([1, 1, 1, 2]), np.array([2, 3, 4, 1]), np.array([1, 5, 5, 1]), np.ones(5), neighbors_per_item=2
    )
    assert list(zip(items.tolist(), neighbors.tolist())) == [(1, 3), (1, 4), (2, 1)]
    assert similarities.tolist() == [5.0, 5.0, 1.0]


def test_itemcf_score_matches_score_all():
    from training.models import ItemCFRanker

    ranker = ItemCFRanker.from_sequences(np.array([[1, 2, 3, 4], [2, 3, 5, 1]]), np.array([0, 2, 2, 2, 1, 1]))
    with torch.no_grad():
        state = ranker.encode(batch_of([[1, 2], [5]], length=4))
        full = ranker.score_all(state)
        picked = ranker.score(state, torch.tensor([[3, 0, 5], [1, 2, 4]]))
    assert torch.allclose(picked[0, [0, 2]], full[0, [3, 5]])
    assert torch.isneginf(picked[0, 1])
    assert torch.allclose(picked[1], full[1, [1, 2, 4]])


def test_itemcf_scores_match_dense_product():
    from training.models import ItemCFConfig, ItemCFRanker

    rng = np.random.default_rng(3)
    num_items = 40
    pairs = np.unique(rng.integers(1, num_items, size=(300, 2)), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    similarities = rng.random(len(pairs)).astype(np.float32)
    shuffled = rng.permutation(len(pairs))  # the ranker must not rely on sorted pairs
    ranker = ItemCFRanker(
        num_items, pairs[shuffled, 0], pairs[shuffled, 1], similarities[shuffled], ItemCFConfig(recent_items=4)
    )
    dense = torch.zeros(num_items, num_items)
    dense[pairs[:, 0], pairs[:, 1]] = torch.from_numpy(similarities)

    rows = [rng.integers(1, num_items, size=n).tolist() for n in (1, 3, 6, 6)]
    rows[3][1] = rows[3][4]  # an item seen twice adds its neighbours twice
    with torch.no_grad():
        state = ranker.encode(batch_of(rows, length=6))
        scores = ranker.score_all(state)
    expected = state @ dense
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.allclose(scores[:, 1:], expected[:, 1:], atol=1e-6)
