"""`kernels.scales` against its definition, per token: y' = y + y * c_out[slot] + e[slot], x' = x + x * c_in[slot],
for slots without vectors (-1, LoRA-only) nothing; in each of its three ways: vector pages (a GPU, or the Triton
kernels), runs of an adapter's tokens (a CPU, few scaled adapters, tokens grouped) and one gather per token (a CPU,
many scaled adapters, or tokens not grouped)."""

from __future__ import annotations

import pytest
import torch

from kernels import LoRABatch, PageTable
from kernels.layer_adapters import AdapterSlices, LayerAdapters
from kernels.paging import allocate_buffers
from kernels.scales import IN_SCALE_ROW, MAX_RUN_OPS, OUT_SCALE_ROW, OUT_SHIFT_ROW, scale_inputs, scale_outputs

D_IN, D_OUT, NUM_SLOTS = 6, 10, 20


def vectors(slots: int) -> dict[int, dict[str, torch.Tensor]]:
    """Each even slot scales outputs (with a shift), every third also inputs; odd slots have none (LoRA)."""
    gen = torch.Generator().manual_seed(0)
    held = {}
    for slot in range(0, slots, 2):
        held[slot] = {"out_scale": torch.randn(D_OUT, generator=gen), "out_shift": torch.randn(D_OUT, generator=gen)}
        if slot % 3 == 0:
            held[slot]["in_scale"] = torch.randn(D_IN, generator=gen)
    return held


def expected(z: torch.Tensor, token_slots: list[int], held: dict, scale: str, shift: str | None) -> torch.Tensor:
    out = z.clone()
    for t, slot in enumerate(token_slots):
        if slot in held and scale in held[slot]:
            out[t] += z[t] * held[slot][scale]
        if shift is not None and slot in held:
            out[t] += held[slot][shift]
    return out


def held_apart(held: dict) -> tuple[PageTable, LayerAdapters]:
    table = PageTable.empty(NUM_SLOTS, 16)
    targets = LayerAdapters()
    for slot in range(NUM_SLOTS):
        targets[slot] = AdapterSlices((0,), **held.get(slot, {}))
        table.assign(slot, 8, [], has_vectors=slot in held)
    return table, targets


def in_pages(held: dict) -> tuple[PageTable, torch.Tensor, torch.Tensor]:
    table = PageTable.empty(NUM_SLOTS, 16)
    lora_a, lora_b = allocate_buffers(1 + NUM_SLOTS, D_IN, (D_OUT,), torch.float32, "cpu")
    for slot in range(NUM_SLOTS):
        page = 1 + slot if slot in held else 0
        if slot in held:
            lora_b[page, OUT_SCALE_ROW] = held[slot]["out_scale"]
            lora_b[page, OUT_SHIFT_ROW] = held[slot]["out_shift"]
            if "in_scale" in held[slot]:
                lora_a[page, IN_SCALE_ROW] = held[slot]["in_scale"]
        table.assign(slot, 8, [], scale_page=page, has_vectors=slot in held)
    return table, lora_a, lora_b


STEPS = {
    "few adapters, grouped (runs)": [-1, -1, 1, 2, 2, 2, 3, 4, 4, 6],
    "many adapters, grouped (gather)": sorted([-1, *range(NUM_SLOTS), 0, 4, 4]),
    "not grouped (gather)": [2, -1, 4, 2, 1, 0, 6, -1, 0],
}


@pytest.mark.parametrize("way", ["pages", "apart"])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_each_token_gets_its_own_adapter_s_vectors(step: str, way: str):
    token_slots = STEPS[step]
    held = vectors(NUM_SLOTS)
    batch = LoRABatch.from_token_slots(token_slots)
    scaled = {slot for slot in batch.active_slots if slot in held}
    if way == "apart" and step.startswith("few"):
        assert batch.grouped_from is not None and len(scaled) <= MAX_RUN_OPS  # the runs way, not the gather
    if step.startswith("many"):
        assert len(scaled) > MAX_RUN_OPS
    x = torch.randn(len(token_slots), D_IN)
    y = torch.randn(len(token_slots), D_OUT)
    if way == "pages":
        table, lora_a, lora_b = in_pages(held)
        targets = LayerAdapters()
    else:
        (table, targets), lora_a, lora_b = held_apart(held), None, None
    scaled_x = scale_inputs(x, batch, table, lora_a, targets)
    out = y.clone()
    scale_outputs(out, batch, table, lora_b, targets, has_bias=True)
    torch.testing.assert_close(scaled_x, expected(x, token_slots, held, "in_scale", None))
    torch.testing.assert_close(out, expected(y, token_slots, held, "out_scale", "out_shift"))
    assert scaled_x is not x or not any(slot in held and "in_scale" in held[slot] for slot in token_slots)


def test_a_layer_without_bias_adds_no_shift():
    held = vectors(NUM_SLOTS)
    table, targets = held_apart(held)
    batch = LoRABatch.from_token_slots([0, 0, 2])
    y = torch.randn(3, D_OUT)
    out = y.clone()
    scale_outputs(out, batch, table, None, targets, has_bias=False)
    torch.testing.assert_close(out, expected(y, [0, 0, 2], held, "out_scale", None))
