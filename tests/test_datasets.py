import json

import pyarrow.compute as pc
import pytest

from training.datasets import (
    DATA_DIR_ENV,
    DATASETS,
    get_dataset,
    ingest_dataset,
    load_item_categories,
    resolve_data_dir,
)
from training.events import read_events
from training.schema import CATEGORY_ID, EVENTS_SCHEMA, ITEM_ID, USER_ID

from conftest import real_data_path


def _ingest_real(name, tmp_path):
    spec = get_dataset(name)
    source = real_data_path(spec.events_file)
    data_dir = source.parents[len(spec.events_file.split("/")) - 1]
    report = ingest_dataset(name, tmp_path / name, data_dir)
    return report, read_events(report.events_path)


def _distinct(table, column):
    return len(pc.unique(table[column]))


def test_registry_paths_are_relative():
    for spec in DATASETS.values():
        assert not spec.events_file.startswith("/"), spec.name
        assert spec.attributes_file is None or not spec.attributes_file.startswith("/"), spec.name
        assert get_dataset(spec.name) is spec


def test_unknown_dataset_rejected():
    with pytest.raises(ValueError, match="unknown data set 'beauty'"):
        get_dataset("beauty")


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path


def test_data_dir_missing_variable_rejected(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=DATA_DIR_ENV):
        resolve_data_dir()


def test_data_dir_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        resolve_data_dir(tmp_path / "absent")


def test_categories_combination_rule(tmp_path):
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps({"1": [5, 3], "2": [3, 5], "3": [3], "4": [], "5": [7, 3]}))
    categories = load_item_categories(path, "combination")
    # Sorted attribute sets: (3,), (3, 5), (3, 7).
    assert categories == {1: 2, 2: 2, 3: 1, 5: 3}


def test_categories_first_rule(tmp_path):
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps({"1": [5, 3], "2": [3, 5], "4": []}))
    assert load_item_categories(path, "first") == {1: 5, 2: 3}


def test_categories_reject_bad_attributes(tmp_path):
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps({"1": ["brand"]}))
    with pytest.raises(ValueError, match="item '1' must be a list of positive integers"):
        load_item_categories(path)


def test_categories_reject_unknown_rule(tmp_path):
    path = tmp_path / "attributes.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="unknown category rule 'bag'"):
        load_item_categories(path, "bag")


def test_ingest_fake_sequences_with_attributes(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "amazon_s3rec").mkdir(parents=True)
    (data_dir / "amazon_s3rec" / "Beauty.txt").write_text("1 1 2 3\n2 3 1\n")
    (data_dir / "amazon_s3rec" / "Beauty_item2attributes.json").write_text(
        json.dumps({"1": [4, 9], "2": [9, 4], "3": [8]})
    )
    report = ingest_dataset("beauty-s3rec", tmp_path / "out", data_dir)
    events = read_events(report.events_path)
    assert events[ITEM_ID].to_pylist() == [1, 2, 3, 3, 1]
    # (4, 9) is category 1 and (8,) category 2 in the sorted order (4, 9) < (8,).
    assert events[CATEGORY_ID].to_pylist() == [1, 1, 2, 2, 1]


def test_beauty_s3rec_real_file(tmp_path):
    report, events = _ingest_real("beauty-s3rec", tmp_path)
    assert report.rows_rejected == 0
    assert events.schema == EVENTS_SCHEMA
    assert events.num_rows == 198_502
    assert _distinct(events, USER_ID) == 22_363
    assert _distinct(events, ITEM_ID) == 12_101
    # Every item has attributes, so no event has the padding category.
    assert pc.sum(pc.equal(events[CATEGORY_ID], 0)).as_py() == 0
    assert _distinct(events, CATEGORY_ID) == 3_120


def test_beauty_s3rec_first_attribute(tmp_path):
    spec = get_dataset("beauty-s3rec")
    path = real_data_path(spec.attributes_file)
    categories = load_item_categories(path, "first")
    assert len(categories) == 12_101
    assert len(set(categories.values())) == 443


def test_beauty_bert4rec_real_file(tmp_path):
    report, events = _ingest_real("beauty-bert4rec", tmp_path)
    assert report.rows_rejected == 0
    assert events.num_rows == 353_962
    assert _distinct(events, USER_ID) == 40_226
    assert _distinct(events, ITEM_ID) == 54_542
    assert _distinct(events, CATEGORY_ID) == 1


def test_ml_100k_real_file(tmp_path):
    report, events = _ingest_real("ml-100k", tmp_path)
    assert report.rows_rejected == 0
    assert events.num_rows == 100_000
    assert _distinct(events, USER_ID) == 943
    assert _distinct(events, ITEM_ID) == 1_682
    # Real rating times: MovieLens-100K spans 1997-09 to 1998-04.
    years = pc.unique(pc.year(events["event_timestamp"])).to_pylist()
    assert sorted(years) == [1997, 1998]
