"""lorahive against transformers + PEFT on the CPU: the same checkpoint, the same PEFT adapters, the same requests.

One random-weight checkpoint (benchmarks/engine_throughput.py's SHAPES: `smollm2-135m` by default; `deep-narrow`, 32
layers of hidden 64, where compute is negligible and tok/s measures per-step overhead; `tiny` for a smoke test) in
fp32, and PEFT LoRA adapters written by peft's own `save_pretrained` with random non-zero B. Four configurations,
alternated for `--rounds` rounds:

- transformers base: one batched `model.generate` over every request (left padding, greedy,
  `min_new_tokens = max_new_tokens = --tokens`), on the plain model;
- transformers + PEFT mixed: the same call on the PeftModel holding every adapter, `adapter_names` spreading the
  requests round-robin over them (PEFT's mixed-adapter batch);
- lorahive base / lorahive mixed: a real `lorahive serve` subprocess (`--adapters DIR` with the same adapter
  directories) on a free port, every request a concurrent non-streaming `/v1/completions` call with token-id
  prompts, greedy, `ignore_eos`.

The tokenizer is a numbered word list (`t0`, `t1`, ... one word per id of the vocabulary, no EOS): a completion's
text spells its token ids, and neither side can stop early, so both take the plain argmax for exactly `--tokens`
tokens and their outputs can be compared token by token. Random weights make near-ties between the top two logits
likelier than a trained model does, so a few requests may part ways where the two sides' fp32 sums round apart;
the report counts the requests whose tokens agree.

    python benchmarks/vs_peft.py                        # SmolLM2-135M's shapes, 4 adapters, 32 x 64 tokens
    python benchmarks/vs_peft.py --shape deep-narrow    # 8 rank-16 adapters on all seven modules, batch 64

Prints a table (best and median tok/s per configuration, the ratios the issue sets targets for, agreement) and
writes JSON to benchmarks/results/vs_peft-cpu.json (`-<shape>` appended for shapes other than smollm2-135m).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import peft
import tokenizers
import torch
import transformers

from benchmarks.engine_throughput import RESULTS, SHAPES, TARGETS, write_random_checkpoint
from server.tokenizer import Tokenizer
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHAPE = "smollm2-135m"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
CONFIGURATIONS = ("transformers base", "transformers+PEFT mixed", "lorahive base", "lorahive mixed")
PAD = "t0"  # prompts never hold it: prompt ids start at 1
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 1800.0  # a full-size round on a busy 2-core machine takes minutes


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    targets: tuple[str, ...]
    use_rslora: bool = False

    @property
    def name(self) -> str:
        return f"r{self.rank}-{'-'.join(t.removesuffix('_proj') for t in self.targets)}" + ("-rslora" * self.use_rslora)


FOUR_MIXED = (AdapterSpec(8, ("q_proj", "v_proj")), AdapterSpec(16, ATTENTION), AdapterSpec(32, TARGETS),
              AdapterSpec(64, MLP, use_rslora=True))
ADAPTERS = {  # per shape: the adapters the mixed configurations spread their requests over
    "smollm2-135m": FOUR_MIXED,
    "tiny": FOUR_MIXED,
    "deep-narrow": tuple(AdapterSpec(16, TARGETS) for _ in range(8)),
}
DEFAULT_REQUESTS = {"deep-narrow": 64}  # else 32
RATIO_TARGETS = {  # (numerator, denominator) -> the target per shape; None: reported, no target
    ("lorahive mixed", "transformers+PEFT mixed"): {"smollm2-135m": 1.3, "deep-narrow": 3.0},
    ("lorahive base", "transformers base"): {"smollm2-135m": 1.0},
    ("lorahive mixed", "lorahive base"): {"smollm2-135m": 0.85},
}


def adapter_names(shape: str) -> list[str]:
    """The adapters' ids (their directory names); repeated specs get an index, so every id is distinct."""
    specs = ADAPTERS[shape]
    return [s.name if specs.count(s) == 1 else f"{s.name}-{i}" for i, s in enumerate(specs)]


def numbered_tokenizer(vocab_size: int) -> Tokenizer:
    """One word `t<id>` per token id, split on whitespace, decoded space-separated: every id's text is unique."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token=PAD))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend)


def token_ids(text: str) -> list[int]:
    return [int(word.removeprefix("t")) for word in text.split()]


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    tokens: int
    mixed_adapters: list[str]  # the adapter of each request in the mixed configurations

    def adapters(self, configuration: str) -> list[str | None]:
        return list(self.mixed_adapters) if configuration.endswith("mixed") else [None] * len(self.prompts)


def build_workload(requests: int, tokens: int, vocab_size: int, names: list[str], seed: int = 0) -> Workload:
    """`requests` prompts of 32 to 64 random token ids, spread round-robin over the adapters `names`."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 65, (requests,), generator=gen).tolist()
    prompts = [torch.randint(1, vocab_size, (n,), generator=gen).tolist() for n in lengths]
    return Workload(prompts, tokens, [names[i % len(names)] for i in range(requests)])


# --------------------------------------------------------------------------------------------------
# transformers + PEFT


class TransformersSide:
    """The plain model for the base configuration, and a PeftModel holding every adapter for the mixed one."""

    def __init__(self, checkpoint: Path, adapters_dir: Path, shape: str) -> None:
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        self.tokenizer.pad_token = PAD
        self.tokenizer.padding_side = "left"
        self.base = self._load(checkpoint)
        self.peft = self._with_adapters(self._load(checkpoint), adapters_dir, shape)

    @staticmethod
    def _load(checkpoint: Path) -> transformers.PreTrainedModel:
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        # LlamaConfig's default EOS (id 2) would be a token like any other on lorahive's side (the tokenizer has no
        # EOS): without one here too, both sides take the plain argmax at every step.
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
        return model

    @staticmethod
    def _with_adapters(model: transformers.PreTrainedModel, adapters_dir: Path, shape: str) -> peft.PeftModel:
        """Adds the shape's adapters with random A and B (init_lora_weights=False) and saves each into its own
        directory of `adapters_dir` (peft writes every adapter but "default" to a sub-directory of its name)."""
        torch.manual_seed(0)
        peft_model: peft.PeftModel | None = None
        for spec, name in zip(ADAPTERS[shape], adapter_names(shape), strict=True):
            config = peft.LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=list(spec.targets),
                                     use_rslora=spec.use_rslora, init_lora_weights=False)
            if peft_model is None:
                peft_model = peft.get_peft_model(model, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
        assert peft_model is not None
        peft_model.save_pretrained(str(adapters_dir))
        return peft_model.eval()

    def generate(self, workload: Workload, configuration: str) -> tuple[float, list[list[int]]]:
        """Seconds of one batched `generate` over every request, and each request's generated tokens."""
        batch = self.tokenizer.pad({"input_ids": workload.prompts}, return_tensors="pt")
        extra = {}
        model: transformers.PreTrainedModel | peft.PeftModel = self.base
        if configuration.endswith("mixed"):
            model, extra = self.peft, {"adapter_names": workload.mixed_adapters}
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**batch, **extra, do_sample=False, max_new_tokens=workload.tokens,
                                 min_new_tokens=workload.tokens, pad_token_id=self.tokenizer.pad_token_id)
            seconds = time.perf_counter() - start
        return seconds, out[:, batch["input_ids"].shape[1]:].tolist()


# --------------------------------------------------------------------------------------------------
# lorahive


@contextmanager
def lorahive_server(checkpoint: Path, adapters_dir: Path, workload: Workload, max_rank: int,
                    log: Path) -> Iterator[str]:
    """`lorahive serve` on the checkpoint and adapters, sized for the workload; yields its base URL once ready."""
    port = free_port()
    longest = max(len(p) for p in workload.prompts) + workload.tokens
    requests = len(workload.prompts)
    flags = {"model": checkpoint, "adapters": adapters_dir, "port": port, "dtype": "float32", "device": "cpu",
             "max-num-seqs": requests, "max-gpu-adapters": len(set(workload.mixed_adapters)),
             "max-lora-rank": max_rank, "max-model-len": longest, "kv-cache-tokens": requests * (longest + 16),
             "log-level": "warning"}
    command = [sys.executable, "-m", "server.cli", "serve", *(f"--{k}={v}" for k, v in flags.items())]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"lorahive serve did not become ready:\n{log.read_text()}")


async def _complete_all(url: str, workload: Workload, configuration: str) -> tuple[float, list[list[int]]]:
    limits = httpx.Limits(max_connections=len(workload.prompts))
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one(prompt: list[int], adapter: str | None) -> list[int]:
            body = {"prompt": prompt, "max_tokens": workload.tokens, "temperature": 0, "ignore_eos": True,
                    "stream": False} | ({"model": adapter} if adapter else {})
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return token_ids(response.json()["choices"][0]["text"])

        start = time.perf_counter()
        outputs = await asyncio.gather(*(one(p, a) for p, a in zip(workload.prompts, workload.adapters(configuration),
                                                                     strict=True)))
        return time.perf_counter() - start, list(outputs)


def complete_all(url: str, workload: Workload, configuration: str) -> tuple[float, list[list[int]]]:
    """Seconds until every request of the workload has its completion, and each one's generated tokens."""
    return asyncio.run(_complete_all(url, workload, configuration))


# --------------------------------------------------------------------------------------------------
# rounds, ratios, agreement


def run_rounds(rounds: int, runners: dict[str, Callable[[], tuple[float, list[list[int]]]]],
               tokens_per_run: int) -> tuple[dict[str, dict], dict[str, list[list[int]]]]:
    """Every configuration once per round, in turn; per configuration its tok/s (best, median, every run) and its
    last run's outputs (greedy: every run's are the same)."""
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, list[list[int]]] = {}
    for round_index in range(rounds):
        for name, run in runners.items():
            seconds, outputs[name] = run()
            speeds[name].append(tokens_per_run / seconds)
            print(f"round {round_index + 1}/{rounds} {name}: {speeds[name][-1]:.1f} tok/s ({seconds:.2f} s)",
                  flush=True)
    summary = {name: {"best_tok_per_s": max(runs), "median_tok_per_s": statistics.median(runs), "runs_tok_per_s": runs}
               for name, runs in speeds.items()}
    return summary, outputs


def ratios(summary: dict[str, dict], shape: str) -> list[dict]:
    rows = []
    for (numerator, denominator), targets in RATIO_TARGETS.items():
        target = targets.get(shape)
        best = summary[numerator]["best_tok_per_s"] / summary[denominator]["best_tok_per_s"]
        median = summary[numerator]["median_tok_per_s"] / summary[denominator]["median_tok_per_s"]
        rows.append({"ratio": f"{numerator} / {denominator}", "best": best, "median": median, "target": target,
                     "met": None if target is None else median >= target})
    return rows


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How many requests' tokens are identical, and how many tokens agree before each request's first difference."""
    leading = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
               for x, y in zip(ours, theirs, strict=True)]
    return {"requests": len(ours), "requests_identical": sum(x == y for x, y in zip(ours, theirs, strict=True)),
            "tokens": sum(len(y) for y in theirs), "tokens_before_first_difference": sum(leading)}


def describe_cpu(threads: int) -> str:
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores; transformers on {threads} torch threads)"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                  else "")


def print_report(result: dict) -> None:
    print(f"\n{result['device']}; shape {result['shape']}; {result['requests']} requests x {result['tokens']} tokens; "
          f"{result['rounds']} rounds; commit {result['commit']}")
    print(f"{'configuration':<24} {'best tok/s':>10} {'median tok/s':>12}")
    for name, row in result["configurations"].items():
        print(f"{name:<24} {row['best_tok_per_s']:>10.1f} {row['median_tok_per_s']:>12.1f}")
    print(f"\n{'ratio':<48} {'best':>6} {'median':>6} {'target':>6}")
    for row in result["ratios"]:
        target = "-" if row["target"] is None else f">={row['target']:g}" + (" ok" if row["met"] else " MISSED")
        print(f"{row['ratio']:<48} {row['best']:>6.2f} {row['median']:>6.2f} {target:>6}")
    for name, row in result["agreement"].items():
        print(f"{name}: {row['requests_identical']}/{row['requests']} requests identical, "
              f"{row['tokens_before_first_difference']}/{row['tokens']} tokens before the first difference")
    print(f"adapters changed the output of {result['adapters_change_output']}/{result['requests']} requests")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(ADAPTERS), default=DEFAULT_SHAPE)
    parser.add_argument("--requests", type=int, default=None, help="concurrent requests (default 32; deep-narrow 64)")
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the transformers side (lorahive keeps its default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    args.requests = args.requests or DEFAULT_REQUESTS.get(args.shape, 32)
    torch.set_num_threads(args.threads)

    names = adapter_names(args.shape)
    workload = build_workload(args.requests, args.tokens, SHAPES[args.shape]["vocab_size"], names)
    tokens_per_run = args.requests * args.tokens
    with tempfile.TemporaryDirectory(prefix="lorahive-vs-peft-") as scratch:
        checkpoint = write_random_checkpoint(args.shape, Path(scratch) / "model", torch.float32,
                                             numbered_tokenizer(SHAPES[args.shape]["vocab_size"]))
        adapters_dir = Path(scratch) / "adapters"
        hf = TransformersSide(checkpoint, adapters_dir, args.shape)
        max_rank = max(s.rank for s in ADAPTERS[args.shape])
        with lorahive_server(checkpoint, adapters_dir, workload, max_rank, Path(scratch) / "server.log") as url:
            # Warm both sides up (lorahive also loads every adapter into its slot) so that no round pays for it.
            warm = Workload([workload.prompts[i % args.requests] for i in range(len(names))], 2, names)
            for name in CONFIGURATIONS:
                (hf.generate if name.startswith("transformers") else lambda w, c: complete_all(url, w, c))(warm, name)
            runners = {
                "transformers base": lambda: hf.generate(workload, "transformers base"),
                "transformers+PEFT mixed": lambda: hf.generate(workload, "transformers+PEFT mixed"),
                "lorahive base": lambda: complete_all(url, workload, "lorahive base"),
                "lorahive mixed": lambda: complete_all(url, workload, "lorahive mixed"),
            }
            summary, outputs = run_rounds(args.rounds, runners, tokens_per_run)

    result = {
        "device": describe_cpu(args.threads), "shape": args.shape, "commit": commit(), "requests": args.requests,
        "tokens": args.tokens, "rounds": args.rounds,
        "adapters": [{"id": n, "rank": s.rank, "targets": list(s.targets), "use_rslora": s.use_rslora}
                     for n, s in zip(names, ADAPTERS[args.shape], strict=True)],
        "configurations": summary, "ratios": ratios(summary, args.shape),
        "agreement": {
            "lorahive base vs transformers base": agreement(outputs["lorahive base"], outputs["transformers base"]),
            "lorahive mixed vs transformers+PEFT mixed": agreement(outputs["lorahive mixed"],
                                                                   outputs["transformers+PEFT mixed"]),
        },
        "adapters_change_output": sum(a != b for a, b in zip(outputs["transformers+PEFT mixed"],
                                                             outputs["transformers base"], strict=True)),
    }
    print_report(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.shape == DEFAULT_SHAPE else f"-{args.shape}"
    out = args.out or RESULTS / f"vs_peft-cpu{suffix}.json"
    out.write_text(json.dumps(result | {"config": vars(args) | {"out": str(out)}}, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
