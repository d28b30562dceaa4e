"""Train real LoRA adapters for the embedded demo model, the way a user would: `transformers` + `peft`.

Each adapter learns to answer one prompt with its own phrase. Used by tests that must prove routing: a
request through adapter X can only produce X's phrase if X's weights were applied to its tokens.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
import transformers

from server.checkpoint import save_checkpoint
from server.demo import build_demo_model
from server.tokenizer import Tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def export_demo(directory: Path, seed: int = 0) -> Tokenizer:
    model, tokenizer = build_demo_model(seed)
    save_checkpoint(model, directory)
    tokenizer.save(directory)
    return tokenizer


def train_phrase_adapter(
    model_dir: Path, out_dir: Path, prompt_ids: list[int], answer_ids: list[int], rank: int = 8, steps: int = 150,
    seed: int = 0, config: peft.PeftConfig | None = None, lr: float = 1e-2,
) -> None:
    """Fit an adapter (LoRA of `rank` unless `config` says otherwise: IA3, prompt tuning) so that greedy decoding
    after `prompt_ids` yields `answer_ids`."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, config or peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100  # learn the answer only
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    model.save_pretrained(out_dir)
