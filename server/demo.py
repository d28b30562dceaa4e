"""The embedded demo model: a small random-weight Llama built the same way on every machine.

It exists so that `lorahive serve` answers on a fresh CPU machine with nothing to download. Its weights
are noise (fixed seed), so its text is noise too; adapters trained against it (tests do this) steer it.
"""

from __future__ import annotations

import math

import torch

from server.model import ModelArgs, Transformer
from server.tokenizer import Tokenizer, build_byte_tokenizer

DEMO_MODEL_NAME = "lorahive-demo"
DEMO_DESCRIPTION = "random-weight demo model (Llama architecture, about 3M parameters, untrained: its text is noise)"


def demo_args(vocab_size: int) -> ModelArgs:
    return ModelArgs(
        architecture="LlamaForCausalLM",
        vocab_size=vocab_size,
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        head_dim=32,
        intermediate_size=688,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
    )


def build_demo_model(seed: int = 0) -> tuple[Transformer, Tokenizer]:
    """Deterministic weights: the same seed gives the same bits on every machine (fp32, CPU)."""
    tokenizer = build_byte_tokenizer()
    args = demo_args(tokenizer.vocab_size)
    model = Transformer(args, max_seq_len=args.max_position_embeddings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                # Variance-preserving scale, so activations neither vanish nor blow up and the logits
                # have clear winners (greedy output then does not hinge on rounding).
                fan_in = param.shape[1]
                std = 1.0 if name == "tok_embeddings.weight" else 1.0 / math.sqrt(fan_in)
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        # Favour printable ASCII (and the end-of-text tokens) in the output head, so the demo's noise reads
        # as characters rather than broken UTF-8: other tokens get a zero row (logit 0), these a sharper one.
        printable = torch.zeros(args.vocab_size, dtype=torch.bool)
        printable[list(range(32, 127)) + [ord("\n"), *tokenizer.eos_token_ids]] = True
        model.output.weight[~printable] = 0.0
        model.output.weight[printable] *= 3.0
    return model.eval(), tokenizer
