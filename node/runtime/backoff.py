"""Retry with exponential backoff, with the sleep function injected so tests run without waiting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


def backoff_delays(attempts: int, base: float, cap: float) -> list[float]:
    """Delays before attempts 2..attempts: base, 2*base, 4*base, ... each at most cap."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if base < 0 or cap < 0:
        raise ValueError("backoff delays must be non-negative")
    return [min(cap, base * 2**i) for i in range(attempts - 1)]


async def retry(
    attempt: Callable[[int], Awaitable[T]],
    *,
    attempts: int,
    base_delay: float,
    max_delay: float = 30.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Call ``attempt(i)`` until it returns; after the last failure, re-raise its exception."""
    delays = backoff_delays(attempts, base_delay, max_delay)
    for i in range(attempts):
        try:
            return await attempt(i)
        except retry_on as e:
            if i == attempts - 1:
                raise
            logger.warning("attempt %d/%d failed (%s); retrying in %.1f s", i + 1, attempts, e, delays[i])
            await sleep(delays[i])
    raise AssertionError("unreachable")  # pragma: no cover
