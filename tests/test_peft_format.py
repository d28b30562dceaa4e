"""adapters_store.peft_format against adapters made by the real `peft` on a tiny random Llama.

The reference for every number is PEFT itself: A/B are its `lora_A["default"]` / `lora_B["default"]`
weights and the scale is its `module.scaling["default"]`, so rank_pattern / alpha_pattern / rsLoRA
resolution is checked against the library that wrote the files, not against our reading of it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from adapters_store import (
    TARGET_MODULES,
    AdapterFormatError,
    BaseModelShape,
    LoraAdapter,
    load_peft_adapter,
    parse_peft_adapter,
    validate_adapter_id,
)
from tests.support.tiny_llama_peft import (
    BASE,
    CONFIG,
    HIDDEN,
    LAYERS,
    Q0_A,
    Q0_B,
    Q1_A,
    WEIGHTS,
    make_peft,
    rewrite_config,
    rewrite_tensors,
)


def peft_reference(peft_model: Any) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """(layer, module) -> (A, B, scale) read from PEFT's live LoRA layers."""
    out = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", name)
        assert m is not None, name
        out[(int(m[1]), m[2])] = (
            module.lora_A["default"].weight.detach().float(),
            module.lora_B["default"].weight.detach().float(),
            module.scaling["default"],
        )
    return out


def assert_matches_peft(adapter: LoraAdapter, peft_model: Any) -> None:
    ref = peft_reference(peft_model)
    assert set(adapter.weights) == set(ref)
    for key, (a, b, scale) in ref.items():
        w = adapter.weights[key]
        assert w.a.dtype == torch.float32 and w.b.dtype == torch.float32
        assert w.a.is_contiguous() and w.b.is_contiguous()
        assert torch.equal(w.a, a), key
        assert torch.equal(w.b, b), key
        assert w.scale == pytest.approx(scale, rel=1e-12), key
    assert adapter.rank == max(a.shape[0] for a, _, _ in ref.values())
    assert adapter.target_modules == tuple(m for m in TARGET_MODULES if any(k[1] == m for k in ref))
    assert adapter.num_bytes == sum(a.nbytes + b.nbytes for a, b, _ in ref.values())


# -------------------------------------------------------------------------------------- what loads


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        pytest.param(dict(r=4, lora_alpha=8, target_modules=list(TARGET_MODULES)), id="plain-all-seven"),
        pytest.param(
            dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True), id="rslora-qv"
        ),
        pytest.param(
            dict(r=8, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]), id="mlp-only"
        ),
        pytest.param(
            dict(
                r=8,
                lora_alpha=16,
                target_modules=list(TARGET_MODULES),
                # First matching key wins: layer 1's q_proj gets 2, layer 0's gets 6.
                rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 6, "model.layers.0.mlp.down_proj": 3},
                # PEFT wraps the key in a group, so an alternation applies to the whole suffix.
                alpha_pattern={"v_proj": 5, r"layers\.1\.mlp\.up_proj": 32, "k_proj|o_proj": 7},
            ),
            id="rank-and-alpha-pattern",
        ),
        pytest.param(
            dict(
                r=4,
                lora_alpha=8,
                target_modules=["k_proj", "o_proj"],
                use_rslora=True,
                rank_pattern={"k_proj": 2},
            ),
            id="rslora-with-rank-pattern",
        ),
        pytest.param(dict(r=2, lora_alpha=4, target_modules="all-linear"), id="target-string"),
    ],
)
def test_loads_exactly_what_peft_uses(tmp_path: Path, lora_kwargs: dict[str, Any]) -> None:
    peft_model = make_peft(tmp_path, **lora_kwargs)
    adapter = load_peft_adapter(tmp_path, "my-adapter", base=BASE, max_rank=8)
    assert adapter.adapter_id == "my-adapter"
    assert adapter.lora_alpha == lora_kwargs["lora_alpha"]
    assert adapter.config["r"] == lora_kwargs["r"]
    assert_matches_peft(adapter, peft_model)


def test_parse_from_bytes_equals_load(tmp_path: Path) -> None:
    make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    loaded = load_peft_adapter(tmp_path, "a")
    parsed = parse_peft_adapter((tmp_path / CONFIG).read_bytes(), (tmp_path / WEIGHTS).read_bytes(), "a")
    assert loaded.weights.keys() == parsed.weights.keys()
    for key, w in loaded.weights.items():
        assert torch.equal(w.a, parsed.weights[key].a) and torch.equal(w.b, parsed.weights[key].b)
        assert w.scale == parsed.weights[key].scale


def test_accepts_unprefixed_names_adapter_infix_and_half_precision(tmp_path: Path) -> None:
    peft_model = make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])

    def rename_and_cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for i, (name, t) in enumerate(sorted(tensors.items())):
            name = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            out[name] = t.to(torch.bfloat16 if i % 2 else torch.float16)
        return out

    rewrite_tensors(tmp_path, rename_and_cast)
    adapter = load_peft_adapter(tmp_path, "a", base=BASE)
    for key, (a, b, scale) in peft_reference(peft_model).items():
        w = adapter.weights[key]
        assert w.a.dtype == torch.float32
        # Equal to PEFT's weights rounded to the half type they were stored in.
        assert torch.allclose(w.a, a, rtol=1e-2, atol=1e-3) and torch.allclose(w.b, b, rtol=1e-2, atol=1e-3)
        assert w.scale == scale


def test_lora_dropout_and_consistent_layers_to_transform_are_fine(tmp_path: Path) -> None:
    peft_model = make_peft(
        tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.1, layers_to_transform=[1]
    )
    adapter = load_peft_adapter(tmp_path, "a", base=BASE)
    assert set(adapter.weights) == {(1, "q_proj")}
    assert_matches_peft(adapter, peft_model)


# -------------------------------------------------------------------------------------- refusals


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A valid adapter (q, v and down_proj, rank 4) that each refusal test then breaks."""
    make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return tmp_path


def refusal(directory: Path, **kwargs: Any) -> AdapterFormatError:
    with pytest.raises(AdapterFormatError) as info:
        load_peft_adapter(directory, "a", **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize(
    ("lora_kwargs", "field", "words"),
    [
        (dict(use_dora=True, target_modules=["q_proj", "embed_tokens"]), "target_modules", "'embed_tokens'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save", "not supported"),
        (dict(bias="all"), "bias", "bias='none'"),
        (dict(target_modules=["q_proj", "lm_head"]), "target_modules", "'lm_head'"),
        (dict(target_modules=["q_proj", "embed_tokens"]), "target_modules", "'embed_tokens'"),
    ],
)
def test_refuses_unsupported_peft_features(
    tmp_path: Path, lora_kwargs: dict[str, Any], field: str, words: str
):
    make_peft(tmp_path, **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **lora_kwargs})
    err = refusal(tmp_path)
    assert err.field == field
    assert words in err.message and field in err.message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ({"peft_type": "P_TUNING"}, "peft_type"),
        ({"peft_type": "LOHA"}, "peft_type"),
        ({"peft_type": "ADALORA"}, "peft_type"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"use_qalora": True}, "use_qalora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"use_dora": 1}, "use_dora"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
        ({"trainable_token_indices": [5]}, "trainable_token_indices"),
        ({"r": 0}, "r"),
        ({"r": "4"}, "r"),
        ({"r": True}, "r"),
        ({"lora_alpha": "8"}, "lora_alpha"),
        ({"lora_alpha": None}, "lora_alpha"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": {"(q_proj": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"(.*)*x": 4}}, "alpha_pattern"),  # catastrophic backtracking: never compiled
        ({"alpha_pattern": ["q_proj"]}, "alpha_pattern"),
        ({"target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]}, "target_modules"),
        ({"target_modules": ["q_proj", "down_proj"]}, "target_modules"),  # v_proj tensors not listed
        ({"layers_to_transform": [0]}, "layers_to_transform"),  # layer 1 tensors present
    ],
)
def test_refuses_bad_config_fields(good: Path, changes: dict[str, Any], field: str) -> None:
    rewrite_config(good, **changes)
    err = refusal(good)
    assert err.field == field
    assert field in err.message


def test_ignores_lora_dropout_layers_pattern_and_regex_target_modules(good: Path) -> None:
    rewrite_config(good, lora_dropout=0.5, layers_pattern="layers", target_modules=r".*\.(q|v)_proj")
    # The regex string does not cover down_proj; only the tensors present count.
    assert {m for _, m in load_peft_adapter(good, "a").weights} == {"q_proj", "v_proj", "down_proj"}


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe\x00garbage", "not valid UTF-8 JSON"),
        (b'{"r": 4, "lora_alpha": NaN}', "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 100_000, "not valid UTF-8 JSON"),
    ],
)
def test_refuses_config_that_is_not_a_json_object(good: Path, content: bytes, words: str) -> None:
    (good / CONFIG).write_bytes(content)
    err = refusal(good)
    assert err.field == CONFIG and words in err.message


def test_refuses_missing_files(good: Path) -> None:
    (good / CONFIG).unlink()
    assert refusal(good).field == CONFIG
    (good / WEIGHTS).unlink()
    assert refusal(good).field == WEIGHTS
    assert refusal(good / "nope").field == "path"


def test_refuses_pickle_bin_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], _safe=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / WEIGHTS).exists()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    err = refusal(tmp_path)
    assert err.field == "adapter_model.bin"
    assert "pickle .bin files are not supported" in err.message and "safe_serialization" in err.message


def test_refuses_pickle_renamed_to_safetensors(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({Q0_A: torch.zeros(4, 64)}, good / WEIGHTS)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    err = refusal(good)
    assert err.field == WEIGHTS and "pickle" in err.message
    # A bare (non-zip) pickle stream too.
    torch.save({Q0_A: torch.zeros(4, 64)}, good / WEIGHTS, _use_new_zipfile_serialization=False)
    assert "pickle" in refusal(good).message


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -100, -1])
def test_refuses_truncated_safetensors(good: Path, keep: int) -> None:
    data = (good / WEIGHTS).read_bytes()
    (good / WEIGHTS).write_bytes(data[:keep])
    err = refusal(good)
    assert "truncated" in err.message
    if 0 <= keep <= 40:  # cut inside the length prefix or the header
        assert err.field == WEIGHTS
    else:  # cut inside the data: the first tensor whose bytes are missing is named
        assert err.field is not None and err.field.startswith("base_model.model.")


def test_refuses_header_length_claiming_10_gb_before_reading(good: Path) -> None:
    (good / WEIGHTS).write_bytes(struct.pack("<Q", 10 * 2**30) + b"{}")
    err = refusal(good)
    assert err.field == WEIGHTS and "header claims 10737418240 bytes" in err.message
    # Below the limit but past the end of the data: truncated, still without reading anything huge.
    (good / WEIGHTS).write_bytes(struct.pack("<Q", 1000) + b"{}")
    assert "truncated" in refusal(good).message
    # The configured limit is the one applied.
    (good / WEIGHTS).write_bytes(struct.pack("<Q", 2) + b"{}")
    assert "more than the 1 allowed" in refusal(good, max_header_bytes=1).message


def raw_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize(
    ("header", "data", "field", "words"),
    [
        ({"x": 1}, b"", "x", "not an object"),
        ({Q0_A: {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, b"\0" * 8, Q0_A, "outside"),
        ({Q0_A: {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, Q0_A, "needs 12"),
        ({Q0_A: {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, Q0_A, "dtype 'I32'"),
        ({Q0_A: {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, Q0_A, "invalid shape"),
        ({}, b"", WEIGHTS, "no LoRA tensors"),
    ],
)
def test_refuses_malformed_safetensors_headers(header: dict, data: bytes, field: str, words: str) -> None:
    with pytest.raises(AdapterFormatError) as info:
        parse_peft_adapter(b'{"r": 4, "lora_alpha": 8}', raw_safetensors(header, data), "a")
    assert info.value.field == field and words in info.value.message


def test_refuses_non_json_safetensors_header() -> None:
    blob = b"\xff not json at all"
    with pytest.raises(AdapterFormatError) as info:
        parse_peft_adapter(b'{"r": 4, "lora_alpha": 8}', struct.pack("<Q", len(blob)) + blob, "a")
    assert info.value.field == WEIGHTS and "JSON" in info.value.message


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding LoRA"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "bias"),
        ("base_model.model.lm_head.lora_A.weight", "'lm_head'"),
        ("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", "self_attn.q_proj"),
        ("base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight", "model.layers.<i>"),
        ("base_model.model.model.layers.\u0661.self_attn.q_proj.lora_A.weight", "unexpected tensor"),
    ],
)
def test_refuses_unexpected_tensors(good: Path, extra: str, words: str) -> None:
    rewrite_config(good, target_modules=".*")  # so only the tensor check can object
    rewrite_tensors(good, lambda t: {**t, extra: torch.zeros(4, 4)})
    err = refusal(good)
    assert err.field == extra and extra in err.message and words in err.message


def test_refuses_embedding_lora_made_by_peft(tmp_path: Path) -> None:
    make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    rewrite_config(tmp_path, target_modules=["q_proj"])  # get past the config check to the tensors
    # PEFT also saves the full embedding matrix alongside; refused too (it is not LoRA).
    err = refusal(tmp_path)
    assert err.field == "base_model.model.model.embed_tokens.base_layer.weight" and "base" in err.message

    rewrite_tensors(tmp_path, lambda t: {k: v for k, v in t.items() if "base_layer" not in k})
    err = refusal(tmp_path)
    assert err.field is not None and "lora_embedding" in err.field and "embedding LoRA" in err.message


def test_refuses_missing_b_and_two_adapter_names(good: Path) -> None:
    shutil.copytree(good, good / "copy")
    rewrite_tensors(good, lambda t: {k: v for k, v in t.items() if k != Q0_B})
    err = refusal(good)
    assert err.field == Q0_A and "lora_B" in err.message

    other = good / "copy"
    rewrite_tensors(other, lambda t: {**t, Q0_A.replace(".weight", ".second.weight"): t[Q0_A].clone()})
    assert "several adapter names" in refusal(other).message


def test_refuses_nan_and_inf(good: Path) -> None:
    def poison(value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            t[Q1_A] = t[Q1_A].clone()
            t[Q1_A][1, 3] = value
            return t

        return edit

    rewrite_tensors(good, poison(math.nan))
    err = refusal(good)
    assert err.field == Q1_A and "NaN" in err.message
    rewrite_tensors(good, poison(math.inf))
    assert refusal(good).field == Q1_A
    # float64 values beyond float32's range become inf on conversion and are refused too.
    rewrite_tensors(good, lambda t: {**t, Q1_A: torch.full((4, 64), 1e300, dtype=torch.float64)})
    assert refusal(good).field == Q1_A


def test_refuses_shapes_that_do_not_fit_the_base_model(good: Path) -> None:
    wider = BaseModelShape(LAYERS, {**BASE.module_dims, "q_proj": (HIDDEN * 2, HIDDEN)})
    err = refusal(good, base=wider)
    assert err.field == Q0_A and "[4, 64]" in err.message and "[4, 128]" in err.message

    narrower_out = BaseModelShape(LAYERS, {**BASE.module_dims, "v_proj": (HIDDEN, 16)})
    err = refusal(good, base=narrower_out)
    assert err.field == "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    assert "[32, 4]" in err.message and "[16, 4]" in err.message

    no_v = BaseModelShape(LAYERS, {k: v for k, v in BASE.module_dims.items() if k != "v_proj"})
    assert "no v_proj" in refusal(good, base=no_v).message


def test_refuses_layer_index_out_of_range(good: Path) -> None:
    err = refusal(good, base=BaseModelShape(1, BASE.module_dims))
    assert err.field is not None and ".layers.1." in err.field
    assert "layer 1" in err.message and "1 layers" in err.message


def test_refuses_rank_above_max_rank(good: Path) -> None:
    assert load_peft_adapter(good, "a", max_rank=4).rank == 4
    err = refusal(good, max_rank=2)
    assert err.field == "r" and "4" in err.message and "2" in err.message


def test_refuses_rank_pattern_rank_above_max_rank(tmp_path: Path) -> None:
    make_peft(tmp_path, r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8})
    err = refusal(tmp_path, max_rank=4)
    assert err.field == "rank_pattern" and "8" in err.message


def test_refuses_rank_that_disagrees_with_config(good: Path) -> None:
    rewrite_config(good, rank_pattern={"layers.0.self_attn.q_proj": 3})
    err = refusal(good)
    assert err.field == Q0_A and "rank 4" in err.message and "rank 3" in err.message
    rewrite_config(good, rank_pattern={}, r=8)
    assert "rank 8 (r)" in refusal(good).message


def test_refuses_inconsistent_a_and_b(good: Path) -> None:
    rewrite_tensors(good, lambda t: {**t, Q0_B: torch.zeros(64, 3)})
    err = refusal(good)
    assert err.field == Q0_B and "rank 4" in err.message
    rewrite_tensors(good, lambda t: {**t, Q0_B: torch.zeros(64, 4, 1)})
    assert "2-D" in refusal(good).message
    # Without a base model, layers must still agree with each other.
    rewrite_tensors(good, lambda t: {**t, Q0_B: torch.zeros(64, 4), Q1_A: torch.zeros(4, 65)})
    assert refusal(good).field == Q1_A


def test_result_is_read_only(good: Path) -> None:
    adapter = load_peft_adapter(good, "a")
    with pytest.raises(TypeError):
        adapter.weights[(0, "q_proj")] = adapter.weights[(0, "v_proj")]  # type: ignore[index]
    with pytest.raises(AttributeError):
        adapter.rank = 3  # type: ignore[misc]


# -------------------------------------------------------------------------------------- adapter ids


@pytest.mark.parametrize("good_id", ["a", "A", "0", "llama-3_sql.v2", "x" * 128, "a..b", "a-", "a."])
def test_validate_adapter_id_accepts(good_id: str) -> None:
    assert validate_adapter_id(good_id) == good_id


@pytest.mark.parametrize(
    "bad_id",
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "a\\b",
        ".hidden",
        "-rf",
        "_x",
        "x" * 129,
        "a b",
        "a\n",
        "a\x00",
        "\u0430dapter",  # Cyrillic a
        "ada\u212apter",  # Kelvin sign, which looks like K
        "\uff41",  # fullwidth a
        "caf\u00e9",
        "\u0661",  # Arabic-Indic digit one
        "a:b",
    ],
)
def test_validate_adapter_id_refuses(bad_id: str) -> None:
    with pytest.raises(AdapterFormatError) as info:
        validate_adapter_id(bad_id)
    assert info.value.field == "id"


def test_loaders_validate_the_id(good: Path) -> None:
    with pytest.raises(AdapterFormatError) as info:
        load_peft_adapter(good, "../escape")
    assert info.value.field == "id"
    with pytest.raises(AdapterFormatError):
        parse_peft_adapter(b"{}", b"", "a/b")
    with pytest.raises(AdapterFormatError):
        validate_adapter_id(None)  # type: ignore[arg-type]


def test_safetensors_bytes_round_trip_through_parse() -> None:
    # Hand-built minimal adapter: no peft needed, checks the scale formula with no pattern at all.
    tensors = {Q0_A: torch.randn(2, HIDDEN), Q0_B: torch.randn(HIDDEN, 2)}
    adapter = parse_peft_adapter(
        json.dumps({"r": 2, "lora_alpha": 3, "use_rslora": True}).encode(),
        save(tensors),
        "hand-made",
        base=BASE,
    )
    w = adapter.weights[(0, "q_proj")]
    assert w.scale == pytest.approx(3 / math.sqrt(2))
    assert torch.equal(w.a, tensors[Q0_A]) and adapter.target_modules == ("q_proj",)
