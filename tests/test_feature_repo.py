import importlib.util

from feast import FeatureService, FeatureView

from helpers import PROJECT_ROOT
from training import schema


def load_definitions():
    spec = importlib.util.spec_from_file_location("seqrec_feature_definitions", PROJECT_ROOT / "feature_repo" / "features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_feature_views_match_shared_schema():
    module = load_definitions()
    views = {value.name: value for value in vars(module).values() if isinstance(value, FeatureView)}
    assert set(views) == {schema.USER_SEQUENCE_VIEW, schema.ITEM_STATS_VIEW, schema.ITEM_NEIGHBORS_VIEW}
    fields = {name: {f.name for f in view.schema} - {schema.USER_ID, schema.ITEM_ID} for name, view in views.items()}
    assert fields[schema.USER_SEQUENCE_VIEW] == set(schema.SEQUENCE_FIELDS)
    assert fields[schema.ITEM_STATS_VIEW] == set(schema.ITEM_STATS_FIELDS)
    assert fields[schema.ITEM_NEIGHBORS_VIEW] == {schema.NEIGHBOR_IDS, schema.NEIGHBOR_SCORES}

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
    assert ranking_views == {schema.USER_SEQUENCE_VIEW}


def test_platform_is_not_a_python_package():
    assert not list((PROJECT_ROOT / "platform").rglob("*.py"))
    assert not (PROJECT_ROOT / "platform" / "__init__.py").exists()
