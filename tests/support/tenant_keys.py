"""One API key per tenant, all in clear in the key file (`ops` is the admin), and the Authorization header of a
tenant's requests."""

from __future__ import annotations

KEYS = {"acme": "acme-key-0123456789", "globex": "globex-key-0123456789", "initech": "initech-key-0123456789",
        "ops": "ops-key-0123456789"}
KEY_FILE = {"keys": [{"key": key, "tenant": tenant, "role": "admin" if tenant == "ops" else "tenant"}
                     for tenant, key in KEYS.items()]}


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}
