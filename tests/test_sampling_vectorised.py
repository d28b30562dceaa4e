"""The batched sampler against the per-row sampler it replaced: the same tokens and logprobs for every mix of
options and seeds, one device-to-host transfer per call, and a seed's tokens kept through retried steps."""

from __future__ import annotations

import random

import pytest
import torch

from server.requests import SamplingParams, TokenLogprob
from server.sampling import SamplerState, sample

# ---- the oracle: the per-row sampler as it was before the batched one (a test copy, kept as it was) --------------


def _reference_adjust(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    adjusted = logits.clone()
    for row, state in enumerate(states):
        p = state.params
        if p.logit_bias:
            token_ids, biases = zip(*p.logit_bias, strict=True)
            adjusted[row].index_add_(0, torch.tensor(token_ids), torch.tensor(biases).to(logits.dtype))
        if state.output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(state.output_ids), minlength=logits.shape[1]).to(logits.dtype)
            adjusted[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return adjusted


def _reference_sample_rows(logits: torch.Tensor, states: list[SamplerState], uniforms: torch.Tensor) -> torch.Tensor:
    temperature = torch.tensor([s.params.temperature for s in states])
    top_k = torch.tensor([s.params.top_k or logits.shape[1] for s in states])
    top_p = torch.tensor([s.params.top_p for s in states])
    sorted_logits, sorted_ids = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1])
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (ranks[None, :] < top_k[:, None]) & (mass_before < top_p[:, None])
    keep[:, 0] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp_max(logits.shape[1] - 1)
    return sorted_ids.gather(1, picks).squeeze(1)


def _reference_sample(
    logits: torch.Tensor, states: list[SamplerState], generators: list[torch.Generator]
) -> tuple[list[int], list[TokenLogprob | None]]:
    adjusted = _reference_adjust(logits, states)
    tokens = adjusted.argmax(dim=-1)
    sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if sampled_rows:
        uniforms = torch.stack([torch.rand((), generator=generators[i]) for i in sampled_rows])
        index = torch.tensor(sampled_rows)
        tokens[index] = _reference_sample_rows(adjusted[index], [states[i] for i in sampled_rows], uniforms)
    token_ids = tokens.tolist()
    raw = logits.log_softmax(dim=-1)
    logprobs: list[TokenLogprob | None] = []
    for row, state in enumerate(states):
        k = state.params.logprobs
        if k is None:
            logprobs.append(None)
            continue
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            values, ids = raw[row].topk(k)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        logprobs.append(TokenLogprob(token_ids[row], raw[row, token_ids[row]].item(), top))
    return token_ids, logprobs


# ---- random mixes of options ---------------------------------------------------------------------------------------


def _random_params(rng: random.Random, vocab: int) -> SamplingParams:
    greedy = rng.random() < 0.3
    bias = rng.sample(range(vocab), rng.choice([0, 0, 3, 40]))
    return SamplingParams(
        temperature=0.0 if greedy else rng.choice([0.3, 0.7, 1.0, 1.5]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5, 1e-50]),
        top_k=rng.choice([0, 0, 1, 5, 50]),
        presence_penalty=rng.choice([0.0, 0.0, 0.5, -1.0]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.25, 2.0]),
        logit_bias=tuple(sorted((token, rng.uniform(-100, 100)) for token in bias)),
        logprobs=rng.choice([None, None, 0, 1, 5, 20]),
    )


@pytest.mark.parametrize("case", range(8))
def test_batched_sampler_equals_the_per_row_sampler(case: int) -> None:
    rng = random.Random(case)
    vocab, rows, steps = 300, rng.choice([1, 3, 8, 17]), 66  # more steps than one block of uniforms
    params = [_random_params(rng, vocab) for _ in range(rows)]
    states = [SamplerState(p, torch.Generator().manual_seed(seed)) for seed, p in enumerate(params)]
    oracle_states = [SamplerState(p, torch.Generator()) for p in params]
    oracle_generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    logits_gen = torch.Generator().manual_seed(1000 + case)
    for _ in range(steps):
        logits = torch.randn(rows, vocab, generator=logits_gen) * 3
        before = logits.clone()
        got = sample(logits, states)
        assert got == _reference_sample(logits, oracle_states, oracle_generators)
        assert torch.equal(logits, before)  # logprobs are read from the model's own logits
        for state, oracle, token in zip(states, oracle_states, got[0], strict=True):
            state.output_ids.append(token)
            oracle.output_ids.append(token)


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch(torch_gen: torch.Generator) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, presence_penalty=0.5)
    alone = SamplerState(params, torch.Generator().manual_seed(7))
    crowd = [SamplerState(_random_params(random.Random(i), 300), torch.Generator().manual_seed(i)) for i in range(5)]
    batched = SamplerState(params, torch.Generator().manual_seed(7))
    for _ in range(80):
        logits = torch.randn(6, 300, generator=torch_gen)
        token_alone = sample(logits[2:3], [alone])[0][0]
        tokens = sample(logits, [*crowd[:2], batched, *crowd[2:]])[0]
        assert tokens[2] == token_alone
        for state, token in zip([*crowd[:2], batched, *crowd[2:]], tokens, strict=True):
            state.output_ids.append(token)
        alone.output_ids.append(token_alone)


def test_a_retried_step_draws_the_same_numbers(torch_gen: torch.Generator) -> None:
    """The engine samples a step again when it failed after sampling: no token was kept, so none may move."""
    params = SamplingParams(temperature=2.0, frequency_penalty=1.0, logprobs=3)
    states = [SamplerState(params, torch.Generator().manual_seed(seed)) for seed in range(4)]
    for _ in range(70):
        logits = torch.randn(4, 300, generator=torch_gen)
        first = sample(logits, states)
        assert sample(logits, states) == first
        for state, token in zip(states, first[0], strict=True):
            state.output_ids.append(token)


def test_the_seed_generator_is_not_consumed() -> None:
    generator = torch.Generator().manual_seed(11)
    before = generator.get_state()
    state = SamplerState(SamplingParams(temperature=1.0), generator)
    sample(torch.randn(1, 50), [state])
    assert torch.equal(generator.get_state(), before)


def test_sampling_waits_for_the_device_once_per_call(
    torch_gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One device-to-host copy for tokens and logprobs together: no `.item()`, no `.tolist()` per row."""
    rng = random.Random(3)
    states = [SamplerState(_random_params(rng, 400), torch.Generator().manual_seed(i)) for i in range(16)]
    states.append(SamplerState(SamplingParams(temperature=1.0, logprobs=5, presence_penalty=1.0,
                                              logit_bias=((1, 5.0),)), torch.Generator()))
    logits = torch.randn(len(states), 400, generator=torch_gen)
    for state in states:
        state.output_ids.extend([1, 2, 3])
        state.next_uniform()  # draws the sequence's block of uniform numbers (a host tensor, once per 64 tokens)
    transfers: list[str] = []
    for method in ("item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda tensor, *args, _original=original, _method=method: (
                                transfers.append(_method), _original(tensor, *args))[1])
    sample(logits, states)
    assert transfers == ["tolist"]


def test_a_step_that_samples_no_row_returns_nothing() -> None:
    """A step of prefill chunks that all stop short of their prompt's end has no row to sample."""
    assert sample(torch.zeros(0, 50), []) == ([], [])
