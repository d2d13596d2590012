import datetime
import importlib.util

import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureService, FeatureView

from helpers import PROJECT_ROOT
from training import schema
from training.features import run_feature_job


def load_definitions():
    spec = importlib.util.spec_from_file_location("seqrec_feature_definitions", PROJECT_ROOT / "feature_repo" / "features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_feature_views_match_shared_schema():
    module = load_definitions()
    views = {value.name: value for value in vars(module).values() if isinstance(value, FeatureView)}
    assert set(views) == set(schema.OFFLINE_VIEWS)
    fields = {name: {f.name for f in view.schema} - {schema.USER_ID, schema.ITEM_ID} for name, view in views.items()}
    assert fields[schema.USER_SEQUENCE_VIEW] == set(schema.SEQUENCE_FIELDS)
    assert fields[schema.USER_STATS_VIEW] == set(schema.USER_STATS_FIELDS)
    assert fields[schema.ITEM_STATS_VIEW] == set(schema.ITEM_STATS_FIELDS)
    assert fields[schema.ITEM_NEIGHBORS_VIEW] == {schema.NEIGHBOR_IDS, schema.NEIGHBOR_SCORES}


def test_feature_view_fields_match_offline_columns(ray_instance, tmp_path):
    seconds = [1_511_544_000 + step * 600 for step in range(6)]
    events = pa.table(
        {
            "user_id": [1, 1, 1, 2, 2, 2],
            "item_id": [10, 11, 12, 10, 11, 13],
            "category_id": [1] * 6,
            "behavior": ["pv", "cart", "pv", "pv", "buy", "pv"],
            "event_timestamp": [datetime.datetime.fromtimestamp(s, datetime.timezone.utc) for s in seconds],
            "event_position": list(range(6)),
        },
        schema=schema.EVENTS_SCHEMA,
    )
    pq.write_table(events, tmp_path / "events.parquet")
    paths = run_feature_job(str(tmp_path / "events.parquet"), str(tmp_path / "offline"))
    module = load_definitions()
    views = {value.name: value for value in vars(module).values() if isinstance(value, FeatureView)}
    for name, view in views.items():
        columns = pq.read_schema(next(iter(sorted((tmp_path / "offline" / name).iterdir()))))
        assert {field.name for field in view.schema} - {schema.USER_ID, schema.ITEM_ID} <= set(columns.names), name
        assert schema.EVENT_TIMESTAMP in columns.names
        assert columns.field(schema.EVENT_TIMESTAMP).type == pa.timestamp("us", tz="UTC")
    assert set(paths) == set(views)


def test_entity_keys_are_int64():
    module = load_definitions()
    assert module.user.join_key == schema.USER_ID
    assert module.item.join_key == schema.ITEM_ID
    assert module.user.value_type.name == "INT64"
    assert module.item.value_type.name == "INT64"


def test_feature_services_name_what_stages_read():
    module = load_definitions()
    services = {value.name: value for value in vars(module).values() if isinstance(value, FeatureService)}
    assert set(services) == {schema.RANKING_SERVICE, schema.CANDIDATE_SERVICE}
    ranking_views = {projection.name for projection in services[schema.RANKING_SERVICE].feature_view_projections}
    assert ranking_views == {schema.USER_SEQUENCE_VIEW, schema.USER_STATS_VIEW}


def test_platform_is_not_a_python_package():
    assert not list((PROJECT_ROOT / "platform").rglob("*.py"))
    assert not (PROJECT_ROOT / "platform" / "__init__.py").exists()
