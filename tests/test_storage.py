"""Local paths and file:// URIs through every reader and writer that takes a location."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import write_random_artifact
from test_features import make_events
from serving.client import sample_users
from training import storage
from training.artifacts import LATEST, load_artifact, resolve_version
from training.events import ingest_taobao_csv, read_events
from training.features import latest_rows, run_feature_job


def test_join_keeps_uri_scheme():
    assert storage.join("s3://bucket/prefix/", "models", "v1") == "s3://bucket/prefix/models/v1"
    assert storage.join("file:///data", "x") == "file:///data/x"


def test_normalize_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("data") == str(tmp_path / "data")
    assert storage.normalize("gs://bucket/a") == "gs://bucket/a"


def test_text_round_trip_through_file_uri(tmp_path):
    location = f"file://{tmp_path}/notes/a.txt"
    storage.make_dirs(f"file://{tmp_path}/notes")
    storage.write_text(location, "hello")
    assert storage.exists(location)
    assert storage.read_text(location) == "hello"
    assert (tmp_path / "notes" / "a.txt").read_text() == "hello"


def test_ingest_reads_and_writes_file_uris(tmp_path):
    (tmp_path / "raw.csv").write_text("1,10,100,pv,1511544070\n2,11,100,buy,1511544071\n3,12\n")
    report = ingest_taobao_csv(f"file://{tmp_path}/raw.csv", f"file://{tmp_path}/out")
    assert report.events_path == f"file://{tmp_path}/out/events.parquet"
    assert report.rejected == {"malformed": 1}
    assert read_events(report.events_path).num_rows == 2
    assert read_events(tmp_path / "out" / "events.parquet").num_rows == 2
    saved = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert saved["rows_accepted"] == 2
    assert sample_users(report.events_path, 5) == [1, 2]


@pytest.mark.parametrize("as_uri", [False, True])
def test_artifact_round_trip(tmp_path, as_uri):
    model_dir = f"file://{tmp_path}/models" if as_uri else str(tmp_path / "models")
    location = write_random_artifact(model_dir, [5, 6, 7], [1], item_counts={5: 3, 6: 9, 7: 1})
    assert (tmp_path / "models" / LATEST).read_text().strip() == "v0"
    assert resolve_version(model_dir) == location
    artifact = load_artifact(model_dir)
    assert artifact.version == "v0"
    assert artifact.item_vocab.raw_ids.tolist() == [5, 6, 7]
    assert artifact.popularity.top_items(1).tolist() == [2]
    assert not list((tmp_path / "models").glob(".*partial"))


def test_artifact_version_is_never_overwritten(tmp_path):
    write_random_artifact(tmp_path / "models", [5, 6], [1])
    with pytest.raises(FileExistsError, match="v0"):
        write_random_artifact(tmp_path / "models", [5, 6], [1])


def test_missing_artifact_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="training.train"):
        load_artifact(tmp_path / "empty")
    write_random_artifact(tmp_path / "models", [5], [1])
    with pytest.raises(FileNotFoundError, match="'v9'"):
        resolve_version(tmp_path / "models", "v9")


def test_feature_job_accepts_file_uris(ray_instance, tmp_path):
    events = make_events([(user, 100 + step, 1, "pv", user * 100 + step) for user in range(1, 6) for step in range(4)])
    pq.write_table(events, tmp_path / "events.parquet")
    paths = run_feature_job(f"file://{tmp_path}/events.parquet", f"file://{tmp_path}/offline")
    assert all(path.startswith("file://") for path in paths.values())
    sequences = latest_rows(pq.read_table(tmp_path / "offline" / "user_sequence"), "user_id")
    assert sorted(sequences["user_id"].to_pylist()) == [1, 2, 3, 4, 5]
    assert np.all(np.array([len(x) for x in sequences["item_ids"].to_pylist()]) == 4)
