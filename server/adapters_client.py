"""`lorahive adapters upload|list|show|delete`: a command-line client of a server's adapter REST API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

PEFT_FILES = {"adapter_config": "adapter_config.json", "adapter_model": "adapter_model.safetensors"}


def add_commands(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer ...'")
    commands = parser.add_subparsers(dest="adapters_command", required=True)
    upload = commands.add_parser("upload", help="upload a PEFT directory or a .tar.gz/.zip of one")
    upload.add_argument("id")
    upload.add_argument("path", type=Path)
    upload.add_argument("--replace", action="store_true", help="replace an existing adapter (PUT)")
    commands.add_parser("list", help="list every adapter")
    show = commands.add_parser("show", help="one adapter's metadata and cache tier")
    show.add_argument("id")
    delete = commands.add_parser("delete", help="delete an adapter")
    delete.add_argument("id")


def _files(path: Path) -> dict[str, tuple[str, bytes]]:
    if path.is_dir():
        return {field: (name, (path / name).read_bytes()) for field, name in PEFT_FILES.items()}
    return {"archive": (path.name, path.read_bytes())}


def _check(response: httpx.Response) -> dict:
    body = response.json() if response.content else {}
    if response.is_error:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        sys.exit(f"error {response.status_code}: {error.get('message', response.text)}")
    return body


def run(args: argparse.Namespace) -> None:
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
            after = None
            print(f"{'id':<40} {'version':>7} {'rank':>5} {'bytes':>12} {'where':>6} {'requests':>9}")
            while True:
                page = _check(client.get("/v1/adapters", params={"limit": 1000} | ({"after": after} if after else {})))
                for a in page["data"]:
                    print(f"{a['id']:<40} {a['version']:>7} {a['rank']:>5} {a['bytes']:>12} {a['location']:>6} "
                          f"{a['requests_served']:>9}")
                if not page["has_more"]:
                    break
                after = page["last_id"]
        elif args.adapters_command == "show":
            print(json.dumps(_check(client.get(f"/v1/adapters/{args.id}")), indent=2))
        elif args.adapters_command == "delete":
            _check(client.delete(f"/v1/adapters/{args.id}"))
            print(f"deleted {args.id}")
