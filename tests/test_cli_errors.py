"""Mistakes on the command line end with one `error: ...` line that names the flag and says what to do."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI, Request

from server import cli
from tests.support.cli_runs import serve_error
from tests.support.servers import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]


# ---- lorahive serve -----------------------------------------------------------------------------


def test_model_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = serve_error(["--model", str(tmp_path / "Llama-3.1-8B")], capsys)
    assert line.startswith(f"error: --model {tmp_path / 'Llama-3.1-8B'}: no such directory")
    assert "hub ids are not downloaded" in line


def test_model_naming_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{}")
    line = serve_error(["--model", str(tmp_path / "config.json")], capsys)
    assert "is a file, not a directory" in line and f"its directory is {tmp_path}" in line


def test_config_json_that_is_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n}')
    line = serve_error(["--model", str(tmp_path)], capsys)
    assert f"{tmp_path / 'config.json'} is not valid JSON" in line and "at line 2 column 1" in line


def test_adapters_directory_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = serve_error(["--adapters", str(tmp_path / "missing")], capsys)
    assert line.startswith(f"error: --adapters {tmp_path / 'missing'}: no such directory")


def test_store_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "store").write_text("")
    line = serve_error(["--store", str(tmp_path / "store")], capsys)
    assert line.startswith(f"error: --store {tmp_path / 'store'} is a file")


def test_device_that_torch_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_error(["--device", "tpu"], capsys).startswith("error: --device tpu: not a torch device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_device_cuda_on_a_torch_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_error(["--device", "cuda"], capsys).startswith("error: --device cuda: this torch")


@pytest.mark.parametrize(("argv", "expected"), [
    (["--port", "abc"], "error: --port abc: input should be a valid integer, unable to parse string as an integer"),
    (["--max-lora-rank", "0"], "error: --max-lora-rank 0: input should be greater than 0"),
    (["--max-host-adapter-bytes", "4GQ"], "error: --max-host-adapter-bytes 4GQ: could not interpret byte unit: GQ "
                                          "(give bytes, or a size with a unit such as 512MiB or 4GiB)"),
])
def test_bad_values_name_the_flag_and_the_rule(argv: list[str], expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_error(argv, capsys) == expected


def test_a_bad_value_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LORAHIVE_MAX_LORA_RANK", "-3")
    assert serve_error([], capsys) == "error: LORAHIVE_MAX_LORA_RANK=-3: input should be greater than 0"


def test_byte_sizes_take_units() -> None:
    namespace = argparse.Namespace(max_host_adapter_bytes="4GiB", max_adapter_bytes="512MiB",
                                       max_request_bytes="1048576")
    settings = cli.settings_from(namespace, {"LORAHIVE_MAX_STORE_BYTES_PER_TENANT": "2 GiB"})
    assert settings.max_host_adapter_bytes == 4 * 2**30 and settings.max_adapter_bytes == 512 * 2**20
    assert settings.max_request_bytes == 2**20 and settings.max_store_bytes_per_tenant == 2 * 2**30


def test_help_shows_defaults_without_pydantic_internals(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "PydanticUndefined" not in text
    assert "(default 4GiB)" in text and "(default 512MiB)" in text and "(default 32MiB)" in text
    assert "512MiB or 4GiB" in text


def test_port_in_use_stops_the_start_before_the_model_loads(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("server.runtime.build_engine", lambda settings: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            cli.main(["serve", "--port", str(port)])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --port {port}: cannot listen on 127.0.0.1:{port}")
    assert "choose another --port" in error


# ---- lorahive adapters ----------------------------------------------------------------------------


def adapters_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(["adapters", *argv])
    message = exited.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_no_server_at_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_url()
    message = adapters_error(["--url", url, "list"])
    assert f"cannot connect to a server at {url}" in message and "--url" in message
    assert capsys.readouterr().out == ""  # not even the table's header


def test_upload_of_a_path_that_does_not_exist(tmp_path: Path) -> None:
    message = adapters_error(["--url", closed_url(), "upload", "x", str(tmp_path / "nope")])
    assert message.startswith(f"error: {tmp_path / 'nope'} does not exist")


def test_upload_of_a_directory_without_adapter_config(tmp_path: Path) -> None:
    message = adapters_error(["--url", closed_url(), "upload", "x", str(tmp_path)])
    assert message == f"error: {tmp_path}: no adapter_config.json: not a PEFT adapter directory"


def test_upload_of_a_pickle_adapter_says_save_with_safetensors(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02")
    message = adapters_error(["--url", closed_url(), "upload", "x", str(tmp_path)])
    assert "pickle .bin files are not supported; save with safe_serialization=True" in message


@pytest.fixture(scope="module")
def recording_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A stand-in adapter API that records what each request carried."""
    app = FastAPI()
    seen: list[dict[str, str]] = []

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict:
        seen.append({"url": str(request.base_url), "auth": request.headers.get("authorization", "")})
        return {"data": [], "has_more": False, "last_id": None}

    @app.post("/v1/adapters", status_code=201)
    async def upload(request: Request) -> dict:
        form = await request.form()
        seen.append({"url": str(request.base_url), "auth": request.headers.get("authorization", "")})
        return {"id": form["id"], "version": 1}

    with running_server(app) as url:
        yield url, seen


def test_url_and_api_key_after_the_sub_command(recording_server, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    url, seen = recording_server
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    cli.main(["adapters", "upload", "mine", str(tmp_path), "--url", url, "--api-key", "k1"])
    assert '"id": "mine"' in capsys.readouterr().out
    # Given on both sides of the sub-command, the later one wins.
    cli.main(["adapters", "--url", closed_url(), "--api-key", "k0", "list", "--url", url, "--api-key", "k2"])
    assert [s["auth"] for s in seen[-2:]] == ["Bearer k1", "Bearer k2"]


def test_url_and_api_key_from_the_environment(recording_server, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    url, seen = recording_server
    monkeypatch.setenv("LORAHIVE_URL", url)
    monkeypatch.setenv("LORAHIVE_API_KEY", "from-env")
    cli.main(["adapters", "list"])
    assert seen[-1]["auth"] == "Bearer from-env"
    cli.main(["adapters", "list", "--api-key", "from-flag"])  # the flag wins
    assert seen[-1]["auth"] == "Bearer from-flag"
    with pytest.raises(SystemExit):
        cli.main(["adapters", "--help"])
    assert "default http://127.0.0.1:8000" in " ".join(capsys.readouterr().out.split())


def test_output_into_a_closed_pipe_ends_quietly(recording_server) -> None:
    """`lorahive adapters list | head -0`: the reader is gone before the first line."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "adapters", "--url", recording_server[0], "list"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, err
    assert err == ""


def test_a_device_tier_smaller_than_one_max_rank_adapter_is_refused_naming_the_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = serve_error(["--max-gpu-adapter-bytes", "1000", "--max-lora-rank", "16", "--device", "cpu",
                        "--model-runner-process", "false"], capsys)
    assert line.startswith("error: --max-gpu-adapter-bytes 1000 is less than one adapter of --max-lora-rank 16 on "
                           "every module takes on this model (")
    assert "raise --max-gpu-adapter-bytes or lower --max-lora-rank" in line
