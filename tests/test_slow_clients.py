"""Slow and idle clients against the real `lorahive serve`: headers and bodies sent a byte at a time are cut off
(408) while other clients are served, the connection cap holds without locking out a client with a request to
make, and SIGTERM ends within its drain timeout whatever such clients do, without a traceback."""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.demo import DEMO_MODEL_NAME
from server.draining_server import CLOSE_GRACE_S, CUT_GRACE_S
from tests.support.api_keys import KEY_A, KEY_FILE, bearer
from tests.support.servers import TIMEOUT_S, Server

PERIOD_S = 0.1  # a slow client sends one byte this often
SETTLE_S = 30.0  # generous: only turns a server that never acts into a failure
SLOW_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: lorahive\r\nContent-Type: application/json\r\n"
# A tenant's request, whose body the server waits for (a stranger's would get its 401 at once).
SLOW_BODY = SLOW_HEAD + f"Authorization: Bearer {KEY_A}\r\nContent-Length: 100000\r\n\r\n".encode()


class SlowClients:
    """Raw connections that each send `opening` and then one byte of `filler` every PERIOD_S (none if `filler` is
    empty), forever, from a background thread; each records what the server sends back and whether it closed."""

    def __init__(self, server: Server, count: int, opening: bytes = b"", filler: bytes = b"") -> None:
        address = httpx.URL(server.url)
        self.sockets = [socket.create_connection((address.host, address.port), timeout=TIMEOUT_S)
                        for _ in range(count)]
        for sock in self.sockets:
            sock.sendall(opening)
            sock.setblocking(False)
        self.filler = filler
        self.replies: dict[socket.socket, bytes] = dict.fromkeys(self.sockets, b"")
        self.closed: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        sent = 0
        while not self._stop.is_set():
            waiting = [s for s in self.sockets if s not in self.closed]
            readable, _, _ = select.select(waiting, [], [], PERIOD_S) if waiting else ([], [], [])
            for sock in readable:
                self._read(sock)
            if self.filler:
                byte = self.filler[sent % len(self.filler):][:1]
                for sock in set(waiting) - set(readable):  # a socket with a reply waiting is not written to
                    # A send fails once the server has reset the connection (it closed with our latest bytes
                    # unread); its answer may still be unread here, so the socket is left to `_read`, which
                    # collects that answer and then sees the reset.
                    with contextlib.suppress(OSError):
                        sock.send(byte)
                sent += 1

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.replies[sock] += data
        else:
            self.closed.add(sock)

    def wait_until_all_closed(self) -> bool:
        deadline = time.monotonic() + SETTLE_S
        while len(self.closed) < len(self.sockets) and time.monotonic() < deadline:
            time.sleep(PERIOD_S)
        return len(self.closed) == len(self.sockets)

    def open_count(self) -> int:
        return len(self.sockets) - len(self.closed)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT_S)
        for sock in self.sockets:
            sock.close()


def error_reply(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower(), head
    return status, json.loads(body)["error"]


@pytest.fixture
def attack() -> Iterator[list[SlowClients]]:
    started: list[SlowClients] = []
    yield started
    for clients in started:
        clients.stop()


def completion(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=bearer(KEY_A), timeout=TIMEOUT_S,
                      json={"model": DEMO_MODEL_NAME, "prompt": "hi", "max_tokens": 2})


def test_slow_headers_and_bodies_are_cut_off_while_others_are_served(start_server, attack: list[SlowClients],
                                                                      tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEY_FILE))
    server = start_server(drain_timeout=TIMEOUT_S, header_timeout=1, body_timeout=1, api_keys=keys)
    heads = SlowClients(server, 40, SLOW_HEAD, b"X-Slow: 1\r\n")
    bodies = SlowClients(server, 10, SLOW_BODY, b"x")
    silent = SlowClients(server, 10)
    # Keep-alive: one request answered, then the next one's headers trickle.
    kept = SlowClients(server, 5, b"GET /health HTTP/1.1\r\nHost: lorahive\r\n\r\n" + SLOW_HEAD, b"X-Slow: 1\r\n")
    attack += [heads, bodies, silent, kept]
    # Another tenant, and the probes, are answered while the attack runs.
    assert completion(server.url).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 200
    for clients in attack:
        assert clients.wait_until_all_closed(), f"{clients.open_count()} slow connection(s) still open"
    for clients in (heads, bodies):
        for reply in clients.replies.values():
            status, error = error_reply(reply)
            assert status == 408 and error["code"] == "request_timeout", reply
    flags = {error_reply(next(iter(c.replies.values())))[1]["message"] for c in (heads, bodies)}
    assert any("--header-timeout" in message for message in flags) and any("--body-timeout" in m for m in flags)
    for reply in kept.replies.values():
        answered, timed_out = reply.split(b"HTTP/1.1 408 ")
        assert answered.startswith(b"HTTP/1.1 200 ")
        assert error_reply(b"HTTP/1.1 408 " + timed_out)[1]["code"] == "request_timeout"
    assert set(silent.replies.values()) == {b""}  # an idle connection is closed without an answer it never asked for
    assert completion(server.url).status_code == 200


def test_the_connection_cap_holds_without_locking_out_a_client_with_a_request(start_server,
                                                                             attack: list[SlowClients]) -> None:
    cap = 10
    server = start_server(drain_timeout=TIMEOUT_S, max_connections=cap, header_timeout=TIMEOUT_S,
                          body_timeout=TIMEOUT_S)
    idle = SlowClients(server, 3 * cap)
    attack.append(idle)
    # Idle connections past the cap displace the ones that waited longest; a client with a request gets through.
    deadline = time.monotonic() + SETTLE_S
    while idle.open_count() > cap and time.monotonic() < deadline:
        time.sleep(PERIOD_S)
    assert idle.open_count() <= cap
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 200
    idle.stop()
    # When every connection has a request running (here: bodies that never end), a newcomer is refused.
    busy = SlowClients(server, cap, SLOW_BODY, b"x")
    attack.append(busy)
    time.sleep(2.0)  # lets the server read their heads
    refused = SlowClients(server, 1, b"GET /health HTTP/1.1\r\nHost: lorahive\r\n\r\n")
    attack.append(refused)
    assert refused.wait_until_all_closed()
    status, error = error_reply(refused.replies[refused.sockets[0]])
    assert status == 503 and error["code"] == "too_many_connections" and "--max-connections" in error["message"]
    busy.stop()
    deadline = time.monotonic() + SETTLE_S
    while httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code != 200:
        assert time.monotonic() < deadline, "the server still refuses connections after the busy ones left"
        time.sleep(PERIOD_S)


def test_sigterm_ends_within_the_drain_timeout_whatever_slow_clients_do(start_server,
                                                                          attack: list[SlowClients]) -> None:
    drain_timeout = 1.0
    server = start_server(drain_timeout=drain_timeout, header_timeout=TIMEOUT_S, body_timeout=TIMEOUT_S)
    attack += [SlowClients(server, 10, SLOW_HEAD, b"X-Slow: 1\r\n"), SlowClients(server, 10, SLOW_BODY, b"x"),
               SlowClients(server, 5)]
    time.sleep(2.0)  # lets the server read the bodies' heads: those requests are in flight when SIGTERM comes
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    # Draining, the probes still answer (or the server is already gone).
    with contextlib.suppress(httpx.TransportError):
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 200
    assert server.process.wait(TIMEOUT_S) == 0
    took = time.monotonic() - signalled
    bound = drain_timeout + CUT_GRACE_S + CLOSE_GRACE_S + 10.0  # 10 s: the engine's shutdown, a loaded machine
    assert took < bound, f"SIGTERM took {took:.1f} s with slow clients open; at most {bound:.1f} s expected"
    log = server.log.read_text()
    assert "Traceback" not in log, log
    for clients in attack:
        assert clients.wait_until_all_closed()
