"""The persistent adapter store: one directory per adapter, written atomically, listed lazily.

Layout under ``root``::

    <id>/manifest.json                the adapter's manifest; the ONLY commit point of a change
    <id>/v<version>/adapter_config.json, adapter_model.safetensors
    .tmp/<id>.<random>/               a create being written (manifest.json + v1/)
    .trash/<id>.<random>/             an adapter being deleted
    .pending/<id>                     empty marker: a replace/set_public of <id> may leave leftovers
    .lock                             flock()ed by every mutation, so several processes may share a root

Hidden entries are never adapters (ids start with a letter or digit). The visible state of an adapter
is ``<id>/manifest.json`` and the version directory it names; nothing else in ``<id>/`` is ever read.

Why every crash point is safe (a SIGKILL or power loss at any instant, then a restart):

* create: everything is written and fsynced inside ``.tmp/`` (files, then their directories), then one
  ``rename(.tmp/x, <id>)`` publishes the whole adapter at once and the root is fsynced. Before the rename
  the adapter is absent; after it, it is whole. ``rename`` refuses a non-empty target, and an adapter
  directory is never empty, so two creators of one id cannot both win (the lock makes that moot inside
  one store anyway).
* replace: a ``.pending/<id>`` marker is made durable first; the new version is written into
  ``<id>/v<N+1>/`` and fsynced; then ``manifest.json.tmp`` is written, fsynced and ``os.replace``d over
  ``manifest.json`` (atomic), and the directory fsynced. Readers follow the manifest, so until that
  replace they see version N whole, and after it version N+1 whole. Old ``v<N>`` is removed only then.
* delete: ``rename(<id>, .trash/<id>.<random>)`` hides the whole adapter in one step, then it is removed.
* open: ``.tmp/`` and ``.trash/`` are emptied, and each adapter with a ``.pending`` marker is swept
  (everything but ``manifest.json`` and the version it names is removed). That reads one manifest per
  interrupted write, never one per adapter, so opening a store of any size is a few directory reads.

A full disk (ENOSPC, EDQUOT) before the commit point removes what that write made and raises
:class:`StoreFullError`; the store is left as it was. (Past the commit point only a directory fsync is
left; if that fails, the OSError propagates as it is: the change is visible and whole.)

Reads take no lock: they read the manifest, then open the files of the version it names; if a
concurrent replace removed that version in between, they read the new manifest and try again. Every
file is checked against its size and sha256 when read.

Requires POSIX (``fcntl.flock``, fsync on directories); atomicity relies on rename within one filesystem.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from adapters_store.peft_format import (
    ADAPTER_ID_PATTERN,
    ADAPTER_KINDS,
    CONFIG_FILE,
    WEIGHTS_FILE,
    validate_adapter_id,
)

MANIFEST_FILE = "manifest.json"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_MANIFEST_TMP = MANIFEST_FILE + ".tmp"
_TMP_DIR = ".tmp"
_TRASH_DIR = ".trash"
_PENDING_DIR = ".pending"
_LOCK_FILE = ".lock"
# errno values that mean "the disk (or the quota) is full": reported distinctly (HTTP 507 upstream).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SHA256_HEX = frozenset("0123456789abcdef")
_VERSION_DIR = re.compile(r"v[1-9][0-9]*")  # what _version_dir names


# ------------------------------------------------------------------------------------------ manifest


@dataclass(frozen=True)
class StoredFile:
    sha256: str  # lowercase hex
    size: int  # bytes

    @classmethod
    def of(cls, data: bytes) -> StoredFile:
        return cls(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


@dataclass(frozen=True)
class Manifest:
    id: str
    version: int  # 1 on create, +1 on each replace; the weights live in v<version>/
    created_at: float  # unix seconds; kept across replaces
    updated_at: float
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    files: Mapping[str, StoredFile]  # file name -> checksum and size
    owner: str | None = None  # tenant that uploaded it; kept across replaces
    public: bool = False
    kind: str = "lora"  # ADAPTER_KINDS; IA3 and prompt-tuning adapters have rank 0 and lora_alpha 0
    num_virtual_tokens: int = 0  # a prompt-tuning adapter's soft-prompt length

    def __post_init__(self) -> None:
        # Frozen means frozen: copy the caller's containers into immutable ones.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))

    @property
    def num_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
            "files": {name: {"sha256": f.sha256, "size": f.size} for name, f in sorted(self.files.items())},
            "owner": self.owner,
            "public": self.public,
            "kind": self.kind,
            "num_virtual_tokens": self.num_virtual_tokens,
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse what :meth:`to_json` wrote; ``ValueError`` naming the field if anything is off."""
        if not isinstance(data, dict):
            raise ValueError("manifest must be a JSON object")
        adapter_id = _field(data, "id", str)
        if ADAPTER_ID_PATTERN.fullmatch(adapter_id) is None:
            raise ValueError(f"manifest id {adapter_id[:140]!r} is not a valid adapter id")
        version = _field(data, "version", int)
        rank = _field(data, "rank", int)
        kind = data.get("kind", "lora")  # manifests written before other kinds were served have none
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"manifest kind must be one of {', '.join(ADAPTER_KINDS)}")
        if version < 1 or rank < (0 if kind in ("ia3", "prompt") else 1):
            raise ValueError("manifest version and rank must be positive (rank 0 for IA3 and prompt tuning)")
        num_virtual_tokens = data.get("num_virtual_tokens", 0)
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < (1 if kind == "prompt" else 0):
            raise ValueError("manifest num_virtual_tokens must be a positive integer for prompt tuning")
        target_modules = _field(data, "target_modules", list)
        if not all(isinstance(m, str) for m in target_modules):
            raise ValueError("manifest target_modules must be a list of strings")
        owner = data.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise ValueError("manifest owner must be a string or null")
        files = {}
        for name, entry in _field(data, "files", dict).items():
            # Names end up in paths: only plain file names.
            if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
                raise ValueError(f"manifest lists an invalid file name {name!r}")
            if not isinstance(entry, dict):
                raise ValueError(f"manifest entry for {name} must be an object")
            digest, size = _field(entry, "sha256", str), _field(entry, "size", int)
            if len(digest) != 64 or not set(digest) <= _SHA256_HEX or size < 0:
                raise ValueError(f"manifest entry for {name} has an invalid sha256 or size")
            files[name] = StoredFile(sha256=digest, size=size)
        return cls(
            id=adapter_id,
            version=version,
            created_at=_number(data, "created_at"),
            updated_at=_number(data, "updated_at"),
            rank=rank,
            lora_alpha=_number(data, "lora_alpha"),
            target_modules=tuple(target_modules),
            files=files,
            owner=owner,
            public=_field(data, "public", bool),
            kind=kind,
            num_virtual_tokens=num_virtual_tokens,
        )


def _field(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    # bool is an int subclass: never accept true/false where a number is meant.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"manifest field {key!r} must be of type {kind.__name__}, got {value!r}"[:300])
    return value


def _number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"manifest field {key!r} must be a finite number, got {value!r}"[:300])
    return float(value)


# -------------------------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base of the store's errors. ``adapter_id`` names the adapter concerned, when there is one."""

    def __init__(self, message: str, adapter_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.adapter_id = adapter_id


class AdapterExistsError(StoreError):
    """create() of an id that is already stored."""


class AdapterMissingError(StoreError):
    """An operation on an id that is not stored (or cannot be a stored id)."""


class StoreCorruptionError(StoreError):
    """A stored file or manifest is missing, unreadable, or does not match its checksum."""


class StoreFullError(StoreError):
    """The disk or quota filled up while writing; what the write made was removed, the store is unchanged."""


# --------------------------------------------------------------------------------------------- store


class AdapterStore:
    """Adapters on disk, keyed by id. Safe to share between threads, and between processes on one root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._mutating():
            self._recover()

    # ------------------------------------------------------------------------------------- mutating

    def create(
        self,
        adapter_id: str,
        config: bytes,
        weights: bytes,
        *,
        rank: int,
        lora_alpha: float,
        target_modules: Sequence[str],
        owner: str | None = None,
        public: bool = False,
        kind: str = "lora",
        num_virtual_tokens: int = 0,
    ) -> Manifest:
        """Store a new adapter (version 1). AdapterFormatError for an invalid id, AdapterExistsError if taken."""
        validate_adapter_id(adapter_id)
        now = time.time()
        manifest = Manifest(
            id=adapter_id,
            version=1,
            created_at=now,
            updated_at=now,
            rank=rank,
            lora_alpha=float(lora_alpha),
            target_modules=tuple(target_modules),
            files=_describe(config, weights),
            owner=owner,
            public=public,
            kind=kind,
            num_virtual_tokens=num_virtual_tokens,
        )
        with self._mutating():
            if adapter_id in self:  # fail before writing what may be a large file
                raise AdapterExistsError(f"adapter {adapter_id!r} already exists", adapter_id)
            tmp_root = self.root / _TMP_DIR
            tmp_root.mkdir(exist_ok=True)
            staging = tmp_root / f"{adapter_id}.{secrets.token_hex(8)}"
            try:
                os.mkdir(staging)
                _write_version(staging / _version_dir(1), config, weights)
                _write_file(staging / MANIFEST_FILE, _manifest_bytes(manifest))
                _fsync_dir(staging)
                try:
                    # The commit point. rename refuses a non-empty target, and an adapter directory always
                    # holds its manifest, so this never overwrites an adapter, whoever else is creating it.
                    os.rename(staging, self._path(adapter_id))
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise AdapterExistsError(f"adapter {adapter_id!r} already exists", adapter_id) from None
                    raise
            except BaseException as exc:
                shutil.rmtree(staging, ignore_errors=True)
                _raise_if_full(exc, adapter_id)
                raise
            # Durable before reporting success. Past the commit point an error here is not StoreFullError
            # (the adapter is there, whole): it propagates as the OSError it is.
            _fsync_dir(self.root)
        return manifest

    def replace(
        self,
        adapter_id: str,
        config: bytes,
        weights: bytes,
        *,
        rank: int,
        lora_alpha: float,
        target_modules: Sequence[str],
        kind: str = "lora",
        num_virtual_tokens: int = 0,
    ) -> Manifest:
        """Store new files for an existing adapter: version + 1; created_at, owner and public are kept."""
        files = _describe(config, weights)
        with self._mutating():
            try:
                old = self._read_manifest(adapter_id)
            except StoreCorruptionError:  # a replace is how an adapter whose manifest broke is restored
                old = self.unreadable_manifest(adapter_id)
            new = dataclasses.replace(
                old,
                version=old.version + 1,
                updated_at=max(time.time(), old.updated_at),  # never before created_at, even if the clock steps back
                rank=rank,
                lora_alpha=float(lora_alpha),
                target_modules=tuple(target_modules),
                files=files,
                kind=kind,
                num_virtual_tokens=num_virtual_tokens,
            )
            self._commit(old, new, (config, weights))
        return new

    def set_public(self, adapter_id: str, public: bool) -> Manifest:
        """Change who may use the adapter; the files and the version stay as they are."""
        with self._mutating():
            old = self._read_manifest(adapter_id)
            if old.public == public:
                return old
            new = dataclasses.replace(old, public=public, updated_at=max(time.time(), old.updated_at))
            self._commit(old, new, None)
        return new

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter: it disappears atomically, then its files are removed."""
        path = self._path(adapter_id)
        with self._mutating():
            trash_root = self.root / _TRASH_DIR
            trash_root.mkdir(exist_ok=True)
            trash = trash_root / f"{adapter_id}.{secrets.token_hex(8)}"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                raise AdapterMissingError(f"adapter {adapter_id!r} does not exist", adapter_id) from None
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)  # leftovers are removed at the next open
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / _PENDING_DIR / adapter_id)

    # ---------------------------------------------------------------------------------------- reading

    def manifest(self, adapter_id: str) -> Manifest:
        """The adapter's manifest (one small file read). AdapterMissingError, StoreCorruptionError."""
        return self._read_manifest(adapter_id)

    def unreadable_manifest(self, adapter_id: str) -> Manifest:
        """What is known of a stored adapter whose manifest cannot be read (``manifest`` raised
        StoreCorruptionError): its id, the newest version directory present and the directory's time. The
        rest is lost with the manifest: no files, rank 0, and no owner, so that only admins see it."""
        path = self._path(adapter_id)
        try:
            changed = os.lstat(path).st_mtime
            with os.scandir(path) as entries:
                versions = [int(e.name[1:]) for e in entries
                            if _VERSION_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            raise AdapterMissingError(f"adapter {adapter_id!r} does not exist", adapter_id) from None
        return Manifest(id=adapter_id, version=max(versions, default=0), created_at=changed, updated_at=changed,
                        rank=0, lora_alpha=0.0, target_modules=(), files={})

    def read(self, adapter_id: str) -> tuple[Manifest, bytes, bytes]:
        """(manifest, adapter_config.json bytes, adapter_model.safetensors bytes), checksums verified."""
        while True:
            manifest = self._read_manifest(adapter_id)
            for name in ADAPTER_FILES:
                if name not in manifest.files:
                    raise StoreCorruptionError(f"adapter {adapter_id!r}: manifest does not list {name}", adapter_id)
            version_dir = self._path(adapter_id) / _version_dir(manifest.version)
            with contextlib.ExitStack() as stack:
                try:
                    handles = [stack.enter_context(open(version_dir / name, "rb")) for name in ADAPTER_FILES]
                except FileNotFoundError as exc:
                    # A replace or delete may have run between the manifest read and the opens: look again
                    # (AdapterMissingError if it was deleted). Once open, a file stays readable on POSIX.
                    if self._read_manifest(adapter_id).version != manifest.version:
                        continue
                    raise StoreCorruptionError(
                        f"adapter {adapter_id!r}: {Path(str(exc.filename)).name} of version "
                        f"{manifest.version} is missing",
                        adapter_id,
                    ) from None
                except OSError as exc:
                    message = f"adapter {adapter_id!r}: cannot open a file: {exc}"
                    raise StoreCorruptionError(message, adapter_id) from exc
                contents = []
                for name, handle in zip(ADAPTER_FILES, handles, strict=True):
                    try:
                        data = handle.read()
                    except OSError as exc:
                        message = f"adapter {adapter_id!r}: cannot read {name}: {exc}"
                        raise StoreCorruptionError(message, adapter_id) from exc
                    _verify(adapter_id, name, data, manifest.files[name])
                    contents.append(data)
            return manifest, contents[0], contents[1]

    def __contains__(self, adapter_id: object) -> bool:
        if not isinstance(adapter_id, str) or ADAPTER_ID_PATTERN.fullmatch(adapter_id) is None:
            return False
        try:
            return stat.S_ISDIR(os.lstat(self.root / adapter_id).st_mode)
        except OSError:
            return False

    def ids(self, after: str | None = None, limit: int | None = None) -> list[str]:
        """Stored ids in sorted order: those greater than ``after``, at most ``limit`` of them.

        One directory listing, no manifest read; pass the last id of a page as ``after`` for the next.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        names = sorted(self._scan())
        start = 0 if after is None else bisect.bisect_right(names, after)
        return names[start:] if limit is None else names[start : start + limit]

    def count(self) -> int:
        return sum(1 for _ in self._scan())

    # -------------------------------------------------------------------------------------- internals

    def _path(self, adapter_id: str) -> Path:
        """The adapter's directory. An id that cannot be stored is simply missing: no path is ever built from it."""
        if not isinstance(adapter_id, str) or ADAPTER_ID_PATTERN.fullmatch(adapter_id) is None:
            raise AdapterMissingError(f"adapter {str(adapter_id)[:140]!r} does not exist (not a valid id)")
        return self.root / adapter_id

    def _scan(self) -> Iterator[str]:
        with os.scandir(self.root) as entries:
            for entry in entries:
                # d_type from the listing: no stat per entry, and a symlink is never an adapter.
                if ADAPTER_ID_PATTERN.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                    yield entry.name

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Serialize writers: threads of this process by a lock, other processes by flock on ``.lock``."""
        with self._lock:
            fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _read_manifest(self, adapter_id: str) -> Manifest:
        path = self._path(adapter_id)
        try:
            raw = _read_manifest_file(path / MANIFEST_FILE)
        except FileNotFoundError:
            if adapter_id in self:
                raise StoreCorruptionError(f"adapter {adapter_id!r}: {MANIFEST_FILE} is missing", adapter_id) from None
            raise AdapterMissingError(f"adapter {adapter_id!r} does not exist", adapter_id) from None
        except OSError as exc:
            message = f"adapter {adapter_id!r}: cannot read {MANIFEST_FILE}: {exc}"
            raise StoreCorruptionError(message, adapter_id) from exc
        try:
            manifest = Manifest.from_json(json.loads(raw))
        except ValueError as exc:  # also JSONDecodeError and UnicodeDecodeError
            raise StoreCorruptionError(f"adapter {adapter_id!r}: bad {MANIFEST_FILE}: {exc}", adapter_id) from None
        if manifest.id != adapter_id:
            raise StoreCorruptionError(
                f"adapter {adapter_id!r}: {MANIFEST_FILE} belongs to {manifest.id!r}", adapter_id
            )
        return manifest

    def _commit(self, old: Manifest, new: Manifest, files: tuple[bytes, bytes] | None) -> None:
        """Write ``new`` (and its version's files, if given) next to ``old`` and switch the manifest over."""
        adapter_dir = self._path(old.id)
        marker = self.root / _PENDING_DIR / old.id
        marker.parent.mkdir(exist_ok=True)
        try:
            # The marker is durable before anything is written into the adapter's directory, so an open
            # after a crash knows which directories to sweep without reading every manifest.
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644))
            _fsync_dir(marker.parent)
            # Leftovers of an earlier failure that nothing swept (say, a marker lost with a power cut).
            self._sweep(adapter_dir, old.version)
            if files is not None:
                _write_version(adapter_dir / _version_dir(new.version), *files)
                _fsync_dir(adapter_dir)  # the new version's entry is durable before the manifest names it
            tmp = adapter_dir / _MANIFEST_TMP
            _write_file(tmp, _manifest_bytes(new))
            os.replace(tmp, adapter_dir / MANIFEST_FILE)  # the commit point
        except BaseException as exc:
            # os.replace is atomic: when it raised, the old manifest is still the one in place.
            if self._sweep(adapter_dir, old.version):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker)
            _raise_if_full(exc, old.id)
            raise
        # Past the commit point an error is no longer "the store is unchanged": it propagates as the
        # OSError it is, and the marker stays so that the next open finishes the sweep.
        _fsync_dir(adapter_dir)
        if self._sweep(adapter_dir, new.version):  # the old version, once the switch is durable
            os.unlink(marker)

    def _sweep(self, adapter_dir: Path, keep_version: int) -> bool:
        """Remove everything in ``adapter_dir`` but the manifest and ``v<keep_version>``; True if all went."""
        keep = {MANIFEST_FILE, _version_dir(keep_version)}
        clean = True
        try:
            with os.scandir(adapter_dir) as entries:
                extra = [entry for entry in entries if entry.name not in keep]
        except FileNotFoundError:
            return True
        for entry in extra:
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                clean = False
        return clean

    def _recover(self) -> None:
        """Finish what a crash interrupted: drop half-made creates and half-done deletes, sweep replaces."""
        for name in (_TMP_DIR, _TRASH_DIR):
            directory = self.root / name
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(directory)
            directory.mkdir(exist_ok=True)
        pending = self.root / _PENDING_DIR
        pending.mkdir(exist_ok=True)
        for marker in os.listdir(pending):
            if ADAPTER_ID_PATTERN.fullmatch(marker) is None:
                os.unlink(pending / marker)
                continue
            try:
                manifest = self._read_manifest(marker)
            except AdapterMissingError:
                os.unlink(pending / marker)
                continue
            except StoreCorruptionError:
                continue  # never delete files we cannot account for; read() reports the corruption
            if self._sweep(self.root / marker, manifest.version):
                os.unlink(pending / marker)


# ------------------------------------------------------------------------------------------- helpers


def _describe(config: bytes, weights: bytes) -> dict[str, StoredFile]:
    return {CONFIG_FILE: StoredFile.of(config), WEIGHTS_FILE: StoredFile.of(weights)}


def _version_dir(version: int) -> str:
    return f"v{version}"


def _manifest_bytes(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_json(), indent=2, allow_nan=False).encode() + b"\n"


def _read_manifest_file(path: Path) -> bytes:
    """The one place a manifest is read from disk (tests count calls to prove opening reads none)."""
    with open(path, "rb") as f:
        return f.read()


def _verify(adapter_id: str, name: str, data: bytes, expected: StoredFile) -> None:
    if len(data) != expected.size:
        raise StoreCorruptionError(
            f"adapter {adapter_id!r}: {name} has {len(data)} bytes, the manifest says {expected.size}", adapter_id
        )
    if hashlib.sha256(data).hexdigest() != expected.sha256:
        raise StoreCorruptionError(f"adapter {adapter_id!r}: {name} does not match its sha256 checksum", adapter_id)


def _write_version(directory: Path, config: bytes, weights: bytes) -> None:
    os.mkdir(directory)
    _write_file(directory / CONFIG_FILE, config)
    _write_file(directory / WEIGHTS_FILE, weights)
    _fsync_dir(directory)


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync: the data is on disk before any rename makes it reachable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_if_full(exc: BaseException, adapter_id: str) -> None:
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        raise StoreFullError(
            f"no space left on the adapter store's disk while writing adapter {adapter_id!r} "
            f"({os.strerror(exc.errno)}); the store is unchanged",
            adapter_id,
        ) from exc
