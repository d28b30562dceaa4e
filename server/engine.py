"""The engine: a thread that steps the model over a continuously changing batch.

The event loop talks to it through `submit` (returns a `RequestStream`) and `RequestStream.abort`; both
only put a message in the engine's inbox. The engine thread drains the inbox between steps, asks the
scheduler for a plan, has the model runner apply the adapter pool's queued writes and run one forward pass
for the whole mixed-adapter batch and sample it, then detokenizes and pushes `ChoiceDelta`s back onto each
request's asyncio queue with `call_soon_threadsafe`.

The engine orchestrates and nothing more: the scheduler, the KV block allocator and the adapter pool only
decide (host bookkeeping); the model runner (`server/model_runner.py`) alone touches device memory. Whoever
wants to know how busy the engine is reads `stats()`, a snapshot, not those parts' internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from server.adapter_pool import AdapterSlotPool, LoadAdapter, PoolWrite
from server.adapter_registry import AdapterRegistry, AdapterVersion
from server.kv_blocks import BlockAllocator
from server.metrics import Metrics
from server.model import ModelArgs
from server.model_runner import StepOutput, soft_prompt_rows_per_page
from server.requests import (
    AdapterBrokenError,
    AdapterChangedError,
    AdapterNotFoundError,
    AdapterStatus,
    ChoiceDelta,
    EngineStepError,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestError,
    SamplingParams,
)
from server.sampling import SamplerState
from server.scheduler import ScheduledChunk, Scheduler, Sequence
from server.tokenizer import IncrementalDetokenizer, Tokenizer
from server.torch_threads import TorchThread, engine_threads, limit_current_thread
from server.waiting_quota import WaitingQuota

log = logging.getLogger("lorahive.engine")
_SEED_MIX = 0x9E3779B97F4A7C15  # odd, so seed -> seed * _SEED_MIX is a bijection mod 2**63
# A waiting request is admitted as soon as a running one finishes, within a step or so; a second is a fair
# guess of when a refused one would get in, and clients back off further on repeated refusals anyway.
QUEUE_FULL_RETRY_AFTER_S = 1
# One loop iteration (inbox, schedule, a forward pass) taking longer than this means the engine is stuck;
# a chunked prefill of a large model on a CPU takes seconds, not a minute.
STALLED_STEP_S = 60.0


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    max_gpu_adapters: int | None  # cap on resident adapters; None: as many as the bytes hold
    max_lora_rank: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_gpu_adapter_bytes: int | None = None  # None: pages for max_gpu_adapters max-rank adapters
    max_waiting_requests: int = 1024  # requests accepted but not yet admitted (server/waiting_quota.py)
    enforce_eager: bool = False  # True: no padded decode steps, no CUDA graphs
    engine_threads: int | None = None  # torch intra-op threads of the engine thread; None: torch's default


@dataclass(frozen=True)
class EngineStats:
    """How busy the engine is, at one moment (`Engine.stats`); counters count since the engine started."""

    running: int  # sequences (request choices) admitted
    waiting: int  # sequences waiting for admission
    kv_blocks_used: int
    kv_blocks_total: int
    adapter_slots: int  # device slots in all
    adapters_resident: int  # adapters in a device slot
    adapters_pinned: int  # slots a scheduled sequence holds
    adapter_bytes_resident: int
    adapter_bytes_capacity: int
    adapter_stack_bytes: int  # a CPU model runner's kept stacks of its batches' adapters, after the last step
    adapter_loads: int  # host -> device, prefetches included
    adapter_prefetches: int
    adapter_evictions: int
    preemptions: int
    steps: int  # forward passes
    block_size: int  # tokens per KV block
    running_adapters: tuple[str, ...]  # adapters of running sequences (each resident on the device), sorted
    waiting_adapters: tuple[str, ...]  # adapters that waiting sequences ask for, sorted
    max_batch_adapters: int  # distinct adapters of --max-lora-rank one batch can mix: sequences and device tier allow


@dataclass(frozen=True)
class AdapterResidency:
    """Where one adapter's served version is held: "gpu" (the device tier: device memory, or on a CPU the host
    buffers it reads in place) or "host" (parsed in host memory, not on the device)."""

    tier: str
    rank: int
    kind: str  # adapters_store.ADAPTER_KINDS
    pinned: bool  # --pin: never evicted from the host tier
    sequences: int  # sequences holding its device slot now; 0: idle


def _kind(adapter: AdapterVersion | None) -> str:
    """The metrics' kind label of a request's adapter: its kind, or "base" for none."""
    return "base" if adapter is None else adapter.manifest.kind


def _adapter_ids(sequences: list[Sequence]) -> tuple[str, ...]:
    return tuple(sorted({seq.adapter.adapter_id for seq in sequences if seq.adapter is not None}))


class RequestStream:
    """The async side of one request: its choices' deltas, in order, until every choice finished."""

    def __init__(self, request_id: str, prompt_tokens: int, n: int, engine: Engine, incremental: bool = True):
        self.request_id = request_id
        self.incremental = incremental  # GenerationRequest.incremental
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._unfinished = n
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()
        self._aborted = False


    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> ChoiceDelta:
        if self._unfinished == 0:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished = 0
            raise item
        self.completion_tokens += len(item.token_ids)
        if item.finish_reason is not None:
            self._unfinished -= 1
        return item

    def abort(self) -> None:
        """Stop generating; iteration ends at once. Call from the event loop."""
        if not self._aborted and self._unfinished:
            self._aborted = True
            self._unfinished = 0
            self._engine.abort(self.request_id)


Delivery = tuple[RequestStream, ChoiceDelta | BaseException]


def _deliver(items: list[Delivery]) -> None:
    """Put each item on its stream's queue; runs on the streams' event loop."""
    for stream, item in items:
        stream._queue.put_nowait(item)


class ModelRunnerAPI(Protocol):
    """What the engine asks of a model runner: `server.model_runner.ModelRunner`, or
    `server.runner_process.ProcessRunner` for one in a process of its own."""

    device: torch.device

    @property
    def copies_overlap_compute(self) -> bool: ...
    @property
    def can_capture_graphs(self) -> bool: ...
    def prepare_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> tuple[int, ...]: ...
    def execute(self, plan: list[ScheduledChunk], overlap: Callable[[], None] | None = None) -> StepOutput: ...
    def apply(self, write: PoolWrite) -> None: ...
    def liveness_problems(self) -> list[str]: ...  # what no wait cures
    def close(self) -> None: ...


# (num_kv_blocks, block_size, num_slots, max_rank, num_pages) -> the model runner, sized for the engine's pools
RunnerFactory = Callable[[int, int, int, int, int], ModelRunnerAPI]


class Engine:
    def __init__(
        self,
        args: ModelArgs,
        page_bytes: int,
        make_runner: RunnerFactory,
        tokenizer: Tokenizer,
        config: EngineConfig,
        registry: AdapterRegistry,
        model_name: str,
        model_description: str,
        metrics: Metrics | None = None,
        paged: bool = True,
    ):
        """`args`: the model's shape; `page_bytes`: one adapter page over every LoRA layer of it; `paged`: whether
        the runner holds adapters in pages, or reads host buffers (`server/adapter_pool.py`); `make_runner`: the model
        runner, built once the pools are sized."""
        self.args = args
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.model_description = model_description
        self.base_config = args.to_hf_config()  # published on the base model's card
        self.max_model_len = config.max_model_len
        self.created = int(time.time())
        self.registry = registry
        self.allocator = BlockAllocator(config.num_kv_blocks, config.block_size)
        self.pool = AdapterSlotPool(config.max_gpu_adapters, config.max_lora_rank, page_bytes,
                                    config.max_gpu_adapter_bytes, paged, soft_prompt_rows_per_page(args))
        self.runner = make_runner(config.num_kv_blocks, config.block_size, self.pool.num_slots, self.pool.max_rank,
                                  self.pool.num_pages)
        self.device = self.runner.device
        if not config.enforce_eager and self.runner.can_capture_graphs:  # after the KV cache, as vLLM does
            self.runner.prepare_decode_graphs(config.max_num_seqs, config.max_model_len)
        self.metrics = metrics if metrics is not None else Metrics()
        self.scheduler = Scheduler(
            self.allocator, self.pool, registry, config.max_num_seqs, config.max_num_batched_tokens,
            metrics=self.metrics,
        )
        registry.metrics = self.metrics
        self.metrics.attach(self)
        registry.on_retired = lambda version: self._post("retire", version)
        registry.on_loaded = lambda version: self._post("loaded", version)
        self._streams: dict[str, RequestStream] = {}
        self._held: dict[Sequence, list[ChoiceDelta]] = {}  # deltas of choices whose stream wants them whole
        self._sequences: dict[str, list[Sequence]] = {}
        self._inbox: list[tuple[str, object]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._seq_ids = itertools.count()
        # What the engine thread has for the event loops since its last hand-over: one call_soon_threadsafe per
        # loop and loop iteration, not one per token, so the loop wakes (and takes the GIL) once per step.
        self._outbox: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
        # Only the engine thread runs torch with several threads (server/torch_threads.py): whoever builds the
        # engine runs with one from here on, if it did not already.
        limit_current_thread()
        self._thread = TorchThread(self._run, "lorahive-engine", engine_threads(config.engine_threads))
        self._busy_since: float | None = None  # start of the loop iteration under way; None while waiting for work
        self.steps = 0
        self.stack_bytes = 0  # the last step's `StepOutput.stack_bytes`
        self.waiting_quota = WaitingQuota(config.max_waiting_requests)

    # ---- event-loop side -------------------------------------------------------------------------

    def adapter_ids(self) -> list[str]:
        return self.registry.ids()

    def has_adapter(self, adapter_id: str) -> bool:
        return self.registry.exists(adapter_id)

    def adapter_status(self, adapter_id: str) -> tuple[AdapterStatus, str | None] | None:
        """Whether the adapter serves, and why not; None if there is no such adapter."""
        version = self.registry.version(adapter_id)
        return None if version is None else self.registry.status(version)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue `request` for the engine thread; a refusal (invalid, unknown adapter, queue full for its tenant)
        raises here and queues nothing."""
        self._validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        if not self.waiting_quota.enter(request_id, request.tenant):
            self.metrics.request_rejected("queue_full")
            raise QueueFullError(
                f"The server is busy: {len(self.waiting_quota)} requests are waiting, "
                f"{self.waiting_quota.held(request.tenant)} of them yours (--max-waiting-requests "
                f"{self.waiting_quota.capacity}); retry after {QUEUE_FULL_RETRY_AFTER_S} s.",
                QUEUE_FULL_RETRY_AFTER_S,
            )
        try:
            adapter = self._bind_adapter(request)
        except RequestError:
            self.waiting_quota.leave(request_id)
            raise
        stream = RequestStream(request_id, len(request.prompt_token_ids), request.n, self, request.incremental)
        seqs = [self._new_sequence(request, request_id, i, adapter) for i in range(request.n)]
        self.metrics.request_submitted(request.adapter_id, len(request.prompt_token_ids), _kind(adapter))
        self._post("add", (stream, seqs))
        return stream

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def abort_all(self, error: RequestError) -> None:
        """End every request the engine holds now with `error` (a drain ran out of time); it keeps serving."""
        self._post("abort_all", error)

    def liveness_problems(self) -> list[str]:
        """Why the engine can never serve again (its model runner's process exited), one phrase each; a probe that
        sees one should restart the server. Empty while it can serve, now or once busy work is done."""
        return self.runner.liveness_problems()

    def readiness_problems(self) -> list[str]:
        """Why the engine cannot serve, one phrase each; empty when it can. Cheap enough for a probe.

        The model needs no check: an engine exists only once its weights are loaded.
        """
        problems = self.liveness_problems()
        busy_since = self._busy_since
        if not self._thread.is_alive():
            problems.append("the engine thread is not running")
        elif busy_since is not None and time.monotonic() - busy_since > STALLED_STEP_S:
            problems.append(f"the engine has been inside one step for {time.monotonic() - busy_since:.0f} s")
        root = self.registry.store.root
        try:
            with os.scandir(root) as entries:
                next(entries, None)
        except OSError as exc:
            # /ready answers without a key: the path goes to the log, the probe names the flag only.
            log.warning("the adapter store %s cannot be read: %s", root, exc)
            problems.append(f"the adapter store (--store) cannot be read ({exc.strerror or type(exc).__name__})")
        return problems

    def _bind_adapter(self, request: GenerationRequest) -> AdapterVersion | None:
        """The adapter version the request's `n` sequences will use until they finish; refused (nothing held) where
        its soft prompt leaves the request no room in the context."""
        if request.adapter_id is None:
            return None
        version = self.registry.bind(request.adapter_id, request.n)  # refuses a broken or unservable one
        if version is None:
            raise AdapterNotFoundError(request.adapter_id)
        if version.manifest.num_virtual_tokens:  # `_validate` checked the context without it
            try:
                self._check_context(request, version.manifest.num_virtual_tokens)
            except RequestError:
                for _ in range(request.n):
                    self.registry.unbind(version)
                raise
        return version

    def _check_context(self, request: GenerationRequest, virtual_tokens: int = 0) -> None:
        """The request's tokens (a soft prompt's `virtual_tokens` first, which take context like prompt tokens) fit
        the context and the KV cache."""
        prompt_len = len(request.prompt_token_ids)
        total = virtual_tokens + prompt_len + request.params.max_tokens
        soft = f"the adapter's soft prompt takes {virtual_tokens} tokens, " if virtual_tokens else ""
        if total > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; {soft}the prompt has "
                f"{prompt_len} and max_tokens asks for {request.params.max_tokens} more.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        capacity = self.allocator.num_blocks * self.allocator.block_size
        if total > capacity:
            raise RequestError(
                f"{'soft prompt + ' if virtual_tokens else ''}prompt + max_tokens = {total} tokens can never fit in "
                f"this server's KV cache of {capacity} tokens.",
                param="max_tokens",
            )

    def _validate(self, request: GenerationRequest) -> None:
        if request.n < 1:
            raise RequestError(f"n must be at least 1, got {request.n}.", param="n")
        _check_sampling_params(request.params, self.tokenizer.vocab_size)
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise RequestError("The prompt is empty.", param="prompt")
        if any(not 0 <= t < self.tokenizer.vocab_size for t in request.prompt_token_ids):
            raise RequestError(f"Prompt token ids must lie in [0, {self.tokenizer.vocab_size}).", param="prompt")
        self._check_context(request)

    def _new_sequence(self, request: GenerationRequest, request_id: str, index: int, adapter) -> Sequence:
        params = request.params
        if params.top_k >= self.tokenizer.vocab_size:  # keeps every token, as no cut does; and fits a tensor
            params = replace(params, top_k=0)
        # Choice i of a seeded request gets its own stream, unrelated to the streams of nearby seeds.
        seed = secrets.randbits(63) if params.seed is None else (params.seed * _SEED_MIX + index) % 2**63
        generator = torch.Generator().manual_seed(seed)
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output)
        # A soft prompt's virtual tokens come first and take KV positions like prompt tokens; their ids are never
        # embedded (the model runner puts the adapter's embeddings there), so any id does.
        virtual = adapter.manifest.num_virtual_tokens if adapter is not None else 0
        return Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            choice_index=index,
            token_ids=[0] * virtual + list(request.prompt_token_ids),
            num_prompt_tokens=virtual + len(request.prompt_token_ids),
            num_virtual_tokens=virtual,
            adapter=adapter,
            sampler=SamplerState(params, generator),
            detokenizer=detokenizer,
            tenant=request.tenant,
        )

    def _post(self, kind: str, payload: object) -> None:
        with self._wake:
            self._inbox.append((kind, payload))
            self._wake.notify()

    def stats(self) -> EngineStats:
        """A snapshot of the engine's load; cheap, and safe to call from any thread (each number is read once)."""
        scheduler, allocator, pool = self.scheduler, self.allocator, self.pool
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            kv_blocks_used=allocator.num_used,
            kv_blocks_total=allocator.num_blocks,
            adapter_slots=pool.num_slots,
            adapters_resident=pool.resident_count,
            adapters_pinned=pool.pinned_count,
            adapter_bytes_resident=pool.resident_bytes,
            adapter_bytes_capacity=pool.capacity_bytes,
            adapter_stack_bytes=self.stack_bytes,
            adapter_loads=pool.loads,
            adapter_prefetches=pool.prefetches,
            adapter_evictions=pool.evictions,
            preemptions=scheduler.num_preemptions,
            steps=self.steps,
            block_size=allocator.block_size,
            # list() copies each queue in one C call, which the engine thread cannot interleave (the GIL)
            running_adapters=_adapter_ids(list(scheduler.running)),
            waiting_adapters=_adapter_ids(list(scheduler.waiting)),
            max_batch_adapters=min(self.config.max_num_seqs, pool.max_rank_adapters),
        )

    def adapter_residency(self) -> dict[str, AdapterResidency]:
        """Every adapter whose served version has weights in the device or host tier, idle ones included, by id;
        safe from any thread. A replaced version still finishing its requests is left out."""
        device = dict(self.pool.slot_items())
        pinned = self.registry.pinned_ids
        residency: dict[str, AdapterResidency] = {}
        for version in [*device, *self.registry.host_versions()]:  # the device first: the warmest tier wins
            if version.retired or version.adapter_id in residency:
                continue
            slot = device.get(version)
            residency[version.adapter_id] = AdapterResidency(
                "gpu" if slot is not None else "host", version.manifest.rank, version.manifest.kind,
                version.adapter_id in pinned,
                self.pool.pinned(slot) if slot is not None else 0)
        return residency

    @property
    def torch_threads(self) -> int | None:
        """The intra-op threads torch reports on the engine thread; None until it started."""
        return self._thread.num_threads

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.runner.close()

    # ---- engine thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        stalled = False  # the last round scheduled nothing: only a message (a load finishing, a new
        # request, an abort) can change that, so wait for one instead of spinning, which would starve the
        # adapter loader threads of the GIL. The timeout is a safety net, not the mechanism.
        while True:
            with self._wake:
                self._busy_since = None  # waiting for work is healthy, however long it lasts
                while not self._inbox and (stalled or not self.scheduler.has_work()) and not self._stopping:
                    if not self._wake.wait(timeout=0.1 if stalled else None):
                        break
                if self._stopping:
                    self._hand_over()
                    return
                inbox, self._inbox = self._inbox, []
            self._busy_since = time.monotonic()
            for kind, payload in inbox:
                self._handle(kind, payload)
            plan = self.scheduler.schedule()
            for seq, error in self.scheduler.take_failed():
                adapter = seq.adapter
                if adapter is not None and adapter.broken:  # its stored files are at fault: a 503 naming the cure
                    self._fail(seq.request_id, AdapterBrokenError(adapter.adapter_id, adapter.load_error or ""))
                    continue
                if adapter is not None and adapter.gone:  # another server replaced or deleted it: a retry will do
                    self._fail(seq.request_id, AdapterChangedError(adapter.adapter_id))
                    continue
                adapter_id = adapter.adapter_id if adapter else None
                self._fail(seq.request_id, _logged_error(f"The adapter '{adapter_id}' could not be loaded: {error}"))
            self._write_adapters()
            stalled = not plan
            if plan:
                self._admitted(plan)
                self._step(plan)
            self._hand_over()

    def _push(self, stream: RequestStream, item: ChoiceDelta | BaseException) -> None:
        self._outbox.setdefault(stream._loop, []).append((stream, item))

    def _hand_over(self) -> None:
        """Send the outbox to the event loops, one call each."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody reads those streams any more
                loop.call_soon_threadsafe(_deliver, items)

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            stream, seqs = payload
            self._streams[stream.request_id] = stream
            self._sequences[stream.request_id] = seqs
            for seq in seqs:
                self.scheduler.add(seq)
        elif kind == "abort":
            self.waiting_quota.leave(payload)
            for seq in self._sequences.pop(payload, []):
                self._held.pop(seq, None)
                if not seq.finished:
                    self.metrics.sequence_finished("abort")
                self.scheduler.finish(seq)
            self._streams.pop(payload, None)
        elif kind == "abort_all":
            for request_id in list(self._sequences):
                self._fail(request_id, payload, reason="abort")
        elif kind == "retire":  # a deleted or replaced version nobody uses any more: free its slot now
            self.pool.discard(payload)
        # "loaded": an adapter reached host memory; nothing to do but schedule again

    def _admitted(self, plan) -> None:
        now = time.monotonic()
        for chunk in plan:
            if chunk.seq.admitted_time is None:
                chunk.seq.admitted_time = now
                self.metrics.admitted(now - chunk.seq.arrival_time)
                self.waiting_quota.leave(chunk.seq.request_id)  # its first choice in: the request waits no more

    def _step(self, plan: list[ScheduledChunk]) -> None:
        """Run `plan`; when it raises, run its halves on their own, down to single sequences, so a sequence
        that cannot be stepped (its sampling parameters, its adapter, a bug its input trips) fails alone and
        every other sequence of the batch gets the token it would have got without it."""
        plan = [chunk for chunk in plan if not chunk.seq.finished]  # a culprit's sibling choices failed with it
        if not plan:
            return
        try:
            self._try_step(plan)
        except Exception as exc:
            if len(plan) == 1:
                self._fail_culprit(plan[0].seq, exc)
                return
            log.warning("engine step of %d sequences failed (%s: %s); retrying them in halves to find the cause",
                        len(plan), type(exc).__name__, exc)
            middle = len(plan) // 2
            self._step(plan[:middle])
            self._step(plan[middle:])

    def _try_step(self, plan: list[ScheduledChunk]) -> None:
        """One forward pass and sampling over `plan`, then its tokens. Raises, having changed nothing a retry
        depends on, if the pass or the sampling fails: the sequences' computed counts only move on success
        (so a retry writes the same KV-cache slots again, never appends twice), and a seeded sequence's n-th
        token always takes the n-th number of its stream (`server/sampling.py`), so a retry draws the same."""
        start = time.perf_counter()
        # The forward is queued on the GPU while `overlap` runs: copy the next adapters then.
        overlap = self._prefetch_adapters if self.runner.copies_overlap_compute else None
        output = self.runner.execute(plan, overlap)
        self.steps += 1
        self.stack_bytes = output.stack_bytes
        self.metrics.step(time.perf_counter() - start, len(plan), sum(c.num_tokens for c in plan))
        for chunk in plan:
            chunk.seq.num_computed += chunk.num_tokens
        for chunk, token, logprob in zip(output.chunks, output.tokens, output.logprobs, strict=True):
            if chunk.seq.finished:  # a sibling choice failed just now, and its request with it
                continue
            try:
                self._append_token(chunk.seq, token, logprob)
            except Exception as exc:  # detokenizing or stop checks of one sequence: it fails, the step stands
                self._fail_culprit(chunk.seq, exc)

    def _prefetch_adapters(self) -> None:
        self.scheduler.prefetch_to_device()
        self._write_adapters()

    def _write_adapters(self) -> None:
        """Have the model runner carry out the adapter pool's queued writes, in order.

        A load the runner cannot do (weights a layer refuses) leaves its slot empty: the requests that hold the
        slot fail with the reason, the slot is freed, and everything else goes on."""
        while writes := self.pool.take_writes():
            for write in writes:
                start = time.perf_counter()
                try:
                    self.runner.apply(write)
                except Exception as exc:
                    if not isinstance(write, LoadAdapter):
                        raise
                    self._adapter_write_failed(write, exc)
                    continue
                if isinstance(write, LoadAdapter):
                    self.metrics.adapter_loaded("host_to_gpu", time.perf_counter() - start)

    def _adapter_write_failed(self, write: LoadAdapter, exc: Exception) -> None:
        error = _logged_error(f"The adapter '{write.adapter.adapter_id}' could not be loaded: {exc}")
        for seq in [s for s in self.scheduler.running if s.slot == write.slot]:
            self._fail(seq.request_id, error)
        if self.pool.slot_of(write.key) == write.slot:
            self.pool.discard(write.key)  # its pins went with the requests above; the clear is queued next

    def _fail_culprit(self, seq: Sequence, exc: Exception) -> None:
        """End the request of `seq`, which failed a step on its own, with an error naming the logged cause."""
        error_id = uuid.uuid4().hex[:12]
        log.error("engine step failed on request %s (error id %s)", seq.request_id, error_id, exc_info=exc)
        self._fail(seq.request_id, EngineStepError("The engine failed on this request", error_id))

    def _append_token(self, seq: Sequence, token: int, logprob) -> None:
        seq.token_ids.append(token)
        seq.sampler.output_ids.append(token)
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.first_token(now - seq.arrival_time)
        else:
            self.metrics.next_token(now - seq.last_token_time)
        seq.last_token_time = now
        self.metrics.tokens_generated(seq.adapter.adapter_id if seq.adapter else None, 1, _kind(seq.adapter))
        params = seq.sampler.params
        finish: FinishReason | None = None
        if (token in self.tokenizer.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            text, finish = seq.detokenizer.flush(), "stop"
        else:
            text, stopped = seq.detokenizer.push(token)
            if stopped:
                finish = "stop"
            elif len(seq.output_ids) >= params.max_tokens:
                text, finish = text + seq.detokenizer.flush(), "length"
        stream = self._streams.get(seq.request_id)
        if finish is not None:
            num_out = len(seq.output_ids)
            tpot = (now - seq.first_token_time) / (num_out - 1) if num_out > 1 else None
            self.metrics.sequence_finished(finish, now - seq.arrival_time, tpot)
            self.scheduler.finish(seq)
            self._forget_if_done(seq.request_id)
        if stream is None:
            return
        delta = ChoiceDelta(seq.choice_index, text, [token], None if logprob is None else [logprob], finish)
        if not stream.incremental:
            delta = self._whole_choice(seq, delta)
        if delta is not None:
            self._push(stream, delta)

    def _whole_choice(self, seq: Sequence, delta: ChoiceDelta) -> ChoiceDelta | None:
        """For a stream that wants whole choices: None while `seq` runs; once it finished, all its deltas in one."""
        held = self._held.setdefault(seq, [])
        held.append(delta)
        if delta.finish_reason is None:
            return None
        del self._held[seq]
        logprobs = None if delta.logprobs is None else [item for d in held for item in d.logprobs or ()]
        return ChoiceDelta(delta.index, "".join(d.text for d in held), [t for d in held for t in d.token_ids],
                           logprobs, delta.finish_reason)

    def _forget_if_done(self, request_id: str) -> None:
        if all(s.finished for s in self._sequences.get(request_id, [])):
            self._sequences.pop(request_id, None)
            self._streams.pop(request_id, None)

    def _fail(self, request_id: str, error: BaseException, reason: str = "error") -> None:
        """End the request with `error`; its unfinished choices count as finished for `reason`."""
        self.waiting_quota.leave(request_id)
        for seq in self._sequences.pop(request_id, []):
            self._held.pop(seq, None)
            if not seq.finished:
                self.metrics.sequence_finished(reason)
            self.scheduler.finish(seq)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._push(stream, error)


def _check_sampling_params(params: SamplingParams, vocab_size: int) -> None:
    """Refuse, at submit, values the sampler cannot take: the HTTP layer checks its own fields, but whoever
    builds a `GenerationRequest` in process must not be able to hand the engine a step-failing value."""
    def refuse(param: str, requirement: str, value: object) -> RequestError:
        return RequestError(f"'{param}' must be {requirement}, got {value!r}.", param=param)

    if params.max_tokens < 1:
        raise refuse("max_tokens", "at least 1", params.max_tokens)
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise refuse("temperature", "a finite number >= 0", params.temperature)
    if not 0 < params.top_p <= 1:  # also refuses NaN
        raise refuse("top_p", "in (0, 1]", params.top_p)
    if params.top_k < 0:
        raise refuse("top_k", ">= 0 (0: no top-k cut)", params.top_k)
    for name in ("presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(params, name)):
            raise refuse(name, "a finite number", getattr(params, name))
    for token_id, bias in params.logit_bias:
        if not 0 <= token_id < vocab_size:
            raise refuse("logit_bias", f"keyed by token ids in [0, {vocab_size})", token_id)
        if not math.isfinite(bias):
            raise refuse("logit_bias", "finite", bias)
    if params.logprobs is not None and not 0 <= params.logprobs <= vocab_size:
        raise refuse("logprobs", f"in [0, {vocab_size}]", params.logprobs)


def _logged_error(message: str) -> EngineStepError:
    """`message` as a request's error, logged under a fresh error id that the client gets too."""
    error_id = uuid.uuid4().hex[:12]
    log.error("%s (error id %s)", message, error_id)
    return EngineStepError(message, error_id)
