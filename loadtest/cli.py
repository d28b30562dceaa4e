"""`lorahive-loadtest` (also `python -m loadtest`): the command line.

    lorahive-loadtest [run] --url URL [flags]       one load test; writes results.json, summary.md, PNGs
    lorahive-loadtest sweep --vary KNOB --values A,B,C [run flags]
                                                     one run per value, and the curve across them
    lorahive-loadtest compare RESULTS.json ...      side-by-side table (and CDFs) of finished runs
    lorahive-loadtest write-adapters DIR --count N  synthetic PEFT adapters on disk (`lorahive serve --adapters DIR`)
    lorahive-loadtest presets                       the scenario presets and what they set

Flag names are stable (scripts rely on them); every run flag can come from a preset (`--preset NAME`),
and a flag given explicitly wins over the preset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, cast

from loadtest.flag_values import SWEEP_KNOBS, non_negative_int, positive_int, rate, share
from loadtest.presets import PRESETS, describe
from loadtest.synthetic_adapters import ADAPTER_KINDS, TARGET_MODULES, AdapterKind

COMMANDS = ("run", "sweep", "compare", "write-adapters", "presets")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def adapter_kinds(text: str) -> tuple[AdapterKind, ...]:
    kinds = tuple(kind.strip() for kind in text.split(","))
    unknown = [kind for kind in kinds if kind not in ADAPTER_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown adapter kind {', '.join(map(repr, unknown))}: give one of {', '.join(ADAPTER_KINDS)}, "
            "or a comma-separated mix of them")
    return cast("tuple[AdapterKind, ...]", kinds)


def add_dims_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "base model dimensions (for synthetic adapters; default: the server's model card `dims`)")
    group.add_argument("--hidden-size", type=positive_int)
    group.add_argument("--intermediate-size", type=positive_int)
    group.add_argument("--num-layers", type=positive_int)
    group.add_argument("--num-heads", type=positive_int)
    group.add_argument("--num-kv-heads", type=positive_int)
    group.add_argument("--head-dim", type=positive_int)
    group.add_argument("--model-config", type=Path, help="a Hugging Face config.json to read the dimensions from")


def add_adapter_spec_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("synthetic adapters")
    group.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    group.add_argument("--lora-alpha", type=float, default=None, help="lora_alpha (default 2 x rank)")
    group.add_argument("--target-modules", default=",".join(TARGET_MODULES),
                       help="comma-separated projections to adapt (default all seven)")
    group.add_argument("--adapter-kind", type=adapter_kinds, default="lora",
                       help="lora (default), dora, ia3 (default targets: PEFT's k_proj,v_proj,down_proj) or prompt "
                            "(prompt tuning: 8 virtual tokens, no rank or targets); or a comma-separated mix the "
                            "adapters take in turn: lora,ia3 makes PREFIX00 LoRA, PREFIX01 IA3, PREFIX02 LoRA, ...")
    group.add_argument("--adapter-dtype", choices=("float16", "float32"), default="float16")
    group.add_argument("--adapter-prefix", default="lt-", help="ids are PREFIX00, PREFIX01, ... (default lt-)")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", default=os.environ.get("LORAHIVE_LOADTEST_URL", "http://127.0.0.1:8000"),
                        help="server root (default http://127.0.0.1:8000; env LORAHIVE_LOADTEST_URL)")
    target.add_argument("--model", help="the base model's id (default: the first model without a parent)")
    target.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    target.add_argument("--adapter-field", choices=("model", "adapter_id"), default="model",
                        help="how a request names its adapter: `model` (vLLM, lorahive) or lorahive's `adapter_id`")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (env OPENAI_API_KEY)")
    target.add_argument("--served-by-header", default="x-lorahive-replica",
                        help="response header naming the replica that answered, behind a router (default "
                             "x-lorahive-replica, lorahive serve-ray's): the report counts requests per replica and "
                             "how many of each adapter's went to its usual replica")
    target.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds without data before a request fails (default 600)")

    arrivals = parser.add_argument_group(
        "arrivals (open loop: --rate [--cv]; closed loop: --concurrency; replay: --trace)")
    arrivals.add_argument("--rate", type=rate, help="requests/s, Poisson unless --cv; inf sends all at once (default)")
    arrivals.add_argument("--cv", type=float, default=1.0,
                          help="coefficient of variation of the gaps: 1 Poisson, >1 bursty Gamma (default 1)")
    arrivals.add_argument("--concurrency", type=positive_int,
                          help="requests in flight at most; alone, a closed loop of this many users")
    arrivals.add_argument("--trace", type=Path, help="JSONL of {timestamp, adapter?, input_len?, output_len?, prompt?}")
    arrivals.add_argument("--trace-speed", type=float, default=1.0, help="replay the trace this many times faster")

    size = parser.add_argument_group("run size")
    size.add_argument("--num-requests", type=positive_int, help="measured requests (default 100, or the whole trace)")
    size.add_argument("--duration", type=float, help="measured seconds during which requests are sent")
    size.add_argument("--warmup", type=float, default=0.0,
                      help="seconds of traffic first, on top of the measured part and excluded from results "
                           "(needs --rate or --concurrency)")
    size.add_argument("--warmup-requests", type=non_negative_int, default=0,
                      help="requests sent first, on top of the measured part and excluded from results")
    size.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")

    tenants = parser.add_argument_group("adapters and popularity")
    tenants.add_argument("--adapters", type=non_negative_int,
                         help="adapters requests draw from (0: base model only; default: all served or provisioned)")
    tenants.add_argument("--adapter-ids", help="comma-separated adapter ids to use instead of the served ones")
    tenants.add_argument("--popularity", default="uniform", help="distinct | uniform | zipf:ALPHA | identical")
    tenants.add_argument("--base-share", type=share, default=0.0, help="share of requests sent to the base model")

    lengths = parser.add_argument_group("prompts and outputs")
    lengths.add_argument("--input-len", default="32", help="prompt tokens: N or LOW:HIGH (default 32)")
    lengths.add_argument("--output-len", default="32", help="max_tokens: N or LOW:HIGH (default 32)")
    lengths.add_argument("--prompt-mode", choices=("tokens", "text"), default="tokens",
                         help="tokens: random token ids, exact length (completions only); text: ~1 token per word")
    lengths.add_argument("--prompts", type=Path, help='JSONL of {"prompt": ..., "output_len"?: N} to draw prompts from')
    lengths.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                         help="send ignore_eos so every request generates max_tokens (default on)")
    lengths.add_argument("--temperature", type=float, default=0.0)
    lengths.add_argument("--extra-body", type=_json_object, default={}, help="JSON merged into every request body")

    prov = parser.add_argument_group("provisioning (through POST /v1/adapters)")
    prov.add_argument("--provision", type=non_negative_int, default=0,
                      help="upload N synthetic adapters before the run (ids PREFIX00...); existing ids are reused")
    prov.add_argument("--cleanup", action="store_true", help="delete the adapters this run uploaded when it ends")
    prov.add_argument("--provision-parallel", type=positive_int, default=4, help="uploads at a time (default 4)")
    add_adapter_spec_flags(parser)
    add_dims_flags(parser)

    slo = parser.add_argument_group("SLO targets (goodput: requests/s meeting every target given)")
    slo.add_argument("--slo-ttft-ms", type=float)
    slo.add_argument("--slo-tpot-ms", type=float)
    slo.add_argument("--slo-e2el-ms", type=float)

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("loadtest-out"),
                     help="directory for the reports (default loadtest-out)")
    out.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    out.add_argument("--no-progress", action="store_true", help="no live progress line")
    out.add_argument("--preset", choices=sorted(PRESETS), help="a scenario preset (see `lorahive-loadtest presets`)")


def _parser(command: str) -> argparse.ArgumentParser:
    prog = "lorahive-loadtest" + ("" if command == "run" else f" {command}")
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if command in ("run", "sweep"):
        add_run_flags(parser)
    if command == "sweep":
        group = parser.add_argument_group("sweep")
        group.add_argument("--vary", required=True, choices=sorted(SWEEP_KNOBS), help="the knob to vary")
        group.add_argument("--values", required=True, help="comma-separated values of the knob, e.g. 1,8,64,256,1000")
        group.add_argument("--cooldown", type=float, default=1.0, help="seconds of quiet between runs (default 1)")
        group.add_argument("--repeats", type=positive_int, default=1,
                           help="rounds over all values, interleaved; each row is the median of its rounds "
                                "(steadies a shared or noisy machine)")
    elif command == "write-adapters":
        parser.add_argument("directory", type=Path)
        parser.add_argument("--count", type=positive_int, required=True)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--base-model", help="recorded as base_model_name_or_path")
        parser.add_argument("--demo", action="store_true", help="shape them for lorahive's embedded demo model")
        add_adapter_spec_flags(parser)
        add_dims_flags(parser)
    elif command == "compare":
        parser.add_argument("results", type=Path, nargs="+", help="results.json files (or their directories)")
        parser.add_argument("--labels", help="comma-separated names of the runs (default: their directories)")
        parser.add_argument("--out", type=Path, help="also write compare.md and compare_cdf.png here")
    return parser


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    parser = _parser(command)
    if command in ("run", "sweep"):
        # A preset sets defaults; a second parse lets every explicit flag win over them.
        first, _ = parser.parse_known_args(argv)
        if first.preset:
            parser.set_defaults(**PRESETS[first.preset])
    args = parser.parse_args(argv)
    args.command = command
    args.parser = parser
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    if command == "presets":
        print("\n".join(describe(name) for name in PRESETS))
        return
    args = parse(command, argv)
    # Imported here so `--help` and `presets` answer without loading numpy/httpx/matplotlib.
    from loadtest import commands

    try:
        code = {
            "run": commands.run_command,
            "sweep": commands.sweep_command,
            "compare": commands.compare_command,
            "write-adapters": commands.write_adapters_command,
        }[command](args)
    except commands.UsageError as exc:
        args.parser.exit(2, f"{args.parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)

