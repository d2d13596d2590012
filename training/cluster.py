"""Connecting entry points to Ray."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

logger = logging.getLogger(__name__)

# Written by `ray start` on the head node and removed by `ray stop`. A head node that ends any
# other way (killed, machine restarted) leaves it behind.
CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")
# How long a recorded cluster address may take to accept a connection before it counts as gone.
_PROBE_TIMEOUT_S = 2.0


def connect_ray() -> None:
    """Join the Ray cluster this process runs in, or start a local instance when there is none.

    A process started by ``ray job submit`` or on a node of a cluster joins that cluster. Ray Data
    progress bars are turned off, because job logs keep every redraw.
    """
    if not ray.is_initialized():
        ray.init(address=cluster_address())
    ray.data.DataContext.get_current().enable_progress_bars = False


def cluster_address(address_file: Path = CURRENT_CLUSTER_FILE) -> str | None:
    """Return the ``address`` for ``ray.init``: None lets Ray decide, "local" starts a new instance.

    RAY_ADDRESS, where set, is left to Ray. Otherwise Ray joins the cluster that ``address_file``
    records, and fails when that cluster is gone. So a recorded address that accepts no connection
    is skipped with a warning, and a local instance starts.
    """
    if os.environ.get("RAY_ADDRESS"):
        return None
    try:
        recorded = address_file.read_text().strip()
    except FileNotFoundError:
        return None
    if _accepts_connections(recorded):
        return "auto"
    logger.warning(
        "%s records the Ray cluster %r, which accepts no connection, so a local Ray instance starts. "
        "`ray stop` removes the stale file, or set RAY_ADDRESS to the cluster to join.",
        address_file,
        recorded,
    )
    return "local"


def _accepts_connections(address: str) -> bool:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
