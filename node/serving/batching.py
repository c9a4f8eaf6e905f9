"""Sharing a model between concurrent requests (pure asyncio, no model or HTTP here).

    gate = RequestGate(max_active=8, max_waiting=32)
    async with gate.slot():            # Busy at once when 8 are served and 32 wait: the client's 429
        ...

    batcher = EmbedBatcher(backend.embed, window_s=0.005, max_rows=64)
    vectors = await batcher.submit(rows)   # this request's rows, in order, out of one merged backend call
    await batcher.close()

Why batch embeddings: an encoder's forward over 16 short inputs costs about what one costs (the matrix products are
wider, not more numerous), so inputs of concurrent requests go to the backend together. A batch opens when a
request arrives while none is being gathered and closes ``window_s`` after that request arrived, or as soon as
it holds ``max_rows`` rows; one backend call runs at a time, and requests that arrive meanwhile gather into the
next batch (under load the window costs nothing: the backend is busy anyway).

Races handled: a request cancelled while it waits (its client went away) is left out of a batch not yet sent and
its rows of a batch in flight are dropped; a backend call that raises fails exactly the requests in that batch;
``close`` fails whatever still waits, so no caller hangs on a stopped batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

Embed = Callable[[list[list[int]]], Awaitable[list[list[float]]]]
DEFAULT_WINDOW_S = 0.005  # 5 ms: a small fraction of one MiniLM forward on a CPU (tens of ms), so a lone request
# barely waits, yet concurrent clients' requests (which arrive within a few ms of each other) share a forward
DEFAULT_MAX_ROWS = 64  # rows of one backend call: 64 inputs of MiniLM's 256 tokens is ~6 MB of activations per layer


class Busy(Exception):
    """The gate is full: ``str(e)`` says how full, in one line."""


class BatcherClosed(RuntimeError):
    """The batcher was closed while a request waited (the server is stopping)."""


class RequestGate:
    """At most ``max_active`` holders at once and at most ``max_waiting`` more queued for a place (FIFO, as
    asyncio.Semaphore wakes waiters in order); one more is refused with Busy at once rather than queued without
    bound, so an overloaded server answers 429 quickly instead of timing out everyone."""

    def __init__(self, max_active: int, max_waiting: int):
        for label, value, least in (("max_active", max_active, 1), ("max_waiting", max_waiting, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{label} must be an integer >= {least}, got {value!r}")
        self.max_active, self.max_waiting = max_active, max_waiting
        self._semaphore = asyncio.Semaphore(max_active)
        self.admitted = 0  # active + waiting
        self.active = 0

    @property
    def waiting(self) -> int:
        return self.admitted - self.active

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.admitted >= self.max_active + self.max_waiting:
            raise Busy(f"server busy: {self.active} requests being served and {self.waiting} queued "
                       f"(at most {self.max_active} + {self.max_waiting}); retry later")
        self.admitted += 1
        try:
            async with self._semaphore:
                self.active += 1
                try:
                    yield
                finally:
                    self.active -= 1
        finally:
            self.admitted -= 1


def _new_future() -> asyncio.Future[list[list[float]]]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Request:
    rows: list[list[int]]
    arrived: float
    future: asyncio.Future[list[list[float]]] = field(default_factory=_new_future)


class EmbedBatcher:
    """Merges the embedding inputs of concurrent requests into few ``embed`` calls (see the module's docstring).

    ``clock`` (seconds, monotonic) and ``sleep`` are injectable so that the window can be tested without waiting:
    a batch is sent when ``clock()`` has passed its first request's arrival + ``window_s``, the wait meanwhile being
    ``sleep(remaining)`` (cut short when the batch fills up)."""

    def __init__(self, embed: Embed, *, window_s: float = DEFAULT_WINDOW_S, max_rows: int = DEFAULT_MAX_ROWS,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep):
        if isinstance(window_s, bool) or not isinstance(window_s, (int, float)) or not 0 <= window_s <= 10:
            raise ValueError(f"window_s must be a number of seconds in [0, 10], got {window_s!r}")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        self._embed, self.window_s, self.max_rows = embed, float(window_s), max_rows
        self._clock, self._sleep = clock, sleep
        self._pending: list[_Request] = []
        self._arrived = asyncio.Event()  # set when _pending gained a request
        self._full = asyncio.Event()  # set when _pending holds max_rows rows or more
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self.calls = 0  # backend calls made (each a batch)

    async def submit(self, rows: list[list[int]]) -> list[list[float]]:
        """One vector per row of ``rows``, in order; raises what the backend call of its batch raised. A request
        with more than ``max_rows`` rows is sent as a batch of its own (never split, so its rows share a call)."""
        if self._closed:
            raise BatcherClosed("the embedding batcher is closed (the server is stopping)")
        if not rows:
            return []
        request = _Request(rows, self._clock())
        self._pending.append(request)
        self._arrived.set()
        if sum(len(r.rows) for r in self._pending) >= self.max_rows:
            self._full.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="embed-batcher")
        return await request.future

    async def close(self) -> None:
        """Stop the worker; requests still waiting fail with BatcherClosed."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._fail(self._pending, BatcherClosed("the embedding batcher closed before this request was served"))
        self._pending.clear()

    async def _run(self) -> None:
        batch: list[_Request] = []
        try:
            while True:
                await self._arrived.wait()
                self._drop_cancelled()
                if not self._pending:
                    self._arrived.clear()
                    continue
                remaining = self._pending[0].arrived + self.window_s - self._clock()
                if remaining > 0 and not self._full.is_set():
                    await self._wait_full_or(remaining)
                batch = self._take_batch()
                if batch:
                    await self._send(batch)
                batch = []
        except asyncio.CancelledError:
            self._fail(batch, BatcherClosed("the embedding batcher closed while this request's batch ran"))
            raise

    async def _wait_full_or(self, seconds: float) -> None:
        full = asyncio.ensure_future(self._full.wait())
        timer = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait({full, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            full.cancel()
            timer.cancel()

    def _drop_cancelled(self) -> None:
        self._pending = [r for r in self._pending if not r.future.done()]

    def _take_batch(self) -> list[_Request]:
        """Whole requests from the front while they fit in max_rows (the first one always)."""
        self._drop_cancelled()
        batch: list[_Request] = []
        rows = 0
        while self._pending and (not batch or rows + len(self._pending[0].rows) <= self.max_rows):
            request = self._pending.pop(0)
            batch.append(request)
            rows += len(request.rows)
        left = sum(len(r.rows) for r in self._pending)
        if left < self.max_rows:
            self._full.clear()
        if not self._pending:
            self._arrived.clear()
        return batch

    async def _send(self, batch: list[_Request]) -> None:
        merged = [row for request in batch for row in request.rows]
        self.calls += 1
        try:
            vectors = await self._embed(merged)
            if len(vectors) != len(merged):
                raise RuntimeError(f"the backend returned {len(vectors)} embeddings for {len(merged)} inputs")
        except Exception as e:  # noqa: BLE001 -- the batch's requests get the error; the worker lives on
            self._fail(batch, e)
            return
        start = 0
        for request in batch:
            if not request.future.done():  # cancelled meanwhile: its rows are dropped
                request.future.set_result(vectors[start:start + len(request.rows)])
            start += len(request.rows)

    @staticmethod
    def _fail(requests: list[_Request], error: BaseException) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
