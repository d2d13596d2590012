# Shared settings of the local stack scripts; sourced, not run.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PATH="$ROOT/.venv/bin:$PATH"
# Keep the local Ray instance on the loopback interface: Ray otherwise binds to the machine's
# network address, even for a single-node cluster.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# `ray start --head` turns on token authentication; clients read the token from ~/.ray/auth_token.
export RAY_AUTH_MODE=token
RAY_GCS_ADDRESS=127.0.0.1:6379
RAY_DASHBOARD_URL=http://127.0.0.1:8265
SERVE_URL=http://127.0.0.1:8000
DATA_DIR="$ROOT/feature_repo/data"
