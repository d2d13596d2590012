"""Command-line client: fetch recommendations from a running seqrec service over HTTP.

Example::

    python -m serving.client --user-id 1 --user-id 100 --k 5
    python -m serving.client --sample-users 3 --events feature_repo/data/events/events.parquet
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training import storage

DEFAULT_URL = "http://127.0.0.1:8000"
# Raw ids in the supported logs are positive, so this user is never known.
UNKNOWN_USER_ID = -1


def sample_users(events_location: str, count: int) -> list[int]:
    """Return the ``count`` users with the most events, most active first (ties by smaller id)."""
    filesystem, path = storage.resolve(events_location)
    users = pq.read_table(path, columns=["user_id"], filesystem=filesystem)["user_id"]
    counts = pc.value_counts(users)
    order = pc.sort_indices(counts, [("counts", "descending"), ("values", "ascending")])
    return counts.take(order).field("values").to_pylist()[:count]


def recommend(client: httpx.Client, user_id: int, k: int) -> dict:
    response = client.post("/v1/recommend", json={"user_id": user_id, "k": k})
    response.raise_for_status()
    return response.json()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print recommendations from a seqrec service.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service address (default {DEFAULT_URL})")
    parser.add_argument("--user-id", type=int, action="append", default=[], help="user to ask for; repeatable")
    parser.add_argument("--sample-users", type=int, default=0, help="also ask for this many users from --events")
    parser.add_argument("--events", help="canonical events Parquet (path or URI) to sample users from")
    parser.add_argument("--unknown-user", action="store_true", help="also ask for a user the service cannot know")
    parser.add_argument("--k", type=int, default=10, help="items per user")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="HTTP timeout in seconds")
    args = parser.parse_args(argv)

    user_ids = list(args.user_id)
    if args.sample_users:
        if not args.events:
            parser.error("--sample-users needs --events")
        user_ids += sample_users(args.events, args.sample_users)
    if args.unknown_user:
        user_ids.append(UNKNOWN_USER_ID)
    if not user_ids:
        parser.error("name at least one user with --user-id, --sample-users or --unknown-user")

    with httpx.Client(base_url=args.url, timeout=args.timeout_s) as client:
        for user_id in user_ids:
            try:
                body = recommend(client, user_id, args.k)
            except httpx.HTTPError as error:
                print(f"request for user {user_id} failed: {error}", file=sys.stderr)
                sys.exit(1)
            print(f"POST {args.url}/v1/recommend {json.dumps({'user_id': user_id, 'k': args.k})}")
            print(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
