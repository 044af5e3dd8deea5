"""A throwaway OpenSSH server on 127.0.0.1 for the transport tests: `sshd -D -e -f <config>`
listening only on 127.0.0.1 on a random high port, with its own host keys and authorized_keys in
a temp dir.  The module-scoped fixture `sshd` is registered by tests/unit/conftest.py.  Without
/usr/sbin/sshd the fixture skips (a failure under CI: tests/conftest.py)."""

from __future__ import annotations

import base64
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet.model import Host
from fleet.transport.ssh import SSHTransport

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)


@dataclass
class Sshd:
    port: int
    dir: Path
    user: str
    key: Path
    known_hosts: Path  # knows the server's ed25519 key
    ssh_config: Path  # Host *: the client key, IdentitiesOnly
    host_keys: dict[str, bytes]  # key type -> public blob
    log: Path

    def host(self, name: str = "loop", **kw: Any) -> Host:
        return Host(name=name, address="127.0.0.1", port=self.port, user=self.user, **kw)

    def transport(self, **kw: Any) -> SSHTransport:
        kw.setdefault("ssh_config", str(self.ssh_config))
        kw.setdefault("known_hosts", [str(self.known_hosts)])
        return SSHTransport(allow_agent=False, look_for_keys=False, **kw)

    def accepted(self) -> int:
        """How many logins the server has accepted so far."""
        return self.log.read_text(errors="replace").count("Accepted publickey")


def keygen(path: Path, key_type: str = "ed25519") -> bytes:
    bits = ["-b", "2048"] if key_type == "rsa" else []
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, *bits, "-N", "", "-f", str(path)], check=True)
    return base64.b64decode(path.with_suffix(".pub").read_text().split()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def known_line(name: str, type_: str, blob: bytes) -> str:
    return f"{name} {type_} {base64.b64encode(blob).decode()}\n"


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    if SSHD is None:
        pytest.skip("needs OpenSSH's sshd (apt-get install openssh-server)")
    # Not under pytest's 0700 basetemp: sshd reads authorized_keys as the logging-in user.
    d = Path(tempfile.mkdtemp(prefix="fleet-sshd-"))
    d.chmod(0o755)
    host_keys = {
        "ssh-ed25519": keygen(d / "ssh_host_ed25519_key"),
        "ssh-rsa": keygen(d / "ssh_host_rsa_key", "rsa"),
    }
    keygen(d / "client_key")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "authorized_keys").chmod(0o644)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    log = d / "sshd.log"
    for _attempt in range(5):
        port = free_port()
        (d / "sshd_config").write_text(
            f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/ssh_host_ed25519_key
HostKey {d}/ssh_host_rsa_key
PidFile none
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
MaxStartups 200
MaxSessions 50
LogLevel INFO
"""
        )
        with open(log, "ab") as err:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=err)
        deadline = time.monotonic() + 10
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                up = True
                break
            except OSError:
                time.sleep(0.05)
        if up:
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"sshd did not start: {log.read_text(errors='replace')[-2000:]}")
    known = d / "known_hosts"
    known.write_text(known_line(f"[127.0.0.1]:{port}", "ssh-ed25519", host_keys["ssh-ed25519"]))
    config = d / "ssh_config"
    config.write_text(f"Host *\n    IdentityFile {d}/client_key\n    IdentitiesOnly yes\n")
    try:
        yield Sshd(port, d, getpass.getuser(), d / "client_key", known, config, host_keys, log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- commands


