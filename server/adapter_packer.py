"""Packing an adapter for the device tier, done by the threads that read it, never by the engine thread.

A parsed and checked `LoraAdapter` holds each module's A [r, d_in] and B [d_out, r] in fp32 with its LoRA scale
apart. The adapter pages (`kernels.paging`) hold, per rank row, A's row and B's column with the scale folded in, in
the serving dtype. `AdapterPacker.pack` makes that form on the loader thread (and on the upload thread for an
upload): per (layer, module), A's rank rows and B transposed with the scale folded in (in fp32, then one cast), and
DoRA's magnitude or IA3's vector where the adapter has them, contiguous, all in one buffer (per layer every A, then
every B^T, then the magnitudes; IA3's vectors or a soft prompt's embeddings last): pinned on CUDA so the runner's
host-to-device copies are asynchronous, in shared memory for a model runner in another process. The host tier holds
this `PackedAdapter`, so a load on the engine thread only issues copies (`ModelRunner.load_adapter`); a CPU model
runner copies nothing and reads it where it is (`LoRALinear.hold`).

Why per module and only the adapter's own rank rows rather than whole pages (`kernels.paging.pack_pages`): whole
pages pad every rank up to a multiple of 16 and hold zeros for every module the adapter does not target, and the
host tier would hold (and count) those zeros: a rank-8 adapter of q_proj and v_proj takes 10.6x its weights' bytes
as whole pages on SmolLM2-135M. This form takes exactly the weights' bytes in the serving dtype (half of them in
bf16); the device write zeroes the rest of the pages.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from adapters_store import TARGET_MODULES, LoraAdapter


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """One module's rank rows as the adapter pages hold them."""

    a: torch.Tensor  # [r, d_in]: A
    b_t: torch.Tensor  # [r, d_out]: B transposed, the LoRA scale folded in
    magnitude: torch.Tensor | None = None  # [d_out]: DoRA's magnitude (the model runner divides it by a norm)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.a, self.b_t) if self.magnitude is None else (self.a, self.b_t, self.magnitude)


@dataclass(frozen=True, eq=False)
class PackedScale:
    """IA3's vector of one module: it multiplies the module's outputs, or its inputs (`on_input`)."""

    vector: torch.Tensor  # [d_out] or [d_in]
    on_input: bool


@dataclass(frozen=True, eq=False)
class PackedAdapter:
    """An adapter ready to copy into device pages; what the host tier holds."""

    adapter_id: str
    rank: int  # max rank over its modules, as declared (0 for IA3)
    dtype: torch.dtype  # the serving dtype it was packed in
    weights: Mapping[tuple[int, str], PackedWeight]  # (layer index, module name) -> rows
    # The one flat buffer every tensor views: per layer the A of each module in `weights`' order, then their B^T,
    # then DoRA magnitudes and IA3 vectors (None: apart). One buffer is one pinning, or one shared-memory file for
    # a model runner in another process.
    buffer: torch.Tensor | None = None
    kind: str = "lora"  # adapters_store.ADAPTER_KINDS
    scales: Mapping[tuple[int, str], PackedScale] = field(default_factory=dict)  # IA3: (layer, module) -> vector
    prompt: torch.Tensor | None = None  # prompt tuning: [num_virtual_tokens, hidden], the soft prompt

    @property
    def num_bytes(self) -> int:
        return (sum(t.nbytes for w in self.weights.values() for t in w.tensors())
                + sum(s.vector.nbytes for s in self.scales.values())
                + (0 if self.prompt is None else self.prompt.nbytes))

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    @property
    def has_vectors(self) -> bool:
        """Whether it scales outputs or inputs (DoRA, IA3): the device tier then gives it one more page."""
        return self.kind in ("dora", "ia3")


class AdapterPacker:
    """Packs adapters in the serving dtype into one buffer each: pinned in host memory when the device is a GPU
    in this process (the runner's host -> device copies then run asynchronously on the side stream), in shared
    memory when the model runner is another process (it then receives the buffer without a copy)."""

    def __init__(self, dtype: torch.dtype, pin_memory: bool = False, share_memory: bool = False) -> None:
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.share_memory = share_memory

    def pack(self, adapter: LoraAdapter) -> PackedAdapter:
        def module_order(key: tuple[int, str]) -> tuple[int, int]:
            return key[0], TARGET_MODULES.index(key[1])

        keys = sorted(adapter.weights, key=module_order)
        scale_keys = sorted(adapter.scales, key=module_order)
        # Per layer, every module's A, then every module's B^T, in module order, then the vectors: the A rows of the
        # modules one fused layer (q|k|v, gate|up) holds are then one block, which a CPU model runner reads as it is.
        tensors: dict[tuple[int, str], list[torch.Tensor]] = {
            key: [w.a, (w.b * w.scale).T, *(() if w.magnitude is None else (w.magnitude,))]
            for key, w in adapter.weights.items()
        }
        order: list[tuple[list[torch.Tensor], int]] = []  # (a module's tensors, which of them), in buffer order
        for _, group in itertools.groupby(keys, key=lambda key: key[0]):
            layer = [tensors[key] for key in group]
            order += [(parts, part) for part in range(3) for parts in layer if part < len(parts)]
        vectors = {key: [adapter.scales[key].vector] for key in scale_keys}
        order += [(vectors[key], 0) for key in scale_keys]
        prompt = [] if adapter.prompt_embeddings is None else [adapter.prompt_embeddings]
        order += [(prompt, 0)] if prompt else []
        buffer = torch.empty(sum(parts[part].numel() for parts, part in order), dtype=self.dtype,
                             pin_memory=self.pin_memory)
        if self.share_memory:
            buffer.share_memory_()
        offset = 0
        for parts, part in order:
            tensor = parts[part]
            view = buffer[offset : offset + tensor.numel()].view(tensor.shape)
            view.copy_(tensor)  # one cast, from the fp32 product
            parts[part] = view
            offset += tensor.numel()
        weights = {key: PackedWeight(*tensors[key]) for key in keys}
        scales = {key: PackedScale(vectors[key][0], adapter.scales[key].on_input) for key in scale_keys}
        return PackedAdapter(adapter.adapter_id, adapter.rank, self.dtype, weights, buffer, adapter.kind, scales,
                             prompt[0] if prompt else None)
