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

The reference loops over sequences: each gathers its own blocks, only those its queries can see (the window
bounds them), and calls SDPA. A mask is built only where SDPA's own `is_causal` cannot express the rule (a
cached prefix, or a window), and then for that one sequence's [q, keys seen] only; a decode query sees every
key gathered and needs none. No temporary grows with batch x longest context, and SDPA picks its own
accumulation (fp32 for half inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention_metadata import AttentionBatch


def visible_keys(context_len: int, query_len: int, window: int | None) -> int:
    """The first key position any of the sequence's queries can see."""
    first_query = context_len - query_len
    return max(0, first_query - window + 1) if window else 0


def gather_keys(cache: torch.Tensor, blocks: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """[end - first, Hkv, D]: the cache rows of positions first ... end - 1 of one sequence."""
    block_size = cache.shape[1]
    rows = cache[blocks[first // block_size : -(-end // block_size)]].flatten(0, 1)
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


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, window: int | None = None
) -> torch.Tensor:
    """Attention of every query over its sequence's cached keys (see the module's contract)."""
    out = torch.empty_like(q)
    for seq in range(batch.num_seqs):
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
