"""The on-disk adapter store: lifecycle, errors, corruption, lazy listing, crash safety, full disks."""

from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import adapters_store.store as store_mod
from adapters_store import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterMissingError,
    AdapterStore,
    Manifest,
    StoreCorruptionError,
    StoredFile,
    StoreFullError,
)
from tests.support.snapshots import snapshot

REPO = Path(__file__).resolve().parents[1]
OLD = (b'{"r": 4, "lora_alpha": 8}', bytes(range(256)) * 8)
NEW = (b'{"r": 8, "lora_alpha": 16, "new": true}', b"\x07" * 3000 + b"new weights")
META = {"rank": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
NEW_META = {"rank": 8, "lora_alpha": 16.0, "target_modules": ["q_proj"]}


def make(store: AdapterStore, adapter_id: str, files: tuple[bytes, bytes] = OLD, **kwargs: Any) -> Manifest:
    return store.create(adapter_id, *files, **META, **kwargs)


def assert_clean(root: Path) -> None:
    """No leftovers of any write: staging areas empty, each adapter holds its manifest and one version."""
    for hidden in (".tmp", ".trash", ".pending"):
        assert not list((root / hidden).iterdir()), f"leftovers in {hidden}"
    for adapter_dir in root.iterdir():
        if adapter_dir.name.startswith("."):
            continue
        version = json.loads((adapter_dir / "manifest.json").read_bytes())["version"]
        assert sorted(p.name for p in adapter_dir.iterdir()) == ["manifest.json", f"v{version}"]


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A memory-backed directory where there is one: the bulk tests below do tens of thousands of metadata
    operations, and neither a SIGKILL's effects nor lazy listing depend on the disk under them."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="lorahive-test-store-", dir=base) as directory:
        yield Path(directory)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every manifest the store reads from disk, in order."""
    reads: list[Path] = []
    real = store_mod._read_manifest_file

    def counting(path: Path) -> bytes:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(store_mod, "_read_manifest_file", counting)
    return reads


# ------------------------------------------------------------------------------------------- lifecycle


def test_create_read_manifest(store: AdapterStore):
    created = make(store, "tenant-a.lora_1", owner="alice")
    assert created.version == 1 and created.owner == "alice" and not created.public
    assert created.created_at == created.updated_at
    assert created.target_modules == ("q_proj", "v_proj") and created.rank == 4 and created.lora_alpha == 8.0
    assert created.files["adapter_model.safetensors"] == StoredFile.of(OLD[1])
    assert created.num_bytes == len(OLD[0]) + len(OLD[1])

    manifest, config, weights = store.read("tenant-a.lora_1")
    assert (manifest, config, weights) == (created, *OLD)
    assert store.manifest("tenant-a.lora_1") == created
    assert "tenant-a.lora_1" in store and "other" not in store
    assert AdapterStore(store.root).read("tenant-a.lora_1") == (created, *OLD)  # survives a reopen
    assert_clean(store.root)


def test_replace_bumps_version_and_keeps_creation_facts(store: AdapterStore):
    first = make(store, "a", owner="alice", public=True)
    second = store.replace("a", *NEW, **NEW_META)
    assert second.version == 2
    assert (second.created_at, second.owner, second.public) == (first.created_at, "alice", True)
    assert second.updated_at >= first.updated_at
    assert (second.rank, second.lora_alpha, second.target_modules) == (8, 16.0, ("q_proj",))
    assert store.read("a") == (second, *NEW)
    third = store.replace("a", *OLD, **META)
    assert third.version == 3 and store.read("a") == (third, *OLD)
    assert sorted(p.name for p in (store.root / "a").iterdir()) == ["manifest.json", "v3"]  # old versions gone
    assert_clean(store.root)


def test_set_public_keeps_files_and_version(store: AdapterStore):
    make(store, "a")
    changed = store.set_public("a", True)
    assert changed.public and changed.version == 1
    assert AdapterStore(store.root).manifest("a").public
    assert store.read("a")[1:] == OLD
    assert store.set_public("a", True) == changed  # no change, no write
    assert_clean(store.root)


def test_delete(store: AdapterStore):
    make(store, "a")
    make(store, "b")
    store.delete("a")
    assert "a" not in store and store.ids() == ["b"] and not (store.root / "a").exists()
    with pytest.raises(AdapterMissingError):
        store.read("a")
    assert make(store, "a", NEW).version == 1  # the id is free again
    assert store.read("a")[1:] == NEW
    assert_clean(store.root)


def test_create_on_an_existing_id(store: AdapterStore):
    make(store, "a")
    before = snapshot(store.root)
    with pytest.raises(AdapterExistsError) as info:
        make(store, "a", NEW)
    assert info.value.adapter_id == "a"
    assert snapshot(store.root) == before


def test_rename_refuses_to_overwrite_even_without_the_early_check(store: AdapterStore, monkeypatch):
    """The commit rename itself never replaces an adapter (what protects against other writers)."""
    make(store, "a")
    before = snapshot(store.root)
    monkeypatch.setattr(AdapterStore, "__contains__", lambda self, adapter_id: False)
    with pytest.raises(AdapterExistsError):
        make(store, "a", NEW)
    assert snapshot(store.root) == before


@pytest.mark.parametrize("instances", ["one store", "two stores"])
def test_two_threads_race_to_create_one_id(tmp_path: Path, instances: str):
    first = AdapterStore(tmp_path / "s")
    stores = [first, first if instances == "one store" else AdapterStore(tmp_path / "s")]
    barrier = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def racer(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = stores[i].create("same", b"{}", f"weights of {i}".encode(), **META)
        except AdapterExistsError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in enumerate(outcomes) if isinstance(o, Manifest)]
    assert len(winners) == 1 and isinstance(outcomes[1 - winners[0]], AdapterExistsError)
    assert first.read("same")[2] == f"weights of {winners[0]}".encode()
    assert_clean(first.root)


def test_missing_and_invalid_ids(store: AdapterStore):
    make(store, "a")
    for bad in ("absent", "../a", ".tmp", "", "a/b", "a\n"):
        for call in (store.manifest, store.read, store.delete, lambda i: store.set_public(i, True)):
            with pytest.raises(AdapterMissingError):
                call(bad)
        with pytest.raises(AdapterMissingError):
            store.replace(bad, *NEW, **META)
        assert bad not in store
    assert 42 not in store
    for bad in ("../a", ".hidden", "", "a" * 129, "a b"):
        with pytest.raises(AdapterFormatError):
            make(store, bad)
    assert store.ids() == ["a"]


# ------------------------------------------------------------------------------------------ corruption


def test_flipped_byte_is_caught_by_read(store: AdapterStore):
    make(store, "a")
    stored = store.root / "a" / "v1" / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptionError, match="sha256") as info:
        store.read("a")
    assert info.value.adapter_id == "a" and "a" in info.value.message
    assert store.manifest("a").version == 1  # the manifest alone is fine


def test_truncated_and_missing_files(store: AdapterStore):
    make(store, "a")
    make(store, "b")
    (store.root / "a" / "v1" / "adapter_config.json").write_bytes(OLD[0][:-1])
    with pytest.raises(StoreCorruptionError, match="bytes"):
        store.read("a")
    (store.root / "b" / "v1" / "adapter_model.safetensors").unlink()
    with pytest.raises(StoreCorruptionError, match="missing"):
        store.read("b")


@pytest.mark.parametrize(
    "manifest",
    [None, b"{not json", b"[]", b'{"id": "a"}', b'{"id": "someone-else"}'],
    ids=["absent", "not-json", "not-object", "incomplete", "other-id"],
)
def test_bad_manifest(store: AdapterStore, manifest: bytes | None):
    make(store, "a")
    path = store.root / "a" / "manifest.json"
    if manifest is None:
        path.unlink()
    elif manifest == b'{"id": "someone-else"}':
        path.write_text(json.dumps(store.manifest("a").to_json() | {"id": "someone-else"}))
    else:
        path.write_bytes(manifest)
    for call in (store.manifest, store.read):
        with pytest.raises(StoreCorruptionError):
            call("a")
    assert "a" in store and store.ids() == ["a"]
    AdapterStore(store.root)  # opening does not trip over it
    stand_in = store.unreadable_manifest("a")  # what is left to show of it
    assert (stand_in.id, stand_in.version, stand_in.owner, stand_in.public, dict(stand_in.files)) == ("a", 1, None,
                                                                                                     False, {})
    # Replacing restores it, past every version directory present; the owner went with the manifest.
    restored = store.replace("a", *NEW, **NEW_META)
    assert (restored.version, restored.owner) == (2, None)
    assert store.read("a") == (restored, *NEW)
    assert_clean(store.root)
    store.delete("a")
    assert store.ids() == []
    with pytest.raises(AdapterMissingError):
        store.unreadable_manifest("a")


def test_delete_of_an_adapter_whose_manifest_is_damaged(store: AdapterStore):
    make(store, "a", owner="acme")
    (store.root / "a" / "manifest.json").write_bytes(b"{")
    store.delete("a")
    assert store.ids() == [] and "a" not in store


def test_manifest_json_round_trip_and_validation():
    manifest = Manifest(
        id="a", version=3, created_at=1.5, updated_at=2.5, rank=8, lora_alpha=16.0,
        target_modules=["q_proj"], files={"adapter_config.json": StoredFile("ab" * 32, 10)}, owner="t",
    )
    assert isinstance(manifest.target_modules, tuple)
    with pytest.raises(TypeError):
        manifest.files["x"] = StoredFile("ab" * 32, 1)  # type: ignore[index]
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
    good = manifest.to_json()
    for bad in (
        {"version": 0},
        {"rank": True},
        {"id": "../x"},
        {"created_at": "yesterday"},
        {"public": 1},
        {"files": {"../x": {"sha256": "ab" * 32, "size": 1}}},
        {"files": {"adapter_config.json": {"sha256": "XYZ", "size": 1}}},
        {"files": {"adapter_config.json": {"sha256": "ab" * 32, "size": -1}}},
    ):
        with pytest.raises(ValueError):
            Manifest.from_json(good | bad)


# --------------------------------------------------------------------------------------------- listing


def test_ids_sorted_and_paginated(store: AdapterStore):
    names = ["b", "a", "c1", "A", "a.1", "a_2", "z-9", "0"]
    for name in names:
        make(store, name)
    (store.root / "stray-file").write_bytes(b"not an adapter")
    (store.root / ".hidden").mkdir()
    (store.root / "link").symlink_to(store.root / "a")
    everything = sorted(names)
    assert store.ids() == everything and store.count() == len(names)
    assert store.ids(limit=3) == everything[:3]
    assert store.ids(after=everything[2], limit=3) == everything[3:6]
    assert store.ids(after="a") == [n for n in everything if n > "a"]
    assert store.ids(after="zzz") == [] and store.ids(limit=0) == []
    pages, after = [], None
    while page := store.ids(after=after, limit=3):
        pages.append(page)
        after = page[-1]
    assert [n for page in pages for n in page] == everything
    with pytest.raises(ValueError):
        store.ids(limit=-1)


def test_ten_thousand_adapters_open_without_reading_manifests(scratch: Path, manifest_reads: list[Path]):
    root = scratch / "big"
    seed_store = AdapterStore(root)
    template = make(seed_store, "seed").to_json()
    seed = root / "seed" / "v1"
    # The cheap way to 10,000 adapters: a directory and a manifest each. Nothing but read() looks inside
    # an adapter's directory, so only the adapter read below gets its files (hard links to the seed's).
    for i in range(10_000):
        adapter_id = f"ad-{i:05d}"
        os.mkdir(root / adapter_id)
        (root / adapter_id / "manifest.json").write_text(json.dumps(template | {"id": adapter_id}))
    os.mkdir(root / "ad-04242" / "v1")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.link(seed / name, root / "ad-04242" / "v1" / name)
    manifest_reads.clear()

    store = AdapterStore(root)
    first_page = store.ids(limit=100)
    assert first_page == [f"ad-{i:05d}" for i in range(100)]
    assert store.ids(after=first_page[-1], limit=2) == ["ad-00100", "ad-00101"]
    assert store.count() == 10_001 and "ad-09999" in store
    assert manifest_reads == []  # opening, listing, counting and membership read no manifest

    assert store.read("ad-04242")[1:] == OLD
    assert len(manifest_reads) == 1


# ------------------------------------------------------------------------------------ leftovers, races


def test_open_cleans_leftovers_of_interrupted_writes(store: AdapterStore, manifest_reads: list[Path]):
    make(store, "a")
    make(store, "b")
    root = store.root
    (root / ".tmp" / "a2.123" / "v1").mkdir(parents=True)  # a create killed before its rename
    (root / ".trash" / "c.456").mkdir(parents=True)  # a delete killed before its rmtree
    (root / "a" / "v2").mkdir()  # a replace killed before its manifest switch
    (root / "a" / "v2" / "adapter_model.safetensors").write_bytes(b"half")
    (root / "a" / "manifest.json.tmp").write_bytes(b"{")
    (root / ".pending" / "a").touch()
    (root / ".pending" / "gone").touch()  # marker of an adapter deleted since
    manifest_reads.clear()
    reopened = AdapterStore(root)
    assert sorted(p.parent.name for p in manifest_reads) == ["a", "gone"]  # only those with a pending marker
    assert_clean(root)
    assert reopened.ids() == ["a", "b"] and reopened.read("a")[1:] == OLD


def test_unswept_stale_version_is_invisible_and_swept_by_the_next_replace(store: AdapterStore):
    """A leftover without a marker (say, the marker's creation lost in a power cut) never shows, and the
    next replace of that adapter removes it before writing its own version."""
    make(store, "a")
    (store.root / "a" / "v2").mkdir()
    (store.root / "a" / "v2" / "junk").write_bytes(b"x")
    assert store.read("a")[1:] == OLD
    assert store.replace("a", *NEW, **META).version == 2
    assert store.read("a")[1:] == NEW
    assert_clean(store.root)


def test_reads_during_replaces_always_see_a_whole_version(store: AdapterStore):
    make(store, "a", (b"0", b"weights 0"))
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for v in range(1, 60):
                store.replace("a", str(v).encode(), f"weights {v}".encode(), **META)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    while not done.is_set():
        manifest, config, weights = store.read("a")
        assert weights == b"weights " + config and manifest.version == int(config) + 1
        seen.add(manifest.version)
    thread.join()
    assert not errors and store.manifest("a").version == 60


# ------------------------------------------------------------------------------------------- full disk


class _FullDisk:
    """Stands in for the store module's ``os``: the k-th call of ``which`` fails with ENOSPC."""

    def __init__(self, which: str, k: int, code: int = errno.ENOSPC) -> None:
        self.which, self.k, self.code, self.calls = which, k, code, 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name != self.which:
            return real

        def failing(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.k:
                raise OSError(self.code, os.strerror(self.code))
            return real(*args, **kwargs)

        return failing


@pytest.mark.parametrize("which", ["write", "fsync", "mkdir"])
@pytest.mark.parametrize("op", ["create", "replace", "set_public"])
def test_full_disk_leaves_the_store_unchanged(tmp_path: Path, monkeypatch, op: str, which: str):
    actions = {
        "create": lambda store: make(store, "b", NEW),
        "replace": lambda store: store.replace("a", *NEW, **NEW_META),
        "set_public": lambda store: store.set_public("a", True),
    }
    refused = late = 0
    for k in range(1, 100):  # fail at the 1st, 2nd, ... call until the operation gets through
        store = AdapterStore(tmp_path / str(k))
        make(store, "a")
        before = snapshot(store.root)
        fake = _FullDisk(which, k, errno.EDQUOT if k % 2 else errno.ENOSPC)
        monkeypatch.setattr(store_mod, "os", fake)
        try:
            actions[op](store)
        except StoreFullError as exc:
            refused += 1
            assert "unchanged" in exc.message
            assert snapshot(store.root) == before, f"store changed after a full disk at {which} #{k}"
            continue
        except OSError:
            # Past the commit point only a directory fsync remains: the change shows, whole, after a reopen.
            assert which == "fsync"
            late += 1
            monkeypatch.setattr(store_mod, "os", os)
            reopened = AdapterStore(store.root)
            assert_clean(store.root)
            if op == "set_public":
                assert reopened.manifest("a").public
            else:
                assert reopened.read("b" if op == "create" else "a")[1:] == NEW
            continue
        finally:
            monkeypatch.setattr(store_mod, "os", os)
        assert fake.calls < k  # got through because no call failed
        assert_clean(store.root)
        break
    assert refused + late == k - 1
    assert refused > 0 or (op, which) == ("set_public", "mkdir")  # set_public makes no directory
    assert late == (1 if which == "fsync" else 0)


# ----------------------------------------------------------------------------------------- crash safety

# Runs in a fresh interpreter (one import of the package for every kill point): for k = 1, 2, ... it
# copies a template store, forks, and the child opens the store, then SIGKILLs itself at the k-th call
# of a file-system primitive during one operation (a write at that point first lands half its bytes).
# It stops at the first k the operation outlives, and prints each scenario's store copies in k order.
_CRASH_CHILD = r"""
import base64, json, os, shutil, signal, sys, traceback
from adapters_store.store import AdapterStore

PRIMITIVES = ("open", "write", "fsync", "mkdir", "rename", "replace", "unlink", "rmdir")  # all that change files
spec = json.loads(sys.argv[1])
new = tuple(base64.b64decode(x) for x in spec["new"])
meta = spec["meta"]

def arm(k):
    calls, pid, kill = 0, os.getpid(), os.kill
    def wrap(name, real):
        def primitive(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == k:
                if name == "write" and len(args[1]) > 1:
                    real(args[0], args[1][: len(args[1]) // 2])  # a torn write
                kill(pid, signal.SIGKILL)
            return real(*args, **kwargs)
        return primitive
    for name in PRIMITIVES:
        setattr(os, name, wrap(name, getattr(os, name)))

def operate(op, root, k):
    store = AdapterStore(root)
    arm(k)
    if op == "create":
        store.create("a", *new, **meta)
    elif op == "replace":
        store.replace("a", *new, **meta)
    elif op == "set_public":
        store.set_public("a", True)
    else:
        store.delete("a")

result = {}
for op, template, out in spec["scenarios"]:
    roots = []
    for k in range(1, 1000):
        root = os.path.join(out, str(k))
        shutil.copytree(template, root)
        roots.append(root)
        pid = os.fork()
        if pid == 0:
            try:
                operate(op, root, k)
            except BaseException:
                traceback.print_exc()
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            continue
        if os.WEXITSTATUS(status) != 0:
            sys.exit(f"{op}: the operation failed at k={k}")
        break
    result[op] = roots
print(json.dumps(result))
"""

CRASH_OPS = ("create", "replace", "set_public", "delete")


@pytest.fixture(scope="module")
def crashed_stores(scratch: Path) -> dict[str, list[Path]]:
    base = scratch / "crash"
    scenarios = []
    for op in CRASH_OPS:
        template = base / op / "template"
        store = AdapterStore(template)
        store.create("other", b"{}", b"untouched", **META)
        if op != "create":
            store.create("a", *OLD, **META)
        scenarios.append((op, str(template), str(base / op)))
    spec = {"scenarios": scenarios, "new": [base64.b64encode(x).decode() for x in NEW], "meta": NEW_META}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD, json.dumps(spec)], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    return {op: [Path(p) for p in roots] for op, roots in json.loads(proc.stdout).items()}


def _state(root: Path, op: str, manifest_reads: list[Path]) -> str:
    """Reopen a store left by a SIGKILL and say whether it shows the old state or the new one, whole."""
    manifest_reads.clear()
    store = AdapterStore(root)
    assert len(manifest_reads) <= 1  # recovery reads only the interrupted adapter's manifest
    assert_clean(root)
    assert store.read("other")[2] == b"untouched"
    if "a" not in store:
        assert store.ids() == ["other"] and op in ("create", "delete")
        return "old" if op == "create" else "new"
    assert store.ids() == ["a", "other"]
    manifest, config, weights = store.read("a")  # verifies both checksums
    if op == "replace" and manifest.version == 2:
        assert (config, weights) == NEW and manifest.rank == NEW_META["rank"]
        return "new"
    if op == "set_public" and manifest.public:
        assert (config, weights) == OLD and manifest.version == 1
        return "new"
    assert manifest.version == 1 and not manifest.public
    assert (config, weights) == (NEW if op == "create" else OLD)
    return "new" if op == "create" else "old"


@pytest.mark.parametrize("op", CRASH_OPS)
def test_sigkill_at_every_step_leaves_old_or_new_state(crashed_stores, manifest_reads, op: str):
    roots = crashed_stores[op]
    states = [_state(root, op, manifest_reads) for root in roots]
    # One commit point: old before it, new from it on, and the last run (never killed) is new.
    switch = states.index("new")
    assert states == ["old"] * switch + ["new"] * (len(states) - switch)
    assert switch >= 1 and len(roots) > 5, states
