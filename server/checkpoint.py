"""Hugging Face checkpoint directories <-> our `Transformer`.

Reading maps HF tensor names onto our modules and fuses q|k|v and gate|up into one weight each at load
time, so the forward does one GEMM where the checkpoint has three. Writing does the reverse; it exists so
the embedded demo model can be handed to `transformers`/`peft` (to train adapters for it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from server.model import ModelArgs, Transformer

# HF name (after "model.layers.{i}.") -> (our module path, slice index within the fused weight)
_LAYER_WEIGHTS = {
    "self_attn.q_proj": ("attention.wqkv", 0),
    "self_attn.k_proj": ("attention.wqkv", 1),
    "self_attn.v_proj": ("attention.wqkv", 2),
    "self_attn.o_proj": ("attention.wo", 0),
    "mlp.gate_proj": ("feed_forward.w_gate_up", 0),
    "mlp.up_proj": ("feed_forward.w_gate_up", 1),
    "mlp.down_proj": ("feed_forward.w_down", 0),
}
_NORMS = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def read_config(model_dir: Path) -> ModelArgs:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} has no config.json; --model must be a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        position = f"line {exc.lineno} column {exc.colno}"
        raise ValueError(f"{config_path} is not valid JSON: {exc.msg} at {position}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds no JSON object")
    try:
        return ModelArgs.from_hf_config(config)
    except KeyError as exc:
        raise ValueError(f"{config_path} lacks {exc.args[0]!r}, which the model needs") from None


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors weights (pickle .bin checkpoints are not loaded)")
    return files


def _iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_weights(model: Transformer, model_dir: Path) -> None:
    """Copy every tensor of the checkpoint into `model`; fail loudly on anything missing or unknown."""
    destinations = _hf_views(model)
    for hf_name, tensor in _iter_tensors(model_dir):
        if "rotary_emb.inv_freq" in hf_name or (hf_name == "lm_head.weight" and model.args.tie_word_embeddings):
            continue  # older checkpoints store the RoPE table; we compute it. Tied heads share the embedding.
        dest = destinations.pop(hf_name, None)
        if dest is None:
            raise ValueError(f"unexpected tensor {hf_name!r} in {model_dir}")
        if dest.shape != tensor.shape:
            raise ValueError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)
    if destinations:
        missing = ", ".join(sorted(destinations)[:5])
        raise ValueError(f"{model_dir} lacks {len(destinations)} tensor(s) the model needs: {missing}")


def _hf_views(model: Transformer) -> dict[str, torch.Tensor]:
    """Hugging Face tensor name -> the tensor it is in our model (a view into a fused weight where split)."""
    views = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not model.args.tie_word_embeddings:
        views["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        for hf_norm, ours in _NORMS.items():
            views[f"{prefix}{hf_norm}.weight"] = getattr(layer, ours).weight
        for hf_module, (path, slice_index) in _LAYER_WEIGHTS.items():
            module = layer.get_submodule(path)
            base = module.base  # LoRA pages are the adapters'; the checkpoint fills the base layer
            offset = sum(module.slice_widths[:slice_index])
            width = module.slice_widths[slice_index]
            views[f"{prefix}{hf_module}.weight"] = base.weight[offset : offset + width]
            if base.bias is not None:
                views[f"{prefix}{hf_module}.bias"] = base.bias[offset : offset + width]
    return views


def save_checkpoint(model: Transformer, model_dir: Path) -> None:
    """Write config.json + model.safetensors that `transformers` (and `load_weights`) can read."""
    model_dir.mkdir(parents=True, exist_ok=True)
    config = model.args.to_hf_config() | {"torch_dtype": "float32"}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in _hf_views(model).items()}
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
