"""Backpressure and fairness between tenants: the bounded waiting queue (429 past it, never for a tenant under
its fair share), fair-share admission (a flooding tenant cannot push another tenant's first token back,
measured in engine steps), and preemption that takes blocks from the tenant holding the most."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from server.api import build_app
from server.config import Settings
from server.engine import QUEUE_FULL_RETRY_AFTER_S, Engine
from server.requests import GenerationRequest, QueueFullError, SamplingParams
from server.runtime import build_engine
from server.sampling import SamplerState
from server.scheduler import Sequence
from server.tokenizer import IncrementalDetokenizer
from server.waiting_quota import WaitingQuota
from tests.support.engines import ENGINE_SETTINGS, TIMEOUT_S, assert_idle, collect, prompt
from tests.support.openai_schema import assert_valid
from tests.support.step_clock import StepClock

# ------------------------------------------------------------------------------- the waiting-queue rule


def test_one_tenant_holds_at_most_the_capacity() -> None:
    quota = WaitingQuota(8)
    assert [quota.enter(f"r{i}", None) for i in range(10)] == [True] * 8 + [False] * 2
    quota.leave("r0")
    assert quota.enter("r8", None)
    assert len(quota) == 8


def test_a_flood_cannot_take_another_tenants_share() -> None:
    quota = WaitingQuota(8)
    flood = [quota.enter(f"a{i}", "a") for i in range(20)]
    assert flood == [True] * 8 + [False] * 12
    # Full, but b holds less than 8 / 2 = 4: b gets in until it holds its share, a stays refused.
    assert [quota.enter(f"b{i}", "b") for i in range(6)] == [True] * 4 + [False] * 2
    assert not quota.enter("a-late", "a")
    # A third tenant's share is 8 / 3: it gets 3 (held 0, 1 and 2 are all below 2.67).
    assert [quota.enter(f"c{i}", "c") for i in range(5)] == [True] * 3 + [False] * 2
    assert (quota.held("a"), quota.held("b"), quota.held("c"), len(quota)) == (8, 4, 3, 15)


def test_leaving_frees_room_and_unknown_ids_are_ignored() -> None:
    quota = WaitingQuota(2)
    assert quota.enter("x", "a") and quota.enter("y", "a")
    quota.leave("x")
    quota.leave("x")  # twice: the engine leaves on admission and again when the request ends
    quota.leave("never-entered")
    assert (len(quota), quota.held("a")) == (1, 1)
    assert quota.enter("z", "a")


@pytest.mark.parametrize("seed", range(5))
def test_kth_largest_holding_stays_under_capacity_over_k(seed: int) -> None:
    """The docstring's bound under random traffic: the k-th largest holding <= ceil(Q / k), hence the
    queue <= sum of ceil(Q / k) over the tenants waiting; and nobody under Q / T is ever refused."""
    rng = random.Random(seed)
    capacity = 12
    quota = WaitingQuota(capacity)
    waiting: dict[str, list[str]] = {}
    tenants = [f"t{i}" for i in range(6)]
    weights = [20, 5, 3, 2, 1, 1]  # one heavy tenant
    for op in range(4000):
        if rng.random() < 0.7:
            tenant = rng.choices(tenants, weights)[0]
            holders = {t for t, ids in waiting.items() if ids} | {tenant}
            under_share = len(waiting.get(tenant, [])) * len(holders) < capacity
            request_id = f"r{op}"
            if quota.enter(request_id, tenant):
                waiting.setdefault(tenant, []).append(request_id)
            else:
                assert not under_share, f"{tenant} refused while under its share"
        else:
            nonempty = [ids for ids in waiting.values() if ids]
            if nonempty:
                ids = rng.choice(nonempty)
                quota.leave(ids.pop(rng.randrange(len(ids))))
        holdings = sorted((len(ids) for ids in waiting.values() if ids), reverse=True)
        assert all(h <= math.ceil(capacity / k) for k, h in enumerate(holdings, 1)), holdings
        assert len(quota) == sum(holdings) <= sum(math.ceil(capacity / k) for k in range(1, len(holdings) + 1))


# ----------------------------------------------------------------------------- the engine's waiting queue


@pytest.fixture
def make_idle_engine() -> Iterator[Callable[..., Engine]]:
    """Engines whose thread has not started: what is submitted stays waiting, and a test may drive the
    scheduler by hand."""
    built: list[Engine] = []

    def make(**settings: Any) -> Engine:
        built.append(build_engine(Settings(**(ENGINE_SETTINGS | settings))))
        return built[-1]

    yield make
    for engine in built:
        engine.shutdown()


@pytest.fixture
def idle_engine(make_idle_engine: Callable[..., Engine]) -> Engine:
    return make_idle_engine(max_waiting_requests=4)


def request(seed: int, tenant: str | None, max_tokens: int = 4) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(prompt(seed, 6), params, tenant=tenant)


def rejected(engine: Engine, reason: str) -> float | None:
    return engine.metrics.registry.get_sample_value("lorahive_requests_rejected_total", {"reason": reason})


def test_engine_refuses_past_the_bound_at_submit_and_admits_the_rest(idle_engine: Engine) -> None:
    engine = idle_engine

    async def scenario() -> list[Any]:
        streams = [engine.submit(request(i, "a")) for i in range(4)]
        with pytest.raises(QueueFullError) as refused:
            engine.submit(request(9, "a"))
        assert refused.value.retry_after_s == QUEUE_FULL_RETRY_AFTER_S
        assert refused.value.code == "rate_limit_exceeded"
        # The queue is full of a's requests, but b's share (4 / 2) is untouched.
        streams += [engine.submit(request(10 + i, "b")) for i in range(2)]
        with pytest.raises(QueueFullError):
            engine.submit(request(12, "b"))
        assert (len(engine.waiting_quota), engine.waiting_quota.held("b")) == (6, 2)
        engine.start()
        return list(await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), TIMEOUT_S))

    results = asyncio.run(scenario())
    assert [len(choices[0].token_ids) for choices in results] == [4] * 6
    assert rejected(engine, "queue_full") == 2
    assert len(engine.waiting_quota) == 0  # admitted requests left the queue
    assert_idle(engine)


def test_a_full_queue_is_a_429_with_retry_after(idle_engine: Engine) -> None:
    engine = idle_engine

    async def fill() -> None:
        for i in range(4):
            engine.submit(request(i, None))

    asyncio.run(fill())
    with TestClient(build_app(engine), raise_server_exceptions=False) as client:
        response = client.post("/v1/completions", json={"model": engine.model_name, "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == str(QUEUE_FULL_RETRY_AFTER_S)
        assert_valid(response.json(), "ErrorResponse")
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert 'lorahive_requests_rejected_total{reason="queue_full"} 1.0' in client.get("/metrics").text


# ------------------------------------------------------------------------------ fair-share admission

SEATS = 4  # max_num_seqs: the flood fills every seat
FLOOD_MAX_TOKENS = 16  # a's requests: a seat frees at least this often
B_REQUESTS = 2
FLOOD_REQUESTS = 20 * B_REQUESTS


def tenant_request(tenant: str, index: int, max_tokens: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(prompt(100 * ord(tenant[0]) + index, 8), params, request_id=f"{tenant}-{index}",
                             tenant=tenant)


@pytest.fixture
def flood_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Engine, StepClock]]:
    engine = build_engine(Settings(**(ENGINE_SETTINGS | {"max_num_seqs": SEATS})))
    clock = StepClock(engine, monkeypatch)
    engine.start()
    yield engine, clock
    engine.shutdown()


def run_b(engine: Engine, flood: bool) -> None:
    """B's requests, sent after the flood's first tokens when `flood` (so every seat is taken by then)."""

    async def scenario() -> None:
        flood_streams = []
        if flood:
            flood_streams = [engine.submit(tenant_request("a", i, FLOOD_MAX_TOKENS)) for i in range(FLOOD_REQUESTS)]
            await flood_streams[0].__anext__()  # the flood is running
        b_streams = [engine.submit(tenant_request("b", i, FLOOD_MAX_TOKENS)) for i in range(B_REQUESTS)]
        await asyncio.wait_for(asyncio.gather(*(collect(s) for s in [*b_streams, *flood_streams])), TIMEOUT_S)

    asyncio.run(scenario())


def test_a_flooding_tenant_does_not_delay_another_tenants_first_token(
    flood_engine: tuple[Engine, StepClock],
) -> None:
    """Tenant a sends 20x the requests of tenant b. Bound, in engine steps: b's time to first token (and to
    its last token) under the flood is at most twice its time on an idle server plus FLOOD_MAX_TOKENS, the
    longest b can wait for a seat to free (the scheduler never preempts for fairness). First come, first
    served would make b wait for the whole flood: about FLOOD_REQUESTS / SEATS * FLOOD_MAX_TOKENS steps."""
    engine, clock = flood_engine
    b_ids = [f"b-{i}" for i in range(B_REQUESTS)]
    run_b(engine, flood=False)
    alone_ttft = max(clock.ttft(i) for i in b_ids)
    alone_e2e = max(clock.e2e(i) for i in b_ids)
    for table in (clock.arrival, clock.first, clock.last):
        table.clear()

    run_b(engine, flood=True)
    flood_ttft = max(clock.ttft(i) for i in b_ids)
    flood_e2e = max(clock.e2e(i) for i in b_ids)
    a_ttft = sorted(clock.ttft(f"a-{i}") for i in range(FLOOD_REQUESTS))
    print(f"b alone: ttft {alone_ttft}, e2e {alone_e2e} steps; b under the flood: ttft {flood_ttft}, e2e "
          f"{flood_e2e} steps; the flood's own ttft: median {a_ttft[len(a_ttft) // 2]}, max {a_ttft[-1]} steps")
    assert flood_ttft <= 2 * alone_ttft + FLOOD_MAX_TOKENS
    assert flood_e2e <= 2 * alone_e2e + FLOOD_MAX_TOKENS
    assert a_ttft[-1] > 2 * FLOOD_MAX_TOKENS  # the flood really queued: its last request waited for seats
    assert_idle(engine)


# ------------------------------------------------------------------------------------------- preemption


def make_sequence(engine: Engine, seq_id: int, tenant: str, prompt_len: int) -> Sequence:
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    return Sequence(
        seq_id=seq_id,
        request_id=f"{tenant}-{seq_id}",
        choice_index=0,
        token_ids=list(prompt(seq_id, prompt_len)),
        num_prompt_tokens=prompt_len,
        adapter=None,
        sampler=SamplerState(params, torch.Generator()),
        detokenizer=IncrementalDetokenizer(engine.tokenizer, (), False),
        tenant=tenant,
    )


def run_round(engine: Engine) -> list[Sequence]:
    """One scheduling round, with the forward pass faked: every chunk's tokens computed, one token sampled
    where the chunk reaches the end. Returns the sequences of the plan."""
    plan = engine.scheduler.schedule()
    for chunk in plan:
        samples = chunk.completes_sequence
        chunk.seq.num_computed += chunk.num_tokens
        if samples:
            chunk.seq.token_ids.append(0)
    return [chunk.seq for chunk in plan]


def test_preemption_takes_from_the_tenant_holding_the_most_blocks(
    make_idle_engine: Callable[..., Engine],
) -> None:
    # 10 blocks of 4 tokens. a's three 8-token prompts take 6; b's 4-token prompt, admitted last, takes 1.
    engine = make_idle_engine(kv_cache_tokens=40, block_size=4)
    scheduler = engine.scheduler
    a_seqs = [make_sequence(engine, i, "a", 8) for i in range(3)]
    for seq in a_seqs:
        scheduler.add(seq)
    assert run_round(engine) == a_seqs
    b_seq = make_sequence(engine, 3, "b", 4)
    scheduler.add(b_seq)
    # a's decodes take a third block each (9 used), b's prefill the last one.
    assert run_round(engine) == [*a_seqs, b_seq]
    assert engine.allocator.num_free == 0 and scheduler.num_preemptions == 0
    # Now b, the newest sequence, needs a second block. Newest-first would preempt b itself; a holds 9 of
    # the 10 blocks, so a's newest sequence goes, out of the step it was already planned in.
    plan = run_round(engine)
    assert scheduler.num_preemptions == 1
    assert list(scheduler.waiting) == [a_seqs[2]] and a_seqs[2].blocks == []
    assert plan == [a_seqs[0], a_seqs[1], b_seq]
    assert scheduler.running == [a_seqs[0], a_seqs[1], b_seq]
