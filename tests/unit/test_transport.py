"""The SSH transport's logic without a network: host keys, quoting, ssh_config, run_many."""

from __future__ import annotations

import base64
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet.errors import ConfigError, TransportError
from fleet.model import Host
from fleet.transport import ssh as tr
from fleet.transport.config import parse_jump
from fleet.transport.known_hosts import (
    KnownHosts,
    blob_key_type,
    check_host_key,
    fingerprint,
    hostkey_error,
    hostkey_name,
)
from fleet.transport.protocol import RunResult, quote, sudo_command, sudo_refusal
from fleet.transport.ssh import SSHTransport

needs_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")

NASTY = [
    "plain",
    "two words",
    "it's",
    'say "hi"',
    "$HOME and ${PATH}",
    "`id` and $(id)",
    "line one\nline two",
    "tab\there",
    "back\\slash",
    "semi; rm -rf /tmp/nothing",
    "glob * ? [a]",
    "",
    "-n",
    "ünïcödé",
]


@pytest.fixture(autouse=True)
def hermetic_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may read the developer's ~/.ssh (config, keys, known_hosts) or ssh-agent."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def keygen(directory: Path, name: str, key_type: str = "ed25519") -> tuple[Path, bytes]:
    """A fresh key pair made by OpenSSH's ssh-keygen: (private key path, public blob)."""
    path = directory / name
    bits = ["-b", "2048"] if key_type == "rsa" else []
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, *bits, "-N", "", "-C", name, "-f", str(path)],
        check=True,
    )
    blob = base64.b64decode(path.with_suffix(".pub").read_text().split()[1])
    return path, blob


class FakeServerKey:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def asbytes(self) -> bytes:
        return self.blob


class FakeParamikoTransport:
    """Just enough of paramiko.Transport for the host-key check."""

    def __init__(self, blob: bytes) -> None:
        self.key = FakeServerKey(blob)

    def get_remote_server_key(self) -> FakeServerKey:
        return self.key


def known_line(name: str, blob: bytes) -> str:
    return f"{name} {blob_key_type(blob)} {base64.b64encode(blob).decode()}\n"


# --------------------------------------------------------------------------- fingerprints


@needs_keygen
@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_fingerprint_is_what_ssh_keygen_prints(tmp_path: Path, key_type: str) -> None:
    path, blob = keygen(tmp_path, f"k_{key_type}", key_type)
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(path.with_suffix(".pub"))], check=True, capture_output=True, text=True
    ).stdout
    assert fingerprint(blob) == out.split()[1]
    assert fingerprint(blob).startswith("SHA256:") and not fingerprint(blob).endswith("=")


def test_known_hosts_names_non_default_ports_in_brackets() -> None:
    assert hostkey_name("Fritz.Example", 22) == "fritz.example"
    assert hostkey_name("10.0.0.5", 2222) == "[10.0.0.5]:2222"


# --------------------------------------------------------------------------- known_hosts parsing


@needs_keygen
def test_known_hosts_finds_plain_bracketed_wildcard_and_hashed_entries(tmp_path: Path) -> None:
    _, a = keygen(tmp_path, "a")
    _, b = keygen(tmp_path, "b")
    _, c = keygen(tmp_path, "c")
    plain = tmp_path / "plain"
    plain.write_text(
        "# a comment\n\n"
        + known_line("fritz.example,10.0.0.5", a)
        + "garbage line\n"
        + known_line("[10.0.0.6]:2222", b)
        + known_line("*.lab.example,!secret.lab.example", c)
    )
    known = KnownHosts.load(str(plain))
    assert [k.blob for k in known.lookup("10.0.0.5")] == [a]
    assert [k.blob for k in known.lookup("FRITZ.example")] == [a]
    assert [k.line for k in known.lookup("[10.0.0.6]:2222")] == [5]
    assert known.lookup("10.0.0.6") == []
    assert [k.blob for k in known.lookup("web.lab.example")] == [c]
    assert known.lookup("secret.lab.example") == []

    hashed = tmp_path / "hashed"  # ssh-keygen -H refuses files with wildcards: hash a plain one
    hashed.write_text(known_line("fritz.example,10.0.0.5", a) + known_line("[10.0.0.6]:2222", b))
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert "|1|" in hashed.read_text() and "10.0.0.6" not in hashed.read_text()
    known = KnownHosts.load(str(hashed))
    assert [k.blob for k in known.lookup("[10.0.0.6]:2222")] == [b]
    assert [k.blob for k in known.lookup("fritz.example")] == [a]
    assert known.lookup("[10.0.0.6]:2223") == []


def test_missing_known_hosts_file_is_empty(tmp_path: Path) -> None:
    assert KnownHosts.load(str(tmp_path / "nope")).lookup("x") == []


@needs_keygen
def test_appended_hashed_entry_is_found_by_ssh_keygen(tmp_path: Path) -> None:
    _, a = keygen(tmp_path, "a")
    path = tmp_path / "sub" / "known_hosts"
    known = KnownHosts.load(str(path))
    entry = known.append("[127.0.0.1]:2200", "ssh-ed25519", a, hashed=True)
    assert entry.line == 1 and known.lookup("[127.0.0.1]:2200") == [entry]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    found = subprocess.run(["ssh-keygen", "-F", "[127.0.0.1]:2200", "-f", str(path)], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr


# --------------------------------------------------------------------------- host-key verdicts


@needs_keygen
def test_unknown_host_key_is_refused_with_fingerprint_and_how_to_verify(tmp_path: Path) -> None:
    _, offered = keygen(tmp_path, "offered")
    check = check_host_key([], offered)
    assert check.verdict == "unknown" and not check.trusted
    error = hostkey_error("fritz", "10.0.0.5", 2222, offered, check, "/root/.ssh/known_hosts")
    assert error.kind == "hostkey" and error.host == "fritz"
    assert "fritz (10.0.0.5:2222)" in error.message
    assert f"ssh-ed25519 {fingerprint(offered)}" in error.message
    assert "ssh-keyscan -p 2222 10.0.0.5 | ssh-keygen -lf -" in error.hint
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in error.hint
    assert "--accept-new-host-keys" in error.hint and "/root/.ssh/known_hosts" in error.hint


@needs_keygen
def test_changed_host_key_is_refused_with_both_fingerprints_and_the_stored_line(tmp_path: Path) -> None:
    _, old = keygen(tmp_path, "old")
    _, new = keygen(tmp_path, "new")
    path = tmp_path / "known_hosts"
    path.write_text("# first\n" + known_line("[10.0.0.5]:2222", old))
    entries = KnownHosts.load(str(path)).lookup("[10.0.0.5]:2222")
    check = check_host_key(entries, new)
    assert check.verdict == "changed"
    error = hostkey_error("fritz", "10.0.0.5", 2222, new, check, str(path))
    assert "CHANGED" in error.message and "man-in-the-middle" in error.message
    assert fingerprint(old) in error.message and fingerprint(new) in error.message
    assert f"{path}:2" in error.message
    assert "ssh-keygen -R" in error.hint


@needs_keygen
def test_known_host_key_is_accepted_and_revoked_or_other_type_refused(tmp_path: Path) -> None:
    _, ed = keygen(tmp_path, "ed")
    _, ec = keygen(tmp_path, "ec", "ecdsa")
    path = tmp_path / "known_hosts"
    path.write_text(known_line("h", ed))
    entries = KnownHosts.load(str(path)).lookup("h")
    assert check_host_key(entries, ed).trusted
    assert check_host_key(entries, ec).verdict == "other-type"
    path.write_text(known_line("h", ed) + "@revoked " + known_line("h", ed))
    assert check_host_key(KnownHosts.load(str(path)).lookup("h"), ed).verdict == "revoked"


@needs_keygen
def test_accept_new_records_unknown_key_once_but_never_replaces_a_changed_one(tmp_path: Path) -> None:
    _, key = keygen(tmp_path, "key")
    _, other = keygen(tmp_path, "other")
    known = tmp_path / "known_hosts"
    host = Host(name="fritz", address="10.0.0.5", port=2222)

    config = tmp_path / "empty_config"
    config.write_text("")
    strict = SSHTransport(ssh_config=str(config), known_hosts=[str(known)])
    with pytest.raises(TransportError) as refused:
        strict._verify_host_key(FakeParamikoTransport(key), strict.resolve(host))  # type: ignore[arg-type]
    assert refused.value.kind == "hostkey" and not known.exists()

    accepting = SSHTransport(ssh_config=str(config), known_hosts=[str(known)], accept_new=True)
    accepting._verify_host_key(FakeParamikoTransport(key), accepting.resolve(host))  # type: ignore[arg-type]
    assert known.read_text() == known_line("[10.0.0.5]:2222", key)

    later = SSHTransport(ssh_config=str(config), known_hosts=[str(known)])
    later._verify_host_key(FakeParamikoTransport(key), later.resolve(host))  # type: ignore[arg-type]
    with pytest.raises(TransportError) as changed:
        accepting._verify_host_key(FakeParamikoTransport(other), accepting.resolve(host))  # type: ignore[arg-type]
    assert "CHANGED" in changed.value.message
    assert known.read_text().count("\n") == 1


@needs_keygen
def test_known_hosts_files_are_parsed_once_per_transport(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, key = keygen(tmp_path, "key")
    known = tmp_path / "known_hosts"
    known.write_text(known_line("10.0.0.1", key) + known_line("10.0.0.2", key))
    loads: list[str] = []
    real_load = KnownHosts.load

    def counting_load(path: str) -> KnownHosts:
        loads.append(path)
        return real_load(path)

    monkeypatch.setattr(KnownHosts, "load", staticmethod(counting_load))
    transport = SSHTransport(known_hosts=[str(known), str(tmp_path / "global")])
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.1"):
        target = transport.resolve(Host(name=address, address=address))
        transport._verify_host_key(FakeParamikoTransport(key), target)  # type: ignore[arg-type]
    assert sorted(loads) == sorted([str(known), str(tmp_path / "global")])


# --------------------------------------------------------------------------- quoting and sudo


@pytest.mark.parametrize("value", NASTY)
def test_quoted_values_survive_a_shell_round_trip(value: str) -> None:
    assert shlex.split(f"printf %s {quote(value)}") == ["printf", "%s", value]
    out = subprocess.run(["sh", "-c", f"printf %s {quote(value)}"], capture_output=True, check=True).stdout
    assert out.decode() == value


@pytest.mark.parametrize("value", NASTY)
def test_sudo_wraps_the_whole_command_line_as_one_word(value: str) -> None:
    command = f"printf %s {quote(value)} | cat > /dev/null; echo done"
    assert shlex.split(sudo_command(command)) == ["sudo", "-n", "--", "sh", "-c", command]


def test_sudo_refusals_are_recognised_but_command_failures_are_not() -> None:
    assert sudo_refusal(1, b"sudo: a password is required\n") == "sudo: a password is required"
    assert sudo_refusal(1, b"sudo: a terminal is required to read the password; ...\n")
    assert sudo_refusal(1, b"alice is not in the sudoers file.\n") is None  # not sudo's own prefix
    assert sudo_refusal(1, b"sudo: alice is not in the sudoers file.  This incident will be reported.\n")
    assert sudo_refusal(127, b"sh: 1: sudo: not found\n")
    assert sudo_refusal(0, b"sudo: a password is required\n") is None
    chdir = b"Could not chdir to home directory /home/x: No such file or directory\n"
    assert sudo_refusal(1, chdir + b"sudo: a password is required\n") == "sudo: a password is required"
    assert sudo_refusal(1, b"sudo: a password is required\ngrep: no such file\n") is None
    assert sudo_refusal(3, b"") is None


def test_run_result_is_ok_only_on_exit_zero() -> None:
    assert RunResult("h", "true", 0, b"", b"", 0.1).ok
    assert not RunResult("h", "false", 1, b"", b"", 0.1).ok


# --------------------------------------------------------------------------- ssh_config


def lab_config(tmp_path: Path) -> Path:
    config = tmp_path / "ssh_config"
    config.write_text(
        f"""
Host fritz
    HostName 127.0.0.1
    Port 2201
    User admin
    IdentityFile {tmp_path}/lab_key
    IdentitiesOnly yes
    UserKnownHostsFile {tmp_path}/lab_known_hosts
    ConnectTimeout 3

Host franz
    Port 2202

Host behind
    ProxyJump ops@bastion.example:2022
    HostKeyAlias behind-alias

Host bastion.example
    User jumper
"""
    )
    return config


def test_ssh_config_entry_for_the_host_name_redirects_address_user_and_key(tmp_path: Path) -> None:
    transport = SSHTransport(ssh_config=str(lab_config(tmp_path)), known_hosts=[str(tmp_path / "kh")])
    target = transport.resolve(Host(name="fritz", address="fritz.example.org", port=22, user="root"))
    assert (target.address, target.port, target.user) == ("127.0.0.1", 2201, "admin")
    assert target.identity_files == (f"{tmp_path}/lab_key",)
    assert target.identities_only
    assert target.hostkey_name == "[127.0.0.1]:2201"
    assert target.known_hosts == (f"{tmp_path}/lab_known_hosts", "/etc/ssh/ssh_known_hosts")
    assert target.record_to == f"{tmp_path}/lab_known_hosts"
    assert target.connect_timeout == 3.0


def test_hosts_without_a_config_entry_use_the_inventory(tmp_path: Path) -> None:
    transport = SSHTransport(ssh_config=str(lab_config(tmp_path)), known_hosts=[str(tmp_path / "kh")])
    target = transport.resolve(Host(name="nietzsche", address="10.0.0.9", port=2222, user="deploy"))
    assert (target.address, target.port, target.user) == ("10.0.0.9", 2222, "deploy")
    assert target.known_hosts == (str(tmp_path / "kh"),) and target.record_to == str(tmp_path / "kh")
    assert target.identity_files == () and not target.identities_only
    assert target.connect_timeout == transport.connect_timeout
    partial = transport.resolve(Host(name="franz", address="10.0.0.8", user="deploy"))
    assert (partial.address, partial.port, partial.user) == ("10.0.0.8", 2202, "deploy")


def test_proxy_jump_and_host_key_alias_come_from_the_config(tmp_path: Path) -> None:
    transport = SSHTransport(ssh_config=str(lab_config(tmp_path)))
    target = transport.resolve(Host(name="behind", address="192.168.1.4"))
    assert target.proxy_jump == "ops@bastion.example:2022"
    assert target.hostkey_name == "behind-alias"
    assert parse_jump("ops@bastion.example:2022") == ("ops", "bastion.example", 2022)
    assert parse_jump("bastion") == (None, "bastion", None)
    assert parse_jump("ssh://[::1]:2200") == (None, "::1", 2200)


def test_match_exec_in_the_config_still_works(tmp_path: Path) -> None:
    """paramiko is imported without invoke; a config using `Match exec` brings it back."""
    config = tmp_path / "ssh_config"
    config.write_text('Match host fritz exec "test -d /"\n  User from-exec\nMatch host fritz exec "false"\n  Port 9\n')
    code = (
        "from fleet.transport.ssh import SSHTransport; from fleet.model import Host; "
        f"t = SSHTransport(ssh_config={str(config)!r}).resolve(Host(name='fritz', address='a')); "
        "print(t.user, t.port)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,  # invoke.run mirrors stdin
        cwd=Path(__file__).parents[2],
    ).stdout
    assert out.split() == ["from-exec", "22"]


def test_importing_the_transport_does_not_import_invoke() -> None:
    code = "import sys, fleet.transport.ssh, paramiko; assert 'invoke' not in sys.modules, 'invoke imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_a_broken_config_value_is_that_hosts_failure_not_a_crash(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host fritz\n  Port twenty-two\n")
    with pytest.raises(TransportError) as broken:
        SSHTransport(ssh_config=str(config)).run(Host(name="fritz", address="a"), "true")
    assert broken.value.kind == "protocol" and "twenty-two" in broken.value.message


def test_a_missing_explicit_ssh_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        SSHTransport(ssh_config=str(tmp_path / "nope"))
    assert missing.value.file == str(tmp_path / "nope")


def test_default_config_and_known_hosts_come_from_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert SSHTransport().ssh_config_path is None
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host fritz\n  User admin\n")
    transport = SSHTransport()
    assert transport.ssh_config_path == str(tmp_path / ".ssh" / "config")
    assert transport.known_hosts == (str(tmp_path / ".ssh" / "known_hosts"), "/etc/ssh/ssh_known_hosts")
    assert transport.resolve(Host(name="fritz", address="a")).user == "admin"


# --------------------------------------------------------------------------- run_many


HOSTS = [Host(name=n, address=f"10.0.0.{i}") for i, n in enumerate(["ok", "refused", "buggy", "slow"], 1)]


def fake_run(self: SSHTransport, host: Host, command: str, **kw: object) -> RunResult:
    if host.name == "refused":
        raise TransportError(host.name, "unreachable", "cannot reach refused: connection refused")
    if host.name == "buggy":
        raise ValueError("boom")
    return RunResult(host.name, command, 0, f"{command} on {host.name}".encode(), b"", 0.01)


def test_run_many_gives_every_host_a_value_in_inventory_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SSHTransport, "run", fake_run)
    seen: list[tuple[str, str, str]] = []
    outcomes = SSHTransport().run_many(
        HOSTS,
        lambda h: f"echo {h.name}",
        forks=2,
        on_done=lambda name, out: seen.append((name, type(out).__name__, threading.current_thread().name)),
    )
    assert list(outcomes) == ["ok", "refused", "buggy", "slow"]
    assert isinstance(outcomes["ok"], RunResult) and outcomes["ok"].stdout == b"echo ok on ok"
    refused = outcomes["refused"]
    assert isinstance(refused, TransportError) and refused.kind == "unreachable"
    buggy = outcomes["buggy"]
    assert isinstance(buggy, TransportError) and buggy.kind == "protocol" and "ValueError: boom" in buggy.message
    assert sorted(name for name, _, _ in seen) == sorted(outcomes)
    assert {thread for _, _, thread in seen} == {threading.current_thread().name}


def test_run_many_turns_a_failing_command_builder_into_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SSHTransport, "run", fake_run)

    def command_for(host: Host) -> str:
        if host.name == "slow":
            raise KeyError("no script for slow")
        return "true"

    outcomes = SSHTransport().run_many(HOSTS, command_for)
    slow = outcomes["slow"]
    assert isinstance(slow, TransportError) and slow.kind == "protocol" and "no script" in slow.message
    assert isinstance(outcomes["ok"], RunResult)


def test_run_many_bounds_parallelism_by_forks(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    running, peak = 0, 0
    gate = threading.Event()

    def slow_run(self: SSHTransport, host: Host, command: str, **kw: object) -> RunResult:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        gate.wait(0.05)
        with lock:
            running -= 1
        return RunResult(host.name, command, 0, b"", b"", 0.0)

    monkeypatch.setattr(SSHTransport, "run", slow_run)
    hosts = [Host(name=f"h{i}", address="x") for i in range(12)]
    outcomes = SSHTransport().run_many(hosts, "true", forks=3)
    assert len(outcomes) == 12 and peak <= 3


def test_run_many_with_no_hosts_is_empty() -> None:
    assert SSHTransport().run_many([], "true") == {}


def test_the_deadline_watchdog_fires_once_and_disarmed_actions_never() -> None:
    deadlines = tr._Deadlines()
    fired: list[str] = []
    done = threading.Event()

    def fire_soon() -> None:
        fired.append("soon")
        done.set()

    late = deadlines.arm(time.monotonic() + 60, lambda: fired.append("late"))
    soon = deadlines.arm(time.monotonic() + 0.05, fire_soon)
    assert done.wait(5)  # a hang guard only (100 times the 0.05 s deadline), not a measurement
    assert not deadlines.disarm(soon)  # already ran
    assert deadlines.disarm(late)
    deadlines.stop()
    again = threading.Event()
    deadlines.arm(time.monotonic(), again.set)  # a stopped watchdog restarts on demand
    assert again.wait(5)  # a hang guard only: the deadline has already passed
    deadlines.stop()
    assert fired == ["soon"]
