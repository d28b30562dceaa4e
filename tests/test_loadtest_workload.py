"""The load-test harness's workload generation: arrivals, popularity, lengths, traces, seeds.

Statistical checks use large samples from fixed seeds, so they are deterministic; the tolerances are
what the sample size allows, not fudge factors.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtest.arrivals import ArrivalProcess, trace_offsets
from loadtest.workload import (
    TOKEN_ID_RANGE,
    LengthSpec,
    Popularity,
    Workload,
    load_prompts,
    load_trace,
)

ADAPTERS = [f"a{i}" for i in range(10)]


def take(workload: Workload, n: int):
    return list(itertools.islice(workload.requests(), n))


# ------------------------------------------------------------------------------------------ arrivals


@pytest.mark.parametrize("cv", [1.0, 0.5, 3.0])
def test_gamma_arrivals_have_the_asked_rate_and_burstiness(cv: float):
    offsets = list(itertools.islice(ArrivalProcess(rate=20.0, cv=cv).offsets(np.random.default_rng(1)), 40001))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_infinite_rate_sends_everything_at_once_and_kinds_are_named():
    assert list(itertools.islice(ArrivalProcess(float("inf")).offsets(np.random.default_rng(0)), 5)) == [0.0] * 5
    assert ArrivalProcess(float("inf")).kind == "all-at-once"
    assert ArrivalProcess(3.0).kind == "poisson"
    assert ArrivalProcess(3.0, cv=2.0).kind == "gamma"
    with pytest.raises(ValueError):
        ArrivalProcess(0.0)
    with pytest.raises(ValueError):
        ArrivalProcess(1.0, cv=0.0)


def test_trace_offsets_start_at_zero_sorted_and_scaled():
    assert trace_offsets([105.0, 100.0, 101.0], speed=2.0) == [0.0, 0.5, 2.5]


# ------------------------------------------------------------------------------------------ popularity


def test_popularity_parsing():
    assert Popularity.parse("zipf:1.5") == Popularity("zipf", 1.5)
    assert Popularity.parse("skewed") == Popularity("zipf", 1.0)
    assert str(Popularity.parse("zipf:1.0")) == "zipf:1"
    for bad in ("zipf:x", "zipf:-1", "popular", "uniform:2"):
        with pytest.raises(ValueError):
            Popularity.parse(bad)


def test_distinct_gives_every_window_of_n_requests_n_different_adapters():
    specs = take(Workload(ADAPTERS, Popularity("distinct")), 50)
    for start in range(0, 50 - 10):
        assert len({s.adapter for s in specs[start:start + 10]}) == 10


def test_identical_uses_one_adapter_and_uniform_uses_all_evenly():
    assert {s.adapter for s in take(Workload(ADAPTERS, Popularity("identical")), 100)} == {"a0"}
    counts = Counter(s.adapter for s in take(Workload(ADAPTERS, Popularity("uniform")), 20000))
    assert set(counts) == set(ADAPTERS)
    assert all(abs(c / 20000 - 0.1) < 0.01 for c in counts.values())


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_zipf_frequencies_follow_the_power_law(alpha: float):
    n = 20000
    counts = Counter(s.adapter for s in take(Workload(ADAPTERS, Popularity("zipf", alpha)), n))
    weights = np.arange(1, 11, dtype=float) ** -alpha
    expected = weights / weights.sum()
    observed = np.array([counts[a] / n for a in ADAPTERS])
    assert np.abs(observed - expected).max() < 0.012
    assert counts["a0"] / counts["a1"] == pytest.approx(2**alpha, rel=0.08)


def test_base_share_sends_that_share_to_the_base_model():
    specs = take(Workload(ADAPTERS, Popularity("uniform"), base_share=0.3), 10000)
    share = sum(s.adapter is None for s in specs) / len(specs)
    assert share == pytest.approx(0.3, abs=0.015)
    assert all(s.adapter is None for s in take(Workload([], base_share=0.0), 20))


@given(st.integers(1, 50), st.sampled_from(["distinct", "uniform", "zipf:0.7", "zipf:2", "identical"]),
       st.integers(0, 2**31))
def test_popularity_always_picks_a_served_adapter(n: int, popularity: str, seed: int):
    ids = [f"x{i}" for i in range(n)]
    assert {s.adapter for s in take(Workload(ids, Popularity.parse(popularity), seed=seed), 60)} <= set(ids)


# ------------------------------------------------------------------------------------------ lengths and prompts


def test_length_spec_parses_fixed_and_ranges_and_samples_inside():
    assert LengthSpec.parse("128") == LengthSpec(128, 128)
    assert LengthSpec.parse("32:256") == LengthSpec(32, 256) == LengthSpec.parse("32-256")
    for bad in ("0", "5:3", "a", "1:2:3", ""):
        with pytest.raises(ValueError):
            LengthSpec.parse(bad)
    rng = np.random.default_rng(0)
    samples = [LengthSpec(3, 6).sample(rng) for _ in range(500)]
    assert set(samples) == {3, 4, 5, 6}


def test_token_prompts_have_exactly_the_input_length_and_text_prompts_the_word_count():
    specs = take(Workload([], input_len=LengthSpec(5, 40), output_len=LengthSpec(7, 7)), 50)
    for s in specs:
        assert isinstance(s.prompt, list) and len(s.prompt) == s.input_len
        assert all(TOKEN_ID_RANGE[0] <= t < TOKEN_ID_RANGE[1] for t in s.prompt)
        assert s.max_tokens == 7 and s.arrival is None
    text = take(Workload([], input_len=LengthSpec(12, 12), prompt_mode="text"), 3)
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 12 for s in text)


def test_a_seed_reproduces_a_run_and_knobs_do_not_disturb_other_draws():
    def make(**kw):
        base = {"adapters": ADAPTERS, "popularity": Popularity("zipf", 1.0), "input_len": LengthSpec(4, 64),
                "output_len": LengthSpec(4, 64), "arrivals": ArrivalProcess(5.0, 2.0), "seed": 7}
        return take(Workload(**(base | kw)), 200)

    assert make() == make()
    assert make() != make(seed=8)
    # Fewer adapters, another popularity, a base share: same arrival instants, prompts and lengths.
    for other in (make(adapters=ADAPTERS[:3]), make(popularity=Popularity("uniform")), make(base_share=0.5)):
        assert [(s.arrival, s.prompt, s.max_tokens) for s in other] == [(s.arrival, s.prompt, s.max_tokens)
                                                                         for s in make()]


def test_prompt_file_supplies_prompts_and_their_output_lengths(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 5}\n\n{"text": "bye"}\n')
    records = load_prompts(path)
    specs = take(Workload([], prompts=records, output_len=LengthSpec(9, 9)), 40)
    assert {(s.prompt, s.max_tokens) for s in specs} == {("hello there", 5), ("bye", 9)}
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="prompt"):
        load_prompts(path)


def test_trace_replay_keeps_times_maps_tenants_and_overrides_lengths(tmp_path: Path):
    path = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 10.0, "adapter": "tenant-b", "input_len": 3, "output_len": 4},
        {"timestamp": 10.5, "adapter": "tenant-a"},
        {"timestamp": 11.0, "adapter": None},
        {"timestamp": 12.0, "adapter": "tenant-b", "prompt": "literal"},
        {"timestamp": 12.5},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    trace = load_trace(path)
    specs = list(Workload(["x0", "x1"], Popularity("identical"), trace=trace, output_len=LengthSpec(2, 2)).requests())
    assert [s.arrival for s in specs] == [0.0, 0.5, 1.0, 2.0, 2.5]
    # Tenants in order of first appearance onto the served adapters; null is the base model; a line
    # without `adapter` is left to the popularity flag.
    assert [s.adapter for s in specs] == ["x0", "x1", None, "x0", "x0"]
    assert (len(specs[0].prompt), specs[0].max_tokens) == (3, 4)
    assert specs[3].prompt == "literal" and specs[1].max_tokens == 2
    path.write_text('{"adapter": "x"}\n')
    with pytest.raises(ValueError, match="timestamp"):
        load_trace(path)


# ------------------------------------------------------------------------------------------ boundaries


def test_loadtest_imports_nothing_of_the_server_and_no_torch():
    """DESIGN.md: loadtest/ talks HTTP only. Checked in the source and in a fresh interpreter."""
    root = Path(__file__).resolve().parents[1]
    forbidden = ("server", "kernels", "adapters_store", "torch")
    for path in (root / "loadtest").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in forbidden], f"{path.name} imports {names}"
    code = ("import sys, loadtest.cli, loadtest.commands, loadtest.plots; "
            f"print(','.join(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True, text=True)
    assert loaded.stdout.strip() == ""
