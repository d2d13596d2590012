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
