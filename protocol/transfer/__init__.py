"""Bulk transfers between nodes: model shards and a federated job's state.

    shards.py          signed shard manifests (what a splitting node publishes about its stage files)
    shard_transfer.py  ShardServer / fetch_shard: chunked, resumable, sha256-verified shard download
    job_state.py       a federated job's global state for a joiner: StateHeader, serve_job_state, fetch_job_state
"""
