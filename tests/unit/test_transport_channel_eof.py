"""A channel's EOF must never reach sshd after that channel's CLOSE (issue 12's lost connection).

paramiko builds a channel's EOF under the channel's lock but sends it after releasing it
(`Channel.shutdown`); meanwhile paramiko's transport thread may answer the server's CLOSE of the
same channel (a command that has already ended) with its own CLOSE.  When the CLOSE goes out
first, OpenSSH frees the channel number and the late EOF is a protocol error: "Disconnect (code
2): ieof packet referred to nonexistent channel 0" — every command on that connection fails at
once with "connection … was lost … EOFError".  That is the unexplained failure of a fresh-clone CI
run, reproduced on the lab in 1 of 30 bare applies (FLEET_DEBUG_LOG + sshd at DEBUG1 showed it);
paramiko/paramiko#1115 and #1705 describe the same race, still open upstream.

These tests force that interleaving against a real sshd on loopback: whenever a thread other
than paramiko's own sends a channel EOF, it first waits (bounded) until the transport thread has
handled the server's CLOSE of that channel.  fleet avoids the race by never sending an EOF that
can follow a CLOSE: a command without stdin gets /dev/null on the host (no EOF is ever sent),
and a command with stdin drains it to the end before it exits, so the server cannot close the
channel before our EOF has arrived.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import paramiko
import pytest
from paramiko.common import cMSG_CHANNEL_EOF
from sshd_server import Sshd

LATE = 2.0  # at most this long an EOF is held back waiting for its channel's CLOSE


@dataclass
class HeldBack:
    """EOFs sent on their own (paramiko's `Channel.shutdown`, i.e. by fleet) and held back until
    the server had ended their command; `after_close`: those whose channel was closed by then,
    i.e. the ones that reached sshd after the channel's CLOSE."""

    eofs: list[int] = field(default_factory=list)
    after_close: list[int] = field(default_factory=list)


def _from_shutdown() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "shutdown" and frame.f_code.co_filename.endswith("channel.py"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


@pytest.fixture
def eof_after_close(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldBack]:
    """Every EOF a caller sends on its own is held until its command has ended and the transport
    thread has closed the channel (or LATE has passed): the interleaving of the race, every time.
    EOFs that paramiko sends together with its CLOSE are in order and pass untouched."""
    held = HeldBack()
    send = paramiko.Transport._send_user_message

    def held_back(self: paramiko.Transport, data: paramiko.Message) -> None:
        raw = data.asbytes()
        if raw[:1] == cMSG_CHANNEL_EOF and threading.current_thread() is not self and _from_shutdown():
            remote = int.from_bytes(raw[1:5], "big")
            held.eofs.append(remote)
            chan = next((c for c in list(self._channels.values()) if c.remote_chanid == remote), None)
            if chan is not None and chan.status_event.wait(LATE):
                for _ in range(int(LATE / 0.01)):
                    if chan.closed:
                        held.after_close.append(remote)
                        break
                    time.sleep(0.01)
        send(self, data)

    monkeypatch.setattr(paramiko.Transport, "_send_user_message", held_back)
    yield held


def test_a_command_without_stdin_survives_its_channel_closing_first(sshd: Sshd, eof_after_close: HeldBack) -> None:
    with sshd.transport() as t:
        host = sshd.host()
        for i in range(3):
            assert t.run(host, f"echo round-{i}").stdout == f"round-{i}\n".encode()
        assert eof_after_close.eofs == []  # fleet sends no EOF of its own: the command reads /dev/null
        assert t.stats()[host.name]["connections"] == 1  # one connection served every command


def test_a_command_that_exits_without_reading_its_stdin_survives_too(sshd: Sshd, eof_after_close: HeldBack) -> None:
    with sshd.transport() as t:
        host = sshd.host()
        failed = t.run(host, "exit 3", stdin=b"x" * 100_000)
        assert failed.exit_code == 3
        assert t.run(host, "cat", stdin=b"still here").stdout == b"still here"
        assert len(eof_after_close.eofs) == 2  # held back, yet the server had not closed: stdin is drained
        assert eof_after_close.after_close == []
        assert t.stats()[host.name]["connections"] == 1


def test_a_command_that_reads_its_stdin_gets_all_of_it_and_its_exit_code(sshd: Sshd,
                                                                          eof_after_close: HeldBack) -> None:
    with sshd.transport() as t:
        host = sshd.host()
        data = bytes(range(256)) * 1000
        done = t.run(host, "wc -c; exit 5", stdin=data)
        assert (done.exit_code, done.stdout.strip()) == (5, str(len(data)).encode())
