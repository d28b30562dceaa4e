"""The model runner: the one place that touches device memory.

It owns the model's device state: the weights, the paged KV cache, the adapter pages of every `LoRALinear`
and the page table that points slots at them, the step's input tensors, the forward pass and sampling.
Everything else decides: the scheduler picks the step (`ScheduledChunk`s), the adapter pool
(`server/adapter_pool.py`) picks slots and pages and queues each decision as a `PoolWrite`; the engine hands
those to `apply` and the plan to `execute`.

On CUDA every adapter write (pages and page-table rows, loads and clears alike) goes on one side stream, so a
clear and the load that reuses its slot or pages can never land out of order. Weights come packed and pinned
from the host tier (`server/adapter_packer.py`: packing is the loader threads' work, a load here only issues
copies), so a copy issued while a step runs (`execute`'s `overlap`) overlaps that step. Before a slot is
cleared, the side stream waits for an event recorded on the compute stream after the last step that read the
slot (`mark_read`); the first step that reads a loaded slot waits for an event recorded after its load, and
no step waits for copies it does not read.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from kernels import PageTable
from kernels.layer_adapters import StackGroup
from kernels.paging import PAGE_RANK, ZERO_PAGE, PageRows, pages_for_rank
from kernels.reference import accumulation_dtype
from server.adapter_packer import PackedAdapter
from server.adapter_pool import ClearSlot, LoadAdapter, PoolWrite, written_rank
from server.lora_linear import LoRALinear
from server.model import KVCache, ModelArgs, Transformer
from server.requests import TokenLogprob
from server.sampling import sample
from server.scheduler import ScheduledChunk
from server.step_builder import HostStep, StepBuffers, fixed_layout_size, host_step

log = logging.getLogger("lorahive.runner")

# Decode batch sizes captured as CUDA graphs (vLLM's ladder): 1, 2, 4, 8, then steps of 8, up to the
# engine's max_num_seqs, capped. A decode step of B sequences replays the smallest captured size >= B.
MAX_GRAPH_BATCH = 256


def _stack_groups(layers: list[LoRALinear], stack_bytes: int | None, dtype: torch.dtype) -> list[StackGroup]:
    """The layers grouped by shape, each group reading batches of many adapters from one kept stack
    (`kernels.layer_adapters.StackGroup`), with its share of `stack_bytes` in elements of the stacks' dtype: by the
    size of an adapter's rank in its layers, so that every group has room for as many adapters of one rank. Each
    layer forgets what it held (`LoRALinear.drop_adapters`) and joins its group."""
    by_shape: dict[tuple[int, tuple[int, ...]], list[LoRALinear]] = {}
    for layer in layers:
        by_shape.setdefault((layer.d_in, layer.slice_widths), []).append(layer)
    elements = None if stack_bytes is None else stack_bytes // accumulation_dtype(dtype).itemsize
    all_rows = sum(layer.rank_row_elements for layer in layers)
    groups = []
    for members in by_shape.values():
        rows = sum(layer.rank_row_elements for layer in members)
        groups.append(StackGroup(None if elements is None else elements * rows // all_rows))
        for layer in members:
            layer.drop_adapters(groups[-1])  # a runner before this one may have left some
    return groups


def decode_graph_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The padded decode sizes for `max_num_seqs`: 1, 2, 4, 8, 16, 24, ... (the last one max_num_seqs, capped)."""
    largest = min(max_num_seqs, MAX_GRAPH_BATCH)
    ladder = [size for size in (1, 2, 4, *range(8, MAX_GRAPH_BATCH + 1, 8)) if size < largest]
    return (*ladder, largest)


def holds_adapters_in_pages(model: Transformer) -> bool:
    """Whether the runner writes adapters into pages: on a GPU, and wherever the Triton kernels run. On a CPU the
    torch kernels read the host tier's packed weights where they are: device memory is host memory there, and a
    copy would only double it."""
    return model.output.weight.device.type != "cpu" or model.lora.backend != "torch"


def soft_prompt_rows_per_page(args: ModelArgs) -> int:
    """Soft-prompt embeddings one adapter page holds: the rows of its A pages that are as wide as the model's
    embeddings, those of q|k|v (3 x PAGE_RANK) and gate|up (2 x PAGE_RANK) in every layer. A prompt-tuning adapter
    takes pages as any adapter does, and the runner writes its embeddings there (`ModelRunner.load_adapter`)."""
    return args.n_layers * 5 * PAGE_RANK


def adapter_page_bytes(model: Transformer) -> int:
    """Device bytes of one adapter page across every LoRA layer of `model` (the pool's unit of memory); pages
    are in the model's dtype (that of its output head, which no quantization touches)."""
    dtype = model.output.weight.dtype
    return sum(module.page_bytes(dtype) for module in model.lora_layers())


@dataclass(frozen=True)
class StepOutput:
    """What one step produced: a token (and its logprob where asked for) per chunk that completes a sequence."""

    chunks: list[ScheduledChunk]  # the chunks that got a token, in `tokens` order
    tokens: list[int]
    logprobs: list[TokenLogprob | None]
    stack_bytes: int = 0  # what the kept stacks of the LoRA layers take after it (a CPU runner's; 0 with pages)


class ModelRunner:
    def __init__(
        self, model: Transformer, num_kv_blocks: int, block_size: int, num_slots: int, max_rank: int, num_pages: int,
        paged: bool | None = None,
    ):
        """`num_kv_blocks` KV-cache blocks of `block_size` tokens; `num_slots` adapter slots of up to `max_rank`
        over `num_pages` adapter pages (the adapter pool's sizes). `paged`: whether adapters go into pages (None:
        `holds_adapters_in_pages`; without pages the runner needs the torch kernels)."""
        self.model = model
        self.block_size = block_size
        weight = model.output.weight
        self.device, self.dtype = weight.device, weight.dtype
        args = model.args
        # One block past the allocator's: the padding rows of a padded decode step write and read only there.
        self.cache = KVCache(
            args.n_layers, num_kv_blocks + 1, block_size, args.n_kv_heads, args.head_dim, self.dtype, self.device
        )
        self._scratch_block = num_kv_blocks
        self._layers: list[tuple[int, LoRALinear]] = [
            (i, module) for i, block in enumerate(model.layers) for module in block.modules()
            if isinstance(module, LoRALinear)
        ]
        self.paged = holds_adapters_in_pages(model) if paged is None else paged
        # Where soft prompts go in pages: the A buffers as wide as the embeddings (`soft_prompt_rows_per_page`).
        self._prompt_blocks = [module for _, module in self._layers if module.slice_names[0] in ("q_proj", "gate_proj")]
        # Per slot holding a prompt-tuning adapter, its soft prompt: views of its pages, or of the host tier's buffer.
        self._prompts: dict[int, list[torch.Tensor]] = {}
        self._stack_groups = _stack_groups([module for _, module in self._layers], model.lora.stack_bytes, self.dtype)
        for _, module in self._layers:
            if self.paged:
                module.allocate_pages(1 + num_pages, self.dtype, self.device)  # + the zero page
        self.table = PageTable.empty(num_slots, max_rank, self.device)
        model.lora.table = self.table
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Per slot, an event on the compute stream after the last step that read the slot (CUDA only).
        self._last_use: list[torch.cuda.Event | None] = [None] * num_slots
        self._inputs = StepBuffers(self.device)
        # Padded decode steps (`prepare_decode_graphs`): the sizes, their fixed-address inputs, their graphs.
        self._decode_sizes: tuple[int, ...] = ()
        self._static_inputs: StepBuffers | None = None
        self._table_width = 0
        self._decode_splits: dict[int, int] = {}
        # Graphs by (size, whether they apply DoRA's and IA3's vectors: `kernels.scales`).
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Per slot, an event on the side stream after its latest load's copies, until a step has waited for it.
        self._loaded: dict[int, torch.cuda.Event] = {}

    def liveness_problems(self) -> list[str]:
        return []  # in the engine's process: alive as long as the process is

    def close(self) -> None:
        """Nothing to let go of: the device memory goes with the model."""

    @property
    def copies_overlap_compute(self) -> bool:
        """Whether adapter weights go up on a side stream, so deciding loads while a step runs is worth doing."""
        return self._copy_stream is not None

    # ---- adapter pages -----------------------------------------------------------------------------

    def apply(self, write: PoolWrite) -> None:
        """Carry out one decision of the adapter pool; apply them in the order the pool queued them."""
        if isinstance(write, LoadAdapter):
            self.load_adapter(write.slot, write.pages, write.adapter)
        elif isinstance(write, ClearSlot):
            self.clear_slot(write.slot)
        else:
            raise TypeError(f"not a pool write: {write!r}")

    def load_adapter(self, slot: int, pages: Collection[int], adapter: PackedAdapter) -> None:
        """Copy `adapter` into `pages` of every LoRA layer, then point `slot`'s page-table row at them; without
        pages (`paged` False), hand every layer its weights as they are.

        `slot` and `pages` must be free (cleared). The adapter was packed off this thread (`AdapterPacker`), so
        this only issues copies. On CUDA the step that first reads `slot` waits for them (`_await_loads`), no
        other step does. Should a layer refuse the weights, the row stays empty, so the slot reads as no adapter
        rather than half of one."""
        if adapter.dtype != self.dtype:
            raise ValueError(f"adapter {adapter.adapter_id!r} was packed in {adapter.dtype}, not {self.dtype}")
        with self._copying():
            rank = written_rank(adapter)
            # Its rank pages, then (DoRA, IA3) its vector page, then (prompt tuning) its soft prompt's pages.
            rank_pages, rest = list(pages)[: pages_for_rank(rank)], list(pages)[pages_for_rank(rank) :]
            vector_page = rest.pop(0) if self.paged and adapter.has_vectors else None
            if adapter.prompt is not None:
                self._prompts[slot] = self._write_prompt(rest, adapter.prompt) if self.paged else [adapter.prompt]
            rows = PageRows(rank_pages, self.device)
            for layer_index, module in self._layers:
                slices = [adapter.weights.get((layer_index, name)) for name in module.slice_names]
                scales = [adapter.scales.get((layer_index, name)) for name in module.slice_names]
                if self.paged:
                    module.write_pages(slot, rows, slices, scales, vector_page)
                else:
                    module.hold(slot, slices, scales)
            self.table.assign(slot, rank, rank_pages, vector_page or ZERO_PAGE, adapter.has_vectors)
            if self._copy_stream is not None:
                self._loaded[slot] = self._copy_stream.record_event()

    def _write_prompt(self, pages: list[int], prompt: torch.Tensor) -> list[torch.Tensor]:
        """Copy a soft prompt into `pages`' embedding-wide A rows, in order; the views that hold it."""
        views: list[torch.Tensor] = []
        done = 0
        for page in pages:
            for module in self._prompt_blocks:
                if done == len(prompt):
                    return views
                block = module.lora_a[page][: len(prompt) - done]
                block.copy_(prompt[done : done + block.shape[0]], non_blocking=True)
                views.append(block)
                done += block.shape[0]
        if done < len(prompt):
            raise ValueError(f"a soft prompt of {len(prompt)} embeddings does not fit {len(pages)} pages")
        return views

    def _soft_prompt_rows(self, virtual: tuple[tuple[int, int, int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the step, their embeddings) for a step's soft-prompt positions (`HostStep.virtual`)."""
        rows = torch.cat([torch.arange(start, start + count) for start, _, _, count in virtual])
        embeddings = torch.cat([torch.cat(self._prompts[slot])[first : first + count]
                                for _, slot, first, count in virtual])
        return rows.to(self.device, non_blocking=True), embeddings

    def clear_slot(self, slot: int) -> None:
        """Point `slot`'s row at the zero page once the last step that read it has run; its pages are free after."""
        with self._copying():
            last_use = self._last_use[slot]
            if last_use is not None:  # nothing may overwrite the slot's row or pages before its last reader ran
                self._copy_stream.wait_event(last_use)
                self._last_use[slot] = None
            for _, module in self._layers:
                module.forget(slot)
            self._prompts.pop(slot, None)
            self.table.clear(slot)

    def mark_read(self, slots: Collection[int]) -> None:
        """Record that the compute work queued so far reads `slots`: a later clear of one waits for it."""
        if self._copy_stream is None or not slots:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        for slot in slots:
            self._last_use[slot] = event

    @contextmanager
    def _copying(self) -> Iterator[None]:
        """Device writes on the side stream (CUDA), in the order they are issued.

        They wait for no queued compute except a freed slot's last reader (`clear_slot` waits on that event): a
        step in flight pins every adapter it reads, so what a load overwrites is either free or was freed by a
        `clear_slot` earlier on this same stream. The compute stream waits only where it reads what they wrote:
        the first step that reads a loaded slot waits for that load's event (`_await_loads`); a clear is read by
        no step (a cleared slot is unpinned, and reloaded before a step reads it again)."""
        if self._copy_stream is None:
            yield
            return
        with torch.cuda.stream(self._copy_stream):
            yield

    def _await_loads(self, plan: list[ScheduledChunk]) -> None:
        """Have the compute stream wait for the copies of each adapter `plan` reads that no step waited for yet,
        and for no other copy: a prefetch still copying delays only the step that needs it."""
        if not self._loaded:
            return
        compute = torch.cuda.current_stream(self.device)
        for slot in {chunk.seq.slot for chunk in plan}:
            event = self._loaded.pop(slot, None)
            if event is not None:
                compute.wait_event(event)

    # ---- steps -------------------------------------------------------------------------------------

    def execute(self, plan: list[ScheduledChunk], overlap: Callable[[], None] | None = None) -> StepOutput:
        """One forward pass over `plan` and a token for each chunk that completes its sequence.

        `overlap` runs once the forward is queued on the device and before sampling waits for it: host work
        (deciding and copying the next adapters) that then costs the step nothing. Changes no sequence: the
        caller advances `num_computed` and appends the tokens, so a failed step can be retried as it was.

        The inputs go up in one copy and the forward reads nothing back; sampling's read of the tokens is the
        step's one wait for the device. A decode step that fits a prepared size runs padded to it, through the
        fixed-address inputs: replaying its CUDA graph where one was captured, eagerly otherwise."""
        size = self._padded_size(plan)
        self._await_loads(plan)
        try:
            if size is None:
                host = host_step(plan, self.block_size)
                logits = self._forward(self._inputs, host)
            else:
                host = host_step(plan, self.block_size, size, self._table_width, self._scratch_block)
                scaled = any(self.table.has_vectors[chunk.seq.slot] for chunk in plan if chunk.seq.slot >= 0)
                logits = self._forward_padded(host, size, scaled)[: len(plan)]
            if overlap is not None:
                overlap()
            tokens, logprobs = sample(logits, [chunk.seq.sampler for chunk in host.sampled])
        finally:
            self.mark_read({chunk.seq.slot for chunk in plan if chunk.seq.slot >= 0})
        stack_bytes = 0 if self.paged else sum(group.nbytes for group in self._stack_groups)
        return StepOutput(host.sampled, tokens, logprobs, stack_bytes)

    def _forward(self, inputs: StepBuffers, host: HostStep, splits: int | None = None) -> torch.Tensor:
        step, lora_batch = inputs.load(host, self.model.args.sliding_window)
        step.attention.decode_splits = splits
        if host.virtual:
            step.input_embeddings = self._soft_prompt_rows(host.virtual)
        self.model.lora.batch = lora_batch
        try:
            return self.model(step, self.cache)
        finally:
            self.model.lora.batch = None

    def _padded_size(self, plan: list[ScheduledChunk]) -> int | None:
        """The prepared size a decode step of `plan` pads to; None for a step that runs as it is."""
        if not self._decode_sizes or not plan or len(plan) > self._decode_sizes[-1]:
            return None
        if not all(chunk.num_tokens == 1 and chunk.completes_sequence for chunk in plan):
            return None
        return self._decode_sizes[bisect.bisect_left(self._decode_sizes, len(plan))]

    def _forward_padded(self, host: HostStep, size: int, scaled: bool) -> torch.Tensor:
        """Logits of every row of a padded decode step: its graph replayed (the one with the vectors' ops where an
        adapter of the step has vectors), or the same inputs run eagerly."""
        assert self._static_inputs is not None
        captured = self._graphs.get((size, scaled))
        if captured is None:
            return self._forward(self._static_inputs, host, self._decode_splits.get(size))
        graph, logits = captured
        self._static_inputs.load(host, self.model.args.sliding_window)  # into the addresses the graph reads
        graph.replay()
        return logits

    # ---- decode graphs -----------------------------------------------------------------------------

    @property
    def can_capture_graphs(self) -> bool:
        """CUDA graphs need CUDA and kernels that size their launches from shapes alone (Triton's): the torch
        references loop over the step's host metadata, which a replay would not see change."""
        backends = (self.model.lora.backend, self.model.attention_context.backend)
        return self.device.type == "cuda" and all(backend == "triton" for backend in backends)

    def prepare_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> tuple[int, ...]:
        """Run decode steps of up to `max_num_seqs` sequences padded to `decode_graph_sizes`, through inputs of fixed
        address, and capture each size as a CUDA graph where `can_capture_graphs` (elsewhere they run eagerly, the
        same way). Call once the KV cache is allocated, before serving. Returns the captured sizes."""
        self._decode_sizes = decode_graph_sizes(max_num_seqs)
        self._table_width = -(-max_model_len // self.block_size)
        self._static_inputs = StepBuffers(
            self.device, fixed_layout_size(self._decode_sizes[-1], self._table_width), growable=False
        )
        if not self.can_capture_graphs:
            return ()
        from kernels.dispatch import attention_ops

        # The split count must not follow the longest context, which changes between replays: fix it for the
        # longest context the server allows.
        self._decode_splits = {
            size: attention_ops().default_splits(size, self.model.args.n_kv_heads, max_model_len, self.device)
            for size in self._decode_sizes
        }
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self._decode_sizes):  # largest first: the smaller graphs reuse its pool's memory
            for scaled in (False, True):
                self._graphs[size, scaled] = self._capture(size, scaled, pool)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs of decode steps of %s sequences; their memory pool holds %.1f MiB",
                 ", ".join(map(str, self._decode_sizes)), (torch.cuda.memory_reserved(self.device) - before) / 2**20)
        return self._decode_sizes

    def _capture(self, size: int, scaled: bool, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """One padded decode step of `size` rows, every row padding, captured as a graph over the static inputs;
        `scaled`: with the ops that apply DoRA's and IA3's vectors."""
        assert self._static_inputs is not None
        host = host_step([], self.block_size, size, self._table_width, self._scratch_block)
        step, lora_batch = self._static_inputs.load(host, self.model.args.sliding_window)
        step.attention.decode_splits = self._decode_splits[size]
        # The graph must hold the LoRA launches whatever adapters a replay brings: its tiles say which rows work.
        slots = tuple(range(len(self._last_use)))
        self.model.lora.batch = replace(lora_batch, active_slots=slots, weighted_slots=slots,
                                        scaled_slots=slots if scaled else ())
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compiles the kernels and fills their caches outside the capture
                self.model(step, self.cache)
            torch.cuda.current_stream(self.device).wait_stream(side)
            # What the warm-up derived once for the step (each token's vector page, `kernels.scales`) is derived
            # again inside the graph, so that a replay derives it from the inputs it is given.
            self.model.lora.batch.cache.clear()
            graph = torch.cuda.CUDAGraph()
            # thread_local: adapter loader threads pinning host memory meanwhile do not invalidate the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                logits = self.model(step, self.cache)
        finally:
            self.model.lora.batch = None
        return graph, logits
