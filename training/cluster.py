"""Connecting entry points to Ray."""

from __future__ import annotations

import os
from pathlib import Path

import ray

# Written by `ray start` on the head node; removed by `ray stop`.
_CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


def connect_ray() -> None:
    """Join the Ray cluster this process runs in, or start a local instance when there is none.

    A process started by ``ray job submit`` or on a node of a cluster joins that cluster. Ray Data
    progress bars are turned off, because job logs keep every redraw.
    """
    if not ray.is_initialized():
        cluster_running = bool(os.environ.get("RAY_ADDRESS")) or _CURRENT_CLUSTER_FILE.exists()
        ray.init(address="auto" if cluster_running else None)
    ray.data.DataContext.get_current().enable_progress_bars = False
