"""Builders for the serving tests: a Feast repository whose online store is a real Redis."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from helpers import PROJECT_ROOT, copy_feature_repo, feast_apply

REDIS_FEAST_CONFIG = PROJECT_ROOT / "platform" / "feature_store" / "feature_store.redis.yaml"
PATIENT_TIMEOUTS = {"request_deadline_s": 60, "feature_lookup_s": 30, "candidate_generation_s": 30, "ranking_s": 30}
"""Stage timeouts long enough that a busy test machine does not turn the checked lists into degraded ones."""


def redis_connection_string(redis_url: str, db: int) -> str:
    """Feast's ``host:port,db=N`` form of a ``redis://host:port`` URL."""
    url = urlparse(redis_url)
    return f"{url.hostname}:{url.port or 6379},db={db}"


def copy_redis_feature_repo(destination: Path, redis_url: str, db: int) -> Path:
    """Copy the Feast definitions with the production Redis config, pointed at ``redis_url``.

    Each test module passes its own Redis database number, so modules sharing one server never
    read each other's users.
    """
    import redis

    repo = copy_feature_repo(destination)
    config = REDIS_FEAST_CONFIG.read_text().replace(
        "${SEQREC_REDIS_CONNECTION_STRING}", redis_connection_string(redis_url, db)
    )
    (repo / "feature_store.yaml").write_text(config)
    redis.Redis.from_url(redis_url, db=db).flushdb()
    return repo


def applied_redis_store(destination: Path, redis_url: str, db: int):
    """Copy the Feast definitions onto Redis database ``db``, apply them and return the repository
    folder and its FeatureStore."""
    from feast import FeatureStore

    repo = copy_redis_feature_repo(destination, redis_url, db)
    feast_apply(repo)
    return repo, FeatureStore(repo_path=str(repo))


def unreachable_redis_repo(source: Path, destination: Path, port: int) -> Path:
    """A copy of ``source`` (registry included) whose online store is a Redis port with no server listening."""
    import shutil

    shutil.copytree(source, destination)
    config = (destination / "feature_store.yaml").read_text()
    start = config.index("connection_string:")
    end = config.index("\n", start)
    # Without retry=null, redis-py retries a refused connection with backoff for about 10 s.
    config = config[:start] + f"connection_string: 127.0.0.1:{port},db=0,retry=null" + config[end:]
    (destination / "feature_store.yaml").write_text(config)
    return destination
