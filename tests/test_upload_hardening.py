"""Uploads cannot stop, slow or starve other tenants: hostile tar headers are refused before tarfile parses
them, archive members are unpacked a chunk at a time, uploads in flight are capped per tenant and in all,
and only multipart uploads get the upload body limit.

Each attack runs against a real server while another tenant's small completion and `/health` are timed
against the same completion unloaded (a generous multiple of it, never a fixed tight time).
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import io
import json
import select
import socket
import tarfile
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO

import httpx
import pytest

from adapters_store import AdapterFormatError, unpack_adapter_archive
from loadtest.provision import upload_adapter
from server.config import Settings
from tests.support.adapter_uploads import SMALL, multipart
from tests.support.archives import CONFIG, PAIR, WEIGHTS, crafted_tgz, in_dir, pax_header_of, tar_bytes
from tests.support.openai_http import assert_limit
from tests.support.servers import serving_engine
from tests.support.tenant_keys import KEY_FILE, bearer

MAX_REQUEST_BYTES = 2**20
SLOWDOWN = 20  # another tenant's request may take this many times its unloaded time while an attack runs
SLOWDOWN_FLOOR = 2.0  # seconds: below this a 2-core machine's noise, not an attack, is measured
SETTLE_S = 60.0  # generous: only turns a server that never counts a held upload into a failure


# --------------------------------------------------------------------------------------------------
# Item 1: pax headers crafted like CVE-2024-6232's


@pytest.fixture
def pax_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every pax header tarfile's own parser (the one with the quadratic regex) was handed."""
    sizes: list[int] = []
    original = tarfile.TarInfo._proc_pax

    def counting(self: tarfile.TarInfo, archive: tarfile.TarFile) -> tarfile.TarInfo:
        sizes.append(self.size)
        return original(self, archive)

    monkeypatch.setattr(tarfile.TarInfo, "_proc_pax", counting)
    return sizes


def test_tarfile_still_has_the_methods_the_guard_overrides() -> None:
    """The guard replaces tarfile's private per-type parsers by name: a Python that renamed one would skip it."""
    for name in ("_proc_member", "_proc_pax", "_proc_sparse", "_proc_gnusparse_00", "_proc_gnusparse_01",
                 "_proc_gnusparse_10"):
        assert callable(getattr(tarfile.TarInfo, name, None)), name
    source = inspect.getsource(tarfile.TarInfo._proc_member)
    assert "self._proc_pax(tarfile)" in source and "self._proc_sparse(tarfile)" in source


def test_a_cve_2024_6232_pax_header_is_refused_before_tarfile_parses_it(pax_parses: list[int]) -> None:
    with pytest.raises(AdapterFormatError, match=r"extended header .* of 65536 bytes; at most 8192") as refused:
        unpack_adapter_archive(crafted_tgz(64 * 2**10), max_total_bytes=2**20)
    assert refused.value.field == "archive"
    assert pax_parses == []  # the regex never saw a byte of it


def test_many_small_pax_headers_add_up_to_a_bound(pax_parses: list[int]) -> None:
    with pytest.raises(AdapterFormatError, match="extended headers .* add up to more than 65536 bytes"):
        unpack_adapter_archive(crafted_tgz(8 * 2**10, headers=100), max_total_bytes=2**20)
    assert sum(pax_parses) <= 64 * 2**10  # the regex work of one archive is bounded, not 100 headers' worth


def test_long_names_in_pax_or_gnu_headers_still_unpack() -> None:
    directory = "d" * 300  # over ustar's 100-byte names: stored in a pax record or a GNU long name
    for format_ in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=format_) as tf:
            for name, data in PAIR.items():
                info = tarfile.TarInfo(f"{directory}/{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        assert unpack_adapter_archive(buf.getvalue(), max_total_bytes=2**20) == (CONFIG, WEIGHTS)


def test_a_gnu_sparse_map_is_refused_before_it_is_read() -> None:
    """tarfile reads a GNU 1.0 sparse map by growing a buffer a block at a time until enough newlines come."""
    records = b"".join(_pax_record(r) for r in ("GNU.sparse.major=1", "GNU.sparse.minor=0",
                                                 "GNU.sparse.name=adapter_model.safetensors",
                                                 "GNU.sparse.realsize=1000000"))
    member = tarfile.TarInfo("GNUSparseFile.0/adapter_model.safetensors")
    member.size = 512 * 1000
    data = pax_header_of(records) + member.tobuf(format=tarfile.USTAR_FORMAT) + b"7" * member.size + b"\0" * 1024
    with pytest.raises(AdapterFormatError, match="sparse file"):
        unpack_adapter_archive(gzip.compress(data), max_total_bytes=2**20)


def _pax_record(keyword_value: str) -> bytes:
    """'<length> keyword=value\\n', where length counts the whole record, its own digits included."""
    body = f" {keyword_value}\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return f"{length}{body}".encode()


# --------------------------------------------------------------------------------------------------
# Item 5: members are unpacked a chunk at a time


@contextmanager
def spooled(data: bytes) -> Iterator[BinaryIO]:
    """An upload as the server holds it: a spooled temporary file, on disk past 1 MiB."""
    with tempfile.SpooledTemporaryFile(max_size=2**20) as file:
        file.write(data)
        yield file


def peak_python_memory(unpack: Callable[[], object]) -> int:
    tracemalloc.start()
    with suppress(AdapterFormatError):
        unpack()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


ZEROS = 48 * 2**20


@pytest.fixture(scope="module")
def zeros_tgz() -> bytes:
    """The issue's archive, scaled down: a few hundred KB of gzip holding 48 MiB of zeros as the weights."""
    return tar_bytes({"adapter_config.json": CONFIG, "adapter_model.safetensors": bytes(ZEROS)})


def test_a_member_within_the_limit_is_held_once(zeros_tgz: bytes) -> None:
    with spooled(zeros_tgz) as upload:
        peak = peak_python_memory(lambda: unpack_adapter_archive(upload, max_total_bytes=64 * 2**20))
    assert peak < ZEROS + 8 * 2**20  # the weights read back once, not their chunks and then a joined copy


def test_a_refused_archive_costs_a_chunk() -> None:
    """Weights in two places are refused only once both were read: they were never held in memory."""
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": bytes(ZEROS // 2)}
    two_places = tar_bytes(in_dir("a", files) | in_dir("b", files))
    with spooled(two_places) as upload:
        peak = peak_python_memory(lambda: unpack_adapter_archive(upload, max_total_bytes=64 * 2**20))
    assert peak < 8 * 2**20


# --------------------------------------------------------------------------------------------------
# Against a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key_file.write_text(json.dumps(KEY_FILE))
    settings = Settings(store=tmp_path_factory.mktemp("store"), api_keys=key_file, max_lora_rank=8,
                        max_request_bytes=MAX_REQUEST_BYTES, max_concurrent_uploads=2,
                        max_concurrent_uploads_per_tenant=1,
                        # Held uploads wait for the test's release, longer on a loaded machine than the default
                        # --body-timeout would let them: their 408 would free their places mid-test.
                        body_timeout=600)
    with serving_engine(settings) as (url, _):
        yield url


def small_completion(http: httpx.Client, url: str) -> httpx.Response:
    return http.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=bearer("initech"))


def timed(request: Callable[[], httpx.Response]) -> float:
    start = time.monotonic()
    response = request()
    assert response.status_code == 200, response.text
    return time.monotonic() - start


def assert_others_are_served(http: httpx.Client, url: str, unloaded: float) -> None:
    """Another tenant's completion and `/health` answer within a generous multiple of the unloaded time."""
    bound = max(SLOWDOWN * unloaded, SLOWDOWN_FLOOR)
    for _ in range(3):
        assert timed(lambda: small_completion(http, url)) < bound
        assert timed(lambda: http.get(url + "/health")) < bound


@pytest.fixture
def unloaded(server: str) -> float:
    with httpx.Client(timeout=60) as http:
        return min(timed(lambda: small_completion(http, server)) for _ in range(3))


@contextmanager
def attacking(attack: Callable[[httpx.Client], httpx.Response]) -> Iterator[list[httpx.Response]]:
    """`attack` sent again and again from a thread while the block runs; yields the answers so far."""
    answers: list[httpx.Response] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        try:
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    answers.append(attack(http))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread below
            failures.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        while not answers and thread.is_alive():  # the first attack has been answered: the server is at it
            time.sleep(0.01)
        yield answers
    finally:
        stop.set()
        thread.join(120)
    assert not failures, failures


def test_crafted_tar_uploads_do_not_stop_the_server(server: str, unloaded: float) -> None:
    crafted = crafted_tgz(96 * 2**10)  # ~9 s of regex holding the GIL on CPython 3.11.7 without the bound

    def upload_crafted(http: httpx.Client) -> httpx.Response:
        return http.post(server + "/v1/adapters", data={"id": "crafted"}, files={"archive": ("a.tgz", crafted)},
                         headers=bearer("acme"))

    with httpx.Client(timeout=60) as http, attacking(upload_crafted) as answers:
        assert_others_are_served(http, server, unloaded)
    assert answers
    for answer in answers:
        assert_limit(answer, 400, "archive", "invalid_adapter", "extended header")


def assert_invalid_adapter(response: httpx.Response) -> None:
    """Refused by the adapter's validation, whatever field it names: the upload got that far."""
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_adapter", response.text


class HeldUpload:
    """A multipart archive upload sent up to the form's head on a raw connection, its body held back until
    `finish`; the server has it in flight from its first bytes. Raw, so that an answer the server sends before
    the body is done (a place it refused, an error) shows at once (`early_answer`) instead of hiding behind a
    client that is still sending."""

    BOUNDARY = "held-upload"

    def __init__(self, url: str, tenant: str, adapter_id: str, archive: bytes) -> None:
        self.args = (url, tenant, adapter_id, archive)
        form_head = (f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="id"\r\n\r\n{adapter_id}\r\n'
                     f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="archive"; filename="a.tgz"\r\n'
                     "Content-Type: application/gzip\r\n\r\n").encode()
        self.rest = archive + f"\r\n--{self.BOUNDARY}--\r\n".encode()
        headers = bearer(tenant) | {"Content-Type": f"multipart/form-data; boundary={self.BOUNDARY}",
                                    "Content-Length": str(len(form_head) + len(self.rest)), "Connection": "close"}
        head = "POST /v1/adapters HTTP/1.1\r\nHost: lorahive\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        address = httpx.URL(url)
        self.sock = socket.create_connection((address.host, address.port), timeout=120)
        self.sock.sendall(head.encode() + b"\r\n" + form_head)

    def early_answer(self) -> bytes:
        """What the server has sent so far (nothing while it waits for the body)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return self.sock.recv(65536, socket.MSG_PEEK) if readable else b""

    def again(self) -> HeldUpload:
        """The same upload on a new connection, this one closed."""
        self.sock.close()
        return HeldUpload(*self.args)

    def finish(self) -> httpx.Response:
        """Send the rest of the body; the server's answer."""
        self.sock.sendall(self.rest)
        reply = b""
        while chunk := self.sock.recv(65536):
            reply += chunk
        self.sock.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        return httpx.Response(int(head.split(b" ", 2)[1]), content=body)


def refused_when_full(http: httpx.Client, url: str, tenant: str, held: list[HeldUpload]) -> httpx.Response:
    """An upload (of weights that would be refused: nothing is stored) sent until the server has counted the
    held ones and refuses it. The server may read this upload's head before the held one's that went out first
    (they come on two connections): then the held one gets the 429 and is sent again. Any other answer to a held
    upload fails the test."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        response = http.post(url + "/v1/adapters", data={"id": f"{tenant}-extra"},
                             files=multipart(SMALL[0], b"not safetensors"), headers=bearer(tenant))
        for index, upload in enumerate(held):
            answer = upload.early_answer()
            if answer.startswith(b"HTTP/1.1 429 "):
                held[index] = upload.again()
            else:
                assert not answer, answer
        if response.status_code == 429 or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def test_uploads_in_flight_are_capped_per_tenant_and_in_all(server: str, unloaded: float,
                                                            zeros_tgz: bytes) -> None:
    held: list[HeldUpload] = []
    try:
        with httpx.Client(timeout=60) as http:
            for tenant in ("acme", "globex"):  # each counted (its own next upload refused) before the next
                held.append(HeldUpload(server, tenant, f"{tenant}-held", zeros_tgz))
                refused = refused_when_full(http, server, tenant, held)
                assert_limit(refused, 429, None, "rate_limit_exceeded", "--max-concurrent-uploads-per-tenant is 1")
                assert refused.headers["Retry-After"] == "1"
            refused = refused_when_full(http, server, "initech", held)  # a third tenant: the server's cap of 2
            assert_limit(refused, 429, None, "rate_limit_exceeded", "--max-concurrent-uploads is 2")
            assert refused.headers["Retry-After"] == "1"
            assert_others_are_served(http, server, unloaded)
    finally:
        answers = [upload.finish() for upload in held]
    for answer in answers:  # 48 MiB of zeros unpacked, then refused as weights
        assert_invalid_adapter(answer)
    with httpx.Client(timeout=60) as http:
        response = http.post(server + "/v1/adapters", data={"id": "after-the-caps"}, files=multipart(*SMALL),
                             headers=bearer("acme"))
        assert response.status_code == 201, response.text  # the places came back


def test_loadtest_provisioning_waits_out_the_upload_caps() -> None:
    statuses = iter([429, 429, 201])

    def answer(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        return httpx.Response(status, headers={"Retry-After": "0"} if status == 429 else {}, json={})

    async def provision() -> bool:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            return await upload_adapter(http, "http://server", "a", b"{}", b"")

    assert asyncio.run(provision()) is True
    assert next(statuses, None) is None


# --------------------------------------------------------------------------------------------------
# Item 10: the upload limit is for multipart uploads alone


def test_json_bodies_on_adapter_routes_get_the_json_limit(server: str, unloaded: float) -> None:
    oversized = json.dumps({"public": True, "padding": "x" * MAX_REQUEST_BYTES}).encode()
    headers = bearer("acme") | {"Content-Type": "application/json"}
    with httpx.Client(base_url=server, timeout=60) as http:
        for method, path in (("PATCH", "/v1/adapters/any"), ("POST", "/v1/adapters"), ("PUT", "/v1/adapters/any")):
            response = http.request(method, path, content=oversized, headers=headers)
            assert_limit(response, 413, None, "request_too_large", f"{MAX_REQUEST_BYTES} bytes, set by "
                                                                   "--max-request-bytes")
        # A multipart upload past the JSON limit is still an upload: checked as an adapter, not refused for size.
        padded = {"adapter_config": ("adapter_config.json", SMALL[0]),
                  "adapter_model": ("adapter_model.safetensors", SMALL[1] + b"\0" * MAX_REQUEST_BYTES)}
        response = http.post("/v1/adapters", data={"id": "padded"}, files=padded, headers=bearer("acme"))
        assert_invalid_adapter(response)

    def chunked_patch(http: httpx.Client) -> httpx.Response:  # no Content-Length: refused as the bytes arrive
        chunks = (b"x" * 2**16 for _ in range(4 * MAX_REQUEST_BYTES // 2**16))
        return http.patch(server + "/v1/adapters/any", content=chunks, headers=headers)

    with httpx.Client(timeout=60) as http, attacking(chunked_patch) as answers:
        assert_others_are_served(http, server, unloaded)
    for answer in answers:
        assert answer.status_code == 413, answer.text
