#!/usr/bin/env bash
# Run seqrec end to end on this machine: events -> features -> Feast -> training -> serving.
#
# Usage: platform/local/demo.sh [EVENTS_CSV]
# Without EVENTS_CSV, the built-in generator writes the events. The service keeps serving on
# http://127.0.0.1:8000 until platform/local/stop.sh (or `make stop`) stops the local stack.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

events_csv=${1:-}
train_args=${TRAIN_ARGS:-}
step() { printf '\n==> %s\n' "$*"; }

if ray status --address "$RAY_GCS_ADDRESS" >/dev/null 2>&1; then
  step "Using the running local Ray cluster; stopping its Serve applications to free CPUs for the jobs"
  serve shutdown --address "$RAY_DASHBOARD_URL" --yes >/dev/null 2>&1 || true
else
  step "Starting a local Ray cluster (2 CPUs)"
  ray start --head --num-cpus 2 --dashboard-host 127.0.0.1 --disable-usage-stats >/dev/null
fi

mkdir -p "$DATA_DIR"
if [[ -z "$events_csv" ]]; then
  events_csv="$DATA_DIR/raw/generated_events.csv"
  step "Generating events into $events_csv"
  python -m training.generator --output "$events_csv"
elif [[ ! -f "$events_csv" ]]; then
  echo "events file not found: $events_csv" >&2
  exit 2
fi
events_csv=$(realpath "$events_csv")

step "Building features with Ray Data (ray job submit)"
ray job submit --address "$RAY_DASHBOARD_URL" --working-dir . -- \
  python -m training.features --events "$events_csv" --data-dir "$DATA_DIR"

step "Registering features (feast apply) and filling the online store"
# Start from an empty online store and registry, so users of an earlier event log do not linger.
rm -f "$DATA_DIR/online_store.db" "$DATA_DIR/registry.db"
(cd feature_repo && feast apply)
python -m training.materialize --feature-repo feature_repo

step "Training SASRec with Ray Train (ray job submit)"
# shellcheck disable=SC2086
ray job submit --address "$RAY_DASHBOARD_URL" --working-dir . -- \
  python -m training.train --events "$DATA_DIR/events/events.parquet" --model-dir "$DATA_DIR/models" $train_args

step "Deploying the serving graph with Ray Serve (platform/serve/serve_config.yaml)"
# Start the proxy on loopback first; the config's 0.0.0.0 is for cluster nodes. The config's
# relative paths resolve against the repository root, where the cluster was started.
serve start --address "$RAY_GCS_ADDRESS" --http-host 127.0.0.1 --http-port 8000 >/dev/null
serve deploy --address "$RAY_DASHBOARD_URL" platform/serve/serve_config.yaml >/dev/null
python - "$SERVE_URL" <<'PY'
import sys, time, httpx
url = sys.argv[1] + "/healthz"
deadline = time.monotonic() + 180
while True:
    try:
        if httpx.get(url, timeout=5).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"the service did not become healthy at {url} within 180 s; see `serve status`")
    time.sleep(1)
PY

step "Recommendations over HTTP: the three most active users and one unknown user"
python -m serving.client --url "$SERVE_URL" --events "$DATA_DIR/events/events.parquet" \
  --sample-users 3 --unknown-user --k 5

step "Done"
python - "$DATA_DIR/models" <<'PY'
import json, sys
from pathlib import Path
models = Path(sys.argv[1])
version = (models / "LATEST").read_text().strip()
metrics = json.loads((models / version / "metrics.json").read_text())
for name in ("sasrec", "popularity"):
    test = metrics[name]["test"]
    print(f"{name:>10}: test NDCG@10 {test['ndcg@10']:.4f}  HR@10 {test['hr@10']:.4f}  ({int(test['count'])} users)")
print(f"Model version {version}, best validation epoch {metrics['best_epoch']}")
PY
cat <<MSG
The service is answering on $SERVE_URL. Try it with one of the user ids above:
  curl -s -X POST $SERVE_URL/v1/recommend -H 'Content-Type: application/json' -d '{"user_id": <user id>, "k": 10}'
Stop it with: make stop
MSG
