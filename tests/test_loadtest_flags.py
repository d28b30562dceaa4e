"""The load tester's command line: a sweep converts each of `--values` exactly as the flag it varies
would, from one table both the CLI and the commands import; presets say what they set."""

from __future__ import annotations

import inspect

import pytest

from loadtest import commands
from loadtest.cli import parse
from loadtest.commands import UsageError, sweep_values
from loadtest.flag_values import SWEEP_KNOBS
from loadtest.presets import PRESETS, describe

SAMPLES = {"rate": "2.5", "adapters": "8", "popularity": "zipf:1.5", "concurrency": "4", "cv": "2",
           "base-share": "0.25", "input-len": "8:16", "output-len": "32"}


def test_every_knob_has_a_sample():
    assert set(SAMPLES) == set(SWEEP_KNOBS)


@pytest.mark.parametrize("knob", sorted(SWEEP_KNOBS))
def test_a_sweep_value_is_what_the_flag_would_give(knob: str):
    sample = SAMPLES[knob]
    flag_value = getattr(parse("run", [f"--{knob}", sample]), SWEEP_KNOBS[knob].dest)
    args = parse("sweep", ["--vary", knob, "--values", f"{sample},{sample}"])
    assert sweep_values(args) == (SWEEP_KNOBS[knob].dest, [flag_value, flag_value])


@pytest.mark.parametrize(("knob", "bad"), [("rate", "0"), ("adapters", "-1"), ("popularity", "zipf:x"),
                                          ("base-share", "2"), ("input-len", "9:3"), ("cv", "fast")])
def test_a_bad_sweep_value_is_a_usage_error(knob: str, bad: str):
    with pytest.raises(UsageError, match=f"{bad!r} is not a valid {knob}"):
        sweep_values(parse("sweep", ["--vary", knob, "--values", bad]))


def test_the_commands_use_no_private_argparse_attributes():
    assert "._actions" not in inspect.getsource(commands)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_describes_its_arrivals_as_it_sets_them(name: str):
    description = describe(name).split("\n")[0]
    cv = PRESETS[name].get("cv")
    if "Gamma arrivals" in description:
        assert cv is not None and cv != 1.0, f"{name} says Gamma arrivals but sets --cv {cv}"
    if "Poisson arrivals" in description:
        assert cv in (None, 1.0) and "rate" in PRESETS[name]
