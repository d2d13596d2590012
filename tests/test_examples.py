import numpy as np

import pytest

from test_features import T0, make_events
from training.examples import (
    TEST,
    TRAIN,
    VALIDATION,
    SplitConfig,
    build_examples,
    gather_left_padded,
    split_user_examples,
    timestamp_quantile_s,
)
from training.vocab import Vocabulary


def examples_by_split(events, length, cuts_s=None, stride=None):
    table = split_user_examples(
        events,
        Vocabulary(events["item_id"].to_numpy()),
        Vocabulary(events["category_id"].to_numpy()),
        length,
        cuts_s,
        stride,
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


def test_window_stride_overlaps_windows():
    # Items 1..12 are their own vocabulary indices; 11 and 12 are held out, so 2..10 are targets.
    events = make_events([(1, item, 1, "pv", item) for item in range(1, 13)])
    rows = examples_by_split(events, length=4, stride=2)[TRAIN]
    targets = sorted(t for row in rows for t in row["targets"] if t)
    assert targets == list(range(2, 11))
    for row in rows:
        assert row["targets"][:2] == [0, 0]
    # The newest window ends at the last training target, with a full context before it.
    newest = max(rows, key=lambda row: row["targets"][-1])
    assert newest["item_ids"] == [6, 7, 8, 9]
    assert newest["targets"] == [0, 0, 9, 10]


def test_behaviors_and_categories_align_with_items():
    events = make_events([(1, 5, 9, "pv", 0), (1, 6, 8, "buy", 1), (1, 7, 7, "cart", 2), (1, 8, 6, "fav", 3)])
    test = examples_by_split(events, length=4)[TEST][0]
    assert test["item_ids"] == [0, 1, 2, 3]
    assert test["behaviors"] == [0, 1, 4, 2]
    # Category ids 6..9 map to indices 1..4.
    assert test["category_ids"] == [0, 4, 3, 2]


def test_examples_carry_event_seconds():
    events = make_events([(1, 5, 9, "pv", 0), (1, 6, 8, "buy", 7), (1, 7, 7, "cart", 30), (1, 8, 6, "fav", 31)])
    splits = examples_by_split(events, length=4)
    assert splits[TEST][0]["timestamps_s"] == [0, T0, T0 + 7, T0 + 30]
    assert splits[VALIDATION][0]["timestamps_s"] == [0, 0, T0, T0 + 7]
    train = splits[TRAIN][0]
    assert [t for t, item in zip(train["timestamps_s"], train["item_ids"]) if item] == [T0]


def test_temporal_split_holds_out_first_event_after_each_cut():
    # User 1 spans both cuts; user 2 has nothing before the validation cut; user 3 ends before it.
    events = make_events(
        [(1, 1, 1, "pv", 10), (1, 2, 1, "pv", 20), (1, 3, 1, "pv", 110), (1, 4, 1, "pv", 120), (1, 5, 1, "pv", 210)]
        + [(2, 6, 1, "pv", 150), (2, 7, 1, "pv", 220)]
        + [(3, 8, 1, "pv", 30), (3, 9, 1, "pv", 40)]
    )
    cuts = (T0 + 100, T0 + 200)
    splits = examples_by_split(events, length=4, cuts_s=cuts)

    validation = {row["user_id"]: row for row in splits[VALIDATION]}
    assert set(validation) == {1}
    assert validation[1]["item_ids"] == [0, 0, 1, 2]
    assert validation[1]["targets"] == [0, 0, 0, 3]

    test = {row["user_id"]: row for row in splits[TEST]}
    assert set(test) == {1, 2}
    assert test[1]["item_ids"] == [1, 2, 3, 4]
    assert test[1]["targets"] == [0, 0, 0, 5]
    assert test[2]["item_ids"] == [0, 0, 0, 6]
    assert test[2]["targets"] == [0, 0, 0, 7]

    # Training uses only events before the validation cut.
    train_targets = sorted(t for row in splits[TRAIN] for t in row["targets"] if t)
    assert train_targets == [2, 9]


def test_timestamp_quantile_counts_events_per_second():
    seconds = np.array([30, 10, 20, 40])
    counts = np.array([1, 5, 2, 2])
    assert timestamp_quantile_s(seconds, counts, 0.5) == 10
    assert timestamp_quantile_s(seconds, counts, 0.6) == 20
    assert timestamp_quantile_s(seconds, counts, 0.75) == 30
    assert timestamp_quantile_s(seconds, counts, 0.99) == 40


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"kind": "random"}, "split kind"),
        ({"validation_quantile": 0.9, "test_quantile": 0.8}, "quantiles"),
        ({"validation_time_s": 10}, "both"),
        ({"validation_time_s": 20, "test_time_s": 10}, "before the test cut"),
    ],
)
def test_split_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        SplitConfig(**settings)


def test_temporal_split_reports_users_not_evaluated(ray_instance, tmp_path):
    from training.events import ingest_taobao_csv
    from training.generator import GeneratorConfig, generate_events, write_taobao_csv

    config = GeneratorConfig(num_users=150, num_items=300, num_categories=15, mean_events_per_user=15)
    write_taobao_csv(generate_events(config), tmp_path / "events.csv")
    events_path = ingest_taobao_csv(tmp_path / "events.csv", tmp_path / "events").events_path
    examples = build_examples(events_path, 20, split=SplitConfig(kind="temporal", validation_quantile=0.6, test_quantile=0.8))
    validation_cut, test_cut = examples.cuts_s
    assert validation_cut < test_cut
    assert examples.num_users == 150
    assert examples.num_short_users == examples.num_users - examples.test.count()
    assert examples.num_users_not_validated == examples.num_users - examples.validation.count()
    assert 0 < examples.test.count() < 150
    assert "temporal" in examples.split_rule
    # Popularity counts only the events before the validation cut.
    assert examples.train_item_counts.sum() < examples.num_events
