"""API keys for tests: tenant A's key in clear, tenant B's and the admin's as SHA-256 digests (so a key file
exercises both forms of entry), the callers of the README's auth table, and the Authorization header."""

from __future__ import annotations

import hashlib

KEY_A = "acme-key-0123456789"
KEY_B = "globex-key-0123456789"
KEY_ADMIN = "ops-key-0123456789"
KEYS_BY_CALLER = {"no key": None, "bad key": "not-a-key-of-this-server", "tenant A (owner)": KEY_A,
                  "tenant B": KEY_B, "admin": KEY_ADMIN}
TENANT_A, TENANT_B = "acme", "globex"


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# A in clear, B and the admin as digests: the matrix exercises both forms of entry.
KEY_FILE = {"keys": [
    {"key": KEY_A, "tenant": TENANT_A, "role": "tenant"},
    {"sha256": sha256_hex(KEY_B), "tenant": TENANT_B, "role": "tenant"},
    {"sha256": sha256_hex(KEY_ADMIN).upper(), "tenant": "ops", "role": "admin"},
]}


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}
