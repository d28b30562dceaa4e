"""The Llama-family decoder (Llama, Mistral, Qwen2) in one file, over a paged KV cache.

The forward takes a flattened batch: the new tokens of every scheduled sequence, one after another,
whatever mix of prefill chunks and decode steps they are. `StepBatch` says where each token sits (its
position, its KV-cache slot) and where each sequence's keys are (`kernels.AttentionBatch`): attention reads
the cache block by block through the block tables (`kernels.paged_attention`), one call for the whole mix.
LoRA lives inside `LoRALinear`: the model never learns which tenant a token belongs to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import AttentionBatch, paged_attention
from server.lora_linear import LoRAContext, LoRALinear, fused_linear

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Read a Hugging Face `config.json` (transformers 4.x or 5.x spelling)."""
        architecture = (config.get("architectures") or ["LlamaForCausalLM"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {architecture!r} is not supported; lorahive serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        n_heads = config["num_attention_heads"]
        dim = config["hidden_size"]
        # transformers 5 moved rope_theta and rope_scaling into one `rope_parameters` dict.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        attention_bias = config.get("attention_bias", is_qwen2)
        uses_window = config.get("use_sliding_window", not is_qwen2)
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or dim // n_heads,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=attention_bias,
            o_bias=attention_bias and not is_qwen2,  # Qwen2 biases q/k/v only
            mlp_bias=config.get("mlp_bias", False),
            sliding_window=config.get("sliding_window") if uses_window else None,
        )

    def to_hf_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}.get(
                self.architecture, "qwen2"
            ),
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
        }
        return config

    @property
    def lora_module_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each LoRA target module, the shapes an adapter must match."""
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {
            "q_proj": (self.dim, q_out),
            "k_proj": (self.dim, kv_out),
            "v_proj": (self.dim, kv_out),
            "o_proj": (q_out, self.dim),
            "gate_proj": (self.dim, self.intermediate_size),
            "up_proj": (self.dim, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.dim),
        }


# The projections each fused base layer computes from one input (`Attention.wqkv`, `FeedForward.w_gate_up`): an
# adapter cannot scale the input of one of them alone (IA3's feedforward scaling is served on o_proj, down_proj).
SHARED_INPUT_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies of rotary embedding, with linear or Llama-3 scaling applied."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: linear, llama3)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face Llama layout). x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class StepBatch:
    """Everything the forward needs about one step, built once and read by every layer."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    cache_slots: torch.Tensor  # [T] flat KV-cache slot each new token's K/V is written to
    attention: AttentionBatch  # where each sequence's queries and cached keys are (tokens sequence by sequence)
    sliding_window: int | None  # a query at position p sees keys j with p - j < window; None: all j <= p
    logits_index: torch.Tensor  # [B'] rows whose next-token logits are wanted
    # (rows [V], embeddings [V, dim]): rows that take these embeddings instead of their token's (soft prompts)
    input_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


class AttentionContext:
    """How every attention layer of one model runs.

    `backend` is resolved once when the engine is built ("torch" or "triton"; "auto" decides per call).
    """

    def __init__(self) -> None:
        self.backend: str = "auto"


class KVCache(nn.Module):
    """Paged KV storage: one [blocks, block_size, kv_heads, head_dim] tensor per layer for K and for V.

    A token's flat slot is `block * block_size + offset`: `update` writes by slot, the attention kernels read
    the same memory block by block through each sequence's block table.
    """

    def __init__(
        self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype, device
    ):
        super().__init__()
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V ([T, kv_heads, head_dim]) at their flat slots; the layer's paged K and V."""
        k_pages, v_pages = self.k[layer], self.v[layer]
        k_pages.flatten(0, 1)[slots] = k
        v_pages.flatten(0, 1)[slots] = v
        return k_pages, v_pages


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, lora: LoRAContext, context: AttentionContext):
        super().__init__()
        self.layer_id = layer_id
        self.context = context
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        qkv = (q_out, kv_out, kv_out)
        self.wqkv = LoRALinear(fused_linear(args.dim, qkv, args.qkv_bias), qkv, ("q_proj", "k_proj", "v_proj"), lora)
        self.wo = LoRALinear(fused_linear(q_out, (args.dim,), args.o_bias), (args.dim,), ("o_proj",), lora)

    def forward(self, x, cos, sin, step: StepBatch, cache: KVCache) -> torch.Tensor:
        t = x.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(t, self.n_kv_heads, self.head_dim), cos, sin)
        k_pages, v_pages = cache.update(self.layer_id, step.cache_slots, k, v.view(t, self.n_kv_heads, self.head_dim))
        out = paged_attention(q, k_pages, v_pages, step.attention, step.sliding_window, self.context.backend)
        return self.wo(out.view(t, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, lora: LoRAContext):
        super().__init__()
        hidden = args.intermediate_size
        gate_up = (hidden, hidden)
        self.w_gate_up = LoRALinear(
            fused_linear(args.dim, gate_up, args.mlp_bias), gate_up, ("gate_proj", "up_proj"), lora
        )
        self.w_down = LoRALinear(fused_linear(hidden, (args.dim,), args.mlp_bias), (args.dim,), ("down_proj",), lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, lora: LoRAContext, attention: AttentionContext):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id, lora, attention)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args, lora)

    def forward(self, x, cos, sin, step: StepBatch, cache: KVCache) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, step, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_seq_len: int):
        super().__init__()
        self.args = args
        self.lora = LoRAContext()
        self.attention_context = AttentionContext()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, self.lora, self.attention_context) for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._build_rope_cache(max_seq_len)

    def _build_rope_cache(self, max_seq_len: int) -> None:
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), rope_inv_freq(self.args))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos().float(), persistent=False)
        self.register_buffer("rope_sin", emb.sin().float(), persistent=False)

    def lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    @torch.inference_mode()
    def forward(self, step: StepBatch, cache: KVCache) -> torch.Tensor:
        """Next-token logits (fp32) for the rows in `step.logits_index`."""
        x = self.tok_embeddings(step.input_ids)
        if step.input_embeddings is not None:
            rows, embeddings = step.input_embeddings
            x = x.index_copy(0, rows, embeddings.to(x.dtype))
        cos = self.rope_cos[step.positions].to(x.dtype)
        sin = self.rope_sin[step.positions].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, step, cache)
        x = self.norm(x[step.logits_index])
        return self.output(x).float()
