"""Peak memory of the largest step the scheduler can build: measured by running it, and bounded analytically.

Start-up sizes the KV cache from what is left after the weights, the adapter pool and this peak (as vLLM does
with its profiling run), so no step the scheduler may build later can run the device out of memory. The
largest step spends the whole token budget with as many sequences as allowed: `max_num_seqs - 1` decodes and
one prefill chunk of the tokens left, every context `max_model_len` long, every token through a max-rank
adapter, every row sampled with top-k/top-p, penalties and logprobs. A step with all its tokens in one prefill
chunk is tried too (its attention problem is the widest).

The profile runs the step through a scratch `ModelRunner`, the engine's own step code, and needs no real KV
cache: every sequence's block table points at the same single block, and what the attention gathers has the
shape of the block table, not of the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from kernels.attention_reference import DECODE_GROUP_KEYS
from kernels.paging import PAGE_RANK, pages_for_rank
from server.adapter_packer import PackedAdapter, PackedWeight
from server.api.protocol import MAX_LOGPROBS
from server.model import ModelArgs, Transformer
from server.model_runner import ModelRunner, decode_graph_sizes
from server.requests import SamplingParams
from server.sampling import SamplerState
from server.scheduler import ScheduledChunk, Sequence

# The costliest sampling a request can ask for: every sampling stage, penalties, the most logprobs the API allows.
_WORST_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, presence_penalty=0.5, frequency_penalty=0.5,
                                 logprobs=MAX_LOGPROBS)


@dataclass(frozen=True)
class StepLimits:
    """What bounds one engine step: the scheduler's budgets and the adapter pool's shape."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int
    max_gpu_adapters: int | None  # the cap on resident adapters, if any
    max_lora_rank: int

    @property
    def distinct_adapters(self) -> int:
        """The most adapters one step can mix: one per sequence, within the cap."""
        return min(self.max_num_seqs, self.max_gpu_adapters or self.max_num_seqs)


@dataclass(frozen=True)
class ChunkShape:
    """One scheduled chunk reduced to what its memory depends on."""

    num_tokens: int
    context_len: int  # tokens of the sequence once this chunk is in the cache


def largest_steps(limits: StepLimits) -> list[list[ChunkShape]]:
    """The candidate largest steps: decodes plus one prefill chunk, and one prefill chunk alone."""
    budget = limits.max_num_batched_tokens
    decodes = min(limits.max_num_seqs - 1, budget - 1)
    chunk = min(budget - decodes, limits.max_model_len)
    mixed = [ChunkShape(1, limits.max_model_len)] * decodes + [ChunkShape(chunk, limits.max_model_len)]
    alone = [ChunkShape(min(budget, limits.max_model_len), limits.max_model_len)]
    return [mixed] if alone == mixed else [mixed, alone]


def fake_plan(shapes: list[ChunkShape], limits: StepLimits) -> list[ScheduledChunk]:
    """Scheduled chunks of `shapes`, every one through an adapter slot, every block table on block 0."""
    plan = []
    for i, shape in enumerate(shapes):
        seq = Sequence(
            seq_id=i, request_id=f"profile-{i}", choice_index=0, token_ids=[0] * shape.context_len,
            num_prompt_tokens=shape.context_len, adapter=None, detokenizer=None,  # type: ignore[arg-type]
            sampler=SamplerState(_WORST_SAMPLING, torch.Generator().manual_seed(i), output_ids=[0, 1, 2]),
            num_computed=shape.context_len - shape.num_tokens,
            blocks=[0] * -(-shape.context_len // limits.block_size),
            slot=i % limits.distinct_adapters,
        )
        plan.append(ScheduledChunk(seq, shape.num_tokens))
    return plan


def peak_bytes_of(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while `fn()` runs, above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: the torch profiler's allocation and free events, replayed
    in order (every tensor torch allocates on the CPU is one event of each)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw event stream: the aggregated FunctionEvents attribute allocations to ops, not to moments.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_largest_step(model: Transformer, limits: StepLimits) -> int:
    """Peak activation bytes of the largest candidate step, run on the model with as many adapters as a step can
    mix, each of max rank on every module (all of them the same zeros: only their shapes matter here).

    Leaves the model without LoRA pages or adapters, as it was before the engine's own model runner loads them."""
    slots, rank = limits.distinct_adapters, limits.max_lora_rank
    runner = ModelRunner(model, num_kv_blocks=1, block_size=limits.block_size, num_slots=slots, max_rank=rank,
                         num_pages=pages_for_rank(rank))
    zeros = _zero_adapter(model.args, rank, runner.dtype)
    for slot in range(slots):
        if runner.paged:  # every slot on the same pages, nothing written
            runner.table.assign(slot, rank, list(range(1, pages_for_rank(rank) + 1)))
        else:
            runner.load_adapter(slot, (), zeros)
    plans = [fake_plan(shapes, limits) for shapes in largest_steps(limits)]
    peak = max(peak_bytes_of(partial(runner.execute, plan), runner.device) for plan in plans)
    model.lora.table = None
    for layer in model.lora_layers():  # the pages and adapters go back before the KV cache is sized
        layer.drop_adapters()
    return peak


def _zero_adapter(args: ModelArgs, rank: int, dtype: torch.dtype) -> PackedAdapter:
    """An adapter of `rank` on every module of every layer, all zeros."""
    weights = {(layer, name): PackedWeight(torch.zeros(rank, d_in, dtype=dtype), torch.zeros(rank, d_out, dtype=dtype))
               for layer in range(args.n_layers) for name, (d_in, d_out) in args.lora_module_dims.items()}
    return PackedAdapter("profile", rank, dtype, weights)


def estimate_step_bytes(args: ModelArgs, shapes: list[ChunkShape], max_lora_rank: int, dtype: torch.dtype) -> int:
    """An upper bound on the bytes one step of `shapes` allocates at its peak, from the model's dimensions.

    The step's metadata and the residual stream live throughout; on top of them comes the largest of one
    layer's phases (norm, q/k/v with RoPE, attention, MLP, each with its LoRA temporaries) or the head
    (logits and the sampler's [rows, vocab] work). Attention counts the unfused path of its costliest sequence:
    gathered K/V, fp32 scores and their softmax; fused kernels use less."""
    s, f32, i64 = torch.finfo(dtype).bits // 8, 4, 8
    tokens = sum(c.num_tokens for c in shapes)
    rows = len(shapes)  # each chunk ends its sequence's known tokens, so every one samples
    q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    rank = pages_for_rank(max_lora_rank) * PAGE_RANK

    def lora(d_in: int, d_out: int, slices: int) -> int:  # gathered x, shrink output twice, fp32 delta
        return tokens * (d_in * s + 2 * slices * rank * f32 + d_out * (f32 + s))

    max_context = max(c.context_len for c in shapes)
    # Token ids, positions, cache slots, LoRA and sampling indices; each sequence's block table and lengths.
    metadata = tokens * 8 * i64 + len(shapes) * (-(-max_context // 16) + 4) * i64
    residual = tokens * (2 * args.dim * s + 2 * args.head_dim * (f32 + s))
    qkv_out = tokens * (q_width + 2 * kv_width) * s
    norm = tokens * args.dim * (2 * f32 + s)
    qkv = qkv_out + lora(args.dim, q_width + 2 * kv_width, 3) + 4 * tokens * (q_width + kv_width) * s
    # Paged attention (`kernels.attention_reference`) holds one prompt's problem at a time: its gathered K/V and
    # their transposed copies, its [queries, keys] mask and fp32 scores per head, its queries and output; or one
    # decode group's: gathered K/V of at most DECODE_GROUP_KEYS padded keys, their copies, the mask, and at worst
    # an int64 row index per key (`stale_key_rows`).
    # The Triton decode holds fp32 partials per split of at most 256 keys instead.
    one_sequence = max(
        4 * c.context_len * kv_width * s + c.num_tokens * c.context_len * (2 * args.n_heads * f32 + 1)
        + 3 * c.num_tokens * q_width * s
        for c in shapes
    )
    decode_keys = min(DECODE_GROUP_KEYS, sum(-(-c.context_len // 16) * 16 for c in shapes if c.num_tokens == 1))
    decode_group = decode_keys * (4 * kv_width * s + 1 + i64) + 3 * tokens * q_width * s
    decode_partials = tokens * args.n_heads * -(-max_context // 256) * (args.head_dim + 1) * f32
    attention = (qkv_out + 2 * tokens * q_width * s + max(one_sequence, decode_group, decode_partials)
                 + lora(q_width, args.dim, 1))
    mlp = tokens * (4 * args.intermediate_size + args.dim) * s + lora(args.dim, 2 * args.intermediate_size, 2)
    # Logits in the model's dtype and in fp32, then the sampler: bias/penalty copy, tempered logits, sort
    # (values + int64 ids), softmax, two cumsums, the mass before each token, masks, log-softmax.
    head = rows * (2 * args.dim * (f32 + s) + args.vocab_size * (s + 11 * f32 + i64 + 2))
    return metadata + residual + max(norm, qkv, attention, mlp, head)


def estimate_decode_graph_pool(args: ModelArgs, limits: StepLimits, dtype: torch.dtype) -> int:
    """A bound on the memory pool of the decode CUDA graphs: the activations of the largest captured decode step
    (the smaller graphs reuse its memory). The pool stays reserved for the graphs, so eager steps cannot use it."""
    size = decode_graph_sizes(limits.max_num_seqs)[-1]
    return estimate_step_bytes(args, [ChunkShape(1, limits.max_model_len)] * size, limits.max_lora_rank, dtype)


def estimate_largest_step(args: ModelArgs, limits: StepLimits, dtype: torch.dtype) -> int:
    return max(estimate_step_bytes(args, shapes, limits.max_lora_rank, dtype) for shapes in largest_steps(limits))
