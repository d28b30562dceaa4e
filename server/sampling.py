"""Next-token choice for a batch of sequences, each with its own sampling parameters.

Greedy rows are one batched argmax. Sampled rows share the batched temperature / top-k / top-p work and
draw one uniform number each from their own seeded generator (on the CPU, so a seed gives the same
tokens whatever the device and whatever else is in the batch), then invert the CDF.
Logprobs are the model's own (before temperature and penalties), as OpenAI reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.requests import SamplingParams, TokenLogprob


@dataclass
class SamplerState:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    _logit_bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def logit_bias_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`params.logit_bias` as (token ids, biases), built at the sequence's first step and kept: building
        tensors from a few hundred Python numbers costs more than the add itself."""
        if self._logit_bias is None:
            token_ids, biases = zip(*self.params.logit_bias, strict=True)
            self._logit_bias = (torch.tensor(token_ids, device=device), torch.tensor(biases, device=device))
        return self._logit_bias


def _adjust_logits(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Apply logit bias and presence/frequency penalties (only rows that ask pay for it)."""
    adjusted = logits
    for row, state in enumerate(states):
        p = state.params
        if not (p.logit_bias or (state.output_ids and (p.presence_penalty or p.frequency_penalty))):
            continue
        if adjusted is logits:
            adjusted = logits.clone()
        if p.logit_bias:  # one indexed add, not a Python loop per entry on the engine thread
            token_ids, biases = state.logit_bias_tensors(logits.device)
            adjusted[row].index_add_(0, token_ids, biases.to(logits.dtype))
        if state.output_ids and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(state.output_ids, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[1]).to(logits.dtype)
            adjusted[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return adjusted


def _sample_rows(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Draw one token per row of `logits` (all rows have temperature > 0)."""
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in states], device=device)
    top_k = torch.tensor([s.params.top_k or logits.shape[1] for s in states], device=device)
    top_p = torch.tensor([s.params.top_p for s in states], device=device)
    sorted_logits, sorted_ids = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=device)
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token when it is within top-k and the mass strictly before it is below top-p; the most likely token
    # always survives, also when a tiny top_p rounds to 0 in float32.
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (ranks[None, :] < top_k[:, None]) & (mass_before < top_p[:, None])
    keep[:, 0] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = probs.cumsum(dim=-1)
    uniforms = torch.stack([torch.rand((), generator=s.generator) for s in states]).to(device)
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp_max(logits.shape[1] - 1)
    return sorted_ids.gather(1, picks).squeeze(1)


def _logprobs(raw_logprobs: torch.Tensor, row: int, token_id: int, k: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = raw_logprobs[row].topk(k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token_id, logprob=raw_logprobs[row, token_id].item(), top=top)


def sample(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choose the next token of each row; also its logprob where the sequence asked for it."""
    adjusted = _adjust_logits(logits, states)
    tokens = adjusted.argmax(dim=-1)
    sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        tokens[index] = _sample_rows(adjusted[index], [states[i] for i in sampled_rows])
    token_ids = tokens.tolist()
    raw_logprobs = logits.log_softmax(dim=-1) if any(s.params.logprobs is not None for s in states) else None
    logprobs: list[TokenLogprob | None] = [
        None if s.params.logprobs is None else _logprobs(raw_logprobs, i, token_ids[i], s.params.logprobs)
        for i, s in enumerate(states)
    ]
    return token_ids, logprobs
