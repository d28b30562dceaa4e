"""Stepping a `ModelRunner` directly, as the engine does, over hand-made greedy sequences."""

from __future__ import annotations

import torch

from server.model_runner import ModelRunner
from server.sampling import SamplerState
from server.scheduler import ScheduledChunk, Sequence
from server.tokenizer import IncrementalDetokenizer, build_byte_tokenizer
from tests.support.engines import greedy

STEPS = 4  # the prefill's token, then decodes


def sequence(seq_id: int, prompt_ids: tuple[int, ...], slot: int) -> Sequence:
    """A greedy sequence of STEPS tokens on adapter `slot`, in KV blocks of its own (two of them)."""
    params = greedy(prompt_ids, STEPS).params
    blocks = [2 * seq_id, 2 * seq_id + 1]  # 32 tokens each, disjoint
    return Sequence(seq_id, f"r{seq_id}", 0, list(prompt_ids), len(prompt_ids), None,
                    SamplerState(params, torch.Generator()), IncrementalDetokenizer(build_byte_tokenizer(), (), False),
                    blocks=blocks, slot=slot)


def step_all(runner: ModelRunner, seqs: list[Sequence]) -> list[ScheduledChunk]:
    """One step of every sequence's pending tokens, applied as the engine applies it."""
    plan = [ScheduledChunk(seq, seq.num_pending) for seq in seqs]
    output = runner.execute(plan)
    for chunk in plan:
        chunk.seq.num_computed += chunk.num_tokens
    for chunk, token in zip(output.chunks, output.tokens, strict=True):
        chunk.seq.token_ids.append(token)
    return plan


def run_greedy(runner: ModelRunner, seqs: list[Sequence]) -> list[list[int]]:
    """STEPS tokens for each of `seqs`, stepped together (prefill, then one decode a step)."""
    for _ in range(STEPS):
        step_all(runner, seqs)
    return [seq.output_ids for seq in seqs]
