"""Churn: volunteers' sessions with heavy-tailed lengths, calibrated to a fraction leaving per hour.

    churn = ChurnProcess(ChurnConfig(rate_per_hour=0.2), rng)
    remaining = churn.initial_remaining(n)   # (n,) s left in the sessions of the nodes present at t = 0
    length = churn.session()                 # s, a fresh session of a node that joins now
    gap = churn.next_arrival_gap(n)          # s to the next join, for a swarm whose mean size is n

The model is an M/G/inf queue in steady state: nodes join as a Poisson process of rate lambda and stay for a
session of mean m, so the population is about N = lambda * m and rate * N nodes leave per hour when
m = 1 / rate hours. Measured P2P session lengths are heavy-tailed: Stutzbach & Rejaie, "Understanding Churn in
Peer-to-Peer Networks" (IMC 2006), fit them with Weibull and log-normal distributions (median sessions of
minutes to an hour, a long tail of days). Two families, both with mean 1/rate hours:
  * lognormal(mu, sigma): mu = ln(mean) - sigma^2 / 2. sigma 1.5 by default (coefficient of variation 2.9).
  * pareto (Lomax / Pareto II) with shape alpha > 1 and scale s = mean * (alpha - 1).
The nodes present at t = 0 are a steady-state snapshot, so the rate is right from the first hour: their
remaining time is the residual life of a length-biased session, U * L with L length-biased (for the lognormal,
L ~ lognormal(mu + sigma^2, sigma); for the Lomax the residual is Lomax(alpha - 1, s) directly).
A rate of 0 means no churn: sessions never end and nobody joins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HOUR = 3600.0
FAMILIES = ("lognormal", "pareto")


@dataclass(frozen=True)
class ChurnConfig:
    rate_per_hour: float = 0.2  # fraction of the population leaving per hour
    family: str = "lognormal"
    shape: float = 1.5  # lognormal sigma, or pareto alpha (> 1). 1.5 is an assumption: a heavy tail (CV 2.9)

    def __post_init__(self) -> None:
        if not 0 <= self.rate_per_hour <= 1:
            raise ValueError(f"churn must be a fraction per hour in [0, 1], got {self.rate_per_hour}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown session family {self.family!r}: expected one of {', '.join(FAMILIES)}")
        if self.family == "pareto" and not self.shape > 1:
            raise ValueError(f"a pareto session needs shape alpha > 1 for a finite mean, got {self.shape}")
        if self.family == "lognormal" and not self.shape > 0:
            raise ValueError(f"a lognormal session needs sigma > 0, got {self.shape}")

    @property
    def mean_session_s(self) -> float:
        return math.inf if self.rate_per_hour == 0 else HOUR / self.rate_per_hour


class ChurnProcess:
    def __init__(self, config: ChurnConfig, rng: np.random.Generator) -> None:
        self.config, self.rng = config, rng
        mean = config.mean_session_s
        if config.family == "lognormal" and math.isfinite(mean):
            self._mu = math.log(mean) - config.shape ** 2 / 2
        elif math.isfinite(mean):
            self._scale = mean * (config.shape - 1)

    @property
    def active(self) -> bool:
        return self.config.rate_per_hour > 0

    def session(self) -> float:
        """Length in seconds of a session that starts now (inf without churn)."""
        c = self.config
        if not self.active:
            return math.inf
        if c.family == "lognormal":
            return float(self.rng.lognormal(self._mu, c.shape))
        return float(self._scale * ((1.0 - self.rng.random()) ** (-1.0 / c.shape) - 1.0))

    def initial_remaining(self, n: int) -> np.ndarray:
        """(n,) seconds left for the nodes present at t = 0 of a population in steady state."""
        c = self.config
        if not self.active:
            return np.full(n, math.inf)
        if c.family == "lognormal":
            biased = self.rng.lognormal(self._mu + c.shape ** 2, c.shape, n)
            return self.rng.random(n) * biased
        return self._scale * ((1.0 - self.rng.random(n)) ** (-1.0 / (c.shape - 1.0)) - 1.0)

    def next_arrival_gap(self, mean_population: float) -> float:
        """Seconds to the next join, Poisson with rate rate_per_hour * mean_population per hour."""
        if not self.active or mean_population <= 0:
            return math.inf
        return float(self.rng.exponential(HOUR / (self.config.rate_per_hour * mean_population)))
