"""Per-step token -> slot metadata, computed once per step and shared by every LoRA layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
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

    token_slots: torch.Tensor  # [T] int64 (int32 from the model runner's step buffers; either indexes)
    segment_starts: torch.Tensor  # [S + 1] int64
    segment_slots: torch.Tensor  # [S] int64
    active_slots: tuple[int, ...]
    tiles: torch.Tensor  # [W, 3] int32
    tile_rows: int
    by_slot: torch.Tensor  # [T'] int64, T' the tokens with a slot
    slot_runs: tuple[tuple[int, int, int], ...]
    # Where `by_slot` is the run first, first + 1, ... (the tokens already grouped by slot): first; else None.
    grouped_from: int | None = None
    # The slots whose adapters scale outputs or inputs (DoRA, IA3: `kernels.scales`); None: those of
    # `active_slots` the page table marks. A captured CUDA graph fixes it: every slot, or none.
    scaled_slots: tuple[int, ...] | None = None
    # The slots whose adapters have LoRA weights (IA3 and prompt tuning have none, so a step of only those runs
    # no shrink or expand); None: those of `active_slots` the page table gives a rank. A captured graph: every slot.
    weighted_slots: tuple[int, ...] | None = None
    # What the torch reference derives once per step and reads in every layer (`kernels.reference`).
    cache: dict[tuple, tuple[torch.Tensor, ...]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_lora(self) -> bool:
        return bool(self.active_slots)

    def active_marked(self, marks: Sequence[object], name: str) -> tuple[int, ...]:
        """The active slots whose entry of `marks` (a page-table list indexed by slot) is true; worked out once
        per step under `name`."""
        key = (name,)
        if key not in self.cache:
            self.cache[key] = tuple(slot for slot in self.active_slots if marks[slot])
        return self.cache[key]

    @classmethod
    def from_token_slots(
        cls, token_slots: list[int], device: torch.device | str = "cpu", fixed_shape: bool = False
    ) -> LoRABatch:
        host = HostLoRAMetadata.build(np.asarray(token_slots, dtype=np.int64), fixed_shape)
        as_tensor = lambda values: torch.as_tensor(values, dtype=torch.int64).to(device)  # noqa: E731
        return host.on_device(
            as_tensor(host.token_slots), as_tensor(host.segment_starts), as_tensor(host.segment_slots),
            torch.as_tensor(host.tiles, dtype=torch.int32).to(device), as_tensor(host.by_slot),
        )


def run_starts(values: np.ndarray) -> np.ndarray:
    """The index of each run of equal neighbours' first element."""
    return np.flatnonzero(np.concatenate(([len(values) > 0], values[1:] != values[:-1])))


@dataclass(frozen=True)
class HostLoRAMetadata:
    """A step's `LoRABatch` in host memory (numpy), computed without a Python loop over tokens: the step builder
    writes its arrays into the runner's persistent input buffers and makes the batch from their device views."""

    token_slots: np.ndarray  # [T]
    segment_starts: np.ndarray  # [S + 1]
    segment_slots: np.ndarray  # [S]
    tiles: np.ndarray  # [W, 3]
    by_slot: np.ndarray  # [T']
    active_slots: tuple[int, ...]
    slot_runs: tuple[tuple[int, int, int], ...]
    tile_rows: int
    grouped_from: int | None

    @classmethod
    def build(cls, token_slots: np.ndarray, fixed_shape: bool = False) -> HostLoRAMetadata:
        num_tokens = len(token_slots)
        starts = run_starts(token_slots)
        slots = token_slots[starts]
        starts = np.append(starts, num_tokens)
        tile_rows = tile_rows_for(num_tokens)
        # Each segment with a slot cut into runs of tile_rows tokens: its tile count, then each tile's first row.
        adapted = slots >= 0
        seg_first, seg_end, seg_slot = starts[:-1][adapted], starts[1:][adapted], slots[adapted]
        counts = -(-(seg_end - seg_first) // tile_rows)
        index_in_segment = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        first = np.repeat(seg_first, counts) + index_in_segment * tile_rows
        tiles = np.stack([first, np.minimum(first + tile_rows, np.repeat(seg_end, counts)),
                          np.repeat(seg_slot, counts)], axis=1).reshape(-1, 3)
        if fixed_shape:
            padding = np.tile(np.array([[0, 0, -1]]), (num_tokens - len(tiles), 1))
            tiles = np.concatenate([tiles, padding]).reshape(-1, 3)
        # Stable: the tokens of each slot stay in token order.
        by_slot = np.argsort(token_slots, kind="stable")[np.count_nonzero(token_slots < 0):]
        grouped = token_slots[by_slot]
        firsts = run_starts(grouped)
        active, ends = grouped[firsts], np.append(firsts, len(grouped))[1:]
        in_place = len(by_slot) > 0 and np.array_equal(by_slot, np.arange(by_slot[0], by_slot[0] + len(by_slot)))
        return cls(
            token_slots=token_slots,
            segment_starts=starts,
            segment_slots=slots,
            tiles=tiles,
            by_slot=by_slot,
            active_slots=tuple(active.tolist()),
            slot_runs=tuple(zip(active.tolist(), firsts.tolist(), ends.tolist(), strict=True)),
            tile_rows=tile_rows,
            grouped_from=int(by_slot[0]) if in_place else None,
        )

    def on_device(
        self, token_slots: torch.Tensor, segment_starts: torch.Tensor, segment_slots: torch.Tensor,
        tiles: torch.Tensor, by_slot: torch.Tensor,
    ) -> LoRABatch:
        """The `LoRABatch` whose tensors are these arrays' device copies (given) and whose host fields are ours."""
        return LoRABatch(
            token_slots=token_slots,
            segment_starts=segment_starts,
            segment_slots=segment_slots,
            active_slots=self.active_slots,
            tiles=tiles,
            tile_rows=self.tile_rows,
            by_slot=by_slot,
            slot_runs=self.slot_runs,
            grouped_from=self.grouped_from,
        )
