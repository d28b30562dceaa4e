"""adapters_store.peft_format's bounds on what an adapter may cost or produce: pattern keys that are no regex
or too many, and weights or scales that would overflow the dtype the server serves them in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_store import AdapterFormatError, load_peft_adapter
from adapters_store.peft_format import ACTIVATION_HEADROOM, MAX_PATTERN_KEYS
from tests.support.tiny_llama_peft import BASE, Q0_A, Q0_B, make_peft, rewrite_config, rewrite_tensors

FP16_LIMIT = torch.finfo(torch.float16).max / ACTIVATION_HEADROOM  # about 4094


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A PEFT adapter (q and down_proj, rank 4, alpha 8: scale 2) with q_proj's weights set by each test."""
    make_peft(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    return tmp_path


def refused(directory: Path, dtype: torch.dtype = torch.float32) -> AdapterFormatError:
    with pytest.raises(AdapterFormatError) as info:
        load_peft_adapter(directory, "a", base=BASE, serving_dtype=dtype)
    return info.value


def set_q0(directory: Path, a: float, b: float) -> None:
    """Every element of layer 0's q_proj A [4, 64] and B [64, 4] set to one value."""
    rewrite_tensors(directory, lambda t: {**t, Q0_A: torch.full((4, 64), a), Q0_B: torch.full((64, 4), b)})


def test_a_real_peft_adapter_serves_in_every_dtype(adapter_dir: Path) -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert load_peft_adapter(adapter_dir, "a", base=BASE, serving_dtype=dtype).rank == 4


@pytest.mark.parametrize("key", ["q_proj\\", "\\q_proj", "layers\\.1\\9"])
def test_a_pattern_key_that_is_no_regex_names_the_field(adapter_dir: Path, key: str) -> None:
    for field in ("rank_pattern", "alpha_pattern"):
        rewrite_config(adapter_dir, **{field: {key: 4}})
        err = refused(adapter_dir)
        assert err.field == field and "regular expression" in err.message
        rewrite_config(adapter_dir, **{field: None})


def test_pattern_keys_are_bounded_in_number(adapter_dir: Path) -> None:
    many = {f"layers\\.{i}\\.self_attn\\.q_proj": 4 for i in range(MAX_PATTERN_KEYS)}
    rewrite_config(adapter_dir, rank_pattern=many)
    assert load_peft_adapter(adapter_dir, "a", base=BASE).rank == 4  # the limit itself is fine
    rewrite_config(adapter_dir, rank_pattern={**many, "one_more": 4})
    err = refused(adapter_dir)
    assert err.field == "rank_pattern" and str(MAX_PATTERN_KEYS) in err.message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lora_alpha": 1e30}, "lora_alpha"),
        ({"lora_alpha": 10**400}, "lora_alpha"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": -8}, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": 1e30}}, "alpha_pattern"),
        ({"alpha_pattern": {"q_proj": 0.0}}, "alpha_pattern"),
    ],
)
def test_scales_that_are_not_sane_name_their_field(adapter_dir: Path, changes: dict, field: str) -> None:
    rewrite_config(adapter_dir, **changes)
    err = refused(adapter_dir)
    assert err.field == field and field in err.message


def test_a_scale_that_only_float16_cannot_hold_is_refused_there_alone(adapter_dir: Path) -> None:
    rewrite_config(adapter_dir, lora_alpha=4 * 2 * FP16_LIMIT)  # scale 2 * FP16_LIMIT
    set_q0(adapter_dir, a=0.0, b=0.0)
    assert load_peft_adapter(adapter_dir, "a", base=BASE, serving_dtype=torch.bfloat16).rank == 4
    err = refused(adapter_dir, torch.float16)
    assert err.field == "lora_alpha" and "float16" in err.message


def test_weights_float16_cannot_hold_name_the_tensor(adapter_dir: Path) -> None:
    set_q0(adapter_dir, a=0.0, b=FP16_LIMIT)  # times the scale 2: past the limit, even with A all zero
    assert load_peft_adapter(adapter_dir, "a", base=BASE, serving_dtype=torch.float32).rank == 4
    assert refused(adapter_dir, torch.float16).field == Q0_B
    set_q0(adapter_dir, a=FP16_LIMIT, b=0.0)
    assert refused(adapter_dir, torch.float16).field == Q0_A


def test_a_delta_that_could_overflow_float16_names_b_though_each_weight_fits(adapter_dir: Path) -> None:
    # For an input of unit RMS aligned with A (all ones, σ(A) = sqrt(4·64) = 16): |x·Aᵀ| = sqrt(64)·16 = 128,
    # and the delta = 128 · scale 2 · |B row| (4 values b: 2·b) = 512·b.
    set_q0(adapter_dir, a=1.0, b=2.0)
    assert load_peft_adapter(adapter_dir, "a", base=BASE, serving_dtype=torch.float16).rank == 4  # 1024
    set_q0(adapter_dir, a=1.0, b=16.0)  # 8192, while scale·B is only 32
    err = refused(adapter_dir, torch.float16)
    assert err.field == Q0_B and "lora_alpha" in err.message
    assert load_peft_adapter(adapter_dir, "a", base=BASE, serving_dtype=torch.bfloat16).rank == 4


def test_huge_finite_weights_that_overflow_even_float32_work_are_refused(adapter_dir: Path) -> None:
    set_q0(adapter_dir, a=1e30, b=1e-30)  # each finite in float32, but x·Aᵀ could not be squared in float32
    err = refused(adapter_dir)
    assert err.field == Q0_A and "unit RMS" in err.message
