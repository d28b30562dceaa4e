"""Synthetic adapters of each PEFT kind (lora, dora, ia3, prompt) are what `peft` itself loads: every tensor
written is one `PeftModel.from_pretrained` takes, with none missing. `--adapter-kind` gives each adapter index a
kind, a mix taken in turn, whether the adapters are written to disk or uploaded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from loadtest import provision as provision_module
from loadtest.cli import parse
from loadtest.commands import prepare_target, write_adapters_command
from loadtest.provision import ServerInfo
from loadtest.synthetic_adapters import (
    ADAPTER_KINDS,
    CONFIG_FILE,
    TARGET_MODULES,
    WEIGHTS_FILE,
    AdapterKind,
    AdapterSpec,
    BaseDims,
    adapter_files,
)

TINY = BaseDims(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
FUSED_INPUTS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # lorahive cannot scale their inputs alone
PEFT_TYPE = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}


def _files(spec: AdapterSpec, seed: int = 3) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config, weights = adapter_files(TINY, spec, seed, base_model="tiny-llama")
    return json.loads(config), load_safetensors(weights)


def _load_with_peft(directory: Path, spec: AdapterSpec):
    """The adapter written to `directory`, loaded by `peft` onto a freshly initialised Llama of TINY's shapes."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config, weights = adapter_files(TINY, spec, seed=3)
    directory.mkdir()
    (directory / CONFIG_FILE).write_bytes(config)
    (directory / WEIGHTS_FILE).write_bytes(weights)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300))
    return peft, peft.PeftModel.from_pretrained(base, directory)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_peft_loads_every_tensor_as_written(tmp_path: Path, kind: AdapterKind):
    spec = AdapterSpec(rank=4, kind=kind)
    peft, model = _load_with_peft(tmp_path / kind, spec)
    _, written = _files(spec)
    loaded = {name: t.detach().float().numpy() for name, t in peft.get_peft_model_state_dict(model).items()}
    assert loaded.keys() == written.keys()
    for name, tensor in written.items():
        np.testing.assert_array_equal(loaded[name], tensor.astype(np.float32), err_msg=name)
    assert model.peft_config["default"].peft_type.value == PEFT_TYPE[kind]


def test_a_dora_adapter_is_lora_plus_a_positive_magnitude_per_output(tmp_path: Path):
    spec = AdapterSpec(rank=4, kind="dora", targets=("q_proj", "down_proj"))
    _, model = _load_with_peft(tmp_path / "dora", spec)
    assert model.peft_config["default"].use_dora is True
    _, written = _files(spec)
    _, lora = _files(AdapterSpec(rank=4, targets=("q_proj", "down_proj")))
    magnitudes = {name: t for name, t in written.items() if name.endswith(".lora_magnitude_vector")}
    assert written.keys() - magnitudes.keys() == lora.keys()
    assert len(magnitudes) == TINY.num_layers * 2
    for name, magnitude in magnitudes.items():
        assert magnitude.shape == (TINY.hidden_size,) and (magnitude > 0).all() and np.isfinite(magnitude).all(), name


def test_an_ia3_adapter_defaults_to_peft_s_llama_modules_with_down_proj_scaling_its_input(tmp_path: Path):
    _, model = _load_with_peft(tmp_path / "ia3", AdapterSpec(kind="ia3"))
    config = model.peft_config["default"]
    assert set(config.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert set(config.feedforward_modules) == {"down_proj"}
    _, written = _files(AdapterSpec(kind="ia3"))
    kv = TINY.num_kv_heads * TINY.head_dim
    want = {"k_proj": (kv, 1), "v_proj": (kv, 1), "down_proj": (1, TINY.intermediate_size)}
    assert {name: t.shape for name, t in written.items()} == {
        f"base_model.model.model.layers.{layer}.{'mlp' if module == 'down_proj' else 'self_attn'}.{module}.ia3_l":
            shape
        for layer in range(TINY.num_layers) for module, shape in want.items()}


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
                                     ("q_proj", "o_proj", "up_proj", "down_proj"),
                                     TARGET_MODULES[:-1]])
def test_ia3_never_scales_the_inputs_of_fused_modules(targets: tuple[str, ...]):
    config, written = _files(AdapterSpec(kind="ia3", targets=targets))
    feedforward = set(config["feedforward_modules"])
    assert config["target_modules"] == list(targets)
    assert feedforward == {"o_proj", "down_proj"} & set(targets) and not feedforward & FUSED_INPUTS
    module_dims = TINY.module_dims()
    for name, tensor in written.items():
        module = name.split(".")[-2]
        d_in, d_out = module_dims[module]
        assert tensor.shape == ((1, d_in) if module in feedforward else (d_out, 1)), name


def test_a_prompt_tuning_adapter_is_its_virtual_tokens_embeddings(tmp_path: Path):
    spec = AdapterSpec(kind="prompt", num_virtual_tokens=5, init_std=0.001)
    _, model = _load_with_peft(tmp_path / "prompt", spec)
    assert model.peft_config["default"].num_virtual_tokens == 5
    config, written = _files(spec)
    assert config["token_dim"] == TINY.hidden_size and config["base_model_name_or_path"] == "tiny-llama"
    embeddings = written["prompt_embeddings"].astype(np.float64)
    assert embeddings.shape == (5, TINY.hidden_size)
    assert embeddings.std() > 0.015  # as large as a Llama's token embeddings, whatever the (LoRA-sized) init_std


@pytest.mark.parametrize("bad", [{"kind": "qlora"}, {"kind": "prompt", "num_virtual_tokens": 0}])
def test_a_spec_refuses_what_it_cannot_write(bad: dict[str, Any]):
    with pytest.raises(ValueError):
        AdapterSpec(**bad)


def _peft_types(configs: list[bytes]) -> list[str]:
    return [json.loads(config)["peft_type"] for config in configs]


def test_write_adapters_gives_the_kinds_of_a_mix_in_turn(tmp_path: Path):
    args = parse("write-adapters", [str(tmp_path), "--count", "5", "--demo", "--adapter-kind", "lora,ia3"])
    assert args.adapter_kind == ("lora", "ia3")
    assert write_adapters_command(args) == 0
    configs = [(tmp_path / f"lt-{i}" / CONFIG_FILE).read_bytes() for i in range(5)]
    assert _peft_types(configs) == ["LORA", "IA3", "LORA", "IA3", "LORA"]


def test_provisioning_uploads_the_kinds_of_a_mix_in_turn(monkeypatch: pytest.MonkeyPatch):
    uploaded: dict[str, bytes] = {}

    async def discover(*_: Any) -> ServerInfo:
        return ServerInfo("tiny-llama", [], TINY)

    async def upload_adapter(_http: Any, _url: str, adapter_id: str, config: bytes, *_: Any) -> bool:
        uploaded[adapter_id] = config
        return True

    monkeypatch.setattr("loadtest.commands.discover", discover)
    monkeypatch.setattr(provision_module, "upload_adapter", upload_adapter)
    args = parse("run", ["--provision", "6", "--adapter-kind", "dora,prompt,ia3", "--no-progress"])
    target = asyncio.run(prepare_target(args, None, 6))  # type: ignore[arg-type]  # the fakes never use the client
    assert target.pool == [f"lt-{i}" for i in range(6)]
    configs = [json.loads(uploaded[adapter_id]) for adapter_id in target.pool]
    assert [(c["peft_type"], c.get("use_dora", False)) for c in configs] == [
        ("LORA", True), ("PROMPT_TUNING", False), ("IA3", False)] * 2


def test_a_single_kind_is_every_adapter_s_and_lora_is_the_default():
    assert parse("run", []).adapter_kind == ("lora",)
    assert parse("run", ["--adapter-kind", "ia3"]).adapter_kind == ("ia3",)


@pytest.mark.parametrize("value", ["lora,qlora", "", "lora,"])
def test_an_unknown_adapter_kind_is_refused_naming_the_flag(value: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        parse("run", ["--adapter-kind", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --adapter-kind" in err and "unknown adapter kind" in err
