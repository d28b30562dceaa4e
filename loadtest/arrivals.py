"""When requests are sent: open-loop inter-arrival processes, a closed loop, or a replayed trace.

Open-loop processes yield *offsets from the start of the run* (seconds), so a run's schedule is fixed
by its seed before any request is sent and the server's speed cannot bend it (closed-loop benchmarks
hide queueing: a slow server simply receives fewer requests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrivalProcess:
    """Open-loop arrivals at `rate` requests/s. `cv` is the coefficient of variation of the gaps:
    1 is Poisson (exponential gaps), above 1 is burstier, below 1 more regular (S-LoRA's Gamma
    process). `rate = inf` sends everything at t=0."""

    rate: float
    cv: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"the request rate must be positive, got {self.rate}")
        if not self.cv > 0:
            raise ValueError(f"the coefficient of variation must be positive, got {self.cv}")

    @property
    def kind(self) -> str:
        if math.isinf(self.rate):
            return "all-at-once"
        return "poisson" if self.cv == 1.0 else "gamma"

    def offsets(self, rng: np.random.Generator) -> Iterator[float]:
        """Infinite, increasing arrival offsets (seconds). The first request goes at t=0 so a short run
        does not start with an idle gap."""
        t = 0.0
        while True:
            yield t
            if math.isinf(self.rate):
                continue
            # Gamma(shape k, scale θ) has mean kθ and CV 1/sqrt(k): k = 1/cv², θ = cv²/rate gives mean 1/rate.
            shape = 1.0 / (self.cv * self.cv)
            t += float(rng.gamma(shape, 1.0 / (self.rate * shape)))


def trace_offsets(timestamps: list[float], speed: float = 1.0) -> list[float]:
    """A trace's timestamps (any origin, seconds) as offsets from its first request, played `speed`
    times faster. Out-of-order lines are sorted: a trace is a record of arrivals, not a script."""
    if not timestamps:
        return []
    if not speed > 0:
        raise ValueError(f"the trace speed must be positive, got {speed}")
    ordered = sorted(timestamps)
    first = ordered[0]
    return [(t - first) / speed for t in ordered]
