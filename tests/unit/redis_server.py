"""A throwaway Redis (Debian's redis-server) on 127.0.0.1 for the Sidekiq tests: its own config in a
temp dir (a password, no persistence), a random high port.  The module-scoped fixture `redis` is
registered by tests/unit/conftest.py.  Without redis-server and redis-cli the fixture skips (a
failure under CI: tests/conftest.py); scripts/setup.sh installs them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
# A password with everything a shell, a config file or an env file could trip on.
PASSWORD = "pa ss'wo\"rd$HOME\\#1+%41"


@dataclass
class Redis:
    port: int
    dir: Path
    password: str = PASSWORD

    def cli(self, *args: str, stdin: str | None = None) -> str:
        """redis-cli against this server (the password in its environment); its stdout."""
        assert REDIS_CLI is not None
        done = subprocess.run([REDIS_CLI, "-p", str(self.port), *args], input=stdin, capture_output=True, text=True,
                              env={**os.environ, "REDISCLI_AUTH": self.password}, timeout=30, check=True)
        return done.stdout

    def flush(self) -> None:
        self.cli("FLUSHALL")

    def env(self, **extra: str) -> str:
        """An .env file finding this server as Mastodon would (REDIS_HOST/PORT/PASSWORD), plus `extra`."""
        values = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(self.port), "REDIS_PASSWORD": _quoted(self.password),
                  **extra}
        return "".join(f"{k}={v}\n" for k, v in values.items())


def _quoted(value: str) -> str:
    """A double-quoted env value, as fleet writes one (fleet.envfile.render_value)."""
    from fleet.envfile import render_value

    return render_value(value)


def _conf_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ready(port: int, password: str) -> bool:
    assert REDIS_CLI is not None
    done = subprocess.run([REDIS_CLI, "-p", str(port), "PING"], capture_output=True, text=True, timeout=10,
                          env={**os.environ, "REDISCLI_AUTH": password})
    return done.stdout.strip() == "PONG"


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server; scripts/setup.sh)")
    with tempfile.TemporaryDirectory(prefix="fleet-redis-") as tmp:
        root = Path(tmp)
        for _attempt in range(5):  # the port found free may be taken before redis binds it: take another
            port = free_port()
            conf = root / "redis.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\nrequirepass {_conf_string(PASSWORD)}\nsave \"\"\n"
                            f"appendonly no\ndir {root}\nlogfile {root / 'redis.log'}\n")
            server = subprocess.Popen([REDIS_SERVER, str(conf)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while server.poll() is None and not _ready(port, PASSWORD) and time.monotonic() < deadline:
                time.sleep(0.05)
            if server.poll() is None and _ready(port, PASSWORD):
                break
            server.kill()
            server.wait()
        else:
            log = root / "redis.log"
            pytest.fail(f"redis-server did not start: {log.read_text() if log.exists() else '(no log)'}")
        try:
            yield Redis(port=port, dir=root)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
