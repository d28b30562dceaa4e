"""`lorahive serve`: its flags, the settings they give, the start-up checks, and starting the server.

Flags are generated from `Settings`, so every field is both `--some-flag` and `LORAHIVE_SOME_FLAG`
(the flag wins) and nothing is declared twice.
"""

from __future__ import annotations

import argparse
import errno
import socket
from typing import get_args

from pydantic import ByteSize, ValidationError
from pydantic.fields import FieldInfo

from server.config import Settings, StartupError

BYTE_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(size: int) -> str:
    """`size` in the largest binary unit that holds it exactly: 4294967296 -> "4GiB"."""
    for unit, factor in BYTE_UNITS:
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _is_byte_size(field: FieldInfo) -> bool:
    return field.annotation is ByteSize or ByteSize in get_args(field.annotation)


def _default_text(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None or default == []:
        return ""
    return f" (default {format_bytes(default) if _is_byte_size(field) else default})"


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = get_args(field.annotation) if "Literal" in str(field.annotation) else None
        env = "LORAHIVE_" + name.upper()
        unit_text = "; bytes, or a size with a unit such as 512MiB or 4GiB" if _is_byte_size(field) else ""
        # A yes/no setting given as a bare flag means yes (`--metrics-public`); it also takes a value (`false`).
        bare = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        parser.add_argument(
            flag, dest=name, default=None, choices=choices, metavar="SIZE" if unit_text else None,
            help=f"{field.description}{_default_text(field)}{unit_text}; env {env}", **bare,
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


def describe_invalid_settings(error: ValidationError, namespace: argparse.Namespace,
                               environ: dict[str, str]) -> list[str]:
    """One line per bad value, naming the flag (or variable) the user set, the value and the rule it breaks."""
    lines = []
    for problem in error.errors():
        if not problem["loc"]:  # a rule across several settings: its message names the flags
            lines.append(str(problem["msg"]).removeprefix("Value error, "))
            continue
        name = str(problem["loc"][0])
        flag_value = getattr(namespace, name, None)
        given = (
            f"--{name.replace('_', '-')} {flag_value}" if flag_value is not None
            else f"LORAHIVE_{name.upper()}={environ.get('LORAHIVE_' + name.upper())}"
        )
        rule = problem["msg"][:1].lower() + problem["msg"][1:]
        if problem["type"].startswith("byte_size"):
            rule += " (give bytes, or a size with a unit such as 512MiB or 4GiB)"
        lines.append(f"{given}: {rule}")
    return lines


def check_port(settings: Settings) -> None:
    """Bind the host and port as uvicorn will, and let go: a port in use stops the start now, naming --port,
    rather than after the model has loaded and the app has logged its start-up."""
    try:
        addresses = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"--host {settings.host}: cannot resolve it ({exc.strerror})") from None
    for family, kind, protocol, _, address in dict.fromkeys(addresses):
        with socket.socket(family, kind, protocol) as probe:
            # As asyncio binds for uvicorn: a port left in TIME_WAIT is free, one a process listens on is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                hint = ("another process holds that port: stop it or choose another --port"
                        if exc.errno == errno.EADDRINUSE else "check --host and --port")
                raise StartupError(f"--port {settings.port}: cannot listen on {settings.host}:{settings.port} "
                                   f"({exc.strerror}); {hint}") from None


def serve(settings: Settings) -> None:
    from server.api.app import build_app
    from server.api.auth import announce, load_api_keys
    from server.draining_server import serve_app
    from server.requests import ServerDrainingError
    from server.runtime import build_engine

    keys = load_api_keys(settings.api_keys)  # a bad key file stops the start before the model loads
    announce(keys)
    check_port(settings)
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
