"""Pure-torch reference of paged attention over a block table, for decode and prefill/extend alike.

Contract (shared with `kernels.attention_triton`):
  q: [T, H, D]                          the step's queries, sequence after sequence (`AttentionBatch`)
  k_cache, v_cache: [N, P, Hkv, D]      one layer's paged cache: N blocks of P token slots (a view of the
                                        model's flat [N * P, Hkv, D] cache); the step's new K/V already in it
  batch: AttentionBatch                 block tables, context lengths, query offsets
  window: int | None                    sliding window W: a query at position p sees keys j with
                                        j <= p and p - j < W (Hugging Face Mistral/Qwen2); None: all j <= p
  returns [T, H, D] in q's dtype: softmax(q k^T / sqrt(D)) v per query head, query head h reading KV head
  h // (H / Hkv) (grouped-query attention).

Decode sequences (one query each) next to each other in the batch are attended in groups, one SDPA call per
group: the group's blocks are gathered padded to its longest context, and a [sequences, keys] mask hides the
padding (and keys outside a window). A decode step of 64 sequences then costs a handful of ops per layer
rather than a dozen per sequence, which on a CPU is most of a small model's attention time. A group's padded
keys stay within `DECODE_GROUP_KEYS` (a sequence longer than that is a group of its own), so no temporary
grows with batch x longest context. Sequences with several queries (prefill, extend) loop: each gathers its
own blocks, only those its queries can see (the window bounds them), and calls SDPA, with a mask only where
SDPA's own `is_causal` cannot express the rule (a cached prefix, or a window), for that one sequence's
[q, keys seen]. SDPA picks its own accumulation (fp32 for half inputs).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels.attention_metadata import AttentionBatch

DECODE_GROUP_KEYS = 1 << 14  # padded keys (sequences x widest context) one batched decode call gathers at most


def visible_keys(context_len: int, query_len: int, window: int | None) -> int:
    """The first key position any of the sequence's queries can see."""
    first_query = context_len - query_len
    return max(0, first_query - window + 1) if window else 0


def gather_keys(cache: torch.Tensor, blocks: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """[end - first, Hkv, D]: the cache rows of positions first ... end - 1 of one sequence."""
    block_size = cache.shape[1]
    rows = cache.index_select(0, blocks[first // block_size : -(-end // block_size)]).flatten(0, 1)
    offset = first - first // block_size * block_size
    return rows[offset : offset + end - first]


def sequence_mask(
    context_len: int, query_len: int, first_key: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """[q, keys] True where a query may see a key; None where SDPA needs no mask."""
    if query_len == 1 or (first_key == 0 and query_len == context_len and window is None):
        return None  # a decode query sees every gathered key; a whole prompt is plain causal (is_causal)
    query_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    key_pos = torch.arange(first_key, context_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= query_pos - key_pos < window
    return mask


def decode_groups(batch: AttentionBatch, block_size: int) -> list[range]:
    """Runs of consecutive decode sequences, each padded to its longest context within `DECODE_GROUP_KEYS` keys."""
    groups: list[range] = []
    first, widest = 0, 0
    for seq in range(batch.num_seqs + 1):
        decode = seq < batch.num_seqs and batch.query_len(seq) == 1
        blocks = -(-batch.host_context_lens[seq] // block_size) if decode else 0
        fits = (seq - first + 1) * max(widest, blocks) * block_size <= DECODE_GROUP_KEYS
        if seq > first and not (decode and fits):  # the run so far ends here
            groups.append(range(first, seq))
            first, widest = seq, 0
        if decode:
            widest = max(widest, blocks)
        else:
            first = seq + 1
    return groups


def decode_group_inputs(batch: AttentionBatch, seqs: range, block_size: int, window: int | None,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(blocks [n, w], stale_rows [k], bias [n, 1, 1, w * block_size]) of a decode group: its block tables cut to
    its widest context, the gathered rows that may hold another sequence's keys, and 0 where each sequence's query
    sees a key, -inf elsewhere, in the queries' dtype (SDPA would turn a boolean mask into that in every layer).
    Made once per step (cached on the batch) for every layer.

    A masked key still enters SDPA's weighted sum as 0 x value, so a NaN there would poison the output. Table
    entries past a sequence's blocks may name any block, even none, so they are pointed at its first block; then
    only slots past its context can hold someone else's keys (a recycled block): those rows are zeroed once
    gathered (`stale_key_rows`, a few per sequence, not a pass over every key)."""
    key = ("decode", seqs.start, seqs.stop, window, dtype)
    if key not in batch.cache:
        context = batch.context_lens[seqs.start : seqs.stop, None]
        host_context = batch.host_context_lens[seqs.start : seqs.stop]
        width = -(-max(host_context) // block_size)
        blocks = batch.block_tables[seqs.start : seqs.stop, :width].long()
        own_blocks = torch.arange(width, device=blocks.device)[None, :] * block_size < context
        blocks = torch.where(own_blocks, blocks, blocks[:, :1])
        keys = width * block_size
        stale_rows = stale_key_rows(host_context, width, block_size).to(blocks.device, non_blocking=True)
        position = torch.arange(keys, device=blocks.device)[None, :]
        mask = position < context
        if window is not None:
            mask &= position >= context - window
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        batch.cache[key] = (blocks, stale_rows, bias[:, None, None, :])
    return batch.cache[key]


def stale_key_rows(context_lens: list[int], width: int, block_size: int) -> torch.Tensor:
    """Rows of a decode group's gathered keys (flattened [n * width * block_size]) that come from slots past
    their sequence's context: the rest of its last block, and in the padding entries (copies of its first
    block) the slots of that block past the context. Built on the host: no device sync."""
    position = np.arange(width * block_size)[None, :]
    context = np.asarray(context_lens, dtype=np.int64)[:, None]
    own_keys = -(-context // block_size) * block_size
    source = np.where(position < own_keys, position, position % block_size)  # the slot each row copies
    return torch.from_numpy(np.flatnonzero(source >= context))


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, stale_rows: torch.Tensor) -> torch.Tensor:
    """[n, w * P, Hkv, D]: the cache rows of blocks [n, w], sequence by sequence, with `stale_rows` (of the
    flattened result) zeroed. `index_select` copies whole blocks; indexing with a tensor (`cache[blocks]`) copies
    element by element, 3-5x slower on a CPU."""
    rows = cache.index_select(0, blocks.flatten()).flatten(0, 1).index_fill_(0, stale_rows, 0)
    return rows.view(blocks.shape[0], -1, *cache.shape[2:])


def attend_decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                        stale_rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[n, H, D]: decode queries q [n, H, D] over their blocks [n, w] of the cache (`decode_group_inputs`)."""
    k = gather_blocks(k_cache, blocks, stale_rows).transpose(1, 2)  # [n, Hkv, keys, D]
    v = gather_blocks(v_cache, blocks, stale_rows).transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=bias, enable_gqa=True)[:, :, 0]


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, window: int | None = None
) -> torch.Tensor:
    """Attention of every query over its sequence's cached keys (see the module's contract)."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for seqs in decode_groups(batch, block_size):
        rows = slice(batch.host_query_starts[seqs.start], batch.host_query_starts[seqs.stop])
        inputs = decode_group_inputs(batch, seqs, block_size, window, q.dtype)
        out[rows] = attend_decode_group(q[rows], k_cache, v_cache, *inputs)
    for seq in range(batch.num_seqs):
        if batch.query_len(seq) == 1:  # attended with its decode group above
            continue
        start, end = batch.host_query_starts[seq], batch.host_query_starts[seq + 1]
        context_len, query_len = batch.host_context_lens[seq], end - start
        first_key = visible_keys(context_len, query_len, window)
        blocks = batch.block_tables[seq]
        k = gather_keys(k_cache, blocks, first_key, context_len).transpose(0, 1)  # [Hkv, keys, D]
        v = gather_keys(v_cache, blocks, first_key, context_len).transpose(0, 1)
        mask = sequence_mask(context_len, query_len, first_key, window, q.device)
        causal = mask is None and query_len > 1
        # A batch of one, 4-D: on a CPU, 3-D inputs fall back to SDPA's math kernel, which copies K/V once per
        # query head of a group (GQA) and materialises the scores; 4-D ones take its fused kernel, which does not.
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                           is_causal=causal, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
        del k, v, o  # freed before the next sequence gathers: one sequence's copies live at a time
    return out
