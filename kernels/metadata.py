"""Per-step token -> slot metadata, computed once per step and shared by every LoRA layer."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

# Rows per kernel work tile. Small steps (decode) use 16, the smallest tile a tensor-core dot takes, so a
# single decode token wastes little; large steps (prefill) use 64 so each adapter's weights are loaded once
# per 64 tokens. The choice depends only on the token count, so a captured decode step keeps it.
SMALL_TILE_ROWS = 16
LARGE_TILE_ROWS = 64
LARGE_STEP_TOKENS = 256


def tile_rows_for(num_tokens: int) -> int:
    return SMALL_TILE_ROWS if num_tokens <= LARGE_STEP_TOKENS else LARGE_TILE_ROWS


@dataclass(frozen=True)
class LoRABatch:
    """Which adapter slot each token of the flattened batch uses.

    `token_slots[t]` is the slot of token t, or -1 for "no adapter". Tokens of one slot that sit next to
    each other form a segment (prefill tokens of one sequence always do); `segment_starts` has one more
    entry than `segment_slots` and ends with the token count. `active_slots` lists the distinct slots
    >= 0 that occur, so a step with only base-model tokens does no LoRA work at all.

    `by_slot` and `slot_runs` serve the torch reference: the indices of the tokens that have a slot, grouped
    by slot (in token order within a group), and one `(slot, start, end)` per group, positions into `by_slot`.
    Gathering the tokens once per layer makes each adapter's rows one contiguous block.

    `tiles` is the kernels' work list: every segment with a slot cut into runs of at most `tile_rows`
    tokens, one row `(first token, end token, slot)` per run (int32). Segments of slot -1 get no tile.
    With `fixed_shape` the list is padded with `(0, 0, -1)` rows to one row per token (a segment has at
    least one token, so that always suffices): its shape then depends on the token count only, never on
    how many adapters the step mixes, which is what a CUDA graph captured for a decode batch size needs.
    """

    token_slots: torch.Tensor  # [T] int64
    segment_starts: torch.Tensor  # [S + 1] int64
    segment_slots: torch.Tensor  # [S] int64
    active_slots: tuple[int, ...]
    tiles: torch.Tensor  # [W, 3] int32
    tile_rows: int
    by_slot: torch.Tensor  # [T'] int64, T' the tokens with a slot
    slot_runs: tuple[tuple[int, int, int], ...]

    @property
    def has_lora(self) -> bool:
        return bool(self.active_slots)

    @classmethod
    def from_token_slots(
        cls, token_slots: list[int], device: torch.device | str = "cpu", fixed_shape: bool = False
    ) -> LoRABatch:
        starts: list[int] = []
        slots: list[int] = []
        for t, slot in enumerate(token_slots):
            if not slots or slot != slots[-1]:
                starts.append(t)
                slots.append(slot)
        starts.append(len(token_slots))
        tile_rows = tile_rows_for(len(token_slots))
        tiles = [
            (first, min(first + tile_rows, end), slot)
            for slot, start, end in zip(slots, starts, starts[1:], strict=False)
            if slot >= 0
            for first in range(start, end, tile_rows)
        ]
        if fixed_shape:
            tiles += [(0, 0, -1)] * (len(token_slots) - len(tiles))
        active_slots = sorted({s for s in slots if s >= 0})
        tokens_of = {slot: [] for slot in active_slots}
        for t, slot in enumerate(token_slots):
            if slot >= 0:
                tokens_of[slot].append(t)
        by_slot = [t for slot in active_slots for t in tokens_of[slot]]
        ends = list(itertools.accumulate(len(tokens_of[slot]) for slot in active_slots))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        return cls(
            token_slots=as_tensor(token_slots),
            segment_starts=as_tensor(starts),
            segment_slots=as_tensor(slots),
            active_slots=tuple(active_slots),
            tiles=torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, 3),
            tile_rows=tile_rows,
            by_slot=as_tensor(by_slot),
            slot_runs=tuple(zip(active_slots, [0, *ends], ends, strict=False)),
        )
