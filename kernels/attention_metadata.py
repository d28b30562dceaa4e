"""Per-step metadata of paged attention, built once on the host and read by every layer.

A step's queries are the new tokens of B sequences laid out one sequence after another ("varlen"):
sequence b owns query rows `query_starts[b] : query_starts[b + 1]` and has `context_lens[b]` tokens of
context, its cached prefix plus its new tokens, whose K/V are already written to the cache. Its queries sit
at the END of that context: query i of a sequence with q new tokens is at position `context_len - q + i`.
`block_tables[b, j]` is the cache block holding the sequence's positions `j * block_size ...` (the row is
padded past the sequence's own blocks with any value: kernels never follow those entries).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionBatch:
    """Where every sequence's queries and keys are: device tensors for the kernels, host copies for loops.

    The host copies let the torch reference slice each sequence and the dispatcher size its launches without
    reading a device tensor back (a sync per layer). `prefill_tiles` cuts the queries into a work list of runs
    of at most `tile_tokens` tokens of one sequence, the way `kernels.metadata` cuts LoRA segments: one
    prefill/extend launch then covers a whole mixed batch, whatever its lengths.
    """

    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32
    query_starts: torch.Tensor  # [B + 1] int32 (cu_seqlens_q)
    host_context_lens: tuple[int, ...]
    host_query_starts: tuple[int, ...]
    # Splits of each decode context for the split-KV kernel; None: the kernel picks from the step's shapes. A step
    # captured in a CUDA graph fixes it, since the longest context changes between replays.
    decode_splits: int | None = None
    _tiles: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    # What the torch reference derives once per step and reads in every layer (its decode groups' blocks, masks).
    cache: dict[tuple, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_sequences(
        cls,
        block_tables: list[list[int]],
        context_lens: list[int],
        query_lens: list[int],
        device: torch.device | str = "cpu",
    ) -> AttentionBatch:
        if not len(block_tables) == len(context_lens) == len(query_lens):
            raise ValueError("block_tables, context_lens and query_lens need one entry per sequence")
        for blocks, context, queries in zip(block_tables, context_lens, query_lens, strict=True):
            if not 0 < queries <= context:
                raise ValueError(f"a sequence of {context} context tokens cannot have {queries} new tokens")
            if not blocks:
                raise ValueError("every sequence needs at least one cache block")
        width = max((len(blocks) for blocks in block_tables), default=1)
        table = torch.zeros(len(block_tables), width, dtype=torch.int32)
        for row, blocks in enumerate(block_tables):
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        starts = [0, *itertools.accumulate(query_lens)]
        return cls(
            block_tables=table.to(device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            query_starts=torch.tensor(starts, dtype=torch.int32, device=device),
            host_context_lens=tuple(context_lens),
            host_query_starts=tuple(starts),
        )

    @property
    def num_seqs(self) -> int:
        return len(self.host_context_lens)

    @property
    def num_tokens(self) -> int:
        return self.host_query_starts[-1]

    @property
    def decode_only(self) -> bool:
        """One query per sequence: the split-KV decode kernel's case."""
        return self.num_tokens == self.num_seqs

    @property
    def max_context_len(self) -> int:
        return max(self.host_context_lens, default=0)

    def query_len(self, seq: int) -> int:
        return self.host_query_starts[seq + 1] - self.host_query_starts[seq]

    def prefill_tiles(self, tile_tokens: int) -> torch.Tensor:
        """[W, 3] int32 work list: (sequence, first query row, end query row), runs of <= tile_tokens rows.

        Built once per step and tile size, on the device of the batch's tensors.
        """
        if tile_tokens not in self._tiles:
            tiles = [
                (seq, first, min(first + tile_tokens, end))
                for seq, (start, end) in enumerate(itertools.pairwise(self.host_query_starts))
                for first in range(start, end, tile_tokens)
            ]
            self._tiles[tile_tokens] = torch.tensor(tiles, dtype=torch.int32, device=self.context_lens.device).reshape(
                -1, 3
            )
        return self._tiles[tile_tokens]
