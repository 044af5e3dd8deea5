"""Secrets, hostile env values and host identity, on real lab hosts.

One full cycle runs once for the module (`cycle`): a copy of the shipped example whose env file
also carries values full of shell and dotenv syntax, a secrets file (0600) with a distinctive
random value for every "file" secret (some with hostile characters too), and every command an
operator would run — plan (text, --json, -o), show, apply of the saved plan, status --json,
re-plan, audit (text, md, json), history, diff, log, log --json, lock status.  Everything they
print is kept, and then:

* no clear secret (nor its full sha256) appears in any output, the plan file, any byte of the
  state directory (journal, WAL) or any snapshot, decompressed;
* on the hosts, the env file is 0600 mastodon:mastodon, and the running web service got every
  value exactly — read from /proc/PID/environ, i.e. as systemd's EnvironmentFile= parsed it;
* the inventory of the copy points at listeners on this machine: `--lab` must never connect
  to them, and fleet never writes the inventory it reads;
* with one host's known key swapped, `apply --yes` refuses before any command runs on any
  host, naming the host and the fingerprint it was offered, and nothing changes anywhere.

Run it under the machine-wide lab lock:
    flock -x /tmp/fleet-lab-session.lock \
        python -m pytest -q -p no:cacheprovider tests/integration/test_secrets_on_lab.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import socket
import subprocess
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import HISTORY, REPO, fleet, host_history, reset_all

from fleet import config
from fleet.envfile import fingerprint, render_value
from fleet.journal import Journal, journal_path
from fleet.transport.known_hosts import fingerprint as key_fingerprint

ENV = "/home/mastodon/live/.env.production"
SETTLE = ("--settle", "1")

# Values that break naive quoting: shell, dotenv and systemd syntax, one feature per key.
HOSTILE_VALUES = {
    "FLEET_TEST_QUOTES": "it's \"quoted\" 'twice'",
    "FLEET_TEST_DOLLAR": "$HOME ${PATH} $(id) \\$x",
    "FLEET_TEST_BACKTICK": "`id` and `reboot`",
    "FLEET_TEST_EQUALS": "a=b==c=",
    "FLEET_TEST_HASH": "# not a comment #x",
    "FLEET_TEST_UNICODE": "Zürich ✓ ß 日本\u00a0nbsp",
    "FLEET_TEST_BACKSLASH": "back\\slash \\n stays \\",
    "FLEET_TEST_PADDED": "  padded both ends  ",
    "FLEET_TEST_TAB": "tab\there",
    "FLEET_TEST_ALL": "it's \"$HOME\" `id` a=b #c ü \\ end",
    "FLEET_TEST_NEWLINE": "line one\nline two",
}
# A carriage return is refused by `fleet check` (no env file can carry it portably); see
# tests/unit/test_hostile_input.py.
BROKEN: dict[str, pytest.MarkDecorator] = {}

# Extra hostile characters for some of the secrets (their random core is what is looked for).
SECRET_SUFFIXES = [' "quoted" $HOME `id`', "", "=padding==", " p@ss #word ü", "", "/+\\back", "'$(reboot)'"]


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


class Canary:
    """Listeners on 127.0.0.1 that count connections; the copied inventory points at them."""

    def __init__(self, n: int) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            s.settimeout(0.1)
            self.socks.append(s)
        self.hits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def ports(self) -> list[int]:
        return [int(s.getsockname()[1]) for s in self.socks]

    def _loop(self) -> None:
        while not self._stop.is_set():
            for s in self.socks:
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                self.hits += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for s in self.socks:
            s.close()


@dataclass
class Cycle:
    lab: Any
    work: Path  # the copied desired_state.toml + hosts/
    secrets_file: Path
    plan_file: Path
    secret_values: dict[str, str]  # key -> clear value
    canary: Canary
    inventory_before: dict[str, bytes]
    runs: list[tuple[str, subprocess.CompletedProcess[str]]] = field(default_factory=list)

    def fleet(self, label: str, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 180,
              state_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run `fleet --lab --dir WORK --state-dir … ARGS`, keep what it printed under `label`."""
        done = fleet(self.lab, *args, directory=self.work, timeout=timeout, state_dir=state_dir)
        self.runs.append((label, done))
        assert done.returncode in ok, f"fleet {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def output(self, label: str) -> subprocess.CompletedProcess[str]:
        return next(done for lbl, done in self.runs if lbl == label)


def inventory(root: Path) -> dict[str, bytes]:
    files = [root / "desired_state.toml", *sorted((root / "hosts").glob("*"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def write_work_copy(work: Path, ports: list[int]) -> None:
    shutil.copy(REPO / "desired_state.toml", work / "desired_state.toml")
    shutil.copytree(REPO / "hosts", work / "hosts")
    for path, port in zip(sorted((work / "hosts").glob("*.toml")), ports, strict=True):
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(("address", "port"))]
        path.write_text("\n".join(lines) + f'\naddress = "127.0.0.1"\nport = {port}\n')
    text = (work / "desired_state.toml").read_text()
    anchor = 'S3_BUCKET = "hachyderm-media"\n'
    assert anchor in text
    text = text.replace(anchor, anchor + "".join(f"{k} = {toml_str(v)}\n" for k, v in HOSTILE_VALUES.items()))
    text += f"\n[policy.env]\nextra_keys = [{', '.join(toml_str(k) for k in HOSTILE_VALUES)}]\n"
    (work / "desired_state.toml").write_text(text)


def write_secrets(path: Path, keys: list[str]) -> dict[str, str]:
    values = {k: f"S3CR3T{secrets.token_hex(12)}{SECRET_SUFFIXES[i % len(SECRET_SUFFIXES)]}"
              for i, k in enumerate(keys)}
    path.write_text("[mastodon]\n" + "".join(f"{k} = {toml_str(v)}\n" for k, v in values.items()))
    path.chmod(0o600)
    return values


@pytest.fixture(scope="module")
def cycle(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cycle]:
    root = tmp_path_factory.mktemp("secrets")
    work = root / "fleet"
    work.mkdir()
    canary = Canary(4)
    try:
        write_work_copy(work, canary.ports)
        loaded = config.load(work / "desired_state.toml", work / "hosts")
        assert loaded.desired is not None and not loaded.errors, loaded.errors
        keys = [k for k, src in loaded.desired.env_files[0].sensitive if src.kind == "file"]
        assert len(keys) >= 5
        c = Cycle(lab=lab, work=work, secrets_file=root / "secrets.toml", plan_file=root / "plan.json",
                  secret_values=write_secrets(root / "secrets.toml", keys), canary=canary,
                  inventory_before=inventory(work))
        reset_all(lab)
        s = ("--secrets", str(c.secrets_file))
        c.fleet("plan", "plan", *s, ok=(2,))
        c.fleet("plan --json", "plan", "--json", *s, ok=(2,))
        c.fleet("plan -o", "plan", "-o", str(c.plan_file), *s, ok=(2,))
        c.fleet("show", "show", str(c.plan_file), ok=(2,))
        c.fleet("apply", "apply", str(c.plan_file), *s, *SETTLE, timeout=300)
        c.fleet("status --json", "status", "--json")
        c.fleet("re-plan", "plan", *s, ok=(0, 2))  # judged in its own test
        c.fleet("audit", "audit", ok=(0, 2))
        c.fleet("audit md", "audit", "--format", "md", ok=(0, 2))
        c.fleet("audit --json", "audit", "--json", ok=(0, 2))
        c.fleet("history", "history")
        first = json.loads(c.fleet("history --json", "history", "--json").stdout)["snapshots"][0]["id"]
        c.fleet("diff", "diff", first, ok=(2,))
        c.fleet("log", "log")
        c.fleet("log --json", "log", "--json")
        c.fleet("lock status", "lock", "status")
        c.fleet("lock status --json", "lock", "status", "--json")
        yield c
    finally:
        canary.close()
        reset_all(lab)


def secret_needles(value: str) -> dict[str, bytes]:
    """Every form in which a secret would be a leak: its random core, the value, as written in
    the env file, and its full unsalted sha256 (fleet only ever shows 8 hex digits)."""
    core = value[:30]  # "S3CR3T" + 24 random hex digits
    return {"core": core.encode(), "value": value.encode(), "rendered": render_value(value).encode(),
            "sha256": hashlib.sha256(value.encode()).hexdigest().encode(),
            "fingerprint": fingerprint(value).encode()}


def leaks(c: Cycle, where: str, data: bytes) -> list[str]:
    return [f"{key} ({form}) in {where}" for key, value in c.secret_values.items()
            for form, needle in secret_needles(value).items() if needle in data]


# ---------------------------------------------------------------------- secrets


def test_the_whole_cycle_ran_and_showed_secrets_masked(cycle: Cycle) -> None:
    assert [label for label, _ in cycle.runs] == [
        "plan", "plan --json", "plan -o", "show", "apply", "status --json", "re-plan", "audit", "audit md",
        "audit --json", "history", "history --json", "diff", "log", "log --json", "lock status", "lock status --json"]
    assert "Apply complete" in cycle.output("apply").stdout
    plan_text = cycle.output("plan").stdout
    assert plan_text.count("(sensitive, sha256:") >= len(cycle.secret_values)  # secrets are shown, masked


def test_the_search_finds_a_secret_where_one_is(cycle: Cycle) -> None:
    """The control for the searches below: the secrets file holds every value in clear."""
    found = leaks(cycle, "the secrets file", cycle.secrets_file.read_bytes())
    assert {f.split(" ")[0] for f in found} == set(cycle.secret_values)
    assert oct(cycle.secrets_file.stat().st_mode & 0o777) == "0o600"


def test_no_clear_secret_appears_in_any_output(cycle: Cycle) -> None:
    found = []
    for cmd, done in cycle.runs:
        found += leaks(cycle, f"stdout of `fleet {cmd}`", done.stdout.encode())
        found += leaks(cycle, f"stderr of `fleet {cmd}`", done.stderr.encode())
    assert found == []
    for cmd in ("plan --json", "status --json", "audit --json", "history --json", "log --json", "lock status --json"):
        json.loads(cycle.output(cmd).stdout)  # and every --json is JSON
    found = []
    assert found == []


def test_no_clear_secret_appears_in_the_plan_file(cycle: Cycle) -> None:
    data = cycle.plan_file.read_bytes()
    assert b"(sensitive, sha256:" in data
    assert leaks(cycle, "the plan file", data) == []
    assert oct(cycle.plan_file.stat().st_mode & 0o777) == "0o600"


def test_no_clear_secret_appears_in_any_byte_of_the_state_directory(cycle: Cycle) -> None:
    state = cycle.lab.state_dir
    files = [p for p in state.rglob("*") if p.is_file()]
    assert journal_path(state) in files
    found = []
    for p in files:
        found += leaks(cycle, str(p.relative_to(state)), p.read_bytes())
    assert found == []


def test_no_clear_secret_appears_in_any_snapshot_once_decompressed(cycle: Cycle) -> None:
    with Journal.open(journal_path(cycle.lab.state_dir)) as journal:
        snaps = journal.snapshots()
        blobs = {s.id: journal.snapshot_data(s.id) for s in snaps}
    assert len(blobs) >= 8  # plan ×4, apply, status, re-plan, audit ×3, diff
    found, with_env = [], 0
    for snap_id, blob in blobs.items():
        assert blob is not None
        text = zlib.decompress(blob)
        with_env += b"FLEET_TEST_QUOTES" in text  # snapshots taken after the apply hold the env file
        found += leaks(cycle, f"snapshot {snap_id}", text)
    assert with_env >= 5
    assert found == []


def test_the_journal_and_its_wal_are_private_to_root(cycle: Cycle) -> None:
    for p in cycle.lab.state_dir.glob("journal.sqlite*"):
        assert p.stat().st_mode & 0o077 == 0, p


# ---------------------------------------------------------------------- on the hosts


def test_the_env_file_is_0600_and_owned_as_declared_on_every_host(cycle: Cycle) -> None:
    for host in cycle.lab.names:
        meta = cycle.lab.ssh(host, f"stat -c '%a %U %G' {ENV}", user="root").stdout.split()
        assert meta == ["600", "mastodon", "mastodon"], host


def test_fleets_backups_on_the_host_are_readable_by_root_only(cycle: Cycle) -> None:
    for host in cycle.lab.names:
        meta = cycle.lab.ssh(host, "stat -c '%a %U' /var/lib/fleet /var/lib/fleet/backup", user="root").stdout.split()
        assert meta == ["700", "root", "700", "root"], host


def test_no_clear_secret_appears_in_any_hosts_history_and_it_is_root_only(cycle: Cycle) -> None:
    found: list[str] = []
    env_records, masked = 0, 0
    for host in cycle.lab.names:
        files = cycle.lab.ssh(host, f"ls {HISTORY}*", user="root").stdout.split()
        assert HISTORY in files, host
        data = host_history(cycle.lab, host).encode()
        env_records += sum(1 for line in data.splitlines() if b'"kind":"step"' in line and b'"write-env"' in line)
        masked += data.count(b"(sensitive, sha256:")
        found += leaks(cycle, f"{host}:{HISTORY}*", data)
        for f in files:
            meta = cycle.lab.ssh(host, f"stat -c '%a %U' {f}", user="root").stdout.split()
            assert meta == ["600", "root"], (host, f)
    assert env_records >= 4 and masked > 0  # every host's env file was written: its keys are in a record, masked
    assert found == []


@pytest.fixture(scope="module")
def web_environ(cycle: Cycle) -> dict[str, str]:
    """The environment systemd gave the running web service on fritz (EnvironmentFile= parsed
    by systemd itself), read from /proc/PID/environ as root."""
    out = cycle.lab.ssh("fritz", "pid=$(systemctl show -p MainPID --value mastodon-web.service) && "
                                 "[ \"$pid\" -gt 0 ] && base64 -w0 /proc/$pid/environ", user="root").stdout
    env: dict[str, str] = {}
    for entry in base64.b64decode(out).split(b"\0"):
        if entry:
            k, _, v = entry.decode("utf-8").partition("=")
            env[k] = v
    return env


@pytest.mark.parametrize("key", [pytest.param(k, marks=BROKEN.get(k, ())) for k in HOSTILE_VALUES])
def test_a_hostile_value_reaches_the_service_exactly(web_environ: dict[str, str], key: str) -> None:
    assert key in web_environ
    assert web_environ[key] == HOSTILE_VALUES[key]


def test_every_secret_reaches_the_service_exactly(cycle: Cycle, web_environ: dict[str, str]) -> None:
    assert {k: web_environ.get(k) for k in cycle.secret_values} == cycle.secret_values


def test_a_converged_fleet_plans_no_changes(cycle: Cycle) -> None:
    done = cycle.output("re-plan")
    assert done.returncode == 0, done.stdout
    assert "No changes" in done.stdout


# ---------------------------------------------------------------------- --lab and the real inventory


def test_the_lab_cycle_never_connected_to_an_inventory_address(cycle: Cycle) -> None:
    assert cycle.canary.hits == 0
    assert inventory(cycle.work) == cycle.inventory_before  # fleet never writes the inventory it reads
    assert not (cycle.work / ".fleet").exists()  # --state-dir was honoured


# ---------------------------------------------------------------------- host identity


def host_state(lab: Any, host: str) -> str:
    """What an apply would change on a host: units, the env file, fleet's lock and backups."""
    out: str = lab.ssh(host, "systemctl list-units --all --plain --no-legend 'mastodon-*' 'postgresql*' 'redis*' "
                             "| awk '{print $1, $3, $4}'; sha256sum /home/mastodon/live/.env.production 2>&1; "
                             "ls -R /var/lib/fleet 2>&1", user="root").stdout
    return out


def accepted_logins(lab: Any, host: str) -> int:
    out = lab.ssh(host, "journalctl -u ssh.service --no-pager -o cat | grep -c 'Accepted publickey'; true",
                  user="root").stdout
    return int(out.strip() or 0)


def tampered_state(lab: Any, dest: Path, victim: str, impostor: str) -> tuple[Path, str]:
    """A copy of the lab's state dir whose known_hosts has `impostor`'s key for `victim`;
    returns it and the fingerprint of the key `victim` really offers."""
    shutil.copytree(lab.state_dir, dest)
    labdir = dest / "lab"
    lines = (labdir / "known_hosts").read_text().splitlines()
    keys = {ln.split()[0].split(",")[0]: ln for ln in lines if ln.strip()}
    real = keys[victim].split()
    keys[victim] = f"{real[0]} {keys[impostor].split(' ', 1)[1]}"
    (labdir / "known_hosts").write_text("\n".join(keys.values()) + "\n")
    (labdir / "ssh_config").write_text((labdir / "ssh_config").read_text().replace(str(lab.lab_dir), str(labdir)))
    record = json.loads((labdir / "lab.json").read_text())
    record["ssh_config"] = str(labdir / "ssh_config")
    record["known_hosts"] = str(labdir / "known_hosts")
    (labdir / "lab.json").write_text(json.dumps(record))
    return dest, key_fingerprint(base64.b64decode(real[2]))


@dataclass
class Refusal:
    done: subprocess.CompletedProcess[str]
    offered: str  # fingerprint of the key fritz really offers
    before: dict[str, str]
    after: dict[str, str]
    logins: tuple[int, int]  # accepted SSH logins on fritz, before and after
    runs: tuple[int, int]  # apply runs in the journal, before and after


@pytest.fixture(scope="module")
def changed_key_apply(cycle: Cycle, tmp_path_factory: pytest.TempPathFactory) -> Refusal:
    """`apply --yes` with fritz's known_hosts entry holding franz's key, while freud has a
    stopped unit that apply would start."""
    lab = cycle.lab
    lab.ssh("freud", "systemctl stop mastodon-sidekiq-default.service", user="root")
    state, offered = tampered_state(lab, tmp_path_factory.mktemp("hostkey") / ".fleet", "fritz", "franz")
    with Journal.open(journal_path(state)) as journal:
        runs_before = len(journal.runs())
    before = {h: host_state(lab, h) for h in lab.names}
    logins = accepted_logins(lab, "fritz")
    done = cycle.fleet("apply, fritz's key changed", "apply", "--yes", "--secrets", str(cycle.secrets_file), *SETTLE,
                       ok=(1,), state_dir=state)
    logins_after = accepted_logins(lab, "fritz")
    after = {h: host_state(lab, h) for h in lab.names}
    with Journal.open(journal_path(state)) as journal:
        runs_after = len(journal.runs())
    return Refusal(done, offered, before, after, (logins, logins_after), (runs_before, runs_after))


def test_a_changed_host_key_makes_apply_refuse_before_anything_runs_anywhere(cycle: Cycle,
                                                                            changed_key_apply: Refusal) -> None:
    r = changed_key_apply
    assert r.logins[1] == r.logins[0] + 1  # only our own counting session: fleet never logged in to fritz
    assert r.after == r.before  # on every host: no lock left, nothing started, nothing written
    assert "inactive" in cycle.lab.ssh("freud", "systemctl is-active mastodon-sidekiq-default.service", user="root",
                                       check=False).stdout
    assert r.runs[1] == r.runs[0]  # no apply run was even started
    assert r.done.stdout == ""  # refused before anything was observed or planned
    assert cycle.canary.hits == 0


def test_the_refusal_names_the_host_and_the_key_it_offered(changed_key_apply: Refusal) -> None:
    err = changed_key_apply.done.stderr
    assert "cannot lock the hosts, nothing was changed" in err
    assert "fritz: cannot take the lock (hostkey)" in err and "has CHANGED" in err
    assert f"the server offered ssh-ed25519 {changed_key_apply.offered}" in err  # to compare on fritz's console
    assert "known_hosts has ssh-ed25519 SHA256:" in err
    assert not any(f"{h}: cannot take the lock" in err for h in ("franz", "freud", "nietzsche"))


def test_the_refusal_says_how_to_verify_and_accept_the_new_key(changed_key_apply: Refusal) -> None:
    err = changed_key_apply.done.stderr
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in err and "ssh-keygen -R" in err
