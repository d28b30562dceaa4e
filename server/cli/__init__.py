"""`lorahive` command line: `serve` (server/cli/serve_command.py), `serve-ray` (replicas on Ray Serve:
server/cli/serve_ray_command.py), `adapters` (a client of a running server: server/cli/adapters_command.py) and
`export-demo`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from server.cli import adapters_command, serve_ray_command
from server.cli.serve_command import add_settings_flags, describe_invalid_settings, serve, settings_from
from server.config import StartupError


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
    add_settings_flags(commands.add_parser("serve", help="start the OpenAI-compatible server"))
    serve_ray = commands.add_parser("serve-ray", help="start replicas of the server on Ray Serve behind one endpoint")
    add_settings_flags(serve_ray)
    serve_ray_command.add_flags(serve_ray)
    export = commands.add_parser("export-demo", help="write the embedded demo model as a HF checkpoint directory")
    export.add_argument("directory", type=Path)
    export.add_argument("--seed", type=int, default=0)
    adapters_command.add_commands(commands.add_parser("adapters", help="manage a running server's adapters"))
    namespace = parser.parse_args(argv)

    if namespace.command == "export-demo":
        export_demo(namespace.directory, namespace.seed)
        return
    if namespace.command == "adapters":
        adapters_command.run(namespace)
        return
    try:
        settings = settings_from(namespace, dict(os.environ))
    except ValidationError as exc:
        parser.exit(2, "".join(f"error: {line}\n" for line in describe_invalid_settings(exc, namespace, os.environ)))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if namespace.command == "serve-ray":
        serve_ray_command.run(namespace, settings)
        return
    from server.api.auth import KeyFileError  # the server's modules load for `serve` only

    try:
        serve(settings)
    except KeyFileError as exc:
        parser.exit(2, f"error: invalid --api-keys file: {exc}\n")
    except StartupError as exc:
        parser.exit(2, f"error: {exc}\n")
