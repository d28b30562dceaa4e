"""Turns a scheduled plan into the tensors of one forward pass (built once, read by every layer)."""

from __future__ import annotations

import torch

from kernels import AttentionBatch, LoRABatch
from server.model import StepBatch
from server.scheduler import ScheduledChunk


def build_step(
    plan: list[ScheduledChunk], block_size: int, sliding_window: int | None, device
) -> tuple[StepBatch, LoRABatch, list[ScheduledChunk]]:
    """The step's tensors, its LoRA metadata, and the chunks that get a sampled token (in logits order).

    Tokens are laid out grouped by adapter slot so each adapter's tokens form long segments, each sequence's
    tokens one after another; attention reads every sequence's keys through its block table.
    """
    ordered = sorted(plan, key=lambda c: c.seq.slot)
    input_ids: list[int] = []
    positions: list[int] = []
    cache_slots: list[int] = []
    token_slots: list[int] = []
    first_rows: list[int] = []
    for chunk in ordered:
        seq = chunk.seq
        first_rows.append(len(input_ids))
        start, end = seq.num_computed, seq.num_computed + chunk.num_tokens
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        cache_slots.extend(seq.blocks[p // block_size] * block_size + p % block_size for p in range(start, end))
        token_slots.extend([seq.slot] * chunk.num_tokens)

    # Each sequence's tokens are contiguous rows, in `ordered`'s order: the attention metadata's varlen layout.
    attention = AttentionBatch.from_sequences(
        [list(c.seq.blocks) for c in ordered],
        [c.seq.num_computed + c.num_tokens for c in ordered],
        [c.num_tokens for c in ordered],
        device,
    )
    sampled = [i for i, c in enumerate(ordered) if c.completes_sequence]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    step = StepBatch(
        input_ids=as_tensor(input_ids),
        positions=as_tensor(positions),
        cache_slots=as_tensor(cache_slots),
        attention=attention,
        sliding_window=sliding_window,
        logits_index=as_tensor([first_rows[i] + ordered[i].num_tokens - 1 for i in sampled]),
    )
    # A decode-only step gets fixed-shape kernel metadata (one work tile per token, padded), so the step could
    # be captured in a CUDA graph and replayed correctly whatever mix of adapters a later batch brings.
    decode_only = all(c.num_tokens == 1 for c in ordered)
    lora = LoRABatch.from_token_slots(token_slots, device, fixed_shape=decode_only)
    return step, lora, [ordered[i] for i in sampled]
