"""Driving the real `fleet` command against the lab, and shaping lab hosts by hand.

The hand-made changes here play the operator who "tinkers" on a host; fleet then has to see
them.  Everything goes through the real OpenSSH client or the real `fleet` console script.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def fleet_argv() -> list[str]:
    """The `fleet` console script of the Python running the tests (the checkout's venv), never the
    first `fleet` on PATH: that may be another checkout's install, and the tests would test it."""
    exe = Path(sys.executable).with_name("fleet")
    assert exe.is_file(), f"no `fleet` console script next to {sys.executable}: run `pip install -e .` there"
    return [str(exe)]


def fleet(lab: Any, *args: str, state_dir: Path | None = None, timeout: float = 180,
          directory: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`fleet --lab --dir REPO --state-dir LAB_STATE ARGS…`, captured."""
    argv = [*fleet_argv(), "--lab", "--dir", str(directory or REPO), "--state-dir",
            str(state_dir or lab.state_dir), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


WEB_HEALTH = 'health = { http = "http://127.0.0.1:3000/health", timeout = 30 }'
STREAMING_HEALTH = 'health = { http = "http://127.0.0.1:4000/api/v1/streaming/health", timeout = 30 }'


def with_health_timeout(root: Path, seconds: int, *checks: str) -> Path:
    """The lab's desired state in ROOT (returned) with these health checks (lines of
    desired_state.toml) given another timeout: nothing on the hosts depends on it, it is apply's
    gate alone."""
    shutil.copytree(REPO / "hosts", root / "hosts")
    text = (REPO / "desired_state.toml").read_text()
    for check in checks:
        assert text.count(check) == 1, f"desired_state.toml no longer declares {check!r}: update helpers.py"
        text = text.replace(check, check.replace("timeout = 30", f"timeout = {seconds}"))
    (root / "desired_state.toml").write_text(text)
    return root


def fleet_json(lab: Any, *args: str, ok_codes: tuple[int, ...] = (0,), **kw: Any) -> dict[str, Any]:
    done = fleet(lab, *args, "--json", **kw)
    assert done.returncode in ok_codes, f"fleet {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def install_unit(lab: Any, host: str, unit: str, text: str, *, start: bool = True, enable: bool = True) -> None:
    """Write a unit by hand into /etc/systemd/system, as an operator would."""
    lab.ssh(host, f"cat > /etc/systemd/system/{unit}", user="root", input=text)
    cmds = ["systemctl daemon-reload"]
    if enable:
        cmds.append(f"systemctl enable --quiet {unit}")
    if start:
        cmds.append(f"systemctl start {unit}")
    lab.ssh(host, " && ".join(cmds), user="root")


def sidekiq_unit(args: str, description: str = "hand-made sidekiq") -> str:
    return (
        f"[Unit]\nDescription={description}\n\n[Service]\nType=simple\nUser=mastodon\n"
        "WorkingDirectory=/home/mastodon/live\nEnvironment=\"RAILS_ENV=production\" \"DB_POOL=25\"\n"
        f"ExecStart=/home/mastodon/.rbenv/shims/bundle exec sidekiq {args}\nRestart=always\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


STOP_MASTODON = "systemctl stop 'mastodon-*' 2>/dev/null; true"


def reset_host(lab: Any, host: str) -> None:
    """Back to bare: no Mastodon units (stopped, disabled, files gone), no env file, no lock,
    databases stopped and disabled.  (`systemctl disable` takes no globs: name the units.)"""
    lab.ssh(host, STOP_MASTODON + "; "
                  "units=$(cd /etc/systemd/system && ls -d mastodon-*.service 2>/dev/null); "
                  "[ -z \"$units\" ] || systemctl disable --quiet $units; "
                  "systemctl disable --now --quiet postgresql redis-server 2>/dev/null; "
                  "rm -rf /etc/systemd/system/mastodon-* /home/mastodon/live/.env.production "
                  "/home/mastodon/live/STANDIN_FAIL /var/lib/fleet/lock; "
                  "systemctl daemon-reload; systemctl reset-failed", user="root", check=False)
    left = lab.ssh(host, "systemctl list-units --no-legend --plain 'mastodon-*'", user="root").stdout.strip()
    assert not left, f"{host} still runs {left}"


def reset_all(lab: Any) -> None:
    """Every host back to bare, the hosts side by side (each host's reset is its own: one SSH
    session per host, as the tests' lab.ssh runs OpenSSH).  Every host's Mastodon stops first,
    while every Redis still runs, so each Sidekiq leaves `processes` as it does in production
    (one host's Redis stopping before another host's Sidekiq would leave that process behind)."""
    with ThreadPoolExecutor(max_workers=len(lab.names)) as pool:
        list(pool.map(lambda h: lab.ssh(h, STOP_MASTODON, user="root", check=False), lab.names))
        list(pool.map(lambda h: reset_host(lab, h), lab.names))  # re-raises the first host's failure


def converge(lab: Any) -> None:
    """The example converged (REPO's desired state, the session's state dir).  A lab the previous
    module left converged — fleet's plan is empty — is used as it is, after removing any apply lock
    and injected failure left on a host; anything else is reset to bare and applied (--settle 1).
    For tests whose facts start from a converged fleet, not from how it got there."""
    for h in lab.names:
        lab.ssh(h, "rm -rf /home/mastodon/live/STANDIN_FAIL /var/lib/fleet/lock", user="root", check=False)
    if fleet(lab, "plan").returncode != 0:
        reset_all(lab)
        done = fleet(lab, "apply", "--yes", "--settle", "1", timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr


def wait_for_ssh(lab: Any, host: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.ssh(host, "true", check=False, timeout=10).returncode == 0:
            return
        time.sleep(0.3)
    raise AssertionError(f"{host} did not answer SSH again within {timeout}s")


@contextlib.contextmanager
def sshd_stopped(lab: Any, host: str, *, then: str = "") -> Iterator[None]:
    """sshd on a lab host stopped for the length of the block (ssh.service and ssh.socket; `then`:
    a shell command run right after, in the same shell), and started again when the block ends.
    Both are done from inside the host's namespaces (`inside`), not over SSH and not by a timer:
    a timer set to bring sshd back after N seconds did so while a loaded machine was still
    planning, and the test found the host reachable.  Sessions already open survive the stop."""
    stop = "systemctl stop ssh.service ssh.socket 2>/dev/null; ! systemctl is-active --quiet ssh.service"
    done = inside(host, "sh", "-c", f"{stop} && {then}" if then else stop)
    assert done is not None and done.returncode == 0, f"could not stop sshd on {host}: {done}"
    try:
        yield
    finally:
        back = inside(host, "systemctl", "start", "ssh.service")
        assert back is not None and back.returncode == 0, f"could not start sshd on {host} again: {back}"
        wait_for_ssh(lab, host)


def container_pid1(host: str) -> int | None:
    """PID (on this machine) of a lab host's systemd, the child of its systemd-nspawn; None if it
    does not run.  Entering its namespaces reaches the host even when its sshd is gone."""
    found = subprocess.run(["pgrep", "-f", f"systemd-nspawn.*-M {host} "], capture_output=True, text=True,
                           timeout=10)
    for nspawn in found.stdout.split():
        child = subprocess.run(["pgrep", "-P", nspawn], capture_output=True, text=True, timeout=10)
        if child.stdout.split():
            return int(child.stdout.split()[0])
    return None


def inside(host: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
    """Run a command inside a lab host's namespaces (no SSH involved); None if the host is down."""
    pid = container_pid1(host)
    if pid is None:
        return None
    return subprocess.run(["nsenter", "-t", str(pid), "-a", *argv], capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------ Sidekiq's Redis on the lab
# The lab's Redis wants the lab's password (STATE/lab/redis-password, made by `fleet lab up`).  It
# reaches redis-cli on the host on stdin, never in a command line: `ps` on the host must not show it.

REDIS_HOST = "nietzsche"  # where desired_state.toml declares the Redis


def lab_redis_password(lab: Any) -> str:
    return (lab.lab_dir / "redis-password").read_text().strip()


def redis_cli(lab: Any, commands: list[list[str]], *, host: str = REDIS_HOST) -> list[str]:
    """Run redis-cli commands against the lab's Redis on `host`, one reply line each (--csv)."""
    lines = "".join(" ".join(_redis_word(w) for w in c) + "\n" for c in commands)
    done = lab.ssh(host, "read -r REDISCLI_AUTH && export REDISCLI_AUTH && redis-cli --csv", user="root",
                   input=lab_redis_password(lab) + "\n" + lines)
    replies: list[str] = done.stdout.splitlines()
    assert len(replies) == len(commands) and not any(r.startswith("ERROR,") for r in replies), done.stdout
    return replies


def _redis_word(word: str) -> str:
    """One argument of a redis-cli input line: double-quoted, with \\ and " escaped."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def enqueue(lab: Any, queue: str, count: int, *, enqueued_at: float, job_class: str = "ActionMailer::MailDeliveryJob",
            sidekiq8: bool = False, host: str = REDIS_HOST) -> list[str]:
    """Push `count` jobs onto queue:QUEUE as Sidekiq's client does (SADD queues, LPUSH of the job JSON
    with class, args, jid, queue, retry, created_at, enqueued_at), enqueued at `enqueued_at` (epoch
    seconds): a float of seconds as Sidekiq 7 writes it, or integer milliseconds (`sidekiq8`).
    Returns the jids, oldest first."""
    import secrets

    jids = [secrets.token_hex(12) for _ in range(count)]
    stamp: float | int = int(enqueued_at * 1000) if sidekiq8 else float(enqueued_at)
    jobs = [json.dumps({"retry": True, "queue": queue, "args": [n], "class": job_class, "jid": jid,
                        "created_at": stamp, "enqueued_at": stamp}, separators=(",", ":"))
            for n, jid in enumerate(jids)]
    redis_cli(lab, [["SADD", "queues", queue], ["LPUSH", f"queue:{queue}", *jobs]], host=host)
    return jids


# ------------------------------------------------------------------ other checkouts, the hosts' history

HISTORY = "/var/lib/fleet/history.jsonl"


def checkout_state(lab: Any, dest: Path) -> Path:
    """The state directory of another checkout of the same fleet: the lab's access (keys,
    ssh_config, known_hosts) and nothing else — no journal, as after a fresh clone."""
    labdir = dest / "lab"
    shutil.copytree(lab.lab_dir, labdir)
    (labdir / "ssh_config").write_text((labdir / "ssh_config").read_text().replace(str(lab.lab_dir), str(labdir)))
    record = json.loads((labdir / "lab.json").read_text())
    record["ssh_config"] = str(labdir / "ssh_config")
    record["known_hosts"] = str(labdir / "known_hosts")
    (labdir / "lab.json").write_text(json.dumps(record))
    return dest


def host_history(lab: Any, host: str) -> str:
    """Every history file of `host`, oldest first, as one text."""
    done = lab.ssh(host, f"for f in {HISTORY}.4 {HISTORY}.3 {HISTORY}.2 {HISTORY}.1 {HISTORY}; do "
                         "[ -f \"$f\" ] && cat -- \"$f\"; done; true", user="root")
    return done.stdout


def recorded_twice(text: str) -> list[tuple[str, str, str]]:
    """(run, step, kind) of every record that appears more than once in a host's history."""
    seen: dict[tuple[str, str, str], int] = {}
    for line in text.splitlines():
        d = json.loads(line)
        key = (d["run"], d["step"], d["kind"])
        seen[key] = seen.get(key, 0) + 1
    return [k for k, n in seen.items() if n > 1]
