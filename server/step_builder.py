"""Turns a scheduled plan into the tensors of one forward pass (built once, read by every layer)."""

from __future__ import annotations

import torch

from kernels import LoRABatch
from server.model import AttentionGroup, StepBatch
from server.scheduler import ScheduledChunk


def _kv_index(block_tables: list[list[int]], lengths: list[int], block_size: int, device) -> torch.Tensor:
    """[B, max(lengths)] flat cache slot of each key position (0 past a sequence's end; masked out)."""
    max_len = max(lengths)
    max_blocks = -(-max_len // block_size)
    table = torch.zeros(len(block_tables), max_blocks, dtype=torch.int64)
    for b, blocks in enumerate(block_tables):
        table[b, : len(blocks[:max_blocks])] = torch.tensor(blocks[:max_blocks], dtype=torch.int64)
    positions = torch.arange(max_len)
    index = table[:, positions // block_size] * block_size + positions % block_size
    index[positions[None, :] >= torch.tensor(lengths)[:, None]] = 0
    return index.to(device)


def _attention_group(
    chunks: list[ScheduledChunk], first_rows: list[int], block_size: int, window: int | None, device
) -> AttentionGroup:
    """One padded attention problem over `chunks`, whose queries start at `first_rows` in the batch."""
    q_lens = [c.num_tokens for c in chunks]
    kv_lens = [c.seq.num_computed + c.num_tokens for c in chunks]
    max_q = max(q_lens)
    q_offsets = torch.arange(max_q)
    q_lens_t = torch.tensor(q_lens)
    query_valid = q_offsets[None, :] < q_lens_t[:, None]
    query_index = torch.where(query_valid, torch.tensor(first_rows)[:, None] + q_offsets[None, :], 0)
    q_pos = torch.tensor([c.seq.num_computed for c in chunks])[:, None] + q_offsets[None, :]  # [B, Lq]
    k_pos = torch.arange(max(kv_lens))[None, None, :]  # [1, 1, Lk]
    mask = k_pos <= q_pos[:, :, None]
    if window is not None:
        mask &= q_pos[:, :, None] - k_pos < window
    # Padding queries attend to key 0 only, so softmax never sees an all-masked row (NaN).
    mask |= ~query_valid[:, :, None] & (k_pos == 0)
    return AttentionGroup(
        query_index=query_index.to(device),
        query_valid=query_valid.to(device),
        kv_index=_kv_index([c.seq.blocks for c in chunks], kv_lens, block_size, device),
        mask=mask[:, None].to(device),
    )


def build_step(
    plan: list[ScheduledChunk], block_size: int, sliding_window: int | None, device
) -> tuple[StepBatch, LoRABatch, list[ScheduledChunk]]:
    """The step's tensors, its LoRA metadata, and the chunks that get a sampled token (in logits order).

    Tokens are laid out grouped by adapter slot so each adapter's tokens form long segments.
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

    decodes = [i for i, c in enumerate(ordered) if c.num_tokens == 1]
    groups = []
    if decodes:
        groups.append(
            _attention_group([ordered[i] for i in decodes], [first_rows[i] for i in decodes], block_size,
                             sliding_window, device)
        )
    groups.extend(
        _attention_group([c], [first_rows[i]], block_size, sliding_window, device)
        for i, c in enumerate(ordered) if c.num_tokens > 1
    )
    sampled = [i for i, c in enumerate(ordered) if c.completes_sequence]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    step = StepBatch(
        input_ids=as_tensor(input_ids),
        positions=as_tensor(positions),
        cache_slots=as_tensor(cache_slots),
        attention_groups=groups,
        logits_index=as_tensor([first_rows[i] + ordered[i].num_tokens - 1 for i in sampled]),
    )
    # A decode-only step gets fixed-shape kernel metadata (one work tile per token, padded), so the step could
    # be captured in a CUDA graph and replayed correctly whatever mix of adapters a later batch brings.
    decode_only = all(c.num_tokens == 1 for c in ordered)
    lora = LoRABatch.from_token_slots(token_slots, device, fixed_shape=decode_only)
    return step, lora, [ordered[i] for i in sampled]
