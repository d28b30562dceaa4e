"""Turns a scheduled plan into the tensors of one forward pass (built once, read by every layer).

The inputs are computed on the host with numpy, a few array operations per step whatever its size (no Python
loop over tokens), written into one pinned host buffer and sent to the device with ONE asynchronous copy into a
persistent device buffer (`StepBuffers`); every input tensor of the step is a view of that buffer. The device
tensors are never read back: the kernels size their launches from the host copies kept beside them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels import AttentionBatch, LoRABatch
from kernels.metadata import HostLoRAMetadata
from server.model import StepBatch
from server.scheduler import ScheduledChunk

# The step's device tensors, in buffer order. Those whose size depends only on the token count, the sequence
# count and the block-table width come first, so a padded decode step of one size always has the same layout
# (what a captured CUDA graph reads); the LoRA reference's variable-length lists come last.
FIXED_FIELDS = ("input_ids", "positions", "cache_slots", "token_slots", "logits_index", "tiles", "block_tables",
                "context_lens", "query_starts")
VARIABLE_FIELDS = ("segment_starts", "segment_slots", "by_slot")


@dataclass(frozen=True)
class HostStep:
    """One step's inputs in host memory: the arrays to copy, and the host values the kernels size launches by."""

    arrays: dict[str, np.ndarray]  # FIXED_FIELDS + VARIABLE_FIELDS
    lora: HostLoRAMetadata
    context_lens: tuple[int, ...]
    query_starts: tuple[int, ...]
    sampled: list[ScheduledChunk]  # the chunks that get a token, in logits order
    # Runs of soft-prompt positions: (first token in the step, slot, first virtual token, count); the model runner
    # embeds them from the slot's soft prompt instead of the token table.
    virtual: tuple[tuple[int, int, int, int], ...] = ()


def _flat(values_per_seq, count: int) -> np.ndarray:
    """The concatenation of every sequence's integers, read in C (no Python loop over them)."""
    return np.fromiter(itertools.chain.from_iterable(values_per_seq), dtype=np.int64, count=count)


def host_step(
    plan: list[ScheduledChunk], block_size: int, pad_to: int | None = None, table_width: int | None = None,
    scratch_block: int = 0,
) -> HostStep:
    """The step's inputs as host arrays. Each sequence's tokens are laid out one after another, grouped by adapter
    slot, so each adapter's tokens form one segment (which the LoRA reference updates in place), and within a slot
    decode sequences first (runs of them are one call of the attention reference). Attention reads every
    sequence's keys through its block table (`table_width` columns; default: the longest table of the step).

    `pad_to` pads a decode-only step (one token per sequence, each sampled) with rows that use no adapter and
    read and write only `scratch_block`, a KV block no sequence owns; every row's logits are then returned."""
    ordered = sorted(plan, key=lambda c: (c.seq.slot, c.num_tokens > 1))
    num_seqs = len(ordered)
    computed = np.fromiter((c.seq.num_computed for c in ordered), dtype=np.int64, count=num_seqs)
    query_lens = np.fromiter((c.num_tokens for c in ordered), dtype=np.int64, count=num_seqs)
    seq_slots = np.fromiter((c.seq.slot for c in ordered), dtype=np.int64, count=num_seqs)
    num_blocks = np.fromiter((len(c.seq.blocks) for c in ordered), dtype=np.int64, count=num_seqs)
    blocks = _flat((c.seq.blocks for c in ordered), int(num_blocks.sum()))
    input_ids = _flat((c.seq.token_ids[c.seq.num_computed : c.seq.num_computed + c.num_tokens] for c in ordered),
                      int(query_lens.sum()))
    sampled = [i for i, c in enumerate(ordered) if c.completes_sequence]
    if pad_to is not None:
        if len(sampled) != num_seqs or query_lens.sum() != num_seqs or pad_to < num_seqs:
            raise ValueError(f"only a decode step of at most {pad_to} sequences, each sampled, pads to {pad_to}")
        padding = pad_to - num_seqs
        computed = np.concatenate([computed, np.zeros(padding, np.int64)])
        query_lens = np.concatenate([query_lens, np.ones(padding, np.int64)])
        seq_slots = np.concatenate([seq_slots, np.full(padding, -1, np.int64)])
        num_blocks = np.concatenate([num_blocks, np.ones(padding, np.int64)])
        blocks = np.concatenate([blocks, np.full(padding, scratch_block, np.int64)])
        input_ids = np.concatenate([input_ids, np.zeros(padding, np.int64)])

    rows = len(computed)
    query_starts = np.zeros(rows + 1, np.int64)
    np.cumsum(query_lens, out=query_starts[1:])
    context_lens = computed + query_lens
    width = table_width or max(int(num_blocks.max(initial=1)), 1)
    block_tables = np.zeros((rows, width), np.int64)
    block_row = np.repeat(np.arange(rows), num_blocks)
    block_tables[block_row, np.arange(len(blocks)) - np.repeat(np.cumsum(num_blocks) - num_blocks, num_blocks)] = blocks

    seq_of_token = np.repeat(np.arange(rows), query_lens)
    positions = np.arange(len(seq_of_token)) - query_starts[seq_of_token] + computed[seq_of_token]
    cache_slots = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    token_slots = seq_slots[seq_of_token]
    logits_index = np.arange(rows) if pad_to is not None else query_starts[1:][sampled] - 1
    # A decode-only step gets fixed-shape kernel metadata (one work tile per token, padded), so the step can be
    # captured in a CUDA graph and replayed correctly whatever mix of adapters a later batch brings.
    lora = HostLoRAMetadata.build(token_slots, fixed_shape=bool((query_lens == 1).all()))
    arrays = {
        "input_ids": input_ids, "positions": positions, "cache_slots": cache_slots, "token_slots": token_slots,
        "logits_index": logits_index, "tiles": lora.tiles, "block_tables": block_tables,
        "context_lens": context_lens, "query_starts": query_starts,
        "segment_starts": lora.segment_starts, "segment_slots": lora.segment_slots, "by_slot": lora.by_slot,
    }
    virtual = tuple(
        (int(query_starts[i]), c.seq.slot, c.seq.num_computed,
         min(c.num_tokens, c.seq.num_virtual_tokens - c.seq.num_computed))
        for i, c in enumerate(ordered) if c.seq.num_virtual_tokens > c.seq.num_computed
    )
    return HostStep(arrays, lora, tuple(context_lens.tolist()), tuple(query_starts.tolist()),
                    [ordered[i] for i in sampled], virtual)


def fixed_layout_size(num_seqs: int, table_width: int) -> int:
    """Elements of a padded decode step of `num_seqs` rows in a `StepBuffers` (variable fields at their largest)."""
    per_token = 5  # input_ids, positions, cache_slots, token_slots, logits_index (one token per sequence)
    fixed = num_seqs * (per_token + 3 + table_width + 1) + 1  # + tiles, a block-table row, context_lens, starts
    return fixed + (num_seqs + 1) + num_seqs + num_seqs  # segment starts and slots, by_slot: at most one a token


class StepBuffers:
    """A step's inputs, in one pinned host buffer and one persistent device buffer of int32.

    `load` writes a `HostStep` into the host buffer and copies it up with one non-blocking copy; the step's tensors
    are views of the device buffer. With `growable` False the buffers keep their size (and address) for good: a
    CUDA graph captured over their views reads whatever a later `load` of the same layout wrote."""

    def __init__(self, device: torch.device | str, capacity: int = 1 << 14, growable: bool = True):
        self.device = torch.device(device)
        self.growable = growable
        self._allocate(capacity)
        # Recorded after each upload: the host buffer is rewritten only once the copy that reads it has run.
        self._uploaded = torch.cuda.Event() if self.device.type == "cuda" else None

    def _allocate(self, capacity: int) -> None:
        self._host = torch.empty(capacity, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._host_array = self._host.numpy()
        self._device_buffer = torch.empty(capacity, dtype=torch.int32, device=self.device)

    def load(self, step: HostStep, sliding_window: int | None) -> tuple[StepBatch, LoRABatch]:
        """Upload `step` (one host->device copy, no device->host read) and return its tensors."""
        arrays = [step.arrays[name] for name in (*FIXED_FIELDS, *VARIABLE_FIELDS)]
        total = sum(a.size for a in arrays)
        if total > self._host_array.size:
            if not self.growable:
                raise ValueError(f"a step of {total} input elements does not fit buffers of {self._host_array.size}")
            self._allocate(1 << math.ceil(math.log2(total)))
        elif self._uploaded is not None:
            self._uploaded.synchronize()
        ends = np.cumsum([a.size for a in arrays])
        for array, end in zip(arrays, ends, strict=True):
            self._host_array[end - array.size : end] = array.ravel()
        self._device_buffer[:total].copy_(self._host[:total], non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()
        # One split (one torch call, whatever the field count); only the two tables need a 2-D view.
        views = dict(zip((*FIXED_FIELDS, *VARIABLE_FIELDS),
                         self._device_buffer[:total].split([a.size for a in arrays]), strict=True))
        for name in ("tiles", "block_tables"):
            views[name] = views[name].view(step.arrays[name].shape)
        attention = AttentionBatch(views["block_tables"], views["context_lens"], views["query_starts"],
                                   step.context_lens, step.query_starts)
        batch = StepBatch(input_ids=views["input_ids"], positions=views["positions"],
                          cache_slots=views["cache_slots"], attention=attention, sliding_window=sliding_window,
                          logits_index=views["logits_index"])
        lora = step.lora.on_device(views["token_slots"], views["segment_starts"], views["segment_slots"],
                                   views["tiles"], views["by_slot"])
        return batch, lora


def build_step(
    plan: list[ScheduledChunk], block_size: int, sliding_window: int | None, device,
    buffers: StepBuffers | None = None,
) -> tuple[StepBatch, LoRABatch, list[ScheduledChunk]]:
    """The step's tensors, its LoRA metadata, and the chunks that get a sampled token (in logits order), through
    `buffers` (the runner's persistent ones; default: buffers of this step's own)."""
    host = host_step(plan, block_size)
    step, lora = (buffers or StepBuffers(device, capacity=1)).load(host, sliding_window)
    return step, lora, host.sampled
