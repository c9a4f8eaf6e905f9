"""The value checks every job record field passes: ValueError naming the field (the job file's dotted path).

    check_int("rounds", 30, 1, MAX_ROUNDS)          # -> 30, or ValueError("rounds: must be <= 1000000, got ...")
    check_peers("participants", peers, limit)       # -> a tuple of distinct Ed25519 peer ids

One set of rules for job files, local callers and peers: the frozen dataclasses of protocol/records/job_spec.py,
job_records.py and protocol/transfer/job_state.py call these in ``__post_init__``, and their decoders build
the dataclasses (protocol/wire.py from_map).
"""

from __future__ import annotations

import math
import re
from typing import Any

from protocol.records.peer_keys import PeerIdError, public_key_from_peer_id

MAX_NAME = 64  # job and dataset names, model config keys and string values
JOB_ID_HEX = 16
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_HEX_RE = re.compile(r"[0-9a-f]+")


def show(value: Any) -> str:
    """A value as an error message shows it: its repr, cut at 40 characters."""
    return f"{value!r:.40}"


def short(peer: str) -> str:
    """A peer id as a one-line message shows it: its last 8 characters."""
    return f"...{peer[-8:]}"


def check_int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: must be an integer, got {show(value)}")
    if value < lo:
        raise ValueError(f"{field}: must be >= {lo}, got {value}")
    if value > hi:
        raise ValueError(f"{field}: must be <= {hi}, got {value}")
    return value


def check_float(field: str, value: Any, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: must be a number, got {show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{field}: must be finite, got {value}")
    for bound, ok, word in ((gt, lambda b: value > b, ">"), (ge, lambda b: value >= b, ">="),
                            (lt, lambda b: value < b, "<"), (le, lambda b: value <= b, "<=")):
        if bound is not None and not ok(bound):
            raise ValueError(f"{field}: must be {word} {bound:g}, got {value}")
    return float(value)


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise ValueError(f"{field}: must be one of {', '.join(map(repr, choices))}, got {show(value)}")
    return value


def check_name(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a string, got {show(value)}")
    if not 1 <= len(value) <= MAX_NAME or not _NAME_RE.fullmatch(value):
        raise ValueError(f"{field}: must be 1-{MAX_NAME} characters of [A-Za-z0-9._-], got {show(value)}")
    return value


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field}: must be true or false, got {show(value)}")
    return value


def check_job_id(field: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) != JOB_ID_HEX or not _HEX_RE.fullmatch(value):
        raise ValueError(f"{field}: must be {JOB_ID_HEX} lowercase hex digits, got {show(value)}")
    return value


def check_peer_id(field: str, value: Any) -> str:
    try:
        public_key_from_peer_id(value)
    except PeerIdError as e:
        raise ValueError(f"{field}: {e}") from None
    return value


def check_model_hash(field: str, value: Any) -> str:
    if not isinstance(value, str) or (value and (len(value) != 64 or not _HEX_RE.fullmatch(value))):
        raise ValueError(f"{field}: must be '' or a 64-digit lowercase hex sha256, got {show(value)}")
    return value


def check_peers(field: str, value: Any, limit: int) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{field}: must be a list of peer ids, got {show(value)}")
    if len(value) > limit:
        raise ValueError(f"{field}: more than {limit} peers ({len(value)})")
    for i, peer in enumerate(value):
        check_peer_id(f"{field}[{i}]", peer)
    if len(set(value)) != len(value):
        raise ValueError(f"{field}: a peer is listed twice")
    return tuple(value)


def set_field(obj: Any, name: str, value: Any) -> None:
    """Normalise a frozen dataclass field in its ``__post_init__``."""
    object.__setattr__(obj, name, value)
