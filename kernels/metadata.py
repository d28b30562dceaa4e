"""Per-step token -> slot metadata, computed once per step and shared by every LoRA layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRABatch:
    """Which adapter slot each token of the flattened batch uses.

    `token_slots[t]` is the slot of token t, or -1 for "no adapter". Tokens of one slot that sit next to
    each other form a segment (prefill tokens of one sequence always do); `segment_starts` has one more
    entry than `segment_slots` and ends with the token count. `active_slots` lists the distinct slots
    >= 0 that occur, so a step with only base-model tokens does no LoRA work at all.
    """

    token_slots: torch.Tensor  # [T] int64
    segment_starts: torch.Tensor  # [S + 1] int64
    segment_slots: torch.Tensor  # [S] int64
    active_slots: tuple[int, ...]

    @property
    def has_lora(self) -> bool:
        return bool(self.active_slots)

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device | str = "cpu") -> LoRABatch:
        starts: list[int] = []
        slots: list[int] = []
        for t, slot in enumerate(token_slots):
            if not slots or slot != slots[-1]:
                starts.append(t)
                slots.append(slot)
        starts.append(len(token_slots))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        return cls(
            token_slots=as_tensor(token_slots),
            segment_starts=as_tensor(starts),
            segment_slots=as_tensor(slots),
            active_slots=tuple(sorted({s for s in slots if s >= 0})),
        )
