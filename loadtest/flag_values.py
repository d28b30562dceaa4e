"""The value types of `lorahive-loadtest`'s flags, and the knobs a sweep varies.

Both the command line (`cli`, which declares the flags) and the commands (`commands`, which converts a
sweep's `--values` exactly as the flag it varies would) import them from here. Light on purpose: `--help`
must answer without numpy or httpx.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the rate must be positive (or inf), got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


@dataclass(frozen=True)
class SweepKnob:
    dest: str  # the run flag's attribute on the parsed arguments
    convert: Callable[[str], Any]  # the run flag's type: one value of `--values` becomes what the flag gives


SWEEP_KNOBS = {  # knob name on the command line (`--vary`) -> the run flag it sets
    "rate": SweepKnob("rate", rate),
    "adapters": SweepKnob("adapters", non_negative_int),
    "popularity": SweepKnob("popularity", str),
    "concurrency": SweepKnob("concurrency", positive_int),
    "cv": SweepKnob("cv", float),
    "base-share": SweepKnob("base_share", share),
    "input-len": SweepKnob("input_len", str),
    "output-len": SweepKnob("output_len", str),
}
