"""The scripted host the unit tests use (fleet.transport.fake): what it records, how it answers,
what it runs for real, and that it is a Transport the collector and the executor can take."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from fleet import remote
from fleet.collect.collector import collect
from fleet.errors import TransportError
from fleet.model import Host, HostError
from fleet.transport.fake import Call, FakeTransport
from fleet.transport.protocol import RunResult, Transport

FRITZ = Host(name="fritz", address="10.0.0.5")
FRANZ = Host(name="franz", address="10.0.0.6", user="deploy", sudo=True)
HOSTS = [FRITZ, FRANZ, Host(name="freud", address="10.0.0.7")]


def stdout(result: RunResult) -> str:
    return result.stdout.decode()


# ------------------------------------------------------------------ recording


def test_every_call_is_recorded_with_host_command_stdin_sudo_timeout_thread_and_tag() -> None:
    tags = threading.local()
    fake = FakeTransport(tag=lambda: getattr(tags, "step", None))
    tags.step = "fritz:write-unit"
    fake.run(FRITZ, "cat > /etc/x", stdin=b"text", timeout=5)
    tags.step = None

    def elsewhere() -> None:
        fake.run(FRANZ, "true")

    worker = threading.Thread(target=elsewhere, name="another-thread")
    worker.start()
    worker.join()
    first, second = fake.calls
    assert first == Call(0, "fritz", "cat > /etc/x", b"text", False, 5, threading.current_thread().name,
                         "fritz:write-unit")
    assert (second.seq, second.host, second.stdin, second.thread, second.tag) == (1, "franz", None,
                                                                                    "another-thread", None)
    assert second.sudo is True, "the host's own sudo setting when the caller does not say"
    assert fake.run(FRANZ, "id", sudo=False) and fake.calls[-1].sudo is False
    assert fake.commands() == ["cat > /etc/x", "true", "id"]
    assert fake.commands("franz") == ["true", "id"] == [c.command for c in fake.on("franz")]


# ------------------------------------------------------------------ answering


def test_an_unscripted_command_answers_ok() -> None:
    result = FakeTransport().run(FRITZ, "systemctl daemon-reload")
    assert result == RunResult("fritz", "systemctl daemon-reload", 0, b"@@ok\n", b"", 0.0)


def test_canned_replies_match_by_prefix_or_regex_per_host_and_a_later_rule_wins() -> None:
    fake = FakeTransport()
    fake.respond("systemctl is-active", "active\n")
    fake.respond(re.compile(r"is-active .*redis"), "failed\n", exit_code=3)
    fake.respond("systemctl is-active", "inactive\n", host="franz")
    fake.respond("cat", stderr="cat: /nope: No such file or directory\n", exit_code=1)
    assert stdout(fake.run(FRITZ, "systemctl is-active web")) == "active\n"
    redis = fake.run(FRITZ, "systemctl is-active redis-server")
    assert (stdout(redis), redis.exit_code, redis.ok) == ("failed\n", 3, False)
    assert stdout(fake.run(FRANZ, "systemctl is-active redis-server")) == "inactive\n"
    assert stdout(fake.run(FRITZ, "echo systemctl is-active")) == "@@ok\n", "a str pattern is a prefix"
    assert fake.run(FRITZ, "cat /nope").stderr == b"cat: /nope: No such file or directory\n"


def test_the_hook_runs_first_and_may_answer_raise_or_pass() -> None:
    fake = FakeTransport()
    fake.respond("", "scripted\n")
    fake.fail("franz")

    def hook(call: Call) -> RunResult | None:
        if call.command == "killed":
            return call.reply(exit_code=-1)
        if call.command == "crash":
            raise KeyboardInterrupt
        return None

    fake.hook = hook
    killed = fake.run(FRANZ, "killed")
    assert killed.exit_code == -1 and killed.exit_text.startswith("no exit status"), "before the host's failure"
    with pytest.raises(KeyboardInterrupt):
        fake.run(FRITZ, "crash")
    assert stdout(fake.run(FRITZ, "other")) == "scripted\n"
    assert [c.command for c in fake.calls] == ["killed", "crash", "other"], "raising calls are recorded too"


def test_a_failing_host_raises_its_transport_error_until_it_recovers() -> None:
    fake = FakeTransport()
    fake.fail("fritz")
    fake.fail("franz", TransportError("franz", "hostkey", "host key of franz has CHANGED", hint="verify it"))
    with pytest.raises(TransportError) as refused:
        fake.run(FRITZ, "true")
    assert (refused.value.host, refused.value.kind) == ("fritz", "unreachable")
    assert "connection refused" in refused.value.message
    with pytest.raises(TransportError) as changed:
        fake.run(FRANZ, "true")
    assert (changed.value.kind, changed.value.message, changed.value.hint) == (
        "hostkey", "host key of franz has CHANGED", "verify it")
    assert fake.run(HOSTS[2], "true").ok, "other hosts answer"
    fake.recover("fritz")
    assert fake.run(FRITZ, "true").ok


# ------------------------------------------------------------------ running for real


def test_executed_commands_run_in_the_hosts_own_directory_with_paths_rewritten(tmp_path: Path) -> None:
    fake = FakeTransport(root=tmp_path, rewrite={"/FLEET-STATE": "state"})
    fake.execute(re.compile(r"/FLEET-STATE/"))
    wrote = fake.run(FRITZ, "mkdir -p /FLEET-STATE && cat > /FLEET-STATE/f && echo done", stdin=b"from stdin")
    assert wrote.ok and wrote.stdout == b"done\n" and wrote.command.startswith("mkdir -p /FLEET-STATE")
    assert (tmp_path / "fritz" / "state" / "f").read_bytes() == b"from stdin"
    assert not (tmp_path / "franz").exists()
    failed = fake.run(FRANZ, "cat /FLEET-STATE/f")
    assert failed.exit_code == 1 and b"No such file" in failed.stderr, "each host has its own directory"
    assert fake.run(FRANZ, "cat /etc/hostname").stdout == b"@@ok\n", "only matching commands run"


def test_a_lock_taken_for_real_is_refused_to_the_next_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "STATE", "/FLEET-STATE")  # never this machine's /var/lib/fleet
    monkeypatch.setattr(remote, "LOCK", "/FLEET-STATE/lock")
    fake = FakeTransport(root=tmp_path, rewrite={"/FLEET-STATE": "state"})
    fake.execute(re.compile(re.escape("/FLEET-STATE/lock")))
    assert fake.run(FRITZ, remote.acquire_lock('{"token": "a"}')).stdout == b"@@locked\n"
    refused = fake.run(FRITZ, remote.acquire_lock('{"token": "b"}')).stdout.decode()
    assert refused.startswith("@@held\n") and '"token": "a"' in refused
    assert fake.sh("franz", remote.acquire_lock('{"token": "b"}')).stdout == b"@@locked\n", "another host"
    assert len(fake.calls) == 2, "sh() sets a host up without being recorded"


def test_running_for_real_needs_a_root() -> None:
    with pytest.raises(ValueError, match="root"):
        FakeTransport().execute("mkdir")


def test_a_command_run_for_real_that_hangs_is_a_timeout(tmp_path: Path) -> None:
    fake = FakeTransport(root=tmp_path)
    fake.execute("sleep")
    with pytest.raises(TransportError) as hung:
        fake.run(FRITZ, "sleep 5", timeout=0.2)
    assert hung.value.kind == "timeout" and hung.value.host == "fritz"


# ------------------------------------------------------------------ a Transport


def test_run_many_gives_every_host_a_value_in_host_order_from_worker_threads() -> None:
    fake = FakeTransport()
    fake.fail("franz")
    fake.respond("echo", "hello\n", host="freud")
    done: list[tuple[str, str]] = []
    outcomes = fake.run_many(HOSTS, lambda h: f"echo {h.name}", forks=2, sudo=False, timeout=7,
                             on_done=lambda name, outcome: done.append((name, threading.current_thread().name)))
    assert list(outcomes) == ["fritz", "franz", "freud"]
    fritz, franz, freud = outcomes.values()
    assert isinstance(fritz, RunResult) and fritz.stdout == b"@@ok\n" and fritz.command == "echo fritz"
    assert isinstance(franz, TransportError) and franz.kind == "unreachable"
    assert isinstance(freud, RunResult) and freud.stdout == b"hello\n"
    assert sorted(name for name, _ in done) == sorted(outcomes)
    assert {thread for _, thread in done} == {threading.current_thread().name}, "on_done in the calling thread"
    assert all(c.thread.startswith("fleet-fake") for c in fake.calls), "the commands in the pool's threads"
    assert {(c.sudo, c.timeout) for c in fake.calls} == {(False, 7)}


def test_the_collector_takes_it_and_every_host_becomes_a_value() -> None:
    from observed import example

    desired = example()
    fake = FakeTransport()
    fake.fail("fritz")
    fake.respond("", "not the collection output\n")
    transport: Transport = fake
    with transport:
        results = collect(desired, transport)
    assert fake.closed == 1
    assert set(results) == {h.name for h in desired.hosts}
    assert all(isinstance(r, HostError) for r in results.values())
    fritz = results["fritz"]
    assert isinstance(fritz, HostError) and fritz.kind == "unreachable"
    assert {r.kind for name, r in results.items() if name != "fritz" and isinstance(r, HostError)} == {"parse"}
    assert len(fake.calls) == len(desired.hosts), "one round trip per host"
