"""Who is calling: the API key file, the `Principal` a Bearer key stands for, and the middleware that
refuses requests without a valid key.

The key file (`--api-keys FILE`) is JSON::

    {"keys": [{"key": "...", "tenant": "acme", "role": "tenant"},
              {"sha256": "<hex digest of the key>", "tenant": "ops", "role": "admin"}]}

A presented key is hashed with sha256 and compared with `hmac.compare_digest` against every entry's digest,
with no early exit and no lookup keyed by the secret, so the time taken does not depend on which entry (if
any) matches or on how much of a key is right. Keys never reach a log or an error message.

Authentication is a middleware rather than a route dependency because FastAPI reads and parses a
request's body (a multipart upload is spooled to disk) before it runs any dependency: a caller without a
key must be turned away before that. Routes get the result through the `get_principal` dependency.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import INVALID_REQUEST, error_response

log = logging.getLogger("lorahive.auth")

Role = Literal["tenant", "admin"]
ROLES: tuple[Role, ...] = ("tenant", "admin")
# Tenants name owners in adapter manifests and logs: a bounded, printable alphabet.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A key must be sendable in an HTTP header as `Bearer <key>`: visible ASCII, no spaces.
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")
SHA256_HEX_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
OPEN_PATHS = frozenset({"/health", "/ready"})  # probes: never behind a key
METRICS_PATH = "/metrics"  # behind an admin key or --metrics-api-key, unless --metrics-public
METRICS_KEY_NEEDED = ("GET /metrics needs an admin key or this server's metrics key (--metrics-api-key) as "
                      "'Authorization: Bearer <key>'.")
_ENTRY_FIELDS = frozenset({"key", "sha256", "tenant", "role"})


class KeyFileError(ValueError):
    """The key file cannot be used; the message says where and why (never quoting a key)."""


@dataclass(frozen=True)
class Principal:
    """The caller: a tenant's key, an admin's key, or anyone at all on a server without keys."""

    tenant: str | None  # None: the anonymous caller of a server running without keys
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# Without a key file everyone is this caller: one tenant for the limits, and allowed everything.
ANONYMOUS = Principal(tenant=None, role="admin")


@dataclass(frozen=True)
class _Credential:
    digest: bytes  # sha256 of the key
    principal: Principal


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def digest_matches(presented: bytes, expected_digest: bytes) -> bool:
    """Constant-time: both sides are 32-byte digests, whatever the length of what was presented."""
    return hmac.compare_digest(_sha256(presented), expected_digest)


class KeyRing:
    """The keys a server accepts. Empty: the server runs open and every caller is `ANONYMOUS`."""

    def __init__(self, credentials: Sequence[_Credential] = ()) -> None:
        self._credentials = tuple(credentials)

    @property
    def is_open(self) -> bool:
        return not self._credentials

    @property
    def principals(self) -> tuple[Principal, ...]:
        return tuple(c.principal for c in self._credentials)

    def resolve(self, presented: bytes) -> Principal | None:
        """The principal of `presented`, or None. Every entry is compared, whatever matched before."""
        digest = _sha256(presented)
        found = None
        for credential in self._credentials:
            if hmac.compare_digest(digest, credential.digest):
                found = credential.principal
        return found

    @classmethod
    def parse(cls, data: Any, source: str) -> KeyRing:
        """Validate the key file's JSON; `KeyFileError` names the entry and the problem."""
        if not isinstance(data, dict) or set(data) != {"keys"}:
            raise KeyFileError(f'{source}: expected a JSON object {{"keys": [...]}} and nothing else')
        entries = data["keys"]
        if not isinstance(entries, list) or not entries:
            raise KeyFileError(f"{source}: 'keys' must be a non-empty list (no key file at all runs the server open)")
        credentials: list[_Credential] = []
        first_entry_of: dict[bytes, int] = {}
        for number, entry in enumerate(entries, start=1):
            credential = _parse_entry(entry, f"{source}: entry {number} of 'keys'")
            if credential.digest in first_entry_of:
                raise KeyFileError(
                    f"{source}: entries {first_entry_of[credential.digest]} and {number} of 'keys' hold the same key"
                )
            first_entry_of[credential.digest] = number
            credentials.append(credential)
        return cls(credentials)


def _parse_entry(entry: Any, where: str) -> _Credential:
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where}: must be a JSON object")
    unknown = sorted(set(entry) - _ENTRY_FIELDS)
    if unknown:
        raise KeyFileError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"expected {', '.join(sorted(_ENTRY_FIELDS))}")
    tenant, role = entry.get("tenant"), entry.get("role")
    if not isinstance(tenant, str) or TENANT_PATTERN.fullmatch(tenant) is None:
        raise KeyFileError(f"{where}: 'tenant' is required: 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    if role not in ROLES:
        raise KeyFileError(f"{where}: 'role' must be one of {', '.join(map(repr, ROLES))}")
    key, digest = entry.get("key"), entry.get("sha256")
    if (key is None) == (digest is None):
        raise KeyFileError(f"{where}: give exactly one of 'key' (the key in clear) or 'sha256' (its hex digest)")
    if key is not None:
        if not isinstance(key, str) or KEY_PATTERN.fullmatch(key) is None:
            raise KeyFileError(f"{where}: 'key' must be a non-empty string of visible ASCII characters (no spaces)")
        return _Credential(_sha256(key.encode("ascii")), Principal(tenant, role))
    if not isinstance(digest, str) or SHA256_HEX_PATTERN.fullmatch(digest) is None:
        raise KeyFileError(f"{where}: 'sha256' must be 64 hexadecimal characters (the sha256 digest of the key)")
    return _Credential(bytes.fromhex(digest), Principal(tenant, role))


def load_api_keys(path: Path | None) -> KeyRing:
    """The keys of `--api-keys FILE`; no file: an open key ring. `KeyFileError` if the file is unusable."""
    if path is None:
        return KeyRing()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:  # the position only: the text may hold keys
        raise KeyFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return KeyRing.parse(data, str(path))


def announce(keys: KeyRing) -> None:
    """The start-up log line saying who may call (a warning when anyone may); never a key."""
    if keys.is_open:
        log.warning("no --api-keys file: the server runs OPEN, without authentication; anyone who can reach it "
                    "may use, upload, replace and delete every adapter")
        return
    principals = keys.principals
    tenants = {p.tenant for p in principals}
    admins = sum(p.is_admin for p in principals)
    log.info("API keys: %d key(s) for %d tenant(s), %d of them admin", len(principals), len(tenants), admins)


# --------------------------------------------------------------------------------------------------
# The middleware and the dependency


def _bearer_token(scope: Scope) -> bytes | None:
    """The key of `Authorization: Bearer <key>` (the scheme is case-insensitive), or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


def _unauthorized(message: str, code: str) -> JSONResponse:
    return error_response(401, message, error_type=INVALID_REQUEST, code=code,
                          headers={"WWW-Authenticate": "Bearer"})


class Authentication:
    """Resolves the caller of every request but the probes and `/metrics`; 401 without a valid key.

    The principal is left in the request's state for `get_principal`. `/metrics` names every tenant's adapters in
    its labels, so a server with keys (or with `metrics_key`) serves it only to an admin key or `metrics_key`,
    unless `metrics_public` opens it; a server with neither keys nor `metrics_key` serves it to anyone."""

    def __init__(self, app: ASGIApp, keys: KeyRing, metrics_key: str | None = None,
                 metrics_public: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.metrics_digest = None if metrics_key is None else _sha256(metrics_key.encode())
        self.metrics_open = metrics_key is None and (keys.is_open or metrics_public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        if scope["path"] == METRICS_PATH:
            refusal = None if self.metrics_open else self._metrics_refusal(token)
            await (refusal or self.app)(scope, receive, send)
            return
        if self.keys.is_open:
            principal: Principal | None = ANONYMOUS
        elif token is None:
            await _unauthorized("This server needs an API key: send it as 'Authorization: Bearer <key>'.",
                                "missing_api_key")(scope, receive, send)
            return
        else:
            principal = self.keys.resolve(token)
        if principal is None:
            await _unauthorized("The API key is not valid for this server.", "invalid_api_key")(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def _metrics_refusal(self, token: bytes | None) -> JSONResponse | None:
        """The answer to a `/metrics` caller that may not read it, or None for an admin or the metrics key."""
        if token is None:
            return _unauthorized(METRICS_KEY_NEEDED, "missing_api_key")
        if self.metrics_digest is not None and digest_matches(token, self.metrics_digest):
            return None
        principal = self.keys.resolve(token)
        if principal is None:
            return _unauthorized(METRICS_KEY_NEEDED, "invalid_api_key")
        if principal.is_admin:
            return None
        return error_response(403, f"A tenant's key may not read /metrics: {METRICS_KEY_NEEDED}",
                              error_type="permission_error", code="permission_denied")


def get_principal(request: Request) -> Principal:
    """The caller `Authentication` resolved for this request."""
    return request.state.principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
