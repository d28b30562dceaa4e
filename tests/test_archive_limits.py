"""A zip's central directory is bounded before zipfile reads it: zipfile builds a ZipInfo for every entry the
directory holds before the archive's member limit can apply, so a directory of millions of entries would cost
memory in proportion. The end-of-central-directory record (or its zip64 twin) declares the count and the size;
an archive that declares more than the limits allow is refused from those few bytes."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile

import pytest

from adapters_store import AdapterFormatError, unpack_adapter_archive
from tests.support.archives import CONFIG, PAIR, WEIGHTS

LIMIT = 2**20
MAX_MEMBERS = 4096
ENTRIES = 200_000  # 9 MB of central directory: ~80 MB of ZipInfo objects once zipfile has read it


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_many_entries(entries: int) -> bytes:
    """A real zip of one empty file whose central directory repeats that file's entry `entries` times, with an
    end record (zip64 past 65535 entries) that says so: every entry valid, as zipfile would read them."""
    one = zip_of({"f": b""})
    eocd_at = one.rindex(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<LL", one, eocd_at + 12)
    directory = one[cd_offset:cd_offset + cd_size] * entries
    end_of_directory = cd_offset + len(directory)
    zip64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, len(directory), cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end_of_directory, 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return one[:cd_offset] + directory + zip64 + locator + eocd


def refused_within(data: bytes, match: str, peak_bytes: int) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(AdapterFormatError, match=match) as refused:
            unpack_adapter_archive(data, max_total_bytes=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.field == "archive"
    assert peak < peak_bytes, f"refusing it cost {peak / 2**20:.1f} MiB"


def test_the_many_entries_zip_is_one_zipfile_reads_whole() -> None:
    """The archive below is what the guard must stop: zipfile itself reads every entry of it."""
    assert len(zipfile.ZipFile(io.BytesIO(with_many_entries(5000))).infolist()) == 5000


def test_a_zip_listing_millions_of_entries_is_refused_from_its_end_record() -> None:
    refused_within(with_many_entries(ENTRIES), f"lists {ENTRIES} entries; .* at most {MAX_MEMBERS} members",
                   peak_bytes=2**20)


def test_a_plain_end_record_past_the_member_limit_is_refused() -> None:
    data = bytearray(zip_of(PAIR))
    struct.pack_into("<2H", data, data.rindex(b"PK\x05\x06") + 8, MAX_MEMBERS + 1, MAX_MEMBERS + 1)
    refused_within(bytes(data), f"lists {MAX_MEMBERS + 1} entries", peak_bytes=2**20)


def test_a_central_directory_too_big_for_the_member_limit_is_refused() -> None:
    """A count within the limit does not let a lying directory size through: zipfile parses by size."""
    data = bytearray(zip_of(PAIR))
    struct.pack_into("<L", data, data.rindex(b"PK\x05\x06") + 12, MAX_MEMBERS * 2**10 + 1)
    refused_within(bytes(data), f"central directory is {MAX_MEMBERS * 2**10 + 1} bytes", peak_bytes=2**20)


def test_zips_within_the_limits_still_unpack() -> None:
    assert unpack_adapter_archive(zip_of(PAIR), max_total_bytes=LIMIT) == (CONFIG, WEIGHTS)
    commented = io.BytesIO()
    with zipfile.ZipFile(commented, "w") as zf:
        zf.comment = b"x" * 1000
        for name, data in PAIR.items():
            zf.writestr(name, data)
    assert unpack_adapter_archive(commented.getvalue(), max_total_bytes=LIMIT) == (CONFIG, WEIGHTS)
    with pytest.raises(AdapterFormatError, match="appears more than once"):  # past the guard, to the members
        unpack_adapter_archive(with_many_entries(MAX_MEMBERS), max_total_bytes=LIMIT)
