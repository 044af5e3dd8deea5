"""A real HTTP webhook receiver on 127.0.0.1, in a thread, for the notification tests.

It records every request (path, headers, JSON body) and answers what the test scripts: a status
per request (`answers`, then `default`), or "hang" — hold the request without answering until the
receiver closes (the client's timeout fires first).  `down()` / `up()` make the port refuse
connections and accept them again without ever releasing it: a second socket holds the port
bound (SO_REUSEPORT) without listening for the receiver's whole life, so nobody else can take the
port while the server is down and a connection to it is refused at once (no timing involved).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

HANG = "hang"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    answers: list[int | str] = field(default_factory=list)
    default: int | str = 204
    requests: list[Request] = field(default_factory=list)
    location: str = ""  # Location header for a 3xx answer

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                with receiver._lock:
                    answer = receiver.answers.pop(0) if receiver.answers else receiver.default
                    receiver.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                     json.loads(raw) if raw else None))
                if answer == HANG:
                    receiver._release.wait(60)  # hang guard: released when the receiver closes
                    return
                status = int(answer)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.location or "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        # The holder reserves a free port for the receiver's life; servers come and go on it.
        self._holder = _reuseport_socket()
        self._holder.bind(("127.0.0.1", 0))
        self._handler = Handler
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.up()

    @property
    def port(self) -> int:
        return int(self._holder.getsockname()[1])

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def up(self) -> None:
        """Listen and serve (again)."""
        if self._server is not None:
            return
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler, bind_and_activate=False)
        server.daemon_threads = True
        server.socket.close()
        server.socket = _reuseport_socket()
        server.socket.bind(("127.0.0.1", self.port))
        server.server_activate()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop accepting: connections are refused until `up()` (the holder keeps the port)."""
        if self._server is None:
            return
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(10)  # hang guard
        self._server.server_close()
        self._server, self._thread = None, None

    def close(self) -> None:
        self._release.set()
        self.down()
        self._holder.close()

    def bodies(self) -> list[Any]:
        with self._lock:
            return [r.body for r in self.requests]


def _reuseport_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return s


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()
