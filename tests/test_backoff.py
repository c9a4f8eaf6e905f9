"""node/runtime/backoff.py: delays and retry, with an injected sleep that records delays instead of waiting."""

from __future__ import annotations

import asyncio

import pytest

from node.runtime.backoff import backoff_delays, retry


class FakeSleep:
    """Stands in for asyncio.sleep: records each requested delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Flaky:
    """An attempt function that fails ``failures`` times with ``error``, then returns ``f"ok {i}"``."""

    def __init__(self, failures: int, error: type[BaseException] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls: list[int] = []

    async def __call__(self, i: int) -> str:
        self.calls.append(i)
        if len(self.calls) <= self.failures:
            raise self.error(f"failure {len(self.calls)}")
        return f"ok {i}"


def run_retry(attempt, **kwargs):
    return asyncio.run(retry(attempt, **kwargs))


# ---- backoff_delays ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attempts, base, cap, expected",
    [
        (1, 1.0, 30.0, []),
        (2, 1.0, 30.0, [1.0]),
        (5, 1.0, 30.0, [1.0, 2.0, 4.0, 8.0]),
        (6, 0.5, 3.0, [0.5, 1.0, 2.0, 3.0, 3.0]),
        (4, 0.0, 30.0, [0.0, 0.0, 0.0]),
        (3, 5.0, 0.0, [0.0, 0.0]),
    ],
)
def test_backoff_delays(attempts, base, cap, expected):
    assert backoff_delays(attempts, base, cap) == expected


def test_backoff_delays_capped_for_many_attempts():
    delays = backoff_delays(100, 1.0, 30.0)
    assert len(delays) == 99 and max(delays) == 30.0 and delays == sorted(delays)


@pytest.mark.parametrize("attempts", [0, -1])
def test_backoff_delays_rejects_no_attempts(attempts):
    with pytest.raises(ValueError, match="attempts"):
        backoff_delays(attempts, 1.0, 30.0)


@pytest.mark.parametrize("base, cap", [(-1.0, 30.0), (1.0, -1.0)])
def test_backoff_delays_rejects_negative(base, cap):
    with pytest.raises(ValueError, match="non-negative"):
        backoff_delays(3, base, cap)


# ---- retry ---------------------------------------------------------------------------------------------


def test_first_success_does_not_sleep():
    sleep, attempt = FakeSleep(), Flaky(0)
    assert run_retry(attempt, attempts=3, base_delay=1.0, sleep=sleep) == "ok 0"
    assert attempt.calls == [0] and sleep.delays == []


def test_succeeds_after_failures():
    sleep, attempt = FakeSleep(), Flaky(3)
    assert run_retry(attempt, attempts=5, base_delay=0.5, max_delay=1.5, sleep=sleep) == "ok 3"
    assert attempt.calls == [0, 1, 2, 3]
    assert sleep.delays == [0.5, 1.0, 1.5]


def test_succeeds_on_last_attempt():
    sleep, attempt = FakeSleep(), Flaky(2)
    assert run_retry(attempt, attempts=3, base_delay=1.0, sleep=sleep) == "ok 2"
    assert sleep.delays == [1.0, 2.0]


def test_reraises_after_last_attempt():
    sleep, attempt = FakeSleep(), Flaky(10)
    with pytest.raises(ConnectionError, match="failure 4"):
        run_retry(attempt, attempts=4, base_delay=1.0, sleep=sleep)
    assert attempt.calls == [0, 1, 2, 3]
    assert sleep.delays == [1.0, 2.0, 4.0]  # no sleep after the last failure


def test_single_attempt_reraises_without_sleeping():
    sleep, attempt = FakeSleep(), Flaky(1)
    with pytest.raises(ConnectionError):
        run_retry(attempt, attempts=1, base_delay=1.0, sleep=sleep)
    assert attempt.calls == [0] and sleep.delays == []


def test_does_not_retry_exceptions_outside_retry_on():
    sleep, attempt = FakeSleep(), Flaky(1, error=KeyError)
    with pytest.raises(KeyError):
        run_retry(attempt, attempts=5, base_delay=1.0, retry_on=(ConnectionError,), sleep=sleep)
    assert attempt.calls == [0] and sleep.delays == []


def test_retries_subclasses_of_retry_on():
    sleep, attempt = FakeSleep(), Flaky(2, error=ConnectionRefusedError)
    assert run_retry(attempt, attempts=3, base_delay=1.0, retry_on=(OSError,), sleep=sleep) == "ok 2"


def test_default_retry_on_does_not_catch_cancellation():
    sleep, attempt = FakeSleep(), Flaky(1, error=asyncio.CancelledError)
    with pytest.raises(asyncio.CancelledError):
        run_retry(attempt, attempts=3, base_delay=1.0, sleep=sleep)
    assert attempt.calls == [0] and sleep.delays == []


@pytest.mark.parametrize("attempts", [0, -3])
def test_rejects_fewer_than_one_attempt(attempts):
    sleep, attempt = FakeSleep(), Flaky(0)
    with pytest.raises(ValueError, match="attempts"):
        run_retry(attempt, attempts=attempts, base_delay=1.0, sleep=sleep)
    assert attempt.calls == [] and sleep.delays == []
