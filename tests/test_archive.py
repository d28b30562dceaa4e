"""Adapter archives: the layouts people upload, and every hostile archive we refuse, all in memory."""

from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters_store import AdapterFormatError, unpack_adapter_archive
from tests.support.archives import CONFIG, PAIR, WEIGHTS, in_dir, tar_bytes

LIMIT = 2**20


def zip_bytes(files: dict[str, bytes] | list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # duplicate names, on purpose
        for name, data in files.items() if isinstance(files, dict) else files:
            zf.writestr(name, data)
    return buf.getvalue()


def link(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def refused(data: bytes, match: str, limit: int = LIMIT) -> AdapterFormatError:
    with pytest.raises(AdapterFormatError, match=match) as info:
        unpack_adapter_archive(data, max_total_bytes=limit)
    assert info.value.field == "archive"
    return info.value


# ---------------------------------------------------------------------------------------- what we take


def test_tgz_with_the_files_at_the_top_level():
    extras = {"README.md": b"# my adapter", "training_args.bin": b"\x80\x04pickle", "tokenizer.json": b"{}"}
    assert unpack_adapter_archive(tar_bytes(PAIR | extras), max_total_bytes=LIMIT) == (CONFIG, WEIGHTS)


def test_tgz_of_one_directory_as_tar_makes_it(tmp_path: Path):
    directory = tmp_path / "my-adapter"
    (directory / "checkpoint-10").mkdir(parents=True)
    for name, data in PAIR.items():
        (directory / name).write_bytes(data)
        (directory / "checkpoint-10" / name).write_bytes(b"an older checkpoint, nested too deep to count")
    (directory / "README.md").write_text("hello")
    for mode in ("w:gz", "w"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tf:
            tf.add(directory, arcname="my-adapter")  # what `tar czf x.tgz my-adapter` makes, directory entries too
        assert unpack_adapter_archive(buf.getvalue(), max_total_bytes=LIMIT) == (CONFIG, WEIGHTS)


def test_dot_slash_names_and_a_plain_tar():
    assert unpack_adapter_archive(tar_bytes(in_dir("."), compressed=False), max_total_bytes=LIMIT) == (CONFIG, WEIGHTS)
    assert unpack_adapter_archive(tar_bytes(in_dir("./x")), max_total_bytes=LIMIT) == (CONFIG, WEIGHTS)


def test_gzip_with_several_members():
    """`cat a.gz b.gz` is a valid gzip file; the tar inside may span both."""
    raw = tar_bytes(PAIR, compressed=False)
    data = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])
    assert unpack_adapter_archive(data, max_total_bytes=LIMIT) == (CONFIG, WEIGHTS)


@pytest.mark.parametrize("directory", [None, "my-adapter"])
def test_zip_both_ways(directory: str | None):
    files = PAIR | {"README.md": b"hi"}
    entries = list((in_dir(directory, files) if directory else files).items())
    if directory:
        entries.insert(0, (f"{directory}/", b""))  # the directory entry most zip tools write
    assert unpack_adapter_archive(zip_bytes(entries), max_total_bytes=LIMIT) == (CONFIG, WEIGHTS)


# ------------------------------------------------------------------------------------------- not archives


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 1024, b"random bytes that are no archive at all" * 20, WEIGHTS, b"BZh91AY&SY" + b"\0" * 600],
    ids=["empty", "zeros", "random", "bare-safetensors", "bzip2"],
)
def test_not_an_archive(data: bytes):
    refused(data, "not a supported archive")


def test_gzip_without_a_tar_inside():
    refused(gzip.compress(WEIGHTS), "does not hold a tar archive")


@pytest.mark.parametrize("make", [tar_bytes, zip_bytes], ids=["tgz", "zip"])
def test_truncated(make):
    data = make(PAIR | {"README.md": bytes(range(256)) * 100})
    refused(data[: len(data) // 2], "corrupt|truncated|not a supported")


# --------------------------------------------------------------------------------------- escaping paths


@pytest.mark.parametrize(
    "name, match",
    [
        ("../adapter_config.json", r"'\.\.'"),
        ("my-adapter/../../etc/cron.d/x", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        ("//server/share/x", "absolute"),
        ("C:/windows/x", "absolute"),
        ("..\\..\\evil.dll", "backslash"),
        ("dir\\adapter_config.json", "backslash"),
    ],
)
@pytest.mark.parametrize("make", [tar_bytes, zip_bytes], ids=["tgz", "zip"])
def test_escaping_member_names(make, name: str, match: str):
    refused(make(PAIR | {name: b"payload"}), match)  # zipfile.writestr and TarInfo keep names as given


# ------------------------------------------------------------------------------------ links and devices


@pytest.mark.parametrize(
    "info, match",
    [
        (link("adapter_model.safetensors", tarfile.SYMTYPE, "/etc/shadow"), "symbolic link"),
        (link("evil", tarfile.SYMTYPE, "../../outside"), "symbolic link"),
        (link("adapter_config.json", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
        (link("console", tarfile.CHRTYPE), "device"),
        (link("disk", tarfile.BLKTYPE), "device"),
        (link("pipe", tarfile.FIFOTYPE), "FIFO"),
    ],
    ids=["symlink-to-file", "symlink-escaping", "hardlink", "char-device", "block-device", "fifo"],
)
def test_links_and_devices_in_a_tar(info: tarfile.TarInfo, match: str):
    files = dict(PAIR)
    files.pop(info.name, None)
    refused(tar_bytes(files, extra=[info]), match)


def test_zip_entry_flagged_as_a_symlink():
    info = zipfile.ZipInfo("adapter_model.safetensors")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    info.create_system = 3  # Unix
    refused(zip_bytes([("adapter_config.json", CONFIG), (info, b"/etc/shadow")]), "symbolic link")


def test_zip_entry_of_another_kind_and_an_encrypted_one():
    fifo = zipfile.ZipInfo("pipe")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    refused(zip_bytes([*PAIR.items(), (fifo, b"")]), "not a regular file")
    # zipfile cannot write encrypted entries: set the "encrypted" flag in both headers of the second entry.
    data = bytearray(zip_bytes(PAIR))
    local = data.index(b"PK\x03\x04", 4)
    central = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    refused(bytes(data), "encrypted")


# ------------------------------------------------------------------------------------------------- size


@pytest.mark.parametrize("make", [tar_bytes, zip_bytes], ids=["tgz", "zip"])
def test_over_the_size_limit(make):
    data = make(PAIR | {"README.md": b"\0" * (LIMIT + 1)})  # even an ignored file counts
    assert len(data) < LIMIT // 10  # compresses well: the limit is on what it expands to
    refused(data, "expands to more than")
    refused(make(PAIR), "expands to more than", limit=len(CONFIG) + len(WEIGHTS) - 1)
    assert unpack_adapter_archive(make(PAIR), max_total_bytes=len(CONFIG) + len(WEIGHTS)) == (CONFIG, WEIGHTS)


def test_zip_bomb_with_lying_declared_sizes():
    """Sizes rewritten to 100 bytes in both headers while 10 MB of zeros follow: never read past the lie."""
    bomb = 10 * 2**20
    data = bytearray(zip_bytes({"adapter_config.json": CONFIG, "adapter_model.safetensors": b"\0" * bomb}))
    local = data.index(b"PK\x03\x04", data.index(b"adapter_config.json"))  # the second local header
    central = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)  # the second central entry
    assert struct.unpack_from("<I", data, local + 22)[0] == bomb
    struct.pack_into("<I", data, local + 22, 100)
    struct.pack_into("<I", data, central + 24, 100)
    refused(bytes(data), "corrupt|expands")


def test_tar_whose_headers_expand_without_bound():
    """A pax record is read into memory by tarfile itself: its size is capped before tarfile reads it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("README.md")
        info.pax_headers = {"comment": "x" * (10 * 2**20)}  # over LIMIT + the 8 MiB allowed for headers
        tf.addfile(info, io.BytesIO(b""))
        for name, data in PAIR.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    refused(buf.getvalue(), "extended header .* of 10485778 bytes; at most 8192")


def test_too_many_members():
    refused(tar_bytes(PAIR | {f"f{i}": b"" for i in range(4097)}, compressed=False), "more than 4096 members")


# ------------------------------------------------------------------------------------ missing, ambiguous


@pytest.mark.parametrize("make", [tar_bytes, zip_bytes], ids=["tgz", "zip"])
def test_missing_files(make):
    refused(make({"adapter_model.safetensors": WEIGHTS}), "no adapter_config.json")
    refused(make({"adapter_config.json": CONFIG, "README.md": b"hi"}), "no adapter_model.safetensors")
    refused(make({}), "no adapter_config.json")
    refused(make(in_dir("a/b")), r"no adapter_config.json \(found a/b/adapter_config.json")


@pytest.mark.parametrize("make", [tar_bytes, zip_bytes], ids=["tgz", "zip"])
def test_pickle_weights_only(make):
    error = refused(make({"adapter_config.json": CONFIG, "adapter_model.bin": b"\x80\x04..."}), "pickle")
    assert "adapter_model.bin" in error.message and "safe_serialization" in error.message
    refused(make(in_dir("ckpt", {"adapter_model.bin": b"\x80\x04..."})), "pickle")


@pytest.mark.parametrize("make", [tar_bytes, zip_bytes], ids=["tgz", "zip"])
def test_duplicates_and_two_places(make):
    doubled = [*PAIR.items(), ("./adapter_config.json", b'{"r": 64}')]
    data = make(dict(doubled)) if make is tar_bytes else zip_bytes(doubled)
    refused(data, "more than once")
    if make is zip_bytes:
        refused(zip_bytes([*PAIR.items(), ("adapter_config.json", b"{}")]), "more than once")
    refused(make(in_dir("a") | in_dir("b")), "several places")
    refused(make(PAIR | in_dir("a", {"adapter_config.json": CONFIG})), "several places")


def test_tar_with_a_repeated_member():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for data in (CONFIG, b'{"r": 64}'):  # the later one wins on extraction: ambiguous, so refused
            info = tarfile.TarInfo("adapter_config.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = len(WEIGHTS)
        tf.addfile(info, io.BytesIO(WEIGHTS))
    refused(buf.getvalue(), "more than once")


# ------------------------------------------------------------------------------------------------- fuzz

_VALID = [tar_bytes(PAIR), tar_bytes(in_dir("d"), compressed=False), zip_bytes(PAIR)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.sampled_from(range(len(_VALID))),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.none() | st.integers(min_value=0),
)
def test_damaged_archives_fail_only_with_a_format_error(which: int, edits: list[tuple[int, int]], cut: int | None):
    data = bytearray(_VALID[which])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        config, weights = unpack_adapter_archive(bytes(data), max_total_bytes=LIMIT)
    except AdapterFormatError as exc:
        assert exc.field == "archive"
    else:
        assert len(config) + len(weights) <= LIMIT
