"""`lorahive serve --adapters DIR`: bring the operator's PEFT directories into the adapter store at start.

Imported adapters are the operator's: no owner, public. The store is shared with adapters that tenants
uploaded over the API, so an id that is already someone else's (a tenant's, an admin's upload, one uploaded
to a server running without keys, or one an admin made private) is never replaced or taken over: it is
skipped with the reason logged, and its holder keeps it. Every start logs what was imported and what was
skipped, and why.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store import Manifest, StoreError, read_peft_directory
from adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE
from server.adapter_registry import AdapterRegistry

log = logging.getLogger("lorahive.adapters")


@dataclass
class ImportReport:
    new: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)  # the operator's, with changed files: a new version
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # directory -> why


class IdTakenError(Exception):
    """The adapter id belongs to someone other than the operator."""


def import_adapters(registry: AdapterRegistry, directory: Path) -> ImportReport:
    """Import `directory`: one adapter if it holds adapter_config.json itself (its id: the directory's
    name), else each sub-directory as one adapter named after it."""
    report = ImportReport()
    for adapter_id, path in adapter_directories(directory):
        try:
            _import_one(registry, adapter_id, path, report)
        except (OSError, ValueError, StoreError, IdTakenError) as exc:
            report.skipped[str(path)] = getattr(exc, "message", None) or str(exc)
            log.warning("skipping adapter directory %s: %s", path, report.skipped[str(path)])
    imported = len(report.new) + len(report.updated) + len(report.unchanged)
    log.info("--adapters %s: %d adapter(s) imported (%d new, %d updated, %d unchanged), %d skipped%s",
             directory, imported, len(report.new), len(report.updated), len(report.unchanged),
             len(report.skipped), "" if not report.skipped else ": " + ", ".join(report.skipped))
    return report


def adapter_directories(directory: Path) -> list[tuple[str, Path]]:
    """(adapter id, directory) pairs that `--adapters directory` names."""
    if (directory / CONFIG_FILE).is_file() or (directory / WEIGHTS_FILE).is_file():
        adapter_id = directory.resolve().name
        log.info("--adapters %s is itself one adapter: serving it as %r", directory, adapter_id)
        return [(adapter_id, directory)]
    # Hidden directories (.git, .cache) are never adapters, and no adapter id starts with a dot.
    return [(path.name, path) for path in sorted(directory.iterdir()) if path.is_dir() and
            not path.name.startswith(".")]


def _import_one(registry: AdapterRegistry, adapter_id: str, path: Path, report: ImportReport) -> None:
    config, weights = read_peft_directory(path)
    if adapter_id not in registry.store:
        registry.create(adapter_id, config, weights, public=True)  # the operator's: for every tenant
        report.new.append(adapter_id)
        return
    manifest = registry.store.manifest(adapter_id)
    holder = _other_holder(manifest)
    if holder is not None:
        raise IdTakenError(
            f"the id {adapter_id!r} is taken by {holder}; start-up import never replaces or takes over another's "
            f"adapter: rename the directory, or delete that adapter (DELETE /v1/adapters/{adapter_id} as an "
            "admin) and restart"
        )
    if _same_files(manifest, config, weights):
        report.unchanged.append(adapter_id)
        return
    registry.replace(adapter_id, config, weights)
    report.updated.append(adapter_id)


def _other_holder(manifest: Manifest) -> str | None:
    """Who holds the adapter, when it is not the operator (whose imports have no owner and are public)."""
    if manifest.owner is not None:
        return f"tenant {manifest.owner!r}'s {'public' if manifest.public else 'private'} adapter"
    if not manifest.public:
        return "a private adapter without owner (uploaded while the server ran without --api-keys, or made " \
               "private by an admin)"
    return None


def _same_files(manifest: Manifest, config: bytes, weights: bytes) -> bool:
    return all(
        manifest.files[name].sha256 == hashlib.sha256(data).hexdigest()
        for name, data in ((CONFIG_FILE, config), (WEIGHTS_FILE, weights))
    )
