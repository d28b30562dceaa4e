"""The live progress line: requests done (of how many), errors, in flight, current rate, elapsed time.

On a terminal it redraws one line in place; otherwise (CI logs, files) it prints a line every few
seconds so a log is not flooded with carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

RATE_WINDOW_S = 5.0  # "current" rate: completions over the last few seconds


class Progress:
    def __init__(
        self,
        total: int | None,
        duration_s: float | None,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.duration_s = duration_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.done = 0
        self.errors = 0
        self.in_flight = 0
        self.output_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (finish time, output tokens)
        self._start = time.perf_counter()
        self._last_print = 0.0

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, success: bool, output_tokens: int) -> None:
        self.in_flight -= 1
        self.done += 1
        self.errors += not success
        self.output_tokens += output_tokens
        self._recent.append((time.perf_counter(), output_tokens))

    def line(self) -> str:
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        window = min(RATE_WINDOW_S, max(now - self._start, 1e-9))
        rate = len(self._recent) / window
        tokens_rate = sum(t for _, t in self._recent) / window
        elapsed = now - self._start
        if self.total:
            share = self.done / self.total
        elif self.duration_s:
            share = min(elapsed / self.duration_s, 1.0)
        else:
            share = 0.0
        width = 24
        filled = int(share * width)
        bar = "#" * filled + "." * (width - filled)
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        clock = f"{elapsed:.0f}/{self.duration_s:.0f}s" if self.duration_s else f"{elapsed:.0f}s"
        return (f"[{bar}] {count} done, {self.errors} errors, {self.in_flight} in flight, "
                f"{rate:.1f} req/s, {tokens_rate:.0f} tok/s, {clock}")

    def tick(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.interactive:
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()
        elif force or now - self._last_print >= 5.0:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        if not self.enabled:
            return
        self.tick(force=not self.interactive)
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
