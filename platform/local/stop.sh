#!/usr/bin/env bash
# Stop the local stack that demo.sh started: the Serve application, then the Ray cluster.
set -uo pipefail
source "$(dirname "$0")/env.sh"
if ray status --address "$RAY_GCS_ADDRESS" >/dev/null 2>&1; then
  serve shutdown --address "$RAY_DASHBOARD_URL" --yes >/dev/null 2>&1 || true
  ray stop >/dev/null
  echo "Stopped the seqrec service and the local Ray cluster."
else
  echo "No local Ray cluster is running."
  # A cluster that was killed rather than stopped leaves its address behind, and Ray clients on
  # this machine (feast apply, the entry points) would try to join it.
  address_file=/tmp/ray/ray_current_cluster
  if [[ "$(cat "$address_file" 2>/dev/null)" == "$RAY_GCS_ADDRESS" ]]; then
    rm -f "$address_file"
    echo "Removed $address_file, which still named $RAY_GCS_ADDRESS."
  fi
fi
