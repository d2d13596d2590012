"""Fill the Feast online store from the offline sources with Feast's Ray compute engine.

Runs after ``feast apply``. It joins the running Ray cluster when there is one, so the Ray engine
does not start a second local instance.
"""

from __future__ import annotations

import argparse
import datetime
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# Start of the materialization window: the Unix epoch, older than any supported event log
# (MovieLens-100K starts in 1997).
EARLIEST = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def materialize(repo_path: str | Path, end: datetime.datetime | None = None) -> None:
    """Materialize every feature view from EARLIEST up to ``end`` (default: now, UTC)."""
    from feast import FeatureStore

    from training.cluster import connect_ray

    repo_path = Path(repo_path).resolve()
    if not (repo_path / "feature_store.yaml").is_file():
        raise FileNotFoundError(f"no feature_store.yaml in {repo_path}; pass the folder of the Feast repository")
    connect_ray()
    end = end or datetime.datetime.now(datetime.timezone.utc)
    store = FeatureStore(repo_path=str(repo_path))
    logger.info("Materializing %s from %s to %s", repo_path, EARLIEST.isoformat(), end.isoformat())
    store.materialize(start_date=EARLIEST, end_date=end)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Materialize the seqrec feature views into the online store.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--feature-repo", default="feature_repo", help="folder with feature_store.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    materialize(args.feature_repo)


if __name__ == "__main__":
    main()
