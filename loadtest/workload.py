"""What each request asks for: which adapter (popularity), how long a prompt, how many output tokens.

Every random choice draws from its own seeded stream (arrivals, adapters, base share, lengths, prompts),
so changing one knob leaves the others' draws alone: a sweep over the number of adapters sends the
same prompts at the same instants, and only the adapters differ.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from loadtest.arrivals import ArrivalProcess, trace_offsets

PromptMode = Literal["tokens", "text"]
# Token ids of printable ASCII: present in every byte-level or BPE vocabulary we know, so a token-id
# prompt is valid on any server without knowing its tokenizer.
TOKEN_ID_RANGE = (32, 127)
# Short, common English words: about one token each (with the leading space) in BPE vocabularies.
_WORD_LIST = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part"
)
WORDS = tuple(_WORD_LIST.split())


# --------------------------------------------------------------------------------------------------
# Lengths


@dataclass(frozen=True)
class LengthSpec:
    """A fixed length (`"128"`) or a uniform integer range, both ends included (`"32:256"`)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int) -> LengthSpec:
        if isinstance(text, int):
            return cls(text, text)
        match = re.fullmatch(r"\s*(\d+)\s*(?:[:-]\s*(\d+)\s*)?", text)
        if not match:
            raise ValueError(f"a length is N or LOW:HIGH (e.g. 128 or 32:256), got {text!r}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        if low < 1 or high < low:
            raise ValueError(f"a length range needs 1 <= LOW <= HIGH, got {text!r}")
        return cls(low, high)

    def sample(self, rng: np.random.Generator) -> int:
        return self.low if self.low == self.high else int(rng.integers(self.low, self.high + 1))

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


# --------------------------------------------------------------------------------------------------
# Adapter popularity


@dataclass(frozen=True)
class Popularity:
    """How requests spread over N adapters (Punica's four workloads, S-LoRA's power law).

    - `distinct`: each request its own adapter, round-robin, so concurrent requests never share one
      (with more requests than adapters the cycle repeats);
    - `uniform`: every adapter equally likely;
    - `zipf:α`: the k-th adapter with probability ∝ k^-α (α=1 is S-LoRA's default; Punica's "Skewed");
    - `identical`: every request the same adapter.
    """

    kind: Literal["distinct", "uniform", "zipf", "identical"]
    alpha: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Popularity:
        name, _, arg = text.strip().partition(":")
        name = name.lower()
        if name in ("distinct", "uniform", "identical") and not arg:
            return cls(name)  # type: ignore[arg-type]
        if name in ("zipf", "skewed", "powerlaw", "power-law"):
            try:
                alpha = float(arg) if arg else 1.0
            except ValueError:
                raise ValueError(f"zipf's exponent must be a number, got {arg!r}") from None
            if not (alpha >= 0 and math.isfinite(alpha)):
                raise ValueError(f"zipf's exponent must be >= 0, got {alpha}")
            return cls("zipf", alpha)
        raise ValueError(f"popularity is distinct, uniform, zipf:ALPHA or identical, got {text!r}")

    def __str__(self) -> str:
        return f"zipf:{self.alpha:g}" if self.kind == "zipf" else self.kind

    def chooser(self, num_adapters: int, rng: np.random.Generator) -> Iterator[int]:
        """Infinite adapter indices in [0, num_adapters)."""
        if num_adapters < 1:
            raise ValueError("a popularity needs at least one adapter")
        if self.kind == "distinct":
            i = 0
            while True:
                yield i % num_adapters
                i += 1
        if self.kind == "identical":
            while True:
                yield 0
        if self.kind == "uniform":
            while True:
                yield int(rng.integers(num_adapters))
        weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -self.alpha
        cumulative = np.cumsum(weights / weights.sum())
        while True:
            # Inverse CDF; min() guards the last bucket against cumulative[-1] rounding to just below 1.
            yield min(int(np.searchsorted(cumulative, rng.random(), side="right")), num_adapters - 1)


# --------------------------------------------------------------------------------------------------
# Prompt files and traces


@dataclass(frozen=True)
class PromptRecord:
    """One line of a prompts file: `{"prompt": "...", "output_len": 64}` (`output_len` optional;
    `max_tokens` is read as a synonym, and `text` for `prompt`)."""

    prompt: str
    output_len: int | None = None


def load_prompts(path: Path) -> list[PromptRecord]:
    records = []
    for number, raw in _jsonl(path):
        prompt = raw.get("prompt", raw.get("text"))
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{number}: each line needs a non-empty string 'prompt'")
        records.append(PromptRecord(prompt, _optional_positive_int(raw, ("output_len", "max_tokens"), path, number)))
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


@dataclass(frozen=True)
class TraceEntry:
    """One line of a trace: `{"timestamp": 12.5, "adapter": "tenant-7", "input_len": 300, "output_len": 40}`.

    Only `timestamp` (seconds, any origin) is required. `adapter` is the trace's own name for a tenant:
    distinct names are mapped onto the target's adapters in order of first appearance (cycling when the
    trace has more tenants than the target has adapters), which keeps the trace's popularity shape;
    `null` or `""` is the base model; absent, the popularity flag decides. `prompt` may replace `input_len`."""

    timestamp: float
    adapter: str | None | Literal[False] = False  # False: the line did not say
    input_len: int | None = None
    output_len: int | None = None
    prompt: str | None = None


def load_trace(path: Path) -> list[TraceEntry]:
    entries = []
    for number, raw in _jsonl(path):
        stamp = raw.get("timestamp")
        if not isinstance(stamp, int | float) or isinstance(stamp, bool) or not math.isfinite(stamp):
            raise ValueError(f"{path}:{number}: each line needs a numeric 'timestamp' (seconds)")
        adapter: str | None | Literal[False] = False
        if "adapter" in raw:
            adapter = raw["adapter"] or None
            if adapter is not None and not isinstance(adapter, str):
                raise ValueError(f"{path}:{number}: 'adapter' must be a string or null")
        prompt = raw.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: 'prompt' must be a string")
        entries.append(TraceEntry(
            float(stamp), adapter,
            _optional_positive_int(raw, ("input_len",), path, number),
            _optional_positive_int(raw, ("output_len", "max_tokens"), path, number),
            prompt,
        ))
    if not entries:
        raise ValueError(f"{path}: no requests in the trace")
    entries.sort(key=lambda e: e.timestamp)
    return entries


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object")
            yield number, raw


def _optional_positive_int(raw: dict[str, Any], keys: Sequence[str], path: Path, number: int) -> int | None:
    for key in keys:
        if key in raw and raw[key] is not None:
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{path}:{number}: '{key}' must be a positive integer")
            return value
    return None


# --------------------------------------------------------------------------------------------------
# The workload


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: `adapter` None is the base model; `arrival` is the open-loop send time
    (seconds from the run's start), None in a closed loop."""

    index: int
    adapter: str | None
    prompt: str | list[int]
    input_len: int | None  # tokens asked for (token-id prompts: exact); None for prompts from a file
    max_tokens: int
    arrival: float | None


@dataclass
class Workload:
    """Everything that decides the requests of a run, except the server."""

    adapters: list[str]  # the adapter ids requests draw from (empty: base model only)
    popularity: Popularity = field(default_factory=lambda: Popularity("uniform"))
    base_share: float = 0.0  # share of requests sent to the base model
    input_len: LengthSpec = field(default_factory=lambda: LengthSpec(32, 32))
    output_len: LengthSpec = field(default_factory=lambda: LengthSpec(32, 32))
    prompt_mode: PromptMode = "tokens"
    prompts: list[PromptRecord] | None = None  # from a file: replaces synthetic prompts
    arrivals: ArrivalProcess | None = None  # None: closed loop (or trace)
    trace: list[TraceEntry] | None = None
    trace_speed: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.base_share <= 1.0:
            raise ValueError(f"the base-model share must be in [0, 1], got {self.base_share}")

    def requests(self) -> Iterator[RequestSpec]:
        """The run's requests in send order; infinite unless replaying a trace (the runner stops it)."""
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(5)]
        arrival_rng, adapter_rng, base_rng, length_rng, prompt_rng = streams
        chooser = self.popularity.chooser(len(self.adapters), adapter_rng) if self.adapters else None
        if self.trace is not None:
            offsets: Iterator[float | None] = iter(trace_offsets([e.timestamp for e in self.trace], self.trace_speed))
        elif self.arrivals is not None:
            offsets = self.arrivals.offsets(arrival_rng)
        else:
            offsets = _forever(None)
        trace_names: dict[str, str] = {}
        for index, arrival in enumerate(offsets):
            entry = self.trace[index] if self.trace is not None else None
            adapter = self._adapter(entry, chooser, base_rng, trace_names)
            prompt, input_len, output_len = self._prompt(entry, length_rng, prompt_rng)
            yield RequestSpec(index, adapter, prompt, input_len, output_len, arrival)

    def _adapter(
        self,
        entry: TraceEntry | None,
        chooser: Iterator[int] | None,
        base_rng: np.random.Generator,
        trace_names: dict[str, str],
    ) -> str | None:
        if entry is not None and entry.adapter is not False:
            if entry.adapter is None or not self.adapters:
                return None
            if entry.adapter not in trace_names:
                trace_names[entry.adapter] = self.adapters[len(trace_names) % len(self.adapters)]
            return trace_names[entry.adapter]
        # Draw the coin even without adapters, so a base share does not shift the other streams.
        to_base = base_rng.random() < self.base_share
        if chooser is None or to_base:
            return None
        return self.adapters[next(chooser)]

    def _prompt(
        self, entry: TraceEntry | None, length_rng: np.random.Generator, prompt_rng: np.random.Generator
    ) -> tuple[str | list[int], int | None, int]:
        input_len = self.input_len.sample(length_rng)
        output_len = self.output_len.sample(length_rng)
        if entry is not None:
            input_len = entry.input_len or input_len
            output_len = entry.output_len or output_len
            if entry.prompt is not None:
                return entry.prompt, None, output_len
        if self.prompts:
            record = self.prompts[int(prompt_rng.integers(len(self.prompts)))]
            return record.prompt, None, record.output_len or output_len
        if self.prompt_mode == "tokens":
            return prompt_rng.integers(*TOKEN_ID_RANGE, size=input_len).tolist(), input_len, output_len
        words = prompt_rng.integers(len(WORDS), size=input_len)
        return " ".join(WORDS[w] for w in words), input_len, output_len


def _forever(value: None) -> Iterator[None]:
    while True:
        yield value
