"""The model runner in a process of its own (`--model-runner-process`), so the torch work of a step never waits
for the server's GIL.

Why: every torch op releases and retakes the GIL, and a forward pass is thousands of ops. In the server's process
they queue behind the event loop's Python (HTTP, JSON, server-sent events) whenever it runs:
`benchmarks/engine_thread.py` (c) measures pure-Python work taking 30% of a core beside the engine slowing its
decode steps 1.4-1.5x from a thread of the engine's process and not at all from another process.

The split is vLLM's executor/worker one. The worker process builds the model, sizes the KV cache and owns
everything on the device; `ModelRunner` runs on its main thread. The engine (scheduler, adapter pool and tiers,
detokenizing, metrics) stays in the server's process and talks to the worker through `ProcessRunner`, which has
`ModelRunner`'s interface. Per step it sends only what changed (vLLM V1's scheduler output): for each chunk the
sequence's new tokens, its KV blocks, slot and computed count, and a sequence's sampling parameters and seed the
first time; the worker mirrors each sequence (`_MirroredSequence`) and answers with the sampled tokens. Adapter
weights go over once per load, in shared memory. Every message is a request the worker answers, in order, on one
pipe: the engine thread is the only caller.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import multiprocessing
import signal
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401 - registers the reductions that send CPU tensors through shared memory

from server.adapter_packer import PackedAdapter, PackedScale, PackedWeight
from server.adapter_pool import ClearSlot, LoadAdapter, PoolWrite
from server.config import Settings, StartupError
from server.model import ModelArgs
from server.model_runner import ModelRunner, StepOutput
from server.requests import SamplingParams, TokenLogprob
from server.sampling import SamplerState
from server.scheduler import ScheduledChunk, Sequence

log = logging.getLogger("lorahive.runner")
START_TIMEOUT_S = 600.0  # loading a large checkpoint and profiling its memory takes minutes, not more


@dataclass(frozen=True)
class RunnerInfo:
    """What the worker tells the engine once the model is loaded and the KV cache sized."""

    args: ModelArgs
    page_bytes: int  # one adapter page across every LoRA layer (`adapter_page_bytes`)
    paged: bool  # whether the runner holds adapters in pages (`holds_adapters_in_pages`)
    adapter_bytes: int  # the adapter tier's memory, as start-up sized it
    num_kv_blocks: int
    device: str
    dtype: torch.dtype
    description: str  # "serving ... on ..." for the log


@dataclass(frozen=True)
class ChunkInput:
    """One chunk of a step as the worker needs it: the sequence's tokens from `offset` on (those the worker may not
    have; every token the engine sends is kept for good, so sending some twice is harmless)."""

    seq_id: int
    num_tokens: int
    num_computed: int
    slot: int
    blocks: tuple[int, ...]
    offset: int
    new_tokens: tuple[int, ...]
    # The first time the worker sees the sequence: its prompt length, sampling parameters, generator state and
    # soft-prompt length.
    start: tuple[int, SamplingParams, torch.Tensor, int] | None = None


@dataclass(frozen=True)
class StepRequest:
    chunks: list[ChunkInput]
    finished: list[int]  # sequences the worker may forget


@dataclass
class _MirroredSequence:
    """The worker's copy of what `ModelRunner` reads of a `Sequence`."""

    token_ids: list[int]
    sampler: SamplerState
    num_prompt_tokens: int
    slot: int = -1
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    num_virtual_tokens: int = 0

    def extend(self, offset: int, tokens: tuple[int, ...]) -> None:
        """The sequence's tokens from `offset` on are `tokens`; its sampler's outputs follow."""
        del self.token_ids[offset:]
        self.token_ids.extend(tokens)
        outputs = self.sampler.output_ids
        kept = max(offset - self.num_prompt_tokens, 0)
        del outputs[kept:]
        outputs.extend(self.token_ids[self.num_prompt_tokens + kept :])


class RunnerProcessError(RuntimeError):
    """The worker failed a request (its message carries the worker's error), or the worker is gone."""


# ---- the engine's side ---------------------------------------------------------------------------------------


class ProcessRunner:
    """`ModelRunner`'s interface over a worker process; `start` spawns it and waits until the model is served."""

    copies_overlap_compute = False  # each call waits for the worker's answer: nothing to overlap with a step

    def __init__(self, process: multiprocessing.process.BaseProcess, connection: Any, info: RunnerInfo):
        self._process = process
        self._connection = connection
        self.info = info
        self.device = torch.device(info.device)
        self.can_capture_graphs = False  # the worker's model runner's answer, once `attach` built it
        self._sent: dict[int, int] = {}  # seq_id -> tokens of it the worker has; its keys: what the worker mirrors
        # The engine's sequences behind them, weakly: once one finished (or is gone) the worker may forget it; a
        # finished request's sequences must not stay alive here until the next step.
        self._sequences: weakref.WeakValueDictionary[int, Sequence] = weakref.WeakValueDictionary()

    @classmethod
    def start(cls, settings: Settings) -> ProcessRunner:
        """Spawn the worker, which loads the model and sizes the KV cache; StartupError if it cannot."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of the server's threads
        ours, theirs = context.Pipe()
        process = context.Process(target=_worker_main, args=(settings, theirs), name="lorahive-runner", daemon=True)
        process.start()
        theirs.close()
        if not ours.poll(START_TIMEOUT_S):
            process.kill()
            raise StartupError(f"the model runner process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = ours.recv()
        except EOFError:
            process.join(5)
            raise StartupError(f"the model runner process exited while starting (exit code {process.exitcode}); "
                               "its log says why") from None
        if kind == "startup_error":
            process.join(5)
            raise StartupError(payload)
        if kind != "ok":
            process.join(5)
            raise RuntimeError(f"the model runner process failed to start: {payload}")
        runner = cls(process, ours, payload)
        # Before multiprocessing's own exit hook (registered earlier, so it runs later), which would terminate the
        # worker with the SIGTERM it ignores and wait for it forever, should nobody have shut the engine down.
        atexit.register(runner.close)
        return runner

    def attach(self, num_kv_blocks: int, block_size: int, num_slots: int, max_rank: int,
               num_pages: int) -> ProcessRunner:
        """Build the worker's `ModelRunner` with the engine's pool sizes (a `RunnerFactory`)."""
        self.can_capture_graphs = self._call("attach", (num_kv_blocks, block_size, num_slots, max_rank, num_pages))
        return self

    def prepare_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> tuple[int, ...]:
        return self._call("graphs", (max_num_seqs, max_model_len))

    def execute(self, plan: list[ScheduledChunk], overlap: Callable[[], None] | None = None) -> StepOutput:
        finished = [seq_id for seq_id in self._sent if getattr(self._sequences.get(seq_id), "finished", True)]
        for seq_id in finished:
            self._sequences.pop(seq_id, None)
            del self._sent[seq_id]
        chunks = [self._chunk_input(chunk) for chunk in plan]
        for chunk in plan:  # the worker mirrors them from now on, even should this step fail
            self._sequences[chunk.seq.seq_id] = chunk.seq
            self._sent.setdefault(chunk.seq.seq_id, 0)
        positions, tokens, logprobs, stack_bytes = self._call("step", StepRequest(chunks, finished))
        for chunk in plan:
            self._sent[chunk.seq.seq_id] = len(chunk.seq.token_ids)
        if overlap is not None:
            overlap()
        return StepOutput([plan[i] for i in positions], tokens, logprobs, stack_bytes)

    def _chunk_input(self, chunk: ScheduledChunk) -> ChunkInput:
        seq = chunk.seq
        sent = self._sent.get(seq.seq_id, 0)
        start = None
        if not sent:  # the worker may not have it yet (or only from a step that failed): all of it, from the start
            start = (seq.num_prompt_tokens, seq.sampler.params, seq.sampler.generator.get_state(),
                     seq.num_virtual_tokens)
        return ChunkInput(seq.seq_id, chunk.num_tokens, seq.num_computed, seq.slot, tuple(seq.blocks), sent,
                          tuple(seq.token_ids[sent:]), start)

    def apply(self, write: PoolWrite) -> None:
        if isinstance(write, LoadAdapter):
            self._call("load", (write.slot, write.pages, _flattened(write.adapter)))
        elif isinstance(write, ClearSlot):
            self._call("clear", write.slot)
        else:
            raise TypeError(f"not a pool write: {write!r}")

    def liveness_problems(self) -> list[str]:
        if not self._process.is_alive():
            return [f"the model runner process exited (exit code {self._process.exitcode})"]
        return []

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit, and kill it if it has not within `timeout`. Idempotent."""
        if self._connection.closed:
            return
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # it died meanwhile
                self._connection.send(("close", None))
            self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._connection.close()

    def _call(self, kind: str, payload: object) -> Any:
        try:
            self._connection.send((kind, payload))
            status, answer = self._connection.recv()
        except (EOFError, OSError) as exc:
            raise RunnerProcessError(f"the model runner process is gone (exit code {self._process.exitcode})") from exc
        if status != "ok":
            raise RunnerProcessError(answer)
        return answer


@dataclass(frozen=True)
class FlatAdapter:
    """A `PackedAdapter` as one buffer and its layout, which torch's pickling sends through one shared-memory file
    (a tensor each would take a file descriptor each: two per module and layer, past common limits for a large
    model)."""

    adapter_id: str
    rank: int
    kind: str
    buffer: torch.Tensor
    # (key, the offset and shape of each of its tensors: A, B^T and DoRA's magnitude if any), offsets in elements
    # of `buffer`
    layout: list[tuple[tuple[int, str], list[tuple[int, tuple[int, ...]]]]]
    # (key, whether it scales the inputs, the vector's offset and length): IA3's vectors
    scale_layout: list[tuple[tuple[int, str], bool, int, int]]
    prompt_layout: tuple[int, tuple[int, ...]] | None  # a soft prompt's offset and shape

    def unpacked(self) -> PackedAdapter:
        """The adapter over this buffer, each tensor where the packer put it (`server/adapter_packer.py`)."""
        def view(offset: int, shape: tuple[int, ...]) -> torch.Tensor:
            return self.buffer[offset : offset + math.prod(shape)].view(shape)

        weights = {key: PackedWeight(*(view(at, shape) for at, shape in parts)) for key, parts in self.layout}
        scales = {key: PackedScale(view(at, (size,)), on_input) for key, on_input, at, size in self.scale_layout}
        prompt = None if self.prompt_layout is None else view(*self.prompt_layout)
        return PackedAdapter(self.adapter_id, self.rank, self.buffer.dtype, weights, self.buffer, self.kind, scales,
                             prompt)


def _flattened(adapter: PackedAdapter) -> FlatAdapter:
    """The adapter's own buffer where the packer made one (in shared memory: no copy), else its tensors joined."""
    parts = [t for w in adapter.weights.values() for t in w.tensors()] + [s.vector for s in adapter.scales.values()]
    parts += [] if adapter.prompt is None else [adapter.prompt]
    buffer = adapter.buffer
    if buffer is None:
        buffer = torch.cat([t.flatten() for t in parts]) if parts else torch.empty(0, dtype=adapter.dtype)
        starts = iter(itertools.accumulate((t.numel() for t in parts), initial=0))
    else:
        starts = iter([t.storage_offset() - buffer.storage_offset() for t in parts])
    layout = [(key, [(next(starts), tuple(t.shape)) for t in w.tensors()]) for key, w in adapter.weights.items()]
    scale_layout = [(key, s.on_input, next(starts), s.vector.numel()) for key, s in adapter.scales.items()]
    prompt_layout = None if adapter.prompt is None else (next(starts), tuple(adapter.prompt.shape))
    return FlatAdapter(adapter.adapter_id, adapter.rank, adapter.kind, buffer, layout, scale_layout, prompt_layout)


# ---- the worker's side ---------------------------------------------------------------------------------------


def _worker_main(settings: Settings, connection: Any) -> None:
    """The worker process: build the model, answer the engine's requests until it closes the pipe."""
    from server.runtime import load_runner_model
    from server.torch_threads import engine_threads

    # Signals are the server's to handle: a drain after SIGTERM still needs this process, and a Ctrl-C reaches the
    # whole process group. The worker ends when the server closes the pipe, or dies with it (EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[runner]: %(message)s")
    torch.set_num_threads(engine_threads(settings.engine_threads))  # its main thread is the engine's torch thread
    try:
        model, info = load_runner_model(settings)
    except StartupError as exc:
        connection.send(("startup_error", str(exc)))
        return
    except Exception as exc:
        log.exception("the model runner failed to start")
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    connection.send(("ok", info))
    _Worker(model, connection).serve()


class _Worker:
    def __init__(self, model, connection: Any):
        self.model = model
        self.connection = connection
        self.runner = None
        self.sequences: dict[int, _MirroredSequence] = {}
        self.handlers: dict[str, Callable[[Any], Any]] = {
            "attach": self._attach, "graphs": self._graphs, "step": self._step, "load": self._load,
            "clear": self._clear,
        }

    def serve(self) -> None:
        while True:
            try:
                kind, payload = self.connection.recv()
            except EOFError:  # the engine's process is gone
                return
            if kind == "close":
                return
            try:
                answer = ("ok", self.handlers[kind](payload))
            except Exception as exc:
                log.error("model runner: %s failed\n%s", kind, traceback.format_exc())
                answer = ("error", f"{type(exc).__name__}: {exc}")
            try:
                self.connection.send(answer)
            except OSError:  # the engine's process died while this ran
                return

    def _attach(self, sizes: tuple[int, int, int, int, int]) -> bool:
        self.runner = ModelRunner(self.model, *sizes)
        return self.runner.can_capture_graphs

    def _graphs(self, limits: tuple[int, int]) -> tuple[int, ...]:
        return self.runner.prepare_decode_graphs(*limits)

    def _step(self, request: StepRequest) -> tuple[list[int], list[int], list[TokenLogprob | None]]:
        for seq_id in request.finished:
            self.sequences.pop(seq_id, None)
        plan = []
        for chunk in request.chunks:
            seq = self.sequences.get(chunk.seq_id)
            if seq is None:
                num_prompt, params, state, virtual = chunk.start
                seq = _MirroredSequence([], SamplerState(params, torch.Generator().set_state(state)), num_prompt,
                                        num_virtual_tokens=virtual)
                self.sequences[chunk.seq_id] = seq
            seq.extend(chunk.offset, chunk.new_tokens)
            seq.slot, seq.num_computed, seq.blocks = chunk.slot, chunk.num_computed, list(chunk.blocks)
            plan.append(ScheduledChunk(seq, chunk.num_tokens))  # type: ignore[arg-type] - it reads like a Sequence
        output = self.runner.execute(plan)
        position = {id(chunk): i for i, chunk in enumerate(plan)}
        return [position[id(chunk)] for chunk in output.chunks], output.tokens, output.logprobs, output.stack_bytes

    def _load(self, payload: tuple[int, tuple[int, ...], FlatAdapter]) -> None:
        slot, pages, adapter = payload
        self.runner.load_adapter(slot, pages, adapter.unpacked())

    def _clear(self, slot: int) -> None:
        self.runner.clear_slot(slot)
