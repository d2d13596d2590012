"""Shared fixtures: the real data folder, a local Ray instance per module, small event logs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep the test Ray instances on the loopback interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Folder of the public data sets (Taobao UserBehavior sample, Amazon Beauty, MovieLens-100K).
DATA_DIR_ENV = "SEQREC_DATA_DIR"


def real_data_path(relative: str) -> Path:
    """Path of a file in the real data folder; skips the test where the folder or file is absent."""
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        pytest.skip(f"{DATA_DIR_ENV} is not set; it names the folder of the real data sets")
    path = Path(root) / relative
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the whole test module, with this machine's 2 CPUs."""
    import ray

    # address="local" starts a new instance even where a demo cluster is running.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
