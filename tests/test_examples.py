import numpy as np

from test_features import make_events
from training.examples import TEST, TRAIN, VALIDATION, gather_left_padded, split_user_examples
from training.vocab import Vocabulary


def examples_by_split(events, length):
    table = split_user_examples(
        events, Vocabulary(events["item_id"].to_numpy()), Vocabulary(events["category_id"].to_numpy()), length
    )
    return {split: [row for row in table.to_pylist() if row["split"] == split] for split in (TRAIN, VALIDATION, TEST)}


def test_gather_left_padded_respects_starts():
    values = np.array([10, 11, 12, 13, 14])
    out = gather_left_padded(values, ends=np.array([3, 5]), starts=np.array([0, 3]), length=4)
    assert out.tolist() == [[0, 10, 11, 12], [0, 0, 13, 14]]


def test_leave_one_out_holds_out_last_two_events():
    # Items 1..6 map to indices 1..6 because the vocabulary sorts raw ids.
    events = make_events([(7, item, 1, "pv", item * 10) for item in range(1, 7)])
    splits = examples_by_split(events, length=4)

    test = splits[TEST][0]
    assert test["item_ids"] == [2, 3, 4, 5]
    assert test["targets"] == [0, 0, 0, 6]
    validation = splits[VALIDATION][0]
    assert validation["item_ids"] == [1, 2, 3, 4]
    assert validation["targets"] == [0, 0, 0, 5]

    train = splits[TRAIN]
    targets = sorted(t for row in train for t in row["targets"] if t)
    assert targets == [2, 3, 4]  # each training event after the first is a target once
    for row in train:
        for position, target in enumerate(row["targets"]):
            if target:
                assert row["item_ids"][position] == target - 1


def test_users_with_fewer_than_three_events_train_only():
    events = make_events([(1, 1, 1, "pv", 0), (1, 2, 1, "pv", 10)])
    splits = examples_by_split(events, length=4)
    assert splits[TEST] == []
    assert splits[VALIDATION] == []
    assert [t for t in splits[TRAIN][0]["targets"] if t] == [2]


def test_long_training_sequences_are_cut_into_windows():
    events = make_events([(1, item, 1, "pv", item) for item in range(1, 13)])
    splits = examples_by_split(events, length=4)
    targets = sorted(t for row in splits[TRAIN] for t in row["targets"] if t)
    assert targets == list(range(2, 11))
    assert all(len(row["item_ids"]) == 4 for row in splits[TRAIN])


def test_behaviors_and_categories_align_with_items():
    events = make_events([(1, 5, 9, "pv", 0), (1, 6, 8, "buy", 1), (1, 7, 7, "cart", 2), (1, 8, 6, "fav", 3)])
    test = examples_by_split(events, length=4)[TEST][0]
    assert test["item_ids"] == [0, 1, 2, 3]
    assert test["behaviors"] == [0, 1, 4, 2]
    # Category ids 6..9 map to indices 1..4.
    assert test["category_ids"] == [0, 4, 3, 2]
