"""Which adapters exist, which version a request uses, and the host-memory tier of the cache.

Tiers, coldest first: the store on disk (`adapters_store.AdapterStore`), host memory (parsed weights,
pinned on CUDA, within a byte budget, least recently used dropped first) and the device slots
(`AdapterSlotPool`, owned by the engine thread). A request binds to one `AdapterVersion` when it is
submitted and keeps it until it finishes, so a replace or delete never changes the weights under a
request already in flight; a version nobody uses any more is freed from every tier at once.

A version whose stored files fail at load (a checksum mismatch, a missing file, weights that no longer
parse) is *broken*: the requests waiting for it fail, new ones are refused at `bind`, and its files are
not read again; it never reaches host memory or a slot. Only a replace (a new version) or a delete ends
that. Any other load failure (out of memory, say) fails the requests that waited for it and is retried
by the next request.

An adapter whose files are fine may still be *unservable* by this server's settings: a rank above
`--max-lora-rank` (stored under a larger one), or an id that is the base model's served name (stored under
another). It is listed with the reason, warned of at start, and its requests are refused at `bind`.

Thread model: the event loop uploads, deletes and binds; the engine thread unbinds and asks for loads;
a small thread pool reads and parses from disk. One lock guards the bookkeeping; no I/O runs under it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from adapters_store import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterMissingError,
    AdapterStore,
    BaseModelShape,
    LoraAdapter,
    LoraWeight,
    Manifest,
    StoreCorruptionError,
    StoreError,
    parse_peft_adapter,
)
from adapters_store.peft_export import to_peft_files
from server.metrics import Metrics
from server.sequence import AdapterBrokenError, AdapterStatus, AdapterUnservableError

log = logging.getLogger("lorahive.adapters")


@dataclass(eq=False)
class AdapterVersion:
    """One version of one adapter. Requests bind to it; the tiers hold its weights."""

    manifest: Manifest
    weights: LoraAdapter | None = None  # the host-tier copy; None while only on disk
    users: int = 0  # bound requests not yet finished
    retired: bool = False  # replaced or deleted: no new request binds to it
    loading: bool = False
    load_error: str | None = None  # why the last load failed; the requests waiting for it fail with it
    broken: bool = False  # load_error lies in the stored files: this version can never be served
    requests_served: int = 0  # requests for this adapter id since the server started, carried across replaces
    last_used: float | None = None  # likewise

    @property
    def adapter_id(self) -> str:
        return self.manifest.id


@dataclass
class HostTierStats:
    host: int = 0  # bytes of weights held in host memory
    host_adapters: int = 0
    loads_from_disk: int = 0
    host_evictions: int = 0


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        shape: BaseModelShape,
        max_rank: int,
        host_budget_bytes: int,
        pin_memory: bool = False,
        pinned_ids: frozenset[str] = frozenset(),
        max_adapter_bytes: int = 512 * 2**20,
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
        self.host_budget_bytes = host_budget_bytes
        self.pin_memory = pin_memory
        self.pinned_ids = pinned_ids
        self.max_adapter_bytes = max_adapter_bytes
        self._lock = threading.Lock()
        # Held from a store write until the registry shows it, so the cached manifest of the current version
        # (its owner and public flag) is always the newest one written. Parsing runs outside it.
        self._writing = threading.Lock()
        self._current: dict[str, AdapterVersion] = {}  # id -> current version, filled lazily from the store
        self._host_lru: OrderedDict[AdapterVersion, None] = OrderedDict()  # versions with weights, LRU first
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lorahive-adapter-load")
        self.stats = HostTierStats()
        # Called (from any thread) when a version leaves service for good, so the engine frees its slot.
        self.on_retired: Callable[[AdapterVersion], None] = lambda version: None
        # Called when an asynchronous load finished (loaded or failed), so the engine re-schedules.
        self.on_loaded: Callable[[AdapterVersion], None] = lambda version: None
        self.metrics: Metrics | None = None  # set by the engine: disk reads and their latency
        self._warn_unservable()

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
                self._drop_host_copy(version)
        if gone:
            self.on_retired(version)

    def _version(self, adapter_id: str) -> AdapterVersion | None:
        with self._lock:
            version = self._current.get(adapter_id)
        if version is not None:
            return version
        try:
            manifest = self.store.manifest(adapter_id)
        except StoreCorruptionError as exc:
            return self._unreadable(adapter_id, exc)
        except (AdapterMissingError, StoreError, ValueError):
            return None
        with self._lock:  # another thread may have filled it meanwhile: keep the first
            return self._current.setdefault(adapter_id, AdapterVersion(manifest))

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
            if manifest.version != version.manifest.version:
                raise StoreError(f"version {version.manifest.version} was replaced while it loaded")
            adapter = self._parse(version.adapter_id, config, weights)
            with self._lock:
                # A retire may have given it a copy meanwhile, or retired it with nobody left to use it.
                if version.weights is None and not (version.retired and version.users == 0):
                    self._keep_in_host(version, adapter)
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
        # A replace or delete may have removed the files under this read. It holds `_writing` until it has
        # retired the version and given the requests still bound to it a copy of the weights: no failure then.
        with self._writing, self._lock:
            if version.weights is not None:
                return
            log.warning("adapter %s v%d failed to load: %s", version.adapter_id, version.manifest.version, exc)
            reason = _broken_reason(version.adapter_id, exc)
            version.load_error = str(exc) if reason is None else reason
            version.broken = reason is not None
        if self.metrics is not None:
            self.metrics.disk_read(ok=False)
            if reason is not None:
                self.metrics.adapter_broken()

    def _parse(self, adapter_id: str, config: bytes, weights: bytes) -> LoraAdapter:
        adapter = parse_peft_adapter(config, weights, adapter_id, base=self.shape, max_rank=self.max_rank,
                                     serving_dtype=self.serving_dtype)
        if not self.pin_memory:
            return adapter
        # Page-locked host memory lets host -> device copies run asynchronously on CUDA.
        pinned = {key: LoraWeight(w.a.pin_memory(), w.b.pin_memory(), w.scale) for key, w in adapter.weights.items()}
        return replace(adapter, weights=pinned)

    def _keep_in_host(self, version: AdapterVersion, adapter: LoraAdapter) -> None:
        """Lock held. Put weights in the host tier, then drop least recently used copies over budget.

        Copies of idle versions go first; then those of waiting requests, which can be read from disk
        again. Never dropped: pinned adapters, and retired versions still in use (their files are gone).
        """
        version.weights = adapter
        self._host_lru[version] = None
        self.stats.host += adapter.num_bytes
        self.stats.host_adapters += 1
        for idle_only in (True, False):
            for victim in list(self._host_lru):
                if self.stats.host <= self.host_budget_bytes:
                    return
                if victim is version or victim.retired or victim.adapter_id in self.pinned_ids:
                    continue
                if victim.users == 0 or not idle_only:
                    self._drop_host_copy(victim)
                    self.stats.host_evictions += 1

    def _drop_host_copy(self, version: AdapterVersion) -> None:
        """Lock held."""
        if version.weights is None:
            return
        self.stats.host -= version.weights.num_bytes
        self.stats.host_adapters -= 1
        version.weights = None
        self._host_lru.pop(version, None)

    def touch(self, version: AdapterVersion) -> None:
        with self._lock:
            if version in self._host_lru:
                self._host_lru.move_to_end(version)

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
        with self._writing:
            manifest = self.store.create(
                adapter_id, config, weights, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                target_modules=adapter.target_modules, owner=owner, public=public,
            )
            return self._install(manifest, adapter)

    def replace(self, adapter_id: str, config: bytes, weights: bytes) -> AdapterVersion:
        adapter = self.validate(adapter_id, config, weights)
        with self._writing:
            old_weights = self._weights_before_change(adapter_id)
            manifest = self.store.replace(
                adapter_id, config, weights, rank=adapter.rank, lora_alpha=adapter.lora_alpha,
                target_modules=adapter.target_modules,
            )
            return self._install(manifest, adapter, old_weights)

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
        return version

    def delete(self, adapter_id: str) -> None:
        with self._writing:
            old_weights = self._weights_before_change(adapter_id)
            self.store.delete(adapter_id)
            with self._lock:
                old = self._current.pop(adapter_id, None)
            if old is not None:
                self._retire(old, old_weights)

    def _weights_before_change(self, adapter_id: str) -> Callable[[], LoraAdapter] | None:
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
        if manifest.version != version.manifest.version:
            return None
        return lambda: self._parse(adapter_id, config, weights)

    def _install(
        self, manifest: Manifest, adapter: LoraAdapter, old_weights: Callable[[], LoraAdapter] | None = None
    ) -> AdapterVersion:
        """Make a freshly stored version current (warm in host memory) and retire the previous one."""
        version = AdapterVersion(manifest)
        with self._lock:
            old = self._current.get(manifest.id)
            self._current[manifest.id] = version
            self._keep_in_host(version, adapter)
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

    def _retire(self, version: AdapterVersion, weights: Callable[[], LoraAdapter] | None) -> None:
        """No new request binds to `version`; its slot and host copy go once its last user finishes, and until
        then its users get `weights` if no host copy is left (its files are gone)."""
        with self._lock:
            version.retired = True
            gone = version.users == 0
            if gone:
                self._drop_host_copy(version)
            stranded = not gone and version.weights is None
        if gone:
            self.on_retired(version)
        elif stranded and weights is not None:
            self._keep_for_users(version, weights)

    def _keep_for_users(self, version: AdapterVersion, weights: Callable[[], LoraAdapter]) -> None:
        try:
            adapter = weights()
        except AdapterFormatError as exc:  # its users fail with the reason, as a load from disk would have
            log.warning("adapter %s v%d cannot be kept for its requests: %s", version.adapter_id,
                        version.manifest.version, exc)
            return
        with self._lock:
            if version.users == 0 or version.weights is not None:  # its last user finished meanwhile
                return
            self._keep_in_host(version, adapter)  # retired and in use: never evicted
            version.load_error = None
        self.on_loaded(version)  # requests waiting for it can be admitted now

    def import_directory(self, directory: Path) -> None:
        """Bring every PEFT sub-directory of `directory` into the store (new or changed ones only)."""
        for path in sorted(p for p in directory.iterdir() if p.is_dir()):
            try:
                config = (path / "adapter_config.json").read_bytes()
                weights = (path / "adapter_model.safetensors").read_bytes()
                if path.name in self.store and self._same_files(path.name, config, weights):
                    continue
                if path.name in self.store:
                    self.replace(path.name, config, weights)
                else:
                    self.create(path.name, config, weights, public=True)  # the operator's: for every tenant
            except (OSError, ValueError, StoreError) as exc:
                log.warning("skipping adapter directory %s: %s", path, exc)

    def _same_files(self, adapter_id: str, config: bytes, weights: bytes) -> bool:
        files = self.store.manifest(adapter_id).files
        return all(
            files[name].sha256 == hashlib.sha256(data).hexdigest()
            for name, data in (("adapter_config.json", config), ("adapter_model.safetensors", weights))
        )

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


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
