"""Counting in engine steps, not seconds: when each request arrived, got its first token and its last."""

from __future__ import annotations

from typing import Any

import pytest

from server.engine import Engine
from server.scheduler import Sequence


class StepClock:
    """Engine steps at which each request arrived in the scheduler, got its first token and its last
    (recorded on the engine thread, so exact; `engine.steps` counts forward passes)."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch):
        self.arrival: dict[str, int] = {}
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        add, append = engine.scheduler.add, engine._append_token

        def recording_add(seq: Sequence) -> None:
            self.arrival.setdefault(seq.request_id, engine.steps)
            add(seq)

        def recording_append(seq: Sequence, token: int, logprob: Any) -> None:
            # Before appending: the append hands the client its token, and the test may read these at once.
            self.first.setdefault(seq.request_id, engine.steps)
            self.last[seq.request_id] = engine.steps
            append(seq, token, logprob)

        monkeypatch.setattr(engine.scheduler, "add", recording_add)
        monkeypatch.setattr(engine, "_append_token", recording_append)

    def ttft(self, request_id: str) -> int:
        return self.first[request_id] - self.arrival[request_id]

    def e2e(self, request_id: str) -> int:
        return self.last[request_id] - self.arrival[request_id]
