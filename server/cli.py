"""`lorahive` command line: `serve`, `adapters` (a client of a running server) and `export-demo`.

Flags are generated from `Settings`, so every field is both `--some-flag` and `LORAHIVE_SOME_FLAG`
(the flag wins) and nothing is declared twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from server import adapters_client
from server.config import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = get_args(field.annotation) if "Literal" in str(field.annotation) else None
        env = "LORAHIVE_" + name.upper()
        default_text = "" if field.default is None else f" (default {field.default})"
        # A yes/no setting given as a bare flag means yes (`--metrics-public`); it also takes a value (`false`).
        bare = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        parser.add_argument(
            flag, dest=name, default=None, choices=choices, help=f"{field.description}{default_text}; env {env}",
            **bare,
        )


def settings_from(namespace: argparse.Namespace, environ: dict[str, str]) -> Settings:
    """Flags first, then LORAHIVE_* variables, then the defaults; pydantic converts and validates."""
    values = {}
    for name in Settings.model_fields:
        flag_value = getattr(namespace, name, None)
        env_value = environ.get("LORAHIVE_" + name.upper())
        if flag_value is not None:
            values[name] = flag_value
        elif env_value is not None:
            values[name] = env_value
    return Settings.model_validate(values)


def serve(settings: Settings) -> None:
    from server.api.app import build_app
    from server.api.auth import announce, load_api_keys
    from server.draining_server import serve_app
    from server.runtime import build_engine
    from server.sequence import ServerDrainingError

    keys = load_api_keys(settings.api_keys)  # a bad key file stops the start before the model loads
    announce(keys)
    engine = build_engine(settings)
    engine.start()
    try:
        app = build_app(engine, settings, keys)
        cut_error = ServerDrainingError(
            f"The server shut down before this request finished (it had {settings.drain_timeout:g} s, "
            "--drain-timeout); retry it."
        )
        serve_app(app, settings, cut=lambda: engine.abort_all(cut_error))
    finally:
        engine.shutdown()


def export_demo(directory: Path, seed: int) -> None:
    from server.checkpoint import save_checkpoint
    from server.demo import build_demo_model

    model, tokenizer = build_demo_model(seed)
    save_checkpoint(model, directory)
    tokenizer.save(directory)
    print(f"wrote the demo model (seed {seed}) as a Hugging Face checkpoint to {directory}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lorahive", description="Multi-tenant LoRA inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_settings_flags(commands.add_parser("serve", help="start the OpenAI-compatible server"))
    export = commands.add_parser("export-demo", help="write the embedded demo model as a HF checkpoint directory")
    export.add_argument("directory", type=Path)
    export.add_argument("--seed", type=int, default=0)
    adapters_client.add_commands(commands.add_parser("adapters", help="manage a running server's adapters"))
    namespace = parser.parse_args(argv)

    if namespace.command == "export-demo":
        export_demo(namespace.directory, namespace.seed)
        return
    if namespace.command == "adapters":
        adapters_client.run(namespace)
        return
    try:
        settings = settings_from(namespace, dict(os.environ))
    except ValidationError as exc:
        parser.exit(2, f"lorahive: invalid settings:\n{exc}\n")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.api.auth import KeyFileError  # the server's modules load for `serve` only

    try:
        serve(settings)
    except KeyFileError as exc:
        parser.exit(2, f"lorahive: invalid --api-keys file: {exc}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
