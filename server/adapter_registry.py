"""Which adapters exist, which version a request uses, and loading versions from disk into host memory.

Tiers, coldest first: the store on disk (`adapters_store.AdapterStore`), host memory (weights parsed, checked
and packed for the device pages, pinned on CUDA, within a byte budget, least recently used dropped first:
`AdapterHostCache`, which the registry keeps under its lock) and the device slots (`AdapterSlotPool`, owned
by the engine thread). A request binds to one `AdapterVersion` when it is submitted and keeps it until it
finishes, so a replace or delete never changes the weights under a request already in flight; a version nobody
uses any more is freed from every tier at once.

Several processes may share one store (`AdapterStore` locks its writes). Each registry caches the manifest
of every adapter it has looked up, and a lookup older than `revalidate_s` reads the manifest again (one
small file), so what another process did reaches this one within that bound: a delete makes the adapter
missing, a change of owner or visibility applies to the next access check, and a replace makes a new
`AdapterVersion` current (the old one is retired as after a replace of our own). A request bound to a
version whose files another process has since replaced or deleted is served from the host copy if there
is one; otherwise its load finds the files gone, and the version is *gone*: its requests fail with a
retryable error and the next lookup reads the store again. Writes of this process show at once.

A version whose stored files fail at load (a checksum mismatch, a missing file, weights that no longer
parse) is *broken*: the requests waiting for it fail, new ones are refused at `bind`, and its files are
not read again; it never reaches host memory or a slot. Only a replace (a new version) or a delete ends
that. Any other load failure (out of memory, say) fails the requests that waited for it and is retried
by the next request.

An adapter whose files are fine may still be *unservable* by this server's settings: a rank above
`--max-lora-rank` (stored under a larger one), or an id that is the base model's served name (stored under
another). It is listed with the reason, warned of at start, and its requests are refused at `bind`.

Thread model: the event loop uploads, deletes and binds; the engine thread unbinds and asks for loads;
a small thread pool reads, parses and packs from disk (`AdapterPacker`: never the engine thread, whose loads
then only copy). One lock guards the bookkeeping; no I/O runs under it.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapters_store import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterMissingError,
    AdapterStore,
    BaseModelShape,
    LoraAdapter,
    Manifest,
    StoreCorruptionError,
    StoreError,
    parse_peft_adapter,
)
from adapters_store.peft_export import to_peft_files
from server.adapter_host_cache import AdapterHostCache
from server.adapter_packer import AdapterPacker, PackedAdapter
from server.metrics import Metrics
from server.requests import AdapterBrokenError, AdapterStatus, AdapterUnservableError
from server.torch_threads import single_threaded_executor

log = logging.getLogger("lorahive.adapters")


@dataclass(eq=False)
class AdapterVersion:
    """One version of one adapter. Requests bind to it; the tiers hold its weights."""

    manifest: Manifest
    weights: PackedAdapter | None = None  # the host-tier copy; None while only on disk
    users: int = 0  # bound requests not yet finished
    retired: bool = False  # replaced or deleted: no new request binds to it
    loading: bool = False
    load_error: str | None = None  # why the last load failed; the requests waiting for it fail with it
    broken: bool = False  # load_error lies in the stored files: this version can never be served
    gone: bool = False  # its files left the store (replaced or deleted, maybe by another process) before it loaded
    requests_served: int = 0  # requests for this adapter id since the server started, carried across replaces
    last_used: float | None = None  # likewise
    # When the manifest was last read from (or written to) the store: `checked` orders what the registry
    # learned (a ticket), `checked_at` is the registry clock's time of it, which bounds the cache's staleness.
    checked: int = -1
    checked_at: float = -math.inf

    @property
    def adapter_id(self) -> str:
        return self.manifest.id


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        shape: BaseModelShape,
        max_rank: int,
        host_budget_bytes: int,
        pin_memory: bool = False,
        share_memory: bool = False,
        pinned_ids: frozenset[str] = frozenset(),
        max_adapter_bytes: int = 512 * 2**20,
        revalidate_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        serving_dtype: torch.dtype = torch.float32,
        reserved_ids: frozenset[str] = frozenset(),
    ):
        """`serving_dtype`: weights that would overflow it are refused. `reserved_ids`: ids no adapter may take
        (the base model's served name, which `model` always resolves to the base)."""
        self.store = store
        self.shape = shape
        self.max_rank = max_rank
        self.serving_dtype = serving_dtype
        self.reserved_ids = reserved_ids
        self._packer = AdapterPacker(serving_dtype, pin_memory, share_memory)
        self.max_adapter_bytes = max_adapter_bytes
        self.revalidate_s = revalidate_s  # a cached manifest older than this is read again (0: at every lookup)
        self._clock = clock
        self._lock = threading.Lock()
        # Held from a store write until the registry shows it, so the cached manifest of the current version
        # (its owner and public flag) is always the newest one written. Parsing runs outside it.
        self._writing = threading.Lock()
        self._current: dict[str, AdapterVersion] = {}  # id -> current version, filled lazily from the store
        self._host_lru = AdapterHostCache(host_budget_bytes, pinned_ids)  # versions with weights, LRU first
        # Tickets order store reads against this registry's own writes: a read may apply only if nothing newer
        # about the adapter was learned since it started (see `_version`).
        self._tickets = itertools.count()
        self._last_delete = -1  # ticket of this registry's latest delete (a deleted id leaves no version to compare)
        self._loader = single_threaded_executor(2, "lorahive-adapter-load", background=True)
        self.stats = self._host_lru.stats
        # Called (from any thread) when a version leaves service for good, so the engine frees its slot.
        self.on_retired: Callable[[AdapterVersion], None] = lambda version: None
        # Called when an asynchronous load finished (loaded or failed), so the engine re-schedules.
        self.on_loaded: Callable[[AdapterVersion], None] = lambda version: None
        self.metrics: Metrics | None = None  # set by the engine: disk reads and their latency
        self._warn_unservable()

    @property
    def host_budget_bytes(self) -> int:
        return self._host_lru.budget_bytes

    @property
    def pinned_ids(self) -> frozenset[str]:
        return self._host_lru.pinned_ids

    def host_versions(self) -> list[AdapterVersion]:
        """The versions with weights in host memory, least recently used first; a copy made in one C call, so any
        thread may take it while the engine loads and evicts."""
        return list(self._host_lru)

    @host_budget_bytes.setter
    def host_budget_bytes(self, budget: int) -> None:
        self._host_lru.budget_bytes = budget

    # ---- lookup and binding (event loop) ---------------------------------------------------------

    def exists(self, adapter_id: str) -> bool:
        return self._version(adapter_id) is not None

    def ids(self, after: str | None = None, limit: int | None = None) -> list[str]:
        return self.store.ids(after=after, limit=limit)

    def version(self, adapter_id: str) -> AdapterVersion | None:
        return self._version(adapter_id)

    def status(self, version: AdapterVersion) -> tuple[AdapterStatus, str | None]:
        """Whether `version` can be served, and the reason when it cannot."""
        if version.broken:
            return "broken", version.load_error or ""
        reason = self.unservable_reason(version.manifest)
        return ("ready", None) if reason is None else ("unservable", reason)

    def unservable_reason(self, manifest: Manifest) -> str | None:
        """Why this server's settings cannot serve an adapter whose files are fine, or None when they can."""
        if manifest.id in self.reserved_ids:
            return (f"its id is the base model's served name, which requests always resolve to the base model; "
                    f"upload it under another id and DELETE /v1/adapters/{manifest.id}")
        if manifest.rank > self.max_rank:
            return (f"its rank {manifest.rank} is above this server's --max-lora-rank {self.max_rank}; restart "
                    f"with --max-lora-rank {manifest.rank} or more, or PUT /v1/adapters/{manifest.id} a version of "
                    f"rank {self.max_rank} or less")
        most = self.shape.max_virtual_tokens
        if most is not None and manifest.num_virtual_tokens > most:
            return (f"its soft prompt of {manifest.num_virtual_tokens} virtual tokens is longer than this server "
                    f"serves ({most}: the context must leave room for a prompt token and a generated one, and the "
                    f"device tier hold its embeddings); restart with a larger --max-model-len or adapter memory, or "
                    f"PUT /v1/adapters/{manifest.id} a shorter one")
        return None

    def _warn_unservable(self) -> None:
        """At start: name every stored adapter these settings cannot serve (it stays stored and listed)."""
        for adapter_id in self.store.ids():
            try:
                reason = self.unservable_reason(self.store.manifest(adapter_id))
            except (StoreError, ValueError):  # damaged or just deleted: shown as broken when looked up
                continue
            if reason is not None:
                log.warning("adapter %s cannot be served: %s", adapter_id, reason)

    def bind(self, adapter_id: str, users: int = 1) -> AdapterVersion | None:
        """The current version of `adapter_id`, held for `users` sequences (None if there is no such adapter).

        Each of them must be `unbind`-ed once when it finishes. AdapterBrokenError if the version is broken,
        AdapterUnservableError if this server cannot serve it."""
        while True:
            version = self._version(adapter_id)
            if version is None:
                return None
            with self._lock:
                if version.retired:  # replaced or deleted since we looked it up: take the newer state
                    continue
                if version.broken:  # known from an earlier load: refuse without reading the files again
                    raise AdapterBrokenError(adapter_id, version.load_error or "")
                if (reason := self.unservable_reason(version.manifest)) is not None:
                    raise AdapterUnservableError(adapter_id, reason)
                if version.load_error is not None:
                    version.load_error = None  # the failure was not in the files: this request tries again
                version.users += users
                version.requests_served += 1
                version.last_used = time.time()
            return version

    def unbind(self, version: AdapterVersion) -> None:
        """A request bound to `version` finished or was aborted."""
        with self._lock:
            version.users -= 1
            gone = version.retired and version.users == 0
            if gone:
                self._host_lru.drop(version)
        if gone:
            self.on_retired(version)

    def _version(self, adapter_id: str) -> AdapterVersion | None:
        """The current version of `adapter_id`, as the store had it at most `revalidate_s` ago; None if none."""
        while True:
            with self._lock:
                cached = self._current.get(adapter_id)
                if cached is not None and self._clock() - cached.checked_at < self.revalidate_s:
                    return cached
                ticket = next(self._tickets)
            found = self._read_manifest(adapter_id)  # no lock held: another process may write meanwhile
            with self._lock:
                current = self._current.get(adapter_id)
                if current is not None and current.checked > ticket:
                    return current  # a write of ours or a later read overtook this one: theirs is newer
                if current is None and ticket < self._last_delete:
                    continue  # this read may predate a delete of ours: read again
                version, replaced = self._adopt(adapter_id, found, ticket)
            if replaced is not None:
                self._retire(replaced, None)  # its files were changed by another process: only a host copy serves
                if version is not None and version.manifest.version > replaced.manifest.version:
                    self._carry_use(replaced, version)  # a replace, not a delete and a new upload
            if isinstance(found, StoreCorruptionError):
                return self._unreadable(adapter_id, found)
            return version

    def _read_manifest(self, adapter_id: str) -> Manifest | StoreCorruptionError | None:
        try:
            return self.store.manifest(adapter_id)
        except StoreCorruptionError as exc:
            return exc
        except (AdapterMissingError, StoreError, ValueError):
            return None

    def _adopt(
        self, adapter_id: str, found: Manifest | StoreCorruptionError | None, ticket: int
    ) -> tuple[AdapterVersion | None, AdapterVersion | None]:
        """Lock held. Make what the store holds (read under `ticket`) current: (the current version, the version
        it replaced, to retire). The same version keeps its object (and its weights), with the newer manifest."""
        current = self._current.get(adapter_id)
        now = self._clock()
        if isinstance(found, Manifest) and current is not None and _same_version(current.manifest, found):
            current.manifest = found  # its owner or visibility may have changed
            current.checked, current.checked_at = ticket, now
            return current, None
        if not isinstance(found, Manifest):  # deleted, or its manifest is damaged (never cached)
            self._current.pop(adapter_id, None)
            return None, current
        version = AdapterVersion(found, checked=ticket, checked_at=now)
        self._current[adapter_id] = version
        return version, current

    def _unreadable(self, adapter_id: str, error: StoreCorruptionError) -> AdapterVersion | None:
        """A stored adapter whose manifest is damaged: broken, with what the store still knows of it. Not kept
        in `_current`, so a PUT or DELETE (or a repair by hand) shows at the next lookup."""
        try:
            manifest = self.store.unreadable_manifest(adapter_id)
        except AdapterMissingError:  # deleted meanwhile
            return None
        return AdapterVersion(manifest, broken=True, load_error=_broken_reason(adapter_id, error))

    # ---- the host tier ---------------------------------------------------------------------------

    def request_load(self, version: AdapterVersion) -> None:
        """Start reading `version` from disk into host memory unless it is there or on its way."""
        with self._lock:
            if version.weights is not None or version.loading or version.load_error is not None:
                return
            version.loading = True
        self._loader.submit(self._load, version)

    def _load(self, version: AdapterVersion) -> None:
        start = time.perf_counter()
        try:
            manifest, config, weights = self.store.read(version.adapter_id)
            if not _same_version(manifest, version.manifest):
                raise _VersionGone(f"version {version.manifest.version} was replaced", version.adapter_id)
            adapter = self._packed(version.adapter_id, config, weights)
            with self._lock:
                # A retire may have given it a copy meanwhile, or retired it with nobody left to use it.
                if version.weights is None and not (version.retired and version.users == 0):
                    self._host_lru.keep(version, adapter)
                self.stats.loads_from_disk += 1
            if self.metrics is not None:
                self.metrics.disk_read(ok=True)
                self.metrics.adapter_loaded("disk_to_host", time.perf_counter() - start)
        except Exception as exc:  # reported to the requests waiting for it; the others keep serving
            self._load_failed(version, exc)
        finally:
            with self._lock:
                version.loading = False
            self.on_loaded(version)

    def _load_failed(self, version: AdapterVersion, exc: Exception) -> None:
        # A replace or delete may have removed the files under this read. One of ours holds `_writing` until it
        # has retired the version and given the requests still bound to it a copy of the weights: no failure then.
        # One by another process leaves them nothing to serve: they fail with a retryable error.
        gone = isinstance(exc, AdapterMissingError | _VersionGone)
        with self._writing, self._lock:
            if version.weights is not None:
                return
            reason = None if gone else _broken_reason(version.adapter_id, exc)
            if gone:
                log.info("adapter %s v%d was replaced or deleted before it loaded", version.adapter_id,
                         version.manifest.version)
                version.load_error = f"version {version.manifest.version} was replaced or deleted before it loaded"
            else:
                log.warning("adapter %s v%d failed to load: %s", version.adapter_id, version.manifest.version, exc)
                version.load_error = str(exc) if reason is None else reason
            version.gone = gone
            version.broken = reason is not None
            if gone and self._current.get(version.adapter_id) is version:
                del self._current[version.adapter_id]  # the next lookup reads what the store holds now
            retire = gone and not version.retired
        if retire:
            self._retire(version, None)
        if self.metrics is not None:
            self.metrics.disk_read(ok=False)
            if reason is not None:
                self.metrics.adapter_broken()

    def _parse(self, adapter_id: str, config: bytes, weights: bytes) -> LoraAdapter:
        return parse_peft_adapter(config, weights, adapter_id, base=self.shape, max_rank=self.max_rank,
                                  serving_dtype=self.serving_dtype)

    def _packed(self, adapter_id: str, config: bytes, weights: bytes) -> PackedAdapter:
        """Parsed, checked and packed: the host tier's form (packing here keeps it off the engine thread)."""
        return self._packer.pack(self._parse(adapter_id, config, weights))

    def touch(self, version: AdapterVersion) -> None:
        with self._lock:
            self._host_lru.touch(version)

    # ---- lifecycle (event loop; parsing runs in a worker thread via the routes) --------------------

    def validate(self, adapter_id: str, config: bytes, weights: bytes) -> LoraAdapter:
        """Parse and check an upload against this base model; AdapterFormatError names what is wrong."""
        return self._parse(adapter_id, config, weights)

    def create(
        self, adapter_id: str, config: bytes, weights: bytes, owner: str | None = None, public: bool = False
    ) -> AdapterVersion:
        """AdapterIdReservedError if `adapter_id` is reserved, AdapterFormatError if the files are refused."""
        if adapter_id in self.reserved_ids:
            raise AdapterIdReservedError(adapter_id)
        adapter = self.validate(adapter_id, config, weights)
        packed = self._packer.pack(adapter)
        with self._writing:
            manifest = self.store.create(
                adapter_id, config, weights, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                target_modules=adapter.target_modules, owner=owner, public=public, kind=adapter.kind,
                num_virtual_tokens=adapter.num_virtual_tokens,
            )
            return self._install(manifest, packed)

    def replace(self, adapter_id: str, config: bytes, weights: bytes) -> AdapterVersion:
        adapter = self.validate(adapter_id, config, weights)
        packed = self._packer.pack(adapter)
        with self._writing:
            old_weights = self._weights_before_change(adapter_id)
            manifest = self.store.replace(
                adapter_id, config, weights, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                target_modules=adapter.target_modules, kind=adapter.kind, num_virtual_tokens=adapter.num_virtual_tokens,
            )
            return self._install(manifest, packed, old_weights)

    def add(self, adapter: LoraAdapter, owner: str | None = None) -> AdapterVersion:
        """Store an adapter built in code (tests, benchmarks), through the same path as an upload."""
        config, weights = to_peft_files(adapter)
        try:
            return self.create(adapter.adapter_id, config, weights, owner=owner)
        except AdapterExistsError:
            return self.replace(adapter.adapter_id, config, weights)

    def set_public(self, adapter_id: str, public: bool) -> AdapterVersion:
        """Let every tenant use the adapter, or only its owner again; weights and version stay as they are.

        AdapterMissingError if there is no such adapter."""
        with self._writing:
            manifest = self.store.set_public(adapter_id, public)
            version = self._version(adapter_id)
            if version is None:
                raise AdapterMissingError(f"adapter {adapter_id!r} does not exist", adapter_id)
            with self._lock:
                version.manifest = manifest
                version.checked, version.checked_at = next(self._tickets), self._clock()
        return version

    def delete(self, adapter_id: str) -> None:
        with self._writing:
            old_weights = self._weights_before_change(adapter_id)
            self.store.delete(adapter_id)
            with self._lock:
                old = self._current.pop(adapter_id, None)
                self._last_delete = next(self._tickets)
            if old is not None:
                self._retire(old, old_weights)

    def _weights_before_change(self, adapter_id: str) -> Callable[[], PackedAdapter] | None:
        """`_writing` held. The current version's weights, taken before a replace or delete removes its files.

        Requests bound to that version (already, or in the instant before the change shows) must still be
        served with it, and its host copy may be missing: never loaded, or evicted. So hold on to the host copy,
        or read the files while they are there (parsed only if a bound request turns out to need them)."""
        version = self._version(adapter_id)  # now in `_current`: every bind until the change gets this object
        if version is None or version.broken:
            return None
        with self._lock:
            host_copy = version.weights
        if host_copy is not None:
            return lambda: host_copy
        try:
            manifest, config, weights = self.store.read(adapter_id)
        except StoreError:  # nothing servable to keep: a request bound to it fails as its load would have
            return None
        if not _same_version(manifest, version.manifest):
            return None
        return lambda: self._packed(adapter_id, config, weights)

    def _install(
        self, manifest: Manifest, adapter: PackedAdapter, old_weights: Callable[[], PackedAdapter] | None = None
    ) -> AdapterVersion:
        """Make a freshly stored version current (warm in host memory) and retire the previous one."""
        with self._lock:
            version = AdapterVersion(manifest, checked=next(self._tickets), checked_at=self._clock())
            old = self._current.get(manifest.id)
            self._current[manifest.id] = version
            self._host_lru.keep(version, adapter)
        if old is not None:
            self._retire(old, old_weights)
            self._carry_use(old, version)
        return version

    def _carry_use(self, old: AdapterVersion, new: AdapterVersion) -> None:
        """A replace keeps the adapter's use so far (as its metrics do). `old` is retired: its count is final."""
        with self._lock:
            new.requests_served += old.requests_served
            if old.last_used is not None and (new.last_used is None or old.last_used > new.last_used):
                new.last_used = old.last_used

    def _retire(self, version: AdapterVersion, weights: Callable[[], PackedAdapter] | None) -> None:
        """No new request binds to `version`; its slot and host copy go once its last user finishes, and until
        then its users get `weights` if no host copy is left (its files are gone)."""
        with self._lock:
            version.retired = True
            gone = version.users == 0
            if gone:
                self._host_lru.drop(version)
            stranded = not gone and version.weights is None
        if gone:
            self.on_retired(version)
        elif stranded and weights is not None:
            self._keep_for_users(version, weights)

    def _keep_for_users(self, version: AdapterVersion, weights: Callable[[], PackedAdapter]) -> None:
        try:
            adapter = weights()
        except AdapterFormatError as exc:  # its users fail with the reason, as a load from disk would have
            log.warning("adapter %s v%d cannot be kept for its requests: %s", version.adapter_id,
                        version.manifest.version, exc)
            return
        with self._lock:
            if version.users == 0 or version.weights is not None:  # its last user finished meanwhile
                return
            self._host_lru.keep(version, adapter)  # retired and in use: never evicted
            version.load_error = None
        self.on_loaded(version)  # requests waiting for it can be admitted now

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


class _VersionGone(StoreError):
    """The store holds another version than the one being loaded: its files were replaced (or deleted and
    uploaded again), maybe by another process."""


def _same_version(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests describe the same stored files. A delete and a new upload start again at version 1:
    the creation time and the checksums tell them apart. Owner and visibility may differ."""
    return a.version == b.version and a.created_at == b.created_at and a.files == b.files


class AdapterIdReservedError(AdapterFormatError):
    """An adapter may not take this id (the base model's served name)."""

    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter id {adapter_id!r} is the base model's served name; choose another id", field="id")
        self.adapter_id = adapter_id


def _broken_reason(adapter_id: str, error: Exception) -> str | None:
    """What is wrong with the stored files of an adapter, or None when `error` is not about them."""
    if isinstance(error, StoreCorruptionError):
        # The store names the adapter; every message built from this reason names it already.
        return error.message.removeprefix(f"adapter {adapter_id!r}: ")
    if isinstance(error, AdapterFormatError):
        return f"the stored files no longer parse: {error.message}"
    return None
