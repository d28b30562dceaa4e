"""DoRA and IA3 adapters as `peft` saves them are parsed exactly; anything else of theirs is refused naming the
field or tensor at fault (shapes against the served model, NaN, vectors past the serving dtype, input scaling
of a fused module, other PEFT types)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from adapters_store import AdapterFormatError, load_peft_adapter
from tests.support.tiny_llama_peft import (
    BASE,
    HEAD_DIM,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    make_peft,
    make_peft_ia3,
    rewrite_config,
    rewrite_tensors,
)

SERVED = dataclasses.replace(BASE, shared_input_modules=frozenset({"q_proj", "k_proj", "v_proj", "gate_proj",
                                                                    "up_proj"}))
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
K0 = "base_model.model.model.layers.0.self_attn.k_proj"
DOWN0 = "base_model.model.model.layers.0.mlp.down_proj"
UP0 = "base_model.model.model.layers.0.mlp.up_proj"


def refusal(directory: Path, base=SERVED) -> AdapterFormatError:
    with pytest.raises(AdapterFormatError) as info:
        load_peft_adapter(directory, "a", base=base)
    return info.value


@pytest.fixture
def dora(tmp_path: Path) -> Path:
    make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    return tmp_path


@pytest.fixture
def ia3(tmp_path: Path) -> Path:
    make_peft_ia3(tmp_path, target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                  feedforward_modules=["down_proj"])
    return tmp_path


def test_dora_adapter_keeps_peft_s_magnitudes(tmp_path: Path):
    model = make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    adapter = load_peft_adapter(tmp_path, "a", base=SERVED)
    assert adapter.kind == "dora" and adapter.rank == 4
    assert adapter.target_modules == ("q_proj", "v_proj", "down_proj")
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    torch.testing.assert_close(adapter.weights[(1, "v_proj")].magnitude,
                               layer.lora_magnitude_vector["default"].weight.detach())


def test_ia3_adapter_keeps_peft_s_vectors_and_which_scale_inputs(tmp_path: Path):
    model = make_peft_ia3(tmp_path, target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                          feedforward_modules=["down_proj"])
    adapter = load_peft_adapter(tmp_path, "a", base=SERVED)
    assert (adapter.kind, adapter.rank, adapter.weights) == ("ia3", 0, {})
    assert adapter.target_modules == ("k_proj", "v_proj", "up_proj", "down_proj")
    assert [s.on_input for (layer, _), s in adapter.scales.items() if layer == 0] == [False, False, False, True]
    down = model.base_model.model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(adapter.scales[(1, "down_proj")].vector, down.ia3_l["default"].detach().flatten())
    assert adapter.num_bytes == sum(s.vector.nbytes for s in adapter.scales.values())


def test_dora_magnitude_saved_the_older_way_is_read(dora: Path):
    rewrite_tensors(dora, lambda t: {k.replace("lora_magnitude_vector", "lora_magnitude_vector.weight"): v
                                     for k, v in t.items()})
    assert load_peft_adapter(dora, "a", base=SERVED).kind == "dora"


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (lambda t: {k: v for k, v in t.items() if k != f"{Q0}.lora_magnitude_vector"}, f"{Q0}.lora_A.weight",
         "lora_magnitude_vector"),
        (lambda t: {**t, f"{Q0}.lora_magnitude_vector": torch.ones(HIDDEN + 1)}, f"{Q0}.lora_magnitude_vector",
         f"[{HIDDEN}]"),
        (lambda t: {**t, f"{Q0}.lora_magnitude_vector": torch.ones(HIDDEN, 1)}, f"{Q0}.lora_magnitude_vector",
         "shape"),
        (lambda t: {**t, f"{Q0}.lora_magnitude_vector": torch.full((HIDDEN,), float("nan"))},
         f"{Q0}.lora_magnitude_vector", "NaN"),
        (lambda t: {**t, f"{Q0}.lora_magnitude_vector": torch.full((HIDDEN,), 1e30)},
         f"{Q0}.lora_magnitude_vector", "beyond"),
    ],
)
def test_hostile_dora_tensors_are_refused_naming_the_tensor(dora: Path, edit, field: str, words: str):
    rewrite_tensors(dora, edit)
    err = refusal(dora)
    assert err.field == field and words in err.message


def test_magnitudes_without_use_dora_are_refused(dora: Path):
    rewrite_config(dora, use_dora=False)
    err = refusal(dora)
    assert err.field.endswith("lora_magnitude_vector") and "use_dora" in err.message


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (lambda t: {**t, f"{K0}.ia3_l": torch.ones(KV_HEADS * HEAD_DIM + 1, 1)}, f"{K0}.ia3_l",
         f"[{KV_HEADS * HEAD_DIM}, 1]"),
        (lambda t: {**t, f"{DOWN0}.ia3_l": torch.ones(HIDDEN, 1)}, f"{DOWN0}.ia3_l", f"[1, {INTERMEDIATE}]"),
        (lambda t: {**t, f"{K0}.ia3_l": torch.full((KV_HEADS * HEAD_DIM, 1), float("inf"))}, f"{K0}.ia3_l", "NaN"),
        (lambda t: {**t, f"{K0}.ia3_l": torch.full((KV_HEADS * HEAD_DIM, 1), -1e30)}, f"{K0}.ia3_l", "beyond"),
        (lambda t: {**t, f"{Q0}.lora_A.weight": torch.ones(4, HIDDEN)}, f"{Q0}.lora_A.weight", "ia3_l"),
        (lambda t: {**t, "base_model.model.model.layers.7.self_attn.k_proj.ia3_l": torch.ones(32, 1)},
         "base_model.model.model.layers.7.self_attn.k_proj.ia3_l", "layers"),
        (lambda t: {**t, "base_model.model.lm_head.ia3_l": torch.ones(300, 1)}, "base_model.model.lm_head.ia3_l",
         "only"),
    ],
)
def test_hostile_ia3_tensors_are_refused_naming_the_tensor(ia3: Path, edit, field: str, words: str):
    rewrite_config(ia3, target_modules=".*")  # so that only the tensor checks can object
    rewrite_tensors(ia3, edit)
    err = refusal(ia3)
    assert err.field == field and words in err.message


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"feedforward_modules": ["up_proj", "down_proj"]}, "fused"),  # up_proj's input is gate_proj's too
        ({"feedforward_modules": "down_proj"}, "list"),
        ({"feedforward_modules": ["down_proj", "o_proj"]}, "target_modules"),
        ({"feedforward_modules": [3]}, "list"),
    ],
)
def test_ia3_feedforward_modules_that_cannot_be_served_are_refused(ia3: Path, changes: dict, words: str):
    rewrite_config(ia3, **changes)
    err = refusal(ia3)
    assert err.field == "feedforward_modules" and words in err.message


@pytest.mark.parametrize(("field", "value"), [("modules_to_save", ["lm_head"]), ("fan_in_fan_out", True)])
def test_ia3_features_that_change_the_meaning_are_refused(ia3: Path, field: str, value):
    rewrite_config(ia3, **{field: value})
    assert refusal(ia3).field == field


def test_ia3_vectors_of_modules_outside_target_modules_are_refused(ia3: Path):
    rewrite_config(ia3, target_modules=["k_proj", "v_proj", "down_proj"])
    err = refusal(ia3)
    assert err.field == "target_modules" and f"{UP0.removeprefix('base_model.model.')}" in err.message
