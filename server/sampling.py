"""Next-token choice for a batch of sequences, each with its own sampling parameters.

Every option is batched: the per-row parameters travel to the device as one small non-blocking copy, logit
bias and penalties are one indexed add each, greedy rows are one argmax, sampled rows share the temperature /
top-k / top-p work and invert the CDF at one uniform number each, logprobs are one log-softmax and one top-k.
The tokens and logprobs come back to the host in ONE transfer: the step's only wait for the device.

A sequence's n-th sampled token uses the n-th number of its seeded generator's stream (drawn on the CPU in
blocks), so a seed gives the same tokens whatever the device, whatever else is in the batch, and however often
a failed step is retried (the index is the count of tokens the sequence has kept, which only grows on success).
Logprobs are the model's own (before temperature and penalties), as OpenAI reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.requests import SamplingParams, TokenLogprob

# Uniform numbers drawn from a sequence's generator at a time: one draw call per this many tokens.
_UNIFORM_BLOCK = 64


@dataclass
class SamplerState:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    generator: torch.Generator  # the seed; the sampler draws from its own copy, so this one never moves
    output_ids: list[int] = field(default_factory=list)
    _logit_bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _stream: torch.Generator | None = field(default=None, repr=False)
    _block: list[float] = field(default_factory=list, repr=False)
    _block_index: int = field(default=-1, repr=False)
    _counts: torch.Tensor | None = field(default=None, repr=False)  # [vocab] occurrences in output_ids[:_counted]
    _counted: int = field(default=0, repr=False)

    def logit_bias_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`params.logit_bias` as (token ids, biases), built at the sequence's first step and kept: building
        tensors from a few hundred Python numbers costs more than the add itself."""
        if self._logit_bias is None:
            token_ids, biases = zip(*self.params.logit_bias, strict=True)
            self._logit_bias = (_host_to(token_ids, torch.long, device), _host_to(biases, torch.float32, device))
        return self._logit_bias

    def next_uniform(self) -> float:
        """The uniform number in [0, 1) that picks this sequence's next token: number len(output_ids) of the
        generator's stream. Asking again before a token is kept gives the same number (a retried step)."""
        block_index, offset = divmod(len(self.output_ids), _UNIFORM_BLOCK)
        if self._stream is None or block_index < self._block_index:
            self._stream = torch.Generator().set_state(self.generator.get_state())
            self._block_index = -1
        while self._block_index < block_index:
            self._block = torch.rand(_UNIFORM_BLOCK, generator=self._stream).tolist()
            self._block_index += 1
        return self._block[offset]

    @property
    def penalized(self) -> bool:
        return bool(self.params.presence_penalty or self.params.frequency_penalty)


def _host_to(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of Python numbers on `device`, copied without waiting for the device's queue."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _rows(states: list[SamplerState], wanted) -> list[int]:
    return [row for row, state in enumerate(states) if wanted(state)]


def _penalty_counts(states: list[SamplerState], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(states), vocab] occurrences of each token in each sequence's output. Each sequence keeps its own
    count row and adds only the tokens kept since its last step, all rows in one indexed add."""
    for state in states:
        if state._counts is None or state._counts.device != device:
            state._counts = torch.zeros(vocab_size, device=device)
            state._counted = 0
    rows = [state._counts for state in states]
    counts = torch.stack(rows)
    new_rows = [row for row, state in enumerate(states) for _ in state.output_ids[state._counted:]]
    if new_rows:
        new_ids = [token for state in states for token in state.output_ids[state._counted:]]
        ones = torch.ones(len(new_rows), device=device)
        counts.index_put_((_host_to(new_rows, torch.long, device), _host_to(new_ids, torch.long, device)), ones,
                          accumulate=True)
        torch._foreach_copy_(rows, list(counts.unbind(0)))
        for state in states:
            state._counted = len(state.output_ids)
    return counts


def _adjust_logits(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Apply logit bias and presence/frequency penalties (only rows that ask pay for it)."""
    bias_rows = _rows(states, lambda s: s.params.logit_bias)
    penalty_rows = _rows(states, lambda s: s.penalized)
    if not (bias_rows or penalty_rows):
        return logits
    adjusted = logits.clone()
    device, dtype = logits.device, logits.dtype
    if bias_rows:
        tables = [states[row].logit_bias_tensors(device) for row in bias_rows]
        entry_rows = [row for row in bias_rows for _ in states[row].params.logit_bias]
        token_ids = torch.cat([ids for ids, _ in tables])
        biases = torch.cat([values for _, values in tables]).to(dtype)
        adjusted.index_put_((_host_to(entry_rows, torch.long, device), token_ids), biases, accumulate=True)
    if penalty_rows:
        penalized = [states[row] for row in penalty_rows]
        counts = _penalty_counts(penalized, logits.shape[1], device).to(dtype)
        weights = _host_to([[s.params.frequency_penalty, s.params.presence_penalty] for s in penalized], dtype,
                           device)
        penalties = weights[:, :1] * counts + weights[:, 1:] * (counts > 0).to(dtype)
        adjusted.index_add_(0, _host_to(penalty_rows, torch.long, device), penalties, alpha=-1)
    return adjusted


def _sample_rows(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Draw one token per row of `logits` (all rows have temperature > 0)."""
    device, vocab_size = logits.device, logits.shape[1]
    # One [rows, 4] copy: temperature, top-k (exact in float32 below 2**24), top-p, the uniform number.
    columns = _host_to([[s.params.temperature, s.params.top_k or vocab_size, s.params.top_p, s.next_uniform()]
                        for s in states], torch.float32, device)
    temperature, top_k, top_p, uniforms = columns.unbind(1)
    sorted_logits, sorted_ids = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab_size, device=device)
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token when it is within top-k and the mass strictly before it is below top-p; the most likely token
    # always survives, also when a tiny top_p rounds to 0 in float32.
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (ranks[None, :] < top_k[:, None]) & (mass_before < top_p[:, None])
    keep[:, 0] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp_max(vocab_size - 1)
    return sorted_ids.gather(1, picks).squeeze(1)


def _choose_tokens(adjusted: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    sampled_rows = _rows(states, lambda s: not s.params.greedy)
    if sampled_rows and len(sampled_rows) == len(states):
        return _sample_rows(adjusted, states)
    tokens = adjusted.argmax(dim=-1)
    if sampled_rows:
        index = _host_to(sampled_rows, torch.long, adjusted.device)
        tokens[index] = _sample_rows(adjusted[index], [states[row] for row in sampled_rows])
    return tokens


def _logprob_parts(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], top_k: int) -> list[torch.Tensor]:
    """The chosen token's logprob of each row in `rows`, then their `top_k` most likely (logprobs, ids)."""
    if len(rows) < logits.shape[0]:
        index = _host_to(rows, torch.long, logits.device)
        logits, tokens = logits[index], tokens[index]
    raw_logprobs = logits.log_softmax(dim=-1)
    parts = [raw_logprobs.gather(1, tokens[:, None]).flatten()]
    if top_k > 0:
        values, ids = raw_logprobs.topk(top_k)
        parts += [values.flatten(), ids.flatten()]
    return parts


def sample(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choose the next token of each row; also its logprob where the sequence asked for it."""
    tokens = _choose_tokens(_adjust_logits(logits, states), states)
    logprob_rows = _rows(states, lambda s: s.params.logprobs is not None)
    top_k = max((states[row].params.logprobs for row in logprob_rows), default=0)
    parts = [tokens]
    if logprob_rows:
        parts += _logprob_parts(logits, tokens, logprob_rows, top_k)
    # float64 holds every token id and float32 logprob exactly: one tensor, one transfer.
    values = torch.cat([part.to(torch.float64) for part in parts]).tolist()
    token_ids = [int(value) for value in values[: len(states)]]
    logprobs: list[TokenLogprob | None] = [None] * len(states)
    chosen = values[len(states): len(states) + len(logprob_rows)]
    top_values = values[len(states) + len(logprob_rows):][: len(logprob_rows) * top_k]
    top_ids = values[len(states) + len(logprob_rows) * (1 + top_k):]
    for i, row in enumerate(logprob_rows):
        k = states[row].params.logprobs
        top = zip(top_ids[i * top_k: i * top_k + k], top_values[i * top_k: i * top_k + k], strict=True)
        logprobs[row] = TokenLogprob(token_id=token_ids[row], logprob=chosen[i],
                                     top=tuple((int(token), value) for token, value in top))
    return token_ids, logprobs
