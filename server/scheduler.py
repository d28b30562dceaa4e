"""Which sequences run in the next step, and how many of their tokens.

Continuous batching: running sequences go first (one decode token each, or the next chunk of a prefill),
then waiting sequences are admitted while the step's token budget, the sequence cap, the KV-cache blocks
and the adapter slots allow, tenants taking turns (the tenant with the fewest sequences running goes
next; within a tenant, arrival order), so one tenant's flood cannot hold back another tenant's first
token. A long prompt is prefilled in chunks across steps, so decodes of other sequences keep flowing.
When a running sequence needs a KV block and none is free, the newest sequence of the tenant holding the
most blocks is preempted: its blocks are freed and it is recomputed later (its output so far is kept, so
nothing a client has seen changes).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from server.adapter_pool import AdapterSlotPool
from server.adapter_registry import AdapterRegistry, AdapterVersion
from server.kv_blocks import BlockAllocator
from server.metrics import Metrics
from server.sampling import SamplerState
from server.tokenizer import IncrementalDetokenizer


@dataclass(eq=False)
class Sequence:
    """One choice of one request as the engine tracks it."""

    seq_id: int
    request_id: str
    choice_index: int
    token_ids: list[int]  # prompt (after a soft prompt's placeholders), then generated tokens
    num_prompt_tokens: int  # the soft prompt's virtual tokens included
    adapter: AdapterVersion | None
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer
    tenant: str | None = None  # the fair-share key (None: the server runs without API keys)
    num_virtual_tokens: int = 0  # leading positions that take its adapter's soft-prompt embeddings
    arrival_time: float = field(default_factory=time.monotonic)
    num_computed: int = 0  # leading tokens whose K/V sit in the cache
    blocks: list[int] = field(default_factory=list)
    slot: int = -1  # adapter slot while scheduled; -1 for the base model
    finished: bool = False
    waiting_since: int = 0  # the scheduling round it (re)joined the waiting queue
    # Metrics: first admission, first and latest token (monotonic), whether its adapter lookup was counted.
    admitted_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    adapter_looked_up: bool = False

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens fed this step, starting at seq.num_computed

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples a new one."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        pool: AdapterSlotPool,
        registry: AdapterRegistry,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_adapter_wait_rounds: int = 16,
        metrics: Metrics | None = None,
    ):
        self.allocator = allocator
        self.pool = pool
        self.registry = registry
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.max_adapter_wait_rounds = max_adapter_wait_rounds
        self.num_preemptions = 0
        self.rounds = 0
        self._failed: list[tuple[Sequence, Exception]] = []
        self.metrics = metrics

    def add(self, seq: Sequence) -> None:
        seq.waiting_since = self.rounds
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        self.rounds += 1
        budget = self.max_num_batched_tokens
        plan: list[ScheduledChunk] = []
        preempted = False
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue
            num_tokens = min(seq.num_pending, budget)
            while not self._reserve_blocks(seq, seq.num_computed + num_tokens):
                victim = self._victim()
                self._preempt(victim)
                preempted = True
                planned = next((chunk for chunk in plan if chunk.seq is victim), None)
                if planned is not None:  # it ran earlier in this loop: take its chunk back out of the step
                    plan.remove(planned)
                    budget += planned.num_tokens
                if victim is seq:
                    break
            else:
                plan.append(ScheduledChunk(seq, num_tokens))
                budget -= num_tokens
        if not preempted:
            budget = self._admit(plan, budget)
        self._prefetch()
        return plan

    def _victim(self) -> Sequence:
        """Whom to preempt for blocks: the newest sequence of the tenant holding the most KV blocks, so a
        tenant that fills the cache gives back its own work first (with one tenant: the newest sequence)."""
        blocks: Counter[str | None] = Counter()
        for seq in self.running:
            blocks[seq.tenant] += len(seq.blocks)
        return max(reversed(self.running), key=lambda seq: blocks[seq.tenant])  # max keeps the first, the newest

    def _admit(self, plan: list[ScheduledChunk], budget: int) -> int:
        """Admit waiting sequences in fair order (`_FairOrder`) while budget, sequence cap, blocks and slots allow.

        A sequence whose adapter needs a slot while every slot is pinned lets later sequences of resident
        adapters overtake it, which keeps the device busy, but only for `max_adapter_wait_rounds` rounds:
        after that no further adapter sequence is admitted until it has a slot, so pinned slots drain
        (each within its sequences' max_tokens) and every request is served within a bounded number of
        steps. Loads stay at most one per admitted request: no slot is ever evicted while pinned.
        """
        slots_closed = False
        order = _FairOrder(self.waiting, self.running)
        for seq in order:
            if len(self.running) >= self.max_num_seqs or budget == 0:
                break
            num_tokens = min(seq.num_pending, budget)
            needed = self.allocator.blocks_for(seq.num_computed + num_tokens) - len(seq.blocks)
            if needed > self.allocator.num_free:
                break  # memory is admitted in fair order: nobody overtakes a sequence waiting for blocks
            if seq.adapter is not None:
                if slots_closed:
                    continue
                slot = self._acquire_slot(seq)
                if slot is None:
                    starving = self.rounds - seq.waiting_since > self.max_adapter_wait_rounds
                    slots_closed = starving and seq.adapter.weights is not None  # slot-bound, not loading
                    continue
                seq.slot = slot
            self._reserve_blocks(seq, seq.num_computed + num_tokens)
            self.waiting.remove(seq)
            self.running.append(seq)
            plan.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
            order.admitted(seq)
        return budget

    def _acquire_slot(self, seq: Sequence) -> int | None:
        """The sequence's adapter slot, pinned; None while its weights are not ready or no slot is free."""
        version = seq.adapter
        resident = self.pool.slot_of(version) is not None
        if self.metrics is not None and not seq.adapter_looked_up:
            seq.adapter_looked_up = True
            self.metrics.adapter_lookup(on_gpu=resident, in_host=version.weights is not None)
        if not resident and version.weights is None:
            if version.load_error is not None:
                self._drop(seq, RuntimeError(version.load_error))
            else:
                self.registry.request_load(version)
            return None
        try:
            slot = self.pool.acquire(version, None if resident else version.weights)
        except Exception as exc:  # the adapter cannot have a slot (its rank): its request fails, others go on
            self._drop(seq, exc)
            return None
        self.registry.touch(version)
        return slot

    def _prefetch(self) -> None:
        """Start disk -> host loads for the adapters the next waiting sequences need: as many as one step could
        admit, so a burst of cold adapters is read in waves, not all at once into the host tier."""
        seen = 0
        for seq in self.waiting:
            if seen >= min(self.pool.num_slots, self.max_num_seqs):
                break
            version = seq.adapter
            if version is not None and version.weights is None and self.pool.slot_of(version) is None:
                self.registry.request_load(version)
                seen += 1

    def prefetch_to_device(self) -> None:
        """Give the adapters that the next waiting sequences need a place in the device tier.

        Only decides (the pool queues the loads); the engine does this while a step runs on the GPU and has the
        model runner copy them then, so the copies overlap that step instead of delaying the next one. Room is
        made only by evicting adapters that no running sequence pins and no waiting sequence needs, so a
        prefetch never pushes out what the queue is about to use."""
        needed = {seq.adapter for seq in self.waiting if seq.adapter is not None}
        for seq in self.waiting:
            version = seq.adapter
            if version is None or version.weights is None or self.pool.slot_of(version) is not None:
                continue
            try:
                loaded = self.pool.prefetch(version, version.weights, keep=needed)
            except ValueError:  # a rank the pool cannot hold: admission fails that request with the reason
                continue
            if not loaded:
                return  # the device tier holds only what is in use or wanted

    def _drop(self, seq: Sequence, error: Exception) -> None:
        self.waiting.remove(seq)
        self._failed.append((seq, error))

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        """Sequences dropped while scheduling (their adapter could not be loaded), with the reason."""
        failed, self._failed = self._failed, []
        return failed

    def _reserve_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        needed = self.allocator.blocks_for(num_tokens) - len(seq.blocks)
        if needed <= 0:
            return True
        if needed > self.allocator.num_free:
            return False
        seq.blocks.extend(self.allocator.allocate(needed))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.waiting_since = self.rounds
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks = []
        if seq.slot >= 0:
            self.pool.release(seq.slot)
            seq.slot = -1

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and give back its blocks, adapter pin and version."""
        if seq.finished:
            return
        seq.finished = True
        self._release(seq)
        if seq.adapter is not None:
            self.registry.unbind(seq.adapter)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)


class _FairOrder:
    """The waiting sequences in the order admission considers them: each next one comes from the tenant with
    the fewest sequences running (those admitted this round included), ties going to the tenant whose
    next sequence has waited longest; within a tenant, queue order. With one tenant this is queue order.

    So a tenant that floods the queue gets one seat per turn like everyone else: another tenant's sequence
    is admitted as soon as a seat frees, no matter how many of the flood's sequences arrived before it.
    """

    def __init__(self, waiting: Iterable[Sequence], running: Iterable[Sequence]):
        self._queues: dict[str | None, deque[tuple[int, Sequence]]] = {}  # tenant -> (queue position, seq)
        for position, seq in enumerate(waiting):
            self._queues.setdefault(seq.tenant, deque()).append((position, seq))
        self._running: Counter[str | None] = Counter(seq.tenant for seq in running)

    def admitted(self, seq: Sequence) -> None:
        """`seq` (the one just yielded) got a seat: its tenant's next turn comes later."""
        self._running[seq.tenant] += 1

    def __iter__(self) -> Iterator[Sequence]:
        while self._queues:
            tenant = min(self._queues, key=lambda t: (self._running[t], self._queues[t][0][0]))
            queue = self._queues[tenant]
            _, seq = queue.popleft()
            if not queue:
                del self._queues[tenant]
            yield seq
