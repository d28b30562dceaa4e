"""Adapter archives built in memory: the two files of a minimal adapter, tarballs of any files, the same
files under a directory, and tarballs with hostile pax headers."""

from __future__ import annotations

import gzip
import io
import tarfile

CONFIG = b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'
WEIGHTS = b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + bytes(range(256)) * 4
PAIR = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}


def tar_bytes(files: dict[str, bytes], *, compressed: bool = True, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compressed else "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


def in_dir(directory: str, files: dict[str, bytes] = PAIR) -> dict[str, bytes]:
    return {f"{directory}/{name}": data for name, data in files.items()}


def pax_header_of(payload: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A raw extended header carrying `payload` as written, however malformed (tarfile would refuse to)."""
    header = tarfile.TarInfo("PaxHeader")
    header.type, header.size = kind, len(payload)
    return header.tobuf(format=tarfile.USTAR_FORMAT) + payload + b"\0" * (-len(payload) % 512)


def crafted_tgz(digits: int, headers: int = 1) -> bytes:
    """`headers` pax headers of `digits` digits each (quadratic regex work in CPython < 3.11.10, CVE-2024-6232),
    then the adapter's files."""
    return gzip.compress(pax_header_of(b"1" * digits) * headers + tar_bytes(PAIR, compressed=False))
