"""Paged attention of one layer: the Triton kernels against torch SDPA on the same data, on Llama-3-8B shapes.

32 query heads over 8 KV heads, head_dim 128, bf16, a cache of 16-slot blocks shuffled over the pool. Each
row times one call of:

    triton      kernels.paged_attention with the Triton backend (split-KV decode, or varlen prefill/extend),
                reading K/V straight from the block table
    sdpa        F.scaled_dot_product_attention on the same K/V already gathered into dense [B, Hkv, L, D]
                tensors (the gather not timed): the best torch does when the data is dense, FlashAttention on
                a GPU (causal_lower_right for a chunk on a cached prefix)
    reference   kernels.attention_reference: per sequence, gather its blocks and call SDPA

Decode: batches of 1 and 64 sequences at 1k and 8k tokens of context. Prefill: one 2k-token chunk on a cached
prefix of 0 and 8k tokens. Decode rows also print the bytes of K/V the step must read and the achieved GB/s.
On CUDA the L2 cache is flushed before every timed call (benchmarks.lora_kernels.Timer).

    python benchmarks/attention_kernels.py            # needs a CUDA GPU and triton; well under a minute on an H200
    python benchmarks/attention_kernels.py --smoke    # tiny shapes; on a CPU the kernels run interpreted

Writes JSON to benchmarks/results/attention_kernels-<device>.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from benchmarks.lora_kernels import RESULTS, Timer, describe
from benchmarks.paged_cache import random_paged_case
from kernels import AttentionBatch, attention_reference, paged_attention, resolve_attention_backend

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Shape:
    n_heads: int
    n_kv_heads: int
    head_dim: int


MODELS = {"llama3-8b": Shape(32, 8, 128), "tiny": Shape(4, 2, 64)}


@dataclass
class Workload:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [N, P, Hkv, D]
    v_cache: torch.Tensor
    batch: AttentionBatch
    dense_q: torch.Tensor  # [B, H, Lq, D]
    dense_k: torch.Tensor  # [B, Hkv, L, D]
    dense_v: torch.Tensor

    def kv_bytes(self) -> int:
        return 2 * self.dense_k.numel() * self.dense_k.element_size()


def make_workload(shape: Shape, num_seqs: int, context: int, new_tokens: int, dtype: torch.dtype,
                  device: torch.device, gen: torch.Generator) -> Workload:
    """num_seqs sequences of `context` tokens, the last `new_tokens` of each being the step's queries."""
    case = random_paged_case(gen, [(context, new_tokens)] * num_seqs, shape.n_heads, shape.n_kv_heads,
                             shape.head_dim, dtype, BLOCK_SIZE, device=device)

    def dense(cache: torch.Tensor) -> torch.Tensor:
        return cache[case.batch.block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()

    dense_q = case.q.view(num_seqs, new_tokens, shape.n_heads, shape.head_dim).transpose(1, 2).contiguous()
    return Workload(case.q, case.k_cache, case.v_cache, case.batch, dense_q, dense(case.k_cache),
                    dense(case.v_cache))


def run_sdpa(w: Workload) -> torch.Tensor:
    new_tokens, context = w.dense_q.shape[2], w.dense_k.shape[2]
    if new_tokens == 1:
        return F.scaled_dot_product_attention(w.dense_q, w.dense_k, w.dense_v, enable_gqa=True)
    if new_tokens == context:
        return F.scaled_dot_product_attention(w.dense_q, w.dense_k, w.dense_v, is_causal=True, enable_gqa=True)
    # A chunk on a cached prefix: queries at the end of the context (FlashAttention's own causal alignment).
    group = w.dense_q.shape[1] // w.dense_k.shape[1]
    k, v = (w.dense_k, w.dense_v) if group == 1 else (w.dense_k.repeat_interleave(group, 1),
                                                      w.dense_v.repeat_interleave(group, 1))
    return F.scaled_dot_product_attention(w.dense_q, k, v, attn_mask=causal_lower_right(new_tokens, context))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b", choices=list(MODELS))
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[1024, 8192])
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--prefill-prefixes", type=int, nargs="*", default=[0, 8192])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few reps: checks the script runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.decode_batches, args.decode_contexts = "tiny", [1, 3], [40]
        args.prefill_tokens, args.prefill_prefixes, args.reps = 20, [0, 24], 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shape = MODELS[args.model]
    # On a CPU the Triton column runs the interpreter: a check that the script works, not a timing.
    triton_backend = "triton" if device.type == "cuda" or args.smoke else resolve_attention_backend("auto", device)
    device_name, device_tag = describe(device)
    timer = Timer(device, args.reps)
    gen = torch.Generator(device).manual_seed(0)
    print(f"device: {device_name}; {args.model} {shape}; {args.dtype}; cache blocks of {BLOCK_SIZE}")
    steps = [("decode", n, ctx, 1) for n in args.decode_batches for ctx in args.decode_contexts]
    steps += [("prefill", 1, prefix + args.prefill_tokens, args.prefill_tokens) for prefix in args.prefill_prefixes]
    print(f"{'phase':>7} {'seqs':>4} {'context':>7} {'new':>5} {'triton us':>10} {'GB/s':>6} {'sdpa us':>10} "
          f"{'x':>5} {'reference us':>12} {'x':>6} {'max err':>8}")
    rows = []
    for phase, num_seqs, context, new_tokens in steps:
        w = make_workload(shape, num_seqs, context, new_tokens, dtype, device, gen)
        with warnings.catch_warnings():  # SDPA's notes on which kernel a CPU run cannot use
            warnings.simplefilter("ignore")
            expected = run_sdpa(w).transpose(1, 2).flatten(0, 1)
            sdpa_s = timer(lambda w=w: run_sdpa(w))
        out = paged_attention(w.q, w.k_cache, w.v_cache, w.batch, backend=triton_backend)
        triton_s = timer(lambda w=w: paged_attention(w.q, w.k_cache, w.v_cache, w.batch, backend=triton_backend))
        reference_s = timer(lambda w=w: attention_reference.paged_attention(w.q, w.k_cache, w.v_cache, w.batch))
        error = (out.float() - expected.float()).abs().max().item()
        row = {"phase": phase, "seqs": num_seqs, "context": context, "new_tokens": new_tokens,
               "triton_s": triton_s, "sdpa_s": sdpa_s, "reference_s": reference_s, "kv_bytes": w.kv_bytes(),
               "triton_gb_per_s": w.kv_bytes() / triton_s / 1e9, "max_abs_error": error}
        rows.append(row)
        print(f"{phase:>7} {num_seqs:>4} {context:>7} {new_tokens:>5} {triton_s * 1e6:>10.1f} "
              f"{row['triton_gb_per_s']:>6.0f} {sdpa_s * 1e6:>10.1f} {sdpa_s / triton_s:>5.2f} "
              f"{reference_s * 1e6:>12.1f} {reference_s / triton_s:>6.1f} {error:>8.4f}")
        del w
    out_path = args.out or RESULTS / f"attention_kernels-{device_tag}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name, "triton_backend": triton_backend, "dtype": args.dtype, "model": args.model,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
    out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
