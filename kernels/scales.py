"""Per-token scale vectors around a LoRA layer: DoRA's output scale and IA3's output and input scales.

A DoRA adapter turns a layer's output into `g * (x W^T + s x A^T B^T) + bias`, `g` one value per output computed
when the adapter is loaded (its magnitude over the row norms of `W + s B A`); an IA3 adapter multiplies a module's
outputs (bias included) or, for a feedforward module, its inputs by a learned vector. Each is per token an
elementwise product with the vector of the token's adapter, so one batch mixes them with LoRA and base tokens:

  x' = x + x * c_in[slot]                 before the base GEMM (IA3 on a feedforward module)
  y' = y + y * c_out[slot] + e[slot]       after base and LoRA  (DoRA: c_out = g - 1, e = -(g - 1) * bias;
                                                                  IA3:  c_out = l - 1, e = 0)

The vectors are stored minus one, so a token without them (slot -1, LoRA, untouched slices) reads zeros and is
left as it is. Where the adapters live in pages they are rows of the adapter's vector page (`kernels.paging`), and
a step gathers one row per token and does one multiply-add per layer, whatever the mix. Where a CPU model runner
holds them apart they are `AdapterSlices` fields: while a step's scaled adapters are few, one multiply-add per run
of an adapter's tokens (the step builder groups them); else the same gather, from a table of the step's vectors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels.layer_adapters import LayerAdapters
from kernels.metadata import LoRABatch
from kernels.paging import PageTable

# Rows of a vector page (`kernels.paging`): in the B buffer the output scale and shift, in the A buffer the input
# scale.
OUT_SCALE_ROW, OUT_SHIFT_ROW, IN_SCALE_ROW = 0, 1, 0


def scaled_slots(batch: LoRABatch, table: PageTable) -> tuple[int, ...]:
    """The step's slots whose adapters carry vectors; worked out once per step."""
    if batch.scaled_slots is not None:
        return batch.scaled_slots
    return batch.active_marked(table.has_vectors, "scaled slots")


def scale_inputs(x: torch.Tensor, batch: LoRABatch, table: PageTable, lora_a: torch.Tensor | None,
                 targets: LayerAdapters) -> torch.Tensor:
    """x with each token's input scale applied (a new tensor; `x` is left as it is), or `x` when none applies."""
    scale = _token_vectors(batch, table, lora_a, IN_SCALE_ROW, targets, "in_scale")
    if scale is None:
        return x
    out = x.clone()
    _add(out, scale, x)
    return out


def scale_outputs(y: torch.Tensor, batch: LoRABatch, table: PageTable, lora_b: torch.Tensor | None,
                  targets: LayerAdapters, has_bias: bool) -> None:
    """y += y * c_out[slot] + e[slot] per token, in place."""
    scale = _token_vectors(batch, table, lora_b, OUT_SCALE_ROW, targets, "out_scale")
    if scale is not None:
        _add(y, scale, y)
    if has_bias:  # only a biased layer has shifts
        shift = _token_vectors(batch, table, lora_b, OUT_SHIFT_ROW, targets, "out_shift")
        if shift is not None:
            _add(y, shift)


# Where adapters are held apart (a CPU), each run of one adapter's tokens (the step builder groups them) gets its own
# op while runs are few: an op on a run costs ~5 us there, a gather of a row per token ~60 us (demo model, 32 tokens).
MAX_RUN_OPS = 8

# A step's vectors in one layer: a row per token [T, width], or (first token, end token, vector) per run of tokens.
TokenVectors = torch.Tensor | list[tuple[int, int, torch.Tensor]]


def _add(out: torch.Tensor, vectors: TokenVectors, factor: torch.Tensor | None = None) -> None:
    """out += factor * vectors per token (out += vectors without a factor), in place."""
    if isinstance(vectors, torch.Tensor):
        out.add_(vectors) if factor is None else out.addcmul_(factor, vectors)
        return
    for start, end, vector in vectors:
        if factor is None:
            out[start:end].add_(vector)
        else:
            out[start:end].addcmul_(factor[start:end], vector)


def _token_vectors(batch: LoRABatch, table: PageTable, buffer: torch.Tensor | None, row: int,
                   targets: LayerAdapters, field: str) -> TokenVectors | None:
    """Each token's vector (`row` of its vector page where adapters live in `buffer`'s pages, else the `field` of its
    adapter's `AdapterSlices`), zeros or nothing for tokens without; None where no token has one here."""
    if buffer is not None:
        return buffer[:, row].index_select(0, _token_pages(batch, table))
    slots = scaled_slots(batch, table)
    runs = _runs(batch, slots, targets, field)
    if runs is not None:
        return runs or None
    stacked = targets.vector_table(field, slots)
    return None if stacked is None else F.embedding(_token_positions(batch, slots), stacked)


def _runs(batch: LoRABatch, slots: tuple[int, ...], targets: LayerAdapters, field: str
          ) -> list[tuple[int, int, torch.Tensor]] | None:
    """(first token, end token, vector) of each run of tokens whose adapter has a `field` vector here, where the
    tokens with a slot lie grouped by slot and the runs are few; else None."""
    if batch.grouped_from is None or len(slots) > MAX_RUN_OPS:
        return None
    runs = [(start, end, getattr(targets[slot], field)) for slot, start, end in _scaled_runs(batch, slots)
            if slot in targets]
    return [run for run in runs if run[2] is not None]


def _scaled_runs(batch: LoRABatch, slots: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(slot, first token, end token) of each run of grouped tokens whose slot is in `slots`; once per step."""
    key = ("scaled runs", slots)
    if key not in batch.cache:
        scaled = set(slots)
        first = batch.grouped_from
        batch.cache[key] = [(slot, first + start, first + end) for slot, start, end in batch.slot_runs
                            if slot in scaled]
    return batch.cache[key]


def _token_pages(batch: LoRABatch, table: PageTable) -> torch.Tensor:
    """[T] int64: each token's vector page (slot -1 reads the table's last entry, ZERO_PAGE); once per step."""
    key = ("scale pages",)
    if key not in batch.cache:
        batch.cache[key] = (table.scale_pages.index_select(0, _wrapped(batch.token_slots, table)).long(),)
    return batch.cache[key][0]


def _wrapped(token_slots: torch.Tensor, table: PageTable) -> torch.Tensor:
    """Slots as indices of the [num_slots + 1] vector-page table: -1 becomes the last entry."""
    return torch.remainder(token_slots.long(), table.scale_pages.shape[0])


def _token_positions(batch: LoRABatch, slots: tuple[int, ...]) -> torch.Tensor:
    """[T] int64: 1 + the position of each token's slot in `slots`, 0 for a token whose slot is not there. Built
    from the host's slot lists (the step's slots are `active_slots`, and -1), so nothing is read back."""
    key = ("scale positions", slots)
    if key not in batch.cache:
        lookup = np.zeros(max(batch.active_slots, default=0) + 2, dtype=np.int64)  # the last entry: slot -1
        lookup[list(slots)] = np.arange(1, len(slots) + 1)
        batch.cache[key] = (torch.from_numpy(lookup).to(batch.token_slots.device)[batch.token_slots.long()],)
    return batch.cache[key][0]


# Rows of the combined weight W + B A formed at once when computing DoRA's norms: bounds the temporary memory
# (a Llama-3.1-8B gate|up slice is 14,336 x 4,096).
_NORM_ROWS = 2048


def dora_output_scale(weight: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
                      magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's g = magnitude / ||W + B A|| per output row, in float32 (PEFT's `DoraLinearLayer`, the norm taken over
    the inputs of each output). `weight` [d_out, d_in] the base weight, `a` [r, d_in], `b_t` [r, d_out] with the
    LoRA scale folded in, `magnitude` [d_out]."""
    a32, b32 = a.float(), b_t.float().T
    norms = torch.cat([
        torch.linalg.vector_norm(weight[start : start + _NORM_ROWS].float() + b32[start : start + _NORM_ROWS] @ a32,
                                 dim=1)
        for start in range(0, weight.shape[0], _NORM_ROWS)
    ])
    return magnitude.float() / norms
