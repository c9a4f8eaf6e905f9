"""What this process refused from peers, counted by what it was and why, for the node's /metrics and dashboard
(node/api/metrics.py): DHT records a validator rejected, all-reduce parts and owners' results that failed their
checks, matchmaking entries ignored, pipeline frames (activations, control messages, direct-path frames) that did
not decode.

    rejections.count("peer record", error)     # the reason is the error's class name: a small, fixed set
    rejections.counts()                         # {(what, reason): n} since the process started

Pure bookkeeping (a lock and a Counter; no I/O, nothing of Prometheus): protocol/ stays free of node/ and of the
metrics library. The keys are bounded (MAX_KEYS) whatever peers send: reasons are exception class names, never a
peer's text.
"""

from __future__ import annotations

import threading
from collections import Counter

MAX_KEYS = 256  # (what, reason) pairs kept; a pair beyond it is not counted (there are a few dozen in the code)

_counts: Counter[tuple[str, str]] = Counter()
_lock = threading.Lock()


def count(what: str, error: BaseException | str) -> None:
    """One refusal of ``what`` (a record kind, "part", "result", ...) for ``error`` (its class name is the reason)."""
    reason = error if isinstance(error, str) else type(error).__name__
    with _lock:
        if (what, reason) in _counts or len(_counts) < MAX_KEYS:
            _counts[(what, reason)] += 1


def counts() -> dict[tuple[str, str], int]:
    with _lock:
        return dict(_counts)
