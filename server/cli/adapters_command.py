"""`lorahive adapters upload|list|show|delete`: a command-line client of a server's adapter REST API.

Every mistake (no server at the URL, a path that is not an adapter, a refusal by the server) ends the
command with one `error: ...` line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

from adapters_store import AdapterFormatError, read_peft_directory

DEFAULT_URL = "http://127.0.0.1:8000"
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


class ClientError(Exception):
    """A mistake the user can fix; its message says how."""


def add_commands(parser: argparse.ArgumentParser) -> None:
    _add_connection_flags(parser, url=os.environ.get("LORAHIVE_URL", DEFAULT_URL),
                          api_key=os.environ.get("LORAHIVE_API_KEY"))
    commands = parser.add_subparsers(dest="adapters_command", required=True)
    upload = commands.add_parser("upload", help="upload a PEFT directory or a .tar.gz/.zip of one")
    upload.add_argument("id")
    upload.add_argument("path", type=Path)
    upload.add_argument("--replace", action="store_true", help="replace an existing adapter (PUT)")
    list_command = commands.add_parser("list", help="list every adapter")
    show = commands.add_parser("show", help="one adapter's metadata and cache tier")
    show.add_argument("id")
    delete = commands.add_parser("delete", help="delete an adapter")
    delete.add_argument("id")
    for command in (upload, list_command, show, delete):
        # After the sub-command too (`upload ID DIR --url U`); given there, they win over the ones before it.
        _add_connection_flags(command, url=argparse.SUPPRESS, api_key=argparse.SUPPRESS)


def _add_connection_flags(parser: argparse.ArgumentParser, url: str, api_key: str | None) -> None:
    parser.add_argument("--url", default=url, help=f"server base URL (default {DEFAULT_URL}; env LORAHIVE_URL)")
    parser.add_argument("--api-key", default=api_key,
                        help="sent as 'Authorization: Bearer ...' (env LORAHIVE_API_KEY)")


def run(args: argparse.Namespace) -> None:
    """Run one sub-command; any mistake exits with one `error: ...` line."""
    try:
        _run(args)
        sys.stdout.flush()  # here, so that a closed pipe is noticed inside this `try`
    except BrokenPipeError:
        # The reader (`| head`) has what it wanted: stop quietly, as other Unix tools do, and keep Python
        # from complaining about the unflushable stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(BROKEN_PIPE_EXIT)
    except ClientError as exc:
        sys.exit(f"error: {exc}")
    except httpx.ConnectError:
        sys.exit(f"error: cannot connect to a server at {args.url}: start one with `lorahive serve`, or point "
                 "--url (or LORAHIVE_URL) at it")
    except httpx.TimeoutException:
        sys.exit(f"error: the server at {args.url} did not answer in time; check that it is up and not overloaded")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        sys.exit(f"error: cannot talk to {args.url} ({exc}); check --url (or LORAHIVE_URL)")


def _run(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=300) as client:
        if args.adapters_command == "upload":
            files = _files(args.path)
            if args.replace:
                body = _check(client.put(f"/v1/adapters/{args.id}", files=files))
            else:
                body = _check(client.post("/v1/adapters", data={"id": args.id}, files=files))
            print(json.dumps(body, indent=2))
        elif args.adapters_command == "list":
            page = _check(client.get("/v1/adapters", params={"limit": 1000}))  # before the header: errors alone
            print(f"{'id':<40} {'version':>7} {'kind':>6} {'rank':>5} {'bytes':>12} {'where':>6} {'requests':>9}")
            while True:
                for a in page["data"]:
                    print(f"{a['id']:<40} {a['version']:>7} {a['kind']:>6} {a['rank']:>5} {a['bytes']:>12} "
                          f"{a['location']:>6} {a['requests_served']:>9}")
                if not page["has_more"]:
                    break
                page = _check(client.get("/v1/adapters", params={"limit": 1000, "after": page["last_id"]}))
        elif args.adapters_command == "show":
            print(json.dumps(_check(client.get(f"/v1/adapters/{args.id}")), indent=2))
        elif args.adapters_command == "delete":
            _check(client.delete(f"/v1/adapters/{args.id}"))
            print(f"deleted {args.id}")


def _files(path: Path) -> dict[str, tuple[str, bytes]]:
    """The multipart files of an upload: the two PEFT files of a directory, or an archive as it is."""
    if not path.exists():
        raise ClientError(f"{path} does not exist; upload a PEFT adapter directory (adapter_config.json + "
                          "adapter_model.safetensors) or a .tar.gz / .zip of one")
    try:
        if not path.is_dir():
            return {"archive": (path.name, path.read_bytes())}
        config, weights = read_peft_directory(path)
    except AdapterFormatError as exc:
        raise ClientError(f"{path}: {exc.message}") from None
    except OSError as exc:
        raise ClientError(f"cannot read {exc.filename or path}: {exc.strerror}") from None
    return {"adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter_model.safetensors", weights)}


def _check(response: httpx.Response) -> dict:
    """The response's JSON body; ClientError with the server's own message if it refused."""
    try:
        body = response.json() if response.content else {}
    except ValueError:
        body = None
    if response.is_error:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        raise ClientError(f"{message or response.text[:200]} (HTTP {response.status_code})")
    if not isinstance(body, dict):
        raise ClientError(f"{response.url} answered {response.status_code} without a JSON object: is --url a "
                          "lorahive server?")
    return body
