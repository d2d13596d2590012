import numpy as np
import pytest

from training.events import ingest_taobao_csv
from training.generator import GeneratorConfig, generate_events, write_taobao_csv
from training.schema import BEHAVIORS


@pytest.fixture(scope="module")
def events():
    return generate_events(GeneratorConfig(num_users=500, num_items=3_000, num_categories=40, seed=7)).to_pandas()


def test_generator_is_deterministic_per_seed():
    config = GeneratorConfig(num_users=50, num_items=500, num_categories=10, seed=3)
    assert generate_events(config).equals(generate_events(config))


def test_generator_behavior_mix_is_taobao_like(events):
    shares = events["behavior_type"].value_counts(normalize=True)
    assert set(shares.index) == set(BEHAVIORS)
    assert shares["pv"] > 0.8
    assert shares["pv"] > shares["cart"] > shares["buy"]
    assert shares["fav"] > shares["buy"]


def test_generator_item_popularity_is_long_tailed(events):
    counts = events["item_id"].value_counts().to_numpy()
    top_share = counts[: len(counts) // 100].sum() / counts.sum()
    # In a power law the top 1% of items take far more than 1% of events.
    assert top_share > 0.1


def test_generator_sessions_stay_in_a_category(events):
    same_user = events["user_id"].to_numpy()[1:] == events["user_id"].to_numpy()[:-1]
    same_category = events["category_id"].to_numpy()[1:] == events["category_id"].to_numpy()[:-1]
    assert same_category[same_user].mean() > 0.6


def test_generator_events_are_time_ordered_per_user(events):
    for _, user_events in events.groupby("user_id"):
        assert np.all(np.diff(user_events["timestamp"].to_numpy()) >= 0)


def test_generator_output_ingests_cleanly(tmp_path):
    table = generate_events(GeneratorConfig(num_users=30, num_items=200, num_categories=5))
    write_taobao_csv(table, tmp_path / "events.csv")
    report = ingest_taobao_csv(tmp_path / "events.csv", tmp_path / "out")
    assert report.rejected == {}
    assert report.rows_accepted == table.num_rows


@pytest.mark.parametrize(
    "field, value",
    [("num_users", 0), ("num_categories", 30_000), ("revisit_prob", 0.7), ("behavior_probs", (0.5, 0.5, 0.5, 0.5))],
)
def test_generator_config_rejects_invalid(field, value):
    with pytest.raises(ValueError):
        GeneratorConfig(**{field: value})
