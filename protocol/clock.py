"""The clock every component with a timeout reads, injected so that timeout logic is tested without waiting.

    clock = SYSTEM_CLOCK             # what nodes run on: time.monotonic, time.time, asyncio.sleep
    deadline = clock.monotonic() + timeout
    while clock.monotonic() < deadline:
        ...
        await clock.sleep(poll)
    plan = await clock.wait_for(plan_future, timeout)   # a wait inside such a deadline loop
    record.updated_at = clock.time()   # wall time, for what other nodes read (records, heartbeats)

A test passes its own Clock (tests/clocks.py: a virtual clock whose sleep moves time forward at once, as trio's
autojump clock does), so a component's 60-second deadline is reached in microseconds and its decisions at
every deadline are checked exactly.

What the injected clock drives, and what it does not: a component's own decisions in time -- deadlines it
polls toward (a replica to appear, a state to be announced, a step to succeed, a plan to arrive), its retry
and back-off windows, the expiry of what it holds (activations, sessions, old rounds) and the times it writes
into records. Waiting for one reply or frame from a peer (a stream's receive timeout, a part, a commit vote)
stays on the event loop's own clock, as do the expiry times handed to the DHT (hivemind's get_dht_time): those
are the network's time, not the component's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

T = TypeVar("T")


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

    async def wait_for(self, awaitable: Awaitable[T], seconds: float) -> T:
        """``awaitable``'s result, or TimeoutError once ``seconds`` pass on this clock (it is cancelled)."""
        ...


class SystemClock:
    """The real clocks and asyncio's sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, awaitable: Awaitable[T], seconds: float) -> T:
        return await asyncio.wait_for(awaitable, seconds)


SYSTEM_CLOCK: Clock = SystemClock()
