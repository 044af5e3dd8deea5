"""The SSH transport against a real, throwaway OpenSSH server on 127.0.0.1.

The server (`sshd -D -e -f <config>`) listens only on 127.0.0.1 on a random high port, with
its own host keys and authorized_keys in a temp dir.  Without /usr/sbin/sshd these tests
skip (in CI, where tests/conftest.py makes every skip a failure, scripts/setup.sh installs it).
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sshd_server import Sshd, free_port, keygen, known_line  # the fixture `sshd` comes from conftest

from fleet.errors import TransportError
from fleet.model import Host
from fleet.transport.known_hosts import fingerprint
from fleet.transport.protocol import MIB, RunResult, quote
from fleet.transport.ssh import SSHTransport, paramiko


def test_run_returns_stdout_stderr_and_exit_code_separately(sshd: Sshd) -> None:
    with sshd.transport() as transport:
        result = transport.run(sshd.host(), "echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
    assert not result.ok and result.host == "loop" and result.duration > 0


def test_stdin_reaches_the_command_and_ends_with_eof(sshd: Sshd) -> None:
    data = os.urandom(3 * 1024 * 1024)  # more than one channel window
    with sshd.transport() as transport:
        result = transport.run(sshd.host(), "sha256sum", stdin=data)
    import hashlib

    assert result.ok and result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_large_stdout_and_stderr_together_do_not_deadlock(sshd: Sshd) -> None:
    command = "head -c 5000000 /dev/zero; head -c 5000000 /dev/zero >&2; head -c 100 /dev/zero"
    with sshd.transport() as transport:
        result = transport.run(sshd.host(), command, timeout=30)
    assert len(result.stdout) == 5000100 and len(result.stderr) == 5000000


def test_quoted_values_reach_the_remote_command_intact(sshd: Sshd) -> None:
    value = 'it\'s "$HOME" `id` $(id) \\ ; * \n second line'
    with sshd.transport() as transport:
        plain = transport.run(sshd.host(), f"printf %s {quote(value)}")
        as_root = transport.run(sshd.host(), f"printf %s {quote(value)}", sudo=True)
    assert plain.stdout.decode() == value
    assert as_root.stdout.decode() == value


@pytest.mark.skipif(shutil.which("sudo") is None, reason="sudo not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="sudo -n without a password needs the test to run as root")
def test_sudo_runs_as_root_and_stdin_still_reaches_the_command(sshd: Sshd) -> None:
    with sshd.transport() as transport:
        whoami = transport.run(sshd.host(sudo=True), "id -u")
        fed = transport.run(sshd.host(), "cat; id -u", sudo=True, stdin=b"through sudo\n")
        plain = transport.run(sshd.host(sudo=True), "id -un", sudo=False)
    assert whoami.stdout == b"0\n"
    assert fed.stdout == b"through sudo\n0\n"
    assert plain.ok


def test_a_hung_command_times_out_and_the_next_command_reconnects(sshd: Sshd) -> None:
    # After a timeout the connection is dropped: the host may be cut off rather than the command
    # slow, and a dead connection must not make every later command wait out its own timeout.
    # A timeout, not the result of `sleep 60`, is what proves the deadline fired first; the 60 s
    # sleep (root: sshd cannot signal it, it just ends later) leaves a wide margin under load.
    with sshd.transport() as transport:
        with pytest.raises(TransportError) as hung:
            transport.run(sshd.host(), "sleep 60", timeout=1)
        assert hung.value.kind == "timeout"
        assert hung.value.message.startswith("`sleep 60` on loop did not finish within 1s;"), hung.value.message
        assert transport.run(sshd.host(), "echo after").stdout == b"after\n"
        assert transport.stats()["loop"] == {"connections": 2, "channels": 2}


def test_output_beyond_max_output_aborts_without_reading_it_all(sshd: Sshd, monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[int] = []
    recv = paramiko.Channel.recv

    def counted(channel: paramiko.Channel, nbytes: int) -> bytes:
        data = recv(channel, nbytes)
        received.append(len(data))
        return data

    monkeypatch.setattr(paramiko.Channel, "recv", counted)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with sshd.transport(max_output=4 * MIB) as transport:
        with pytest.raises(TransportError) as big:
            transport.run(sshd.host(), "head -c 1000000000 /dev/zero", timeout=600)
        read = sum(received)
        assert big.value.kind == "output-too-large" and "4 MiB" in big.value.message
        assert transport.run(sshd.host(), "echo fine").ok
    # The command stopped being read at the cap: at most one more chunk than 4 MiB of the 1 GB.
    assert 4 * MIB < read <= 4 * MIB + 64 * 1024, f"read {read} bytes"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"


# --------------------------------------------------------------------------- host keys


def test_an_unknown_host_key_is_refused_before_authenticating(sshd: Sshd) -> None:
    empty = sshd.dir / "empty_known_hosts"
    empty.write_text("")
    accepted = sshd.accepted()
    with sshd.transport(known_hosts=[str(empty)]) as transport:
        with pytest.raises(TransportError) as unknown:
            transport.run(sshd.host("stranger"), "true")
    error = unknown.value
    assert error.kind == "hostkey" and error.host == "stranger"
    assert f"stranger (127.0.0.1:{sshd.port})" in error.message
    assert f"ssh-ed25519 {fingerprint(sshd.host_keys['ssh-ed25519'])}" in error.message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 | ssh-keygen -lf -" in error.hint
    assert empty.read_text() == ""
    assert sshd.accepted() == accepted  # never logged in


def test_a_changed_host_key_is_refused_even_with_accept_new(sshd: Sshd) -> None:
    impostor = keygen(sshd.dir / "impostor_key")
    changed = sshd.dir / "changed_known_hosts"
    changed.write_text("# old\n" + known_line(f"[127.0.0.1]:{sshd.port}", "ssh-ed25519", impostor))
    with sshd.transport(known_hosts=[str(changed)], accept_new=True) as transport:
        with pytest.raises(TransportError) as refused:
            transport.run(sshd.host(), "true")
    message = refused.value.message
    assert refused.value.kind == "hostkey" and "CHANGED" in message and "man-in-the-middle" in message
    assert fingerprint(impostor) in message and fingerprint(sshd.host_keys["ssh-ed25519"]) in message
    assert f"{changed}:2" in message


def test_accept_new_records_the_key_and_later_runs_trust_it(sshd: Sshd) -> None:
    recorded = sshd.dir / "new" / "known_hosts"
    with sshd.transport(known_hosts=[str(recorded)], accept_new=True) as transport:
        assert transport.run(sshd.host(), "true").ok
    assert recorded.read_text() == known_line(f"[127.0.0.1]:{sshd.port}", "ssh-ed25519", sshd.host_keys["ssh-ed25519"])
    with sshd.transport(known_hosts=[str(recorded)]) as transport:
        assert transport.run(sshd.host(), "true").ok


def test_hashed_known_hosts_entries_are_trusted(sshd: Sshd) -> None:
    hashed = sshd.dir / "hashed_known_hosts"
    shutil.copy(sshd.known_hosts, hashed)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert hashed.read_text().startswith("|1|")
    with sshd.transport(known_hosts=[str(hashed)]) as transport:
        assert transport.run(sshd.host(), "true").ok


def test_a_host_known_by_its_rsa_key_is_asked_for_that_key_type(sshd: Sshd) -> None:
    rsa_only = sshd.dir / "rsa_known_hosts"
    rsa_only.write_text(known_line(f"[127.0.0.1]:{sshd.port}", "ssh-rsa", sshd.host_keys["ssh-rsa"]))
    with sshd.transport(known_hosts=[str(rsa_only)]) as transport:
        assert transport.run(sshd.host(), "true").ok


# --------------------------------------------------------------------------- failures as kinds


def test_connection_refused_is_unreachable_and_does_not_hide_other_hosts(sshd: Sshd) -> None:
    closed = free_port()
    hosts = [sshd.host("a"), Host(name="dead", address="127.0.0.1", port=closed, user=sshd.user), sshd.host("b")]
    done: list[str] = []
    with sshd.transport() as transport:
        outcomes = transport.run_many(hosts, lambda h: f"echo {quote(h.name)}", on_done=lambda n, _: done.append(n))
    a, dead, b = outcomes["a"], outcomes["dead"], outcomes["b"]
    assert isinstance(a, RunResult) and a.stdout == b"a\n"
    assert isinstance(b, RunResult) and b.stdout == b"b\n"
    assert isinstance(dead, TransportError) and dead.kind == "unreachable"
    assert "connection refused" in dead.message and f"127.0.0.1:{closed}" in dead.message
    assert sorted(done) == ["a", "b", "dead"]


def test_an_unresolvable_address_is_unreachable(sshd: Sshd) -> None:
    with sshd.transport() as transport:
        with pytest.raises(TransportError) as dns:
            transport.run(Host(name="ghost", address="fleet-no-such-host.invalid"), "true")
    assert dns.value.kind == "unreachable" and "cannot resolve" in dns.value.message


def test_a_server_that_never_speaks_is_a_connect_timeout(sshd: Sshd, monkeypatch: pytest.MonkeyPatch) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    host = Host(name="silent", address="127.0.0.1", port=silent.getsockname()[1])
    # What bounds the wait is the budget fleet hands paramiko for the banner and handshake (its
    # own defaults are 15 s and more): record it rather than time the call.
    budgets: list[float] = []
    start_client = paramiko.Transport.start_client

    def recorded(t: paramiko.Transport, event: Any = None, timeout: float | None = None) -> None:
        budgets.extend([t.banner_timeout, t.handshake_timeout, -1.0 if timeout is None else timeout])
        start_client(t, event, timeout)

    monkeypatch.setattr(paramiko.Transport, "start_client", recorded)
    try:
        with sshd.transport(connect_timeout=1) as transport:
            with pytest.raises(TransportError) as hung:
                transport.run(host, "true")
    finally:
        silent.close()
        for s in held:
            s.close()
    assert hung.value.kind == "timeout"
    assert hung.value.message == (f"connecting to silent (127.0.0.1:{host.port}) timed out after 1s "
                                  "(during SSH handshake)")
    assert len(budgets) == 3 and all(0 < b <= 1 for b in budgets), budgets


def test_a_server_that_hangs_up_at_once_is_unreachable(sshd: Sshd, capfd: pytest.CaptureFixture[str]) -> None:
    rude = socket.socket()
    rude.bind(("127.0.0.1", 0))
    rude.listen()
    threading.Thread(target=lambda: rude.accept()[0].close(), daemon=True).start()
    try:
        with sshd.transport() as transport:
            with pytest.raises(TransportError) as closed:
                transport.run(Host(name="rude", address="127.0.0.1", port=rude.getsockname()[1]), "true")
    finally:
        rude.close()
    assert closed.value.kind == "unreachable" and "closed the connection" in closed.value.message
    assert "Traceback" not in capfd.readouterr().err  # paramiko's own logging stays quiet


def test_a_key_the_server_does_not_know_is_an_auth_failure_naming_the_key(sshd: Sshd) -> None:
    stranger = sshd.dir / "stranger_key"
    keygen(stranger)
    config = sshd.dir / "wrong_key_config"
    config.write_text(f"Host *\n    IdentityFile {stranger}\n    IdentityFile {sshd.dir}/missing_key\n")
    with sshd.transport(ssh_config=str(config)) as transport:
        with pytest.raises(TransportError) as denied:
            transport.run(sshd.host(), "true")
    assert denied.value.kind == "auth"
    assert f"{sshd.user}@loop" in denied.value.message
    assert str(stranger) in denied.value.message and "missing_key (missing)" in denied.value.message


@pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="ssh-agent not installed")
def test_keys_in_ssh_agent_are_used_unless_identities_only(sshd: Sshd, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = sshd.dir / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30  # a hang guard only: the agent's socket appears within ms
        while not sock.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(sshd.key)], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        no_keys = sshd.dir / "agent_config"
        no_keys.write_text("")
        only = sshd.dir / "identities_only_config"
        only.write_text("Host *\n    IdentitiesOnly yes\n")
        with SSHTransport(
            ssh_config=str(no_keys), known_hosts=[str(sshd.known_hosts)], look_for_keys=False
        ) as transport:
            assert transport.run(sshd.host(), "echo via agent").stdout == b"via agent\n"
        with SSHTransport(ssh_config=str(only), known_hosts=[str(sshd.known_hosts)], look_for_keys=False) as transport:
            with pytest.raises(TransportError) as denied:
                transport.run(sshd.host(), "true")
        assert denied.value.kind == "auth" and "no keys to offer" in denied.value.message
    finally:
        agent.terminate()
        agent.wait(timeout=10)


@pytest.fixture
def user_without_sudo(sshd: Sshd) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("sudo") is None:
        pytest.skip("creating a user without sudo rights needs root, useradd and sudo")
    name = f"fleetns{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
    subprocess.run(["usermod", "-p", "*", name], check=True)  # not "locked": sshd (UsePAM no) lets it in
    try:
        yield name
    finally:
        # userdel refuses (exit 8) while sshd's session processes for the user are still exiting.
        deadline = time.monotonic() + 10
        while subprocess.run(["userdel", name], capture_output=True).returncode == 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        if name in subprocess.run(["getent", "passwd", name], capture_output=True, text=True).stdout:
            subprocess.run(["userdel", "--force", name], check=False, capture_output=True)


def test_a_timed_out_command_of_a_non_root_user_is_terminated(sshd: Sshd, user_without_sudo: str) -> None:
    marker = str(secrets.randbelow(10**6) + 10**6)  # a sleep length nobody else uses
    host = Host(name="plain-user", address="127.0.0.1", port=sshd.port, user=user_without_sudo)
    with sshd.transport() as transport:
        with pytest.raises(TransportError) as hung:
            transport.run(host, f"sleep {marker}", timeout=1)
    assert hung.value.kind == "timeout"
    # sshd signals the command at once; the loop only waits for the process to be reaped, and its
    # deadline is a hang guard (the sleep would otherwise run for days), not a measurement.
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-u", user_without_sudo, "-f", f"sleep {marker}"]).returncode == 0:
        assert time.monotonic() < deadline, "the timed-out command is still running"
        time.sleep(0.05)


def test_sudo_asking_for_a_password_is_kind_sudo(sshd: Sshd, user_without_sudo: str) -> None:
    host = Host(name="nosudo", address="127.0.0.1", port=sshd.port, user=user_without_sudo, sudo=True)
    with sshd.transport() as transport:
        assert transport.run(host, "id -un", sudo=False).stdout.decode().strip() == user_without_sudo
        with pytest.raises(TransportError) as refused:
            transport.run(host, "id -u")
    assert refused.value.kind == "sudo" and "password is required" in refused.value.message


# --------------------------------------------------------------------------- ssh_config and reuse


def test_a_lab_style_config_entry_redirects_the_host_name(sshd: Sshd) -> None:
    config = sshd.dir / "lab_config"
    config.write_text(
        f"""Host fritz
    HostName 127.0.0.1
    Port {sshd.port}
    User {sshd.user}
    IdentityFile {sshd.key}
    IdentitiesOnly yes
    UserKnownHostsFile {sshd.known_hosts}
"""
    )
    inventory = Host(name="fritz", address="fritz.example.invalid", port=22, user="nobody-here")
    with SSHTransport(ssh_config=str(config), known_hosts=[], allow_agent=False, look_for_keys=False) as transport:
        result = transport.run(inventory, "id -un")
    assert result.stdout.decode().strip() == sshd.user


def test_proxy_jump_tunnels_through_the_jump_host(sshd: Sshd) -> None:
    config = sshd.dir / "jump_config"
    config.write_text(
        f"""Host behind
    HostName 127.0.0.1
    Port {sshd.port}
    ProxyJump {sshd.user}@127.0.0.1:{sshd.port}
Host *
    IdentityFile {sshd.key}
    IdentitiesOnly yes
"""
    )
    with sshd.transport(ssh_config=str(config)) as transport:
        result = transport.run(Host(name="behind", address="unused.invalid", user=sshd.user), "echo tunnelled")
        stats = transport.stats()
    assert result.stdout == b"tunnelled\n"
    assert stats["behind"] == {"connections": 1, "channels": 1}
    assert stats[f"{sshd.user}@127.0.0.1:{sshd.port}"] == {"connections": 1, "channels": 1}


def test_one_run_many_opens_one_connection_and_one_channel_per_host(sshd: Sshd) -> None:
    hosts = [sshd.host(f"h{i}") for i in range(12)]
    accepted = sshd.accepted()
    with sshd.transport() as transport:
        outcomes = transport.run_many(hosts, "hostname", forks=6)
        stats = transport.stats()
    assert all(isinstance(o, RunResult) and o.ok for o in outcomes.values())
    assert stats == {h.name: {"connections": 1, "channels": 1} for h in hosts}
    deadline = time.monotonic() + 30  # a hang guard only: sshd's log line trails the session by ms
    while sshd.accepted() < accepted + 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sshd.accepted() == accepted + 12


def test_later_runs_on_a_host_reuse_its_connection(sshd: Sshd) -> None:
    with sshd.transport() as transport:
        for i in range(3):
            assert transport.run(sshd.host(), f"echo {i}").stdout == f"{i}\n".encode()
        transport.run_many([sshd.host(), sshd.host("other")], "true")
        assert transport.stats() == {
            "loop": {"connections": 1, "channels": 4},
            "other": {"connections": 1, "channels": 1},
        }


def test_idle_connections_beyond_the_limit_are_closed(sshd: Sshd) -> None:
    with sshd.transport(max_connections=2) as transport:
        transport.run_many([sshd.host(f"m{i}") for i in range(5)], "true", forks=1)
        open_now = sum(1 for slot in transport._slots.values() if slot.transport is not None)
        assert open_now <= 2
        assert transport.run(sshd.host("m0"), "true").ok


def test_a_dropped_connection_is_reopened_on_the_next_run(sshd: Sshd) -> None:
    with sshd.transport() as transport:
        assert transport.run(sshd.host(), "true").ok
        slot = transport._slots["loop"]
        assert slot.transport is not None
        slot.transport.close()
        assert transport.run(sshd.host(), "echo again").stdout == b"again\n"
        assert transport.stats()["loop"]["connections"] == 2


def _in_threads(fn: Any, n: int) -> list[Any]:
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        try:
            results[i] = fn(i)
        except Exception as e:  # the assertion shows it
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)  # a hang guard only; a thread still running leaves its result None
    return results


def test_commands_for_one_host_from_several_threads_run_at_once_on_its_one_connection(
        sshd: Sshd, tmp_path: Path) -> None:
    # A barrier: each command waits until all four have started.  Run one after the other, the
    # first would wait for the others until its timeout.
    d = tmp_path / "barrier"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    cmd = (f"touch {quote(str(d))}/$1 && while [ $(ls {quote(str(d))} | wc -l) -lt 4 ]; do sleep 0.05; done; "
           "echo $1")
    with sshd.transport() as transport:
        # The timeout is a hang guard (one after the other, the first would wait it out); together
        # the four meet within ms.
        results = _in_threads(lambda i: transport.run(sshd.host(), f"set -- c{i}; {cmd}", timeout=60), 4)
        stats = transport.stats()
    assert [r.stdout if isinstance(r, RunResult) else r for r in results] == [f"c{i}\n".encode() for i in range(4)]
    assert stats == {"loop": {"connections": 1, "channels": 4}}


def test_no_more_than_max_sessions_commands_run_at_once_on_one_host(sshd: Sshd, tmp_path: Path) -> None:
    d = tmp_path / "running"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    q = quote(str(d))
    with sshd.transport(max_sessions=2) as transport:
        results = _in_threads(lambda i: transport.run(
            sshd.host(), f"touch {q}/r{i}; ls {q} | wc -l; sleep 0.4; rm {q}/r{i}", timeout=20), 6)
    assert all(isinstance(r, RunResult) and r.ok for r in results), results
    assert max(int(r.stdout) for r in results) <= 2


def test_a_connection_busy_with_a_command_is_not_closed_as_idle(sshd: Sshd, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    with sshd.transport(max_connections=1) as transport:
        busy = threading.Thread(target=lambda: results.append(transport.run(
            sshd.host("busy"), f"while [ ! -e {quote(str(flag))} ]; do sleep 0.05; done; echo done", timeout=20)))
        results: list[Any] = []
        busy.start()
        deadline = time.monotonic() + 60  # a hang guard only: the channel opens within ms
        while transport.stats().get("busy", {}).get("channels", 0) < 1:
            assert time.monotonic() < deadline, "the busy command never opened its channel"
            time.sleep(0.02)
        assert transport.run(sshd.host("other"), "true").ok  # over the limit: evicts idle connections only
        flag.touch()
        busy.join(20)
    assert results and isinstance(results[0], RunResult) and results[0].stdout == b"done\n"
