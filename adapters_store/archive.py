"""Take the two PEFT files out of an uploaded archive (.tar.gz, .tgz, .tar or .zip).

An archive is hostile until proven otherwise, so nothing is ever extracted under its own names and
anything that could mean something different to another unpacker is refused rather than skipped:
absolute paths, ``..`` components, backslashes and drive letters, links, device and sparse members,
duplicate names, encrypted zip entries. Size is bounded twice: by the members' declared sizes before
anything is read, and by counting the bytes that actually come out (for gzip, of the whole decompressed
tar stream, since tar headers such as pax records are read into memory by ``tarfile`` itself), so a lying
header or a decompression bomb is stopped after at most ``max_total_bytes`` plus a small allowance for
headers. The two files are copied a chunk at a time into temporary files as they are decompressed, so
unpacking holds at most a chunk in memory until the files are known good and read back once.

Extended tar headers (pax records, GNU long names) are bounded before ``tarfile`` reads them: CPython
before 3.11.10 parses a pax record with a regular expression that takes time quadratic in its length
while holding the GIL (CVE-2024-6232), so a few hundred KB of digits would stop the whole server.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

from adapters_store.peft_format import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE, AdapterFormatError

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with entries; an empty zip
_TAR_MAGIC = b"ustar"  # POSIX and GNU tar headers carry it at offset 257
_TAR_MAGIC_OFFSET = 257
_TAR_BLOCK = 512
# A PEFT checkpoint directory holds a handful of files; this only stops archives built to waste time.
_MAX_MEMBERS = 4096
# Tar stream bytes beyond the members' contents: a 512-byte header and up to 511 bytes of padding per
# member, pax and GNU long-name records, end-of-archive blocks and record padding.
_STREAM_OVERHEAD = 8 * 2**20
_CHUNK = 2**20
# One pax record set or GNU long name: room for a PATH_MAX path with its attributes. Bounded because
# tarfile's pax parser is quadratic in it (up to ~70 ms at this size), and all of them together because
# each costs that again.
_MAX_EXTENDED_HEADER = 8 * 2**10
_MAX_EXTENDED_HEADERS_TOTAL = 64 * 2**10
# Member contents stay in memory up to this size, then move to a temporary file.
_IN_MEMORY_MEMBER = 64 * 2**10
# A zip's central directory is read whole by zipfile, one ZipInfo per entry, before the member limit can
# apply: its declared entry count and size are checked first. 1 KiB per entry leaves room for long names and
# extra fields; a lying count cannot make zipfile build more than ~2**16 entries' worth (46 bytes at least).
_MAX_CENTRAL_DIRECTORY = _MAX_MEMBERS * 2**10
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: signature, disks, entries, size, offset, comment
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_WANTED = (CONFIG_FILE, WEIGHTS_FILE)
_DRIVE = re.compile(r"[A-Za-z]:")


def unpack_adapter_archive(data: bytes | BinaryIO, *, max_total_bytes: int) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes from an archive given as bytes or as a
    seekable binary file (read from its start; an upload's spooled file is never read whole into memory).

    The format is told by magic bytes, not by a file name. The two files sit at the top level or inside
    one top-level directory (``tar czf x.tgz mydir``); other files are ignored. Anything else is an
    :class:`AdapterFormatError` with ``field="archive"`` that says what is wrong.
    """
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    source.seek(0)
    head = source.read(_TAR_MAGIC_OFFSET + len(_TAR_MAGIC))
    source.seek(0)
    with _Collector(max_total_bytes) as collector:
        if head.startswith(_ZIP_MAGICS):
            _read_zip(source, collector)
        elif head.startswith(_GZIP_MAGIC):
            stream = _BoundedReader(gzip.GzipFile(fileobj=source, mode="rb"), max_total_bytes + _STREAM_OVERHEAD)
            _read_tar(stream, collector, compressed=True)
        elif head[_TAR_MAGIC_OFFSET:] == _TAR_MAGIC:
            _read_tar(_BoundedReader(source, max_total_bytes + _STREAM_OVERHEAD), collector, compressed=False)
        else:
            _refuse("the upload is not a supported archive: expected .tar.gz, .tgz, .tar or .zip")
        return collector.result()


def _refuse(message: str) -> None:
    raise AdapterFormatError(message, field="archive")


class _TooLarge(Exception):
    """Raised inside a reader; turned into an AdapterFormatError where the limit is known."""


class _BoundedReader:
    """A read-only stream that raises :class:`_TooLarge` once more than ``limit`` bytes came through it."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self._count = 0
        self._prefix = b""  # bytes peeked at, handed out again by the next reads

    def read(self, size: int | None = -1) -> bytes:
        if self._prefix:
            n = len(self._prefix) if size is None or size < 0 else size
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        room = self._limit - self._count + 1  # one more than allowed, to notice going over
        data = self._raw.read(room if size is None or size < 0 else min(size, room))
        self._count += len(data)
        if self._count > self._limit:
            raise _TooLarge
        return data

    def peek(self, size: int) -> bytes:
        """Up to ``size`` bytes from the start, without consuming them (only before the first read)."""
        chunks = []
        while (got := sum(map(len, chunks))) < size and (chunk := self.read(size - got)):
            chunks.append(chunk)
        self._prefix = b"".join(chunks)
        return self._prefix


class _Collector:
    """Checks every member's path and size, keeps the adapter files, and decides which pair is the adapter."""

    def __init__(self, max_total_bytes: int) -> None:
        self.max_total_bytes = max_total_bytes
        self.declared = 0  # sum of the members' declared sizes
        self.read_bytes = 0  # bytes actually decompressed so far
        self.members = 0
        self.paths: set[tuple[str, ...]] = set()
        # directory (() for the top level, (name,) for a top-level directory) -> file name -> contents
        self.found: dict[tuple[str, ...], dict[str, BinaryIO]] = {}
        self.pickles: list[str] = []
        self.deeper: list[str] = []  # adapter files nested too deep to count, for the error message
        self.sinks = contextlib.ExitStack()  # the kept files' temporary copies, deleted when closed

    def __enter__(self) -> _Collector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sinks.close()

    def check_path(self, name: str) -> tuple[str, ...]:
        """Refuse names that could escape a directory on some unpacker; return the path's parts."""
        self.members += 1
        if self.members > _MAX_MEMBERS:
            _refuse(f"the archive has more than {_MAX_MEMBERS} members")
        shown = repr(name[:200])
        if "\\" in name:
            _refuse(f"archive member {shown} contains a backslash (a path trick on Windows)")
        if "\0" in name:
            _refuse(f"archive member {shown} contains a NUL byte")
        if name.startswith("/") or _DRIVE.match(name):
            _refuse(f"archive member {shown} has an absolute path")
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if ".." in parts:
            _refuse(f"archive member {shown} has a '..' component (it would escape the archive's directory)")
        return parts

    def add_file(
        self, name: str, parts: tuple[str, ...], declared_size: int, copy_to: Callable[[BinaryIO], int]
    ) -> None:
        if parts in self.paths:
            _refuse(f"archive member {'/'.join(parts)!r} appears more than once")
        self.paths.add(parts)
        self.declared += max(declared_size, 0)
        if self.declared > self.max_total_bytes:
            self.too_large()
        if not parts or parts[-1] not in (*_WANTED, PICKLE_FILE):
            return
        if len(parts) > 2:
            self.deeper.append("/".join(parts))
            return
        directory = parts[:-1]
        if parts[-1] == PICKLE_FILE:
            self.pickles.append("/".join(parts))
            self.found.setdefault(directory, {})
            return
        sink = self.sinks.enter_context(tempfile.SpooledTemporaryFile(max_size=_IN_MEMORY_MEMBER))  # noqa: SIM115
        self.found.setdefault(directory, {})[parts[-1]] = sink
        copied = copy_to(sink)
        if copied != declared_size:
            _refuse(f"archive member {name[:200]!r} holds {copied} bytes but its header says {declared_size}")

    def count(self, n: int) -> None:
        """Count bytes as they are decompressed: the declared sizes may lie."""
        self.read_bytes += n
        if self.read_bytes > self.max_total_bytes:
            self.too_large()

    def too_large(self) -> None:
        _refuse(f"the archive expands to more than {self.max_total_bytes} bytes, the most an adapter may have")

    def result(self) -> tuple[bytes, bytes]:
        places = sorted(d for d, files in self.found.items() if any(f in files for f in _WANTED))
        if len(places) > 1:
            shown = ", ".join("/".join(d) + "/" if d else "the top level" for d in places)
            _refuse(f"the archive holds adapter files in several places ({shown}); upload one adapter per archive")
        files = self.found[places[0]] if places else {}
        if WEIGHTS_FILE not in files and self.pickles:
            _refuse(
                f"the archive has only {PICKLE_FILE} ({self.pickles[0]}): pickle weights are not supported; "
                f"save with safe_serialization=True to get {WEIGHTS_FILE}"
            )
        for name in _WANTED:
            if name not in files:
                hint = (
                    f" (found {self.deeper[0]}: put the files at the top level or inside one top-level directory)"
                    if self.deeper
                    else ""
                )
                _refuse(f"the archive has no {name}{hint}")
        return _contents(files[CONFIG_FILE]), _contents(files[WEIGHTS_FILE])


def _contents(sink: BinaryIO) -> bytes:
    sink.seek(0)
    return sink.read()  # one allocation of the file's size, handed back whole when it is freed


def _copy_counted(source: BinaryIO, sink: BinaryIO, collector: _Collector) -> int:
    """Copy a member a chunk at a time, counting the bytes against the limit before they are kept."""
    copied = 0
    while chunk := source.read(_CHUNK):
        collector.count(len(chunk))
        sink.write(chunk)
        copied += len(chunk)
    return copied


# ------------------------------------------------------------------------------------------------ tar


def _read_tar(stream: _BoundedReader, collector: _Collector, *, compressed: bool) -> None:
    try:
        first = stream.peek(_TAR_BLOCK) if compressed else b""
        # An empty tar is end-of-archive zero blocks alone; anything else starts with a ustar header.
        if compressed and first[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + len(_TAR_MAGIC)] != _TAR_MAGIC and any(first):
            _refuse("the gzip data does not hold a tar archive (upload a .tar.gz of the adapter's directory)")
        # Stream mode ("r|"): members are visited in order and nothing is seeked, so each byte is counted once.
        with _GuardedTarFile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                parts = collector.check_path(member.name)
                if member.isdir():
                    continue
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    kind = _tar_kind(member)
                    _refuse(f"archive member {member.name[:200]!r} is a {kind}; only regular files are allowed")
                collector.add_file(
                    member.name, parts, member.size,
                    lambda sink, m=member: _copy_counted(_tar_member(archive, m), sink, collector),
                )
    except _TooLarge:
        collector.too_large()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        _refuse(f"the archive is corrupt or truncated: {exc}")


def _tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> BinaryIO:
    source = archive.extractfile(member)
    assert source is not None  # a regular file always has contents
    return source


class _GuardedTarInfo(tarfile.TarInfo):
    """tarfile's header parser with its costly paths closed before they run.

    ``_proc_member`` is the hook tarfile's source offers subclasses ("can be overridden in a subclass"): it
    sees each header before its extension data is read. Sparse members are refused before their maps are
    read, since reading a GNU 1.0 sparse map grows a buffer a block at a time until a newline (quadratic
    copying). tests/test_upload_hardening.py checks that tarfile still calls these methods by these names.
    """

    _EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                 tarfile.GNUTYPE_LONGLINK)

    def _proc_member(self, archive: _GuardedTarFile) -> tarfile.TarInfo:
        if self.type in self._EXTENDED:
            archive.extended_header_bytes += self.size
            if self.size > _MAX_EXTENDED_HEADER:
                _refuse(f"the archive has an extended header (pax record or long name) of {self.size} bytes; "
                        f"at most {_MAX_EXTENDED_HEADER} are accepted: archive the adapter's directory without "
                        "extended attributes (plain `tar czf adapter.tgz DIR`)")
            if archive.extended_header_bytes > _MAX_EXTENDED_HEADERS_TOTAL:
                _refuse(f"the archive's extended headers (pax records, long names) add up to more than "
                        f"{_MAX_EXTENDED_HEADERS_TOTAL} bytes: archive only the adapter's files, without extended "
                        "attributes")
        return super()._proc_member(archive)

    def _proc_sparse(self, archive: _GuardedTarFile) -> tarfile.TarInfo:
        _refuse(f"archive member {self.name[:200]!r} is a sparse file; only regular files are allowed")

    def _proc_gnusparse_00(self, member: tarfile.TarInfo, *args: object) -> None:
        _refuse(f"archive member {member.name[:200]!r} is a sparse file; only regular files are allowed")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


class _GuardedTarFile(tarfile.TarFile):
    tarinfo = _GuardedTarInfo
    extended_header_bytes = 0  # of this archive so far: an instance attribute once counted


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link (to {member.linkname[:200]!r})"
    if member.islnk():
        return f"hard link (to {member.linkname[:200]!r})"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    if member.issparse():
        return "sparse file"
    return f"member of tar type {member.type!r}"


# ------------------------------------------------------------------------------------------------ zip


def _read_zip(source: BinaryIO, collector: _Collector) -> None:
    _check_zip_directory(source)
    try:
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                parts = collector.check_path(info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # Unix mode bits; 0 when made on DOS/Windows
                if kind == stat.S_IFLNK:
                    _refuse(f"archive member {info.filename[:200]!r} is a symbolic link")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    _refuse(f"archive member {info.filename[:200]!r} is not a regular file (mode {kind:#o})")
                if info.flag_bits & 0x1:
                    _refuse(f"archive member {info.filename[:200]!r} is encrypted")
                if info.is_dir():
                    continue
                collector.add_file(
                    info.filename, parts, info.file_size,
                    lambda sink, i=info: _copy_zip_member(archive, i, sink, collector),
                )
    except AdapterFormatError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, OSError, EOFError,
            zlib.error, RuntimeError) as exc:
        _refuse(f"the zip archive is corrupt or unsupported: {exc}")


def _check_zip_directory(source: BinaryIO) -> None:
    """Refuse a zip whose end-of-central-directory record declares more entries than `_MAX_MEMBERS`, or a
    central directory larger than `_MAX_CENTRAL_DIRECTORY`, before zipfile reads that directory.

    The record is found as zipfile finds it (at the very end without a comment, else the last signature within a
    maximal comment of the end); an archive without one is left for zipfile to call corrupt."""
    source.seek(0, io.SEEK_END)
    end = source.tell()
    tail_start = max(0, end - _EOCD.size - 0xFFFF)
    source.seek(tail_start)
    tail = source.read()
    uncommented = tail[-_EOCD.size:]
    if uncommented.startswith(_EOCD_SIGNATURE) and uncommented.endswith(b"\0\0"):
        at = len(tail) - _EOCD.size
    else:
        at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        return
    _, _, _, _, entries, size, _, _ = _EOCD.unpack_from(tail, at)
    entries, size = _zip64_directory(source, tail_start + at, entries, size)
    if entries > _MAX_MEMBERS:
        _refuse(f"the zip archive's central directory lists {entries} entries; an archive may have at most "
                f"{_MAX_MEMBERS} members")
    if size > _MAX_CENTRAL_DIRECTORY:
        _refuse(f"the zip archive's central directory is {size} bytes; at most {_MAX_CENTRAL_DIRECTORY} bytes "
                f"(room for {_MAX_MEMBERS} members)")


def _zip64_directory(source: BinaryIO, eocd_at: int, entries: int, size: int) -> tuple[int, int]:
    """(entries, size) from the zip64 record, which zipfile expects just before its locator, itself just before
    the end record, and takes over the end record's values whenever it is there; those values where it is not."""
    record_at = eocd_at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if record_at < 0:
        return entries, size
    source.seek(record_at)
    data = source.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
    if len(data) < _ZIP64_EOCD.size + _ZIP64_LOCATOR.size or not data.startswith(b"PK\x06\x06") \
            or _ZIP64_LOCATOR.unpack_from(data, _ZIP64_EOCD.size)[0] != b"PK\x06\x07":
        return entries, size
    _, _, _, _, _, _, _, entries, size, _ = _ZIP64_EOCD.unpack_from(data)
    return entries, size


def _copy_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, sink: BinaryIO, collector: _Collector) -> int:
    with archive.open(info) as source:
        return _copy_counted(source, sink, collector)
