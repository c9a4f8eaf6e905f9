"""The clock every component with a timeout reads, injected so that timeout logic is tested without waiting.

    clock = SYSTEM_CLOCK             # what nodes run on: time.monotonic, time.time, asyncio.sleep
    deadline = clock.monotonic() + timeout
    while clock.monotonic() < deadline:
        ...
        await clock.sleep(poll)
    record.updated_at = clock.time()   # wall time, for what other nodes read (records, heartbeats)

A test passes its own Clock (tests/clocks.py: a virtual clock whose sleep moves time forward at once, as trio's
autojump clock does), so a component's 60-second deadline is reached in microseconds and its decisions at
every deadline are checked exactly. Waiting on network I/O (asyncio.wait_for on a read) stays on the event
loop's own clock: the virtual clock drives a component's own deadlines, polls and expiries, not the
network's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (deadlines, expiries, backoffs)."""
        ...

    def time(self) -> float:
        """Unix time (what goes into records other nodes read)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock."""
        ...


class SystemClock:
    """The real clocks and asyncio's sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
