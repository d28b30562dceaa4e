"""The load tester's plots say what the run measured, checked on matplotlib's figure objects: rates on
axes from zero, one axes per panel (no twin axes), percentiles only over windows that hold enough requests
for them, sample counts in the legends, and a legend entry for the warm-up band. Plus what the commands
say they wrote when matplotlib is missing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytest

from loadtest.client import RequestResult
from loadtest.commands import PLOTS_HINT
from loadtest.plots import (
    compare_cdfs_figure,
    latency_cdf_figure,
    latency_over_time_figure,
    ratio_sweeps_figure,
    sweep_figure,
    throughput_figure,
    write_run_plots,
)
from tests.support.loadtest_harness import cli, fake_server, ok

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

REPO = Path(__file__).resolve().parents[1]


def steady_run(count: int, warmup: int = 0, per_second: float = 10.0) -> list[RequestResult]:
    """`count` requests at `per_second`, the first `warmup` of them warm-up, latencies varying a little."""
    return [
        ok(i, i / per_second, 0.05 + 0.001 * (i % 7), [0.01 + 0.0001 * (i % 5)] * 7, f"a{i % 3}", warmup=i < warmup)
        for i in range(count)
    ]


@pytest.fixture
def figures() -> Iterator[list[Any]]:
    """Figures a test made, closed afterwards."""
    made: list[Any] = []
    yield made
    for figure in made:
        plt.close(figure)


def legend_texts(ax: Any) -> list[str]:
    legend = ax.get_legend()
    return [text.get_text() for text in legend.get_texts()] if legend else []


def assert_no_twin_axes(figure: Any) -> None:
    positions = [tuple(ax.get_position().bounds) for ax in figure.axes]
    assert len(set(positions)) == len(positions), "two axes drawn on the same spot (twinx)"


def test_throughput_axes_start_at_zero_and_legends_count(figures: list[Any]):
    # A steady run whose rate varies by a few percent: its axis must not zoom into the wiggle.
    figure = throughput_figure(steady_run(300, warmup=20))
    figures.append(figure)
    assert_no_twin_axes(figure)
    requests_ax, tokens_ax = figure.axes
    for ax in figure.axes:
        assert ax.get_ylim()[0] == 0
        texts = legend_texts(ax)
        assert texts and all("(n=" in text for text in texts), texts
        assert "warm-up, excluded (n=20)" in texts
    assert {"sent (n=300)", "completed (n=300)"} <= set(legend_texts(requests_ax))
    assert legend_texts(tokens_ax)[0] == "output tokens (n=2,400)"


def test_buckets_hold_enough_requests_for_a_rate(figures: list[Any]):
    figure = throughput_figure(steady_run(40, per_second=2.0))  # 20 s, 40 requests
    figures.append(figure)
    sent = figure.axes[0].get_lines()[0]
    assert len(sent.get_xdata()) <= 40 / 8  # not 60 buckets of 0-1 requests


def percentile_labels(ax: Any) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if line.get_label().startswith("p")]


@pytest.mark.parametrize(
    ("count", "drawn"),
    [(5, []), (60, ["p50"]), (2000, ["p50", "p90"])],
)
def test_latency_percentiles_only_where_windows_hold_enough_requests(figures: list[Any], count: int,
                                                                      drawn: list[str]):
    figure = latency_over_time_figure(steady_run(count, warmup=2))
    figures.append(figure)
    assert_no_twin_axes(figure)
    for ax in figure.axes:
        labels = percentile_labels(ax)
        assert [label.split()[0] for label in labels] == drawn  # never a p99 of a handful of requests
        texts = legend_texts(ax)
        assert f"requests (n={count:,})" in texts and "warm-up, excluded (n=2)" in texts
        assert ax.get_ylim()[0] == 0


def test_cdf_legends_count_their_samples(figures: list[Any]):
    run = steady_run(30, warmup=5)
    run[10].adapter = None  # one base-model request: the CDFs split into base and adapters
    figure = latency_cdf_figure(run)
    compare = compare_cdfs_figure({"one": run, "two": run[:20]})
    figures += [figure, compare]
    ttft, tpot, itl, e2el = figure.axes
    assert legend_texts(ttft) == ["all (n=25)", "base model (n=1)", "adapters (n=24)"]
    assert legend_texts(itl)[0] == "all (n=175)"  # 7 inter-token gaps per request
    assert legend_texts(compare.axes[0]) == ["one (n=25)", "two (n=15)"]


def test_sweep_has_one_axes_per_panel_from_zero(figures: list[Any]):
    rows = [
        {"value": value, "completed": 100, "output_throughput": tokens, "request_throughput": tokens / 8,
         "p50_ttft_ms": 20.0, "p99_ttft_ms": 40.0, "p50_e2el_ms": 200.0, "p99_e2el_ms": 300.0}
        for value, tokens in ((1, 211.0), (8, 209.0), (64, 206.0))
    ]
    figure = sweep_figure(rows, "adapters")
    figures.append(figure)
    assert_no_twin_axes(figure)
    assert len(figure.axes) == 3
    for ax in figure.axes:
        assert ax.get_ylim()[0] == 0  # 206 to 211 tok/s is flat, not a cliff
        assert all("(n=100)" in text for text in legend_texts(ax))
    assert [len(ax.get_lines()) for ax in figure.axes] == [1, 1, 4]


def test_ratio_sweeps_draw_a_line_per_sweep_on_both_panels(figures: list[Any]):
    sweeps = {
        popularity: [{"value": value, "completed": 96, "output_throughput_ratio": ratio, "p50_ttft_ms_ratio": 2 - ratio}
                     for value, ratio in ((1, 1.0), (100, 0.9), (2000, share))]
        for popularity, share in (("zipf:1.0", 0.85), ("uniform", 0.75))
    }
    figure = ratio_sweeps_figure(sweeps, "adapters")
    figures.append(figure)
    assert_no_twin_axes(figure)
    for ax in figure.axes:
        assert ax.get_ylim()[0] == 0
        assert legend_texts(ax) == ["zipf:1.0 (n=96)", "uniform (n=96)"]
        assert [list(line.get_xdata()) for line in ax.get_lines()][:2] == [[1, 100, 2000]] * 2
    assert [list(line.get_ydata()) for line in figure.axes[0].get_lines()][:2] == [[1.0, 0.9, 0.85], [1.0, 0.9, 0.75]]


def test_without_matplotlib_the_run_says_what_it_wrote(tmp_path: Path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with fake_server(ttft_s=0.005, itl_s=0.001) as (url, _, _state):
        assert cli("--url", url, "--num-requests", "2", "--output-len", "2", "--out", str(tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"wrote {tmp_path / 'results.json'}, {tmp_path / 'summary.md'}\n" in err
    assert PLOTS_HINT in err and not list(tmp_path.glob("*.png"))
    install = PLOTS_HINT.split(": ", 1)[1]
    assert f"`{install}`" in (REPO / "README.md").read_text()  # the README gives the same command


def test_with_matplotlib_the_run_lists_its_pngs(tmp_path: Path, capsys):
    paths = write_run_plots(steady_run(12), tmp_path)
    assert all(path.is_file() for path in paths)
    with fake_server(ttft_s=0.005, itl_s=0.001) as (url, _, _state):
        assert cli("--url", url, "--num-requests", "2", "--output-len", "2", "--out", str(tmp_path / "run")) == 0
    written = capsys.readouterr().err.split("wrote ", 1)[1].split("\n", 1)[0].split(", ")
    assert sorted(Path(p).name for p in written) == sorted(
        ["results.json", "summary.md", "latency_cdf.png", "throughput_over_time.png", "latency_over_time.png"])
