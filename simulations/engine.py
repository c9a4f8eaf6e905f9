"""A small discrete-event core: a heap of timestamped events and a virtual clock that is injected.

    clock = Clock()                      # virtual seconds, starts at 0.0
    engine = Engine(clock)               # or Engine() for a fresh Clock
    engine.at(5.0, print, "five")        # absolute time
    engine.after(1.0, print, "one")      # relative to clock.now()
    engine.run(until=10.0)               # fires "one" at 1.0, "five" at 5.0; the clock then reads 10.0

Events fire in time order; events at the same time fire in the order they were scheduled (a sequence
number breaks ties, so the order never depends on comparing callbacks). A callback may schedule more
events, at the current time or later, never earlier (ValueError). Components read time from the Clock they
are given, never from the wall clock, so a simulated day runs in seconds and tests are exact.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any


class Clock:
    """Virtual time in seconds. Only the Engine moves it, and only forward."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        if not math.isfinite(start):
            raise ValueError(f"start must be finite, got {start!r}")
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"time cannot go back: {t} < {self._now}")
        self._now = float(t)

    __call__ = now  # a Clock is also a zero-argument time function, like time.monotonic


class Event:
    """A scheduled callback; cancel() makes the engine skip it (it stays in the heap until popped)."""

    __slots__ = ("time", "callback", "args", "cancelled")

    def __init__(self, time: float, callback: Callable[..., Any], args: tuple) -> None:
        self.time, self.callback, self.args, self.cancelled = time, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """heapq of (time, seq, Event); run() pops them in order and advances the injected clock."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock if clock is not None else Clock()
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0
        self.processed = 0  # events fired so far

    def now(self) -> float:
        return self.clock.now()

    def at(self, t: float, callback: Callable[..., Any], *args: Any) -> Event:
        """Schedule ``callback(*args)`` at absolute time ``t`` (>= now)."""
        if not t >= self.clock.now():  # also rejects NaN
            raise ValueError(f"cannot schedule at {t}: the clock already reads {self.clock.now()}")
        event = Event(float(t), callback, args)
        heapq.heappush(self._heap, (event.time, self._seq, event))
        self._seq += 1
        return event

    def after(self, delay: float, callback: Callable[..., Any], *args: Any) -> Event:
        if not delay >= 0:
            raise ValueError(f"delay must be >= 0, got {delay!r}")
        return self.at(self.clock.now() + delay, callback, *args)

    def pending(self) -> int:
        return sum(1 for _, _, e in self._heap if not e.cancelled)

    def run(self, until: float = math.inf) -> int:
        """Fire every event with time <= until, in order; the clock ends at ``until`` (if finite).
        Returns the number of events fired by this call."""
        fired = 0
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, event = heapq.heappop(heap)
            if event.cancelled:
                continue
            self.clock.advance_to(t)
            event.callback(*event.args)
            fired += 1
        if math.isfinite(until) and until > self.clock.now():
            self.clock.advance_to(until)
        self.processed += fired
        return fired
