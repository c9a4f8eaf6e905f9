"""A virtual clock for timeout logic (protocol/clock.py's Clock): time moves only when the code under test sleeps.

    clock = VirtualClock()
    await component_loop()        # its clock.sleep(60) returns at once, with clock.monotonic() 60 s later
    assert clock.monotonic() == pytest.approx(6 * 60.0)

As trio's autojump clock, but for one task at a time: every ``sleep(s)`` moves the clock forward by ``s`` at
once (then yields to the event loop), so a component's deadlines, polls and expiries run in microseconds and
land exactly where its logic puts them. Drive one sleeping task per clock (two tasks sleeping on one clock
would each move it forward). Waiting on I/O (asyncio.wait_for) stays on the event loop's own clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")
YIELDS = 20  # event-loop turns wait_for gives other ready tasks before it times out


class VirtualClock:
    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self.now = 0.0  # seconds since the clock was made
        self.wall = wall  # unix time at now == 0
        self.sleeps: list[float] = []  # every sleep asked for, in order

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)

    async def wait_for(self, awaitable: Awaitable[T], seconds: float) -> T:
        """The result if ``awaitable`` completes while the other ready tasks run; else the clock moves forward by
        ``seconds`` and TimeoutError (no one else is there to complete it on this clock)."""
        task = asyncio.ensure_future(awaitable)
        for _ in range(YIELDS):
            if task.done():
                return task.result()
            await asyncio.sleep(0)
        if task.done():
            return task.result()
        task.cancel()
        self.now += max(0.0, seconds)
        raise TimeoutError

    def advance(self, seconds: float) -> None:
        """Move the clock forward without sleeping (what passes while a test sets the next step up)."""
        self.now += seconds
