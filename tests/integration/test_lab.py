"""The lab is real: separate hosts with their own addresses and host keys, real systemd and
sudo over real OpenSSH, stand-ins that answer their health checks under units, databases
installed but off, and a teardown that leaves nothing behind.

Traffic goes only to the lab's own addresses or to a lab host's loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab

RUNTIME = Path(os.environ.get("FLEET_LAB_RUNTIME") or "/var/lib/fleet-lab")
NETNS_PREFIX = "fleetlab-"
BRIDGE = "fleetlab0"
CGROUP_DIRS = [Path("/sys/fs/cgroup/systemd/fleetlab"), Path("/sys/fs/cgroup/unified/fleetlab"),
               Path("/sys/fs/cgroup/fleetlab")]


def first_non_root_host(lab: Lab) -> str:
    candidates = [n for n in lab.names if lab.hosts[n].user != "root"]
    if not candidates:
        pytest.skip("no inventory host logs in as a non-root user")
    return candidates[0]


def install_unit(lab: Lab, host: str, name: str, text: str) -> None:
    lab.ssh(host, ["tee", f"/etc/systemd/system/{name}"], user="root", input=text)
    lab.ssh(host, "systemctl daemon-reload", user="root")


def remove_unit(lab: Lab, host: str, name: str) -> None:
    lab.ssh(host, f"systemctl disable --now {name}; rm -f /etc/systemd/system/{name}; "
            "systemctl daemon-reload; systemctl reset-failed", user="root", check=False)


def curl_status(lab: Lab, host: str, url: str, max_time: int = 2) -> str:
    done = lab.ssh(host, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                          str(max_time), url], check=False)
    return done.stdout.strip()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- separate hosts --------------------------------------------------------------------------


def test_each_host_has_its_own_address_on_the_lab_network(lab: Lab) -> None:
    addresses = list(lab.addresses.values())
    assert len(set(addresses)) == len(addresses)
    for name in lab.names:
        inside = lab.ssh(name, "hostname; ip -o -4 addr show dev host0").stdout
        assert inside.splitlines()[0] == name
        assert f"inet {lab.hosts[name].address}/24" in inside


def test_hosts_have_no_default_route_so_they_reach_only_the_lab(lab: Lab) -> None:
    for name in lab.names:
        routes = lab.ssh(name, "ip -4 route show").stdout
        assert "default" not in routes
        assert routes.strip().startswith("10.251.0.0/24")


def test_each_host_presents_its_own_host_key_and_it_matches_known_hosts(lab: Lab) -> None:
    known = {}
    for line in lab.known_hosts.read_text().splitlines():
        names, kind, blob = line.split()
        known[names.split(",")[0]] = (names.split(","), f"{kind} {blob}")
    assert sorted(known) == lab.names
    scanned = {}
    for name, host in lab.hosts.items():
        done = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", host.address],
                              capture_output=True, text=True, timeout=30)
        _, kind, blob = done.stdout.split()[:3]
        scanned[name] = f"{kind} {blob}"
        assert known[name][0] == [name, host.address]
        assert known[name][1] == scanned[name]
    assert len(set(scanned.values())) == len(scanned), "host keys must differ between hosts"


def test_strict_host_key_checking_refuses_a_host_presenting_another_hosts_key(lab: Lab,
                                                                              tmp_path: Path) -> None:
    a, b = lab.names[0], lab.names[1]
    lines = dict(line.split(" ", 1) for line in lab.known_hosts.read_text().splitlines())
    swapped = tmp_path / "known_hosts"
    swapped.write_text(f"{a},{lab.hosts[a].address} {lines[f'{b},{lab.hosts[b].address}']}\n")
    done = subprocess.run(["ssh", "-F", str(lab.ssh_config), "-o", f"UserKnownHostsFile={swapped}",
                           a, "true"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in done.stderr or \
        "Host key verification failed" in done.stderr


def test_each_host_boots_with_its_own_machine_id(lab: Lab) -> None:
    ids = [lab.ssh(n, "cat /etc/machine-id").stdout.strip() for n in lab.names]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


# -- systemd and sudo over SSH ------------------------------------------------------------------


def test_systemd_is_pid_1_and_the_boot_finished_on_every_host(lab: Lab) -> None:
    for name in lab.names:
        out = lab.ssh(name, "ps -o comm= -p 1; systemctl is-system-running", check=False).stdout
        assert out.split() in (["systemd", "running"], ["systemd", "degraded"])


def test_systemctl_works_over_ssh_as_root(lab: Lab) -> None:
    for name in lab.names:
        out = lab.ssh(name, "id -un; systemctl show -p Version --value; "
                      "systemctl list-units --type=service --output=json", user="root").stdout
        whoami, version, units = out.split("\n", 2)
        assert whoami == "root"
        assert version.startswith("252")
        assert "ssh.service" in {u["unit"] for u in json.loads(units)}


def test_the_inventory_user_can_run_systemctl_through_passwordless_sudo(lab: Lab) -> None:
    checked = 0
    for name, host in lab.hosts.items():
        if host.user == "root":
            continue
        out = lab.ssh(name, "id -un; sudo -n id -un; sudo -n systemctl is-active ssh.service").stdout
        assert out.split() == [host.user, "root", "active"]
        checked += 1
    if not checked:
        pytest.skip("no inventory host logs in as a non-root user")


def test_a_unit_in_etc_systemd_system_can_be_reloaded_started_enabled_and_stopped(lab: Lab) -> None:
    host, unit = first_non_root_host(lab), "labtest-sleeper.service"
    text = "[Unit]\nDescription=lab test\n[Service]\nExecStart=/bin/sleep infinity\n" \
           "[Install]\nWantedBy=multi-user.target\n"
    try:
        lab.ssh(host, ["sudo", "-n", "tee", f"/etc/systemd/system/{unit}"], input=text)
        lab.ssh(host, "sudo -n systemctl daemon-reload")
        assert lab.ssh(host, f"systemctl is-active {unit}", check=False).stdout.strip() == "inactive"
        lab.ssh(host, f"sudo -n systemctl enable --now {unit}")
        state = lab.ssh(host, f"systemctl show -p ActiveState,UnitFileState {unit}").stdout
        assert "ActiveState=active" in state and "UnitFileState=enabled" in state
        lab.ssh(host, f"sudo -n systemctl stop {unit}")
        assert lab.ssh(host, f"systemctl is-active {unit}", check=False).stdout.strip() == "inactive"
        assert lab.ssh(host, f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
    finally:
        remove_unit(lab, host, unit)


# -- stand-ins under units --------------------------------------------------------------------


STANDIN_UNIT = """\
[Unit]
Description={description}
[Service]
Type=simple
User=mastodon
WorkingDirectory=/home/mastodon/live
Environment="RAILS_ENV=production" "PORT={port}" {extra_env}
ExecStart={exec_start}
Restart=always
RestartSec=1
"""


def standin_unit(exec_start: str, port: int, extra_env: str = "", description: str = "t") -> str:
    return STANDIN_UNIT.format(exec_start=exec_start, port=port, extra_env=extra_env,
                               description=description)


@pytest.mark.parametrize(
    ("exec_start", "port", "path"),
    [
        ("/home/mastodon/.rbenv/shims/bundle exec puma -C config/puma.rb", 3000, "/health"),
        ("/usr/bin/node ./streaming", 4000, "/api/v1/streaming/health"),
    ],
    ids=["web", "streaming"],
)
def test_the_stand_in_answers_its_health_check_when_run_under_a_unit(
    lab: Lab, exec_start: str, port: int, path: str
) -> None:
    host, unit = lab.names[0], "labtest-http.service"
    try:
        install_unit(lab, host, unit, standin_unit(exec_start, port))
        lab.ssh(host, f"systemctl start {unit}", user="root")
        url = f"http://127.0.0.1:{port}{path}"
        assert wait_for(lambda: curl_status(lab, host, url) == "200"), \
            lab.ssh(host, f"journalctl -u {unit} --no-pager | tail", user="root").stdout
        body = lab.ssh(host, ["curl", "-s", "--max-time", "2", url]).stdout
        assert body == "OK"
        assert lab.ssh(host, f"systemctl show -p User --value {unit}").stdout.strip() == "mastodon"
    finally:
        remove_unit(lab, host, unit)


def test_the_sidekiq_stand_in_runs_under_a_unit_and_logs_its_queues(lab: Lab) -> None:
    host, unit = lab.names[-1], "labtest-sidekiq.service"
    exec_start = "/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 25 -q default,8 -q push,6"
    try:
        install_unit(lab, host, unit, standin_unit(exec_start, 0, '"DB_POOL=25"'))
        lab.ssh(host, f"systemctl start {unit}", user="root")
        assert wait_for(lambda: "queues=default,8 push,6" in lab.ssh(
            host, f"journalctl -u {unit} --no-pager -o cat", user="root").stdout)
        assert lab.ssh(host, f"systemctl is-active {unit}").stdout.strip() == "active"
        lab.ssh(host, f"systemctl stop {unit}", user="root")
        result = lab.ssh(host, f"systemctl show -p Result --value {unit}").stdout.strip()
        assert result == "success", "SIGTERM must end the stand-in cleanly"
    finally:
        remove_unit(lab, host, unit)


def test_stand_in_failures_can_be_injected_with_an_environment_variable_or_a_file(lab: Lab) -> None:
    host, unit = lab.names[0], "labtest-inject.service"
    url = "http://127.0.0.1:3000/health"
    puma = "/home/mastodon/.rbenv/shims/bundle exec puma -C config/puma.rb"
    try:
        install_unit(lab, host, unit, standin_unit(puma, 3000, '"STANDIN_FAIL=unhealthy"'))
        lab.ssh(host, f"systemctl start {unit}", user="root")
        assert wait_for(lambda: curl_status(lab, host, url) == "503")

        # The file wins over the environment: "hang" means the health check never answers.
        lab.ssh(host, "echo hang > /home/mastodon/live/STANDIN_FAIL", user="root")
        lab.ssh(host, f"systemctl restart {unit}", user="root")
        assert wait_for(lambda: lab.ssh(host, "ss -ltn 'sport = :3000'").stdout.count("LISTEN") == 1)
        assert curl_status(lab, host, url, max_time=1) == "000"

        lab.ssh(host, "echo exit > /home/mastodon/live/STANDIN_FAIL", user="root")
        lab.ssh(host, f"systemctl restart {unit}", user="root")
        assert wait_for(lambda: int(lab.ssh(host, f"systemctl show -p NRestarts --value {unit}")
                                    .stdout.strip() or 0) >= 1, timeout=15)
    finally:
        lab.ssh(host, "rm -f /home/mastodon/live/STANDIN_FAIL", user="root", check=False)
        remove_unit(lab, host, unit)


def test_the_stand_ins_reject_arguments_the_real_tools_would_reject(lab: Lab) -> None:
    host = lab.names[0]
    for command in ("/home/mastodon/.rbenv/shims/bundle exec sidekiq -c many",
                    "/home/mastodon/.rbenv/shims/bundle exec sidekiq -q ''",
                    "/home/mastodon/.rbenv/shims/bundle exec rails server",
                    "/usr/bin/node ./server.js"):
        done = lab.ssh(host, command, check=False)
        assert done.returncode == 2, command
        assert "usage:" in done.stderr


# -- databases --------------------------------------------------------------------------------


def test_postgresql_and_redis_are_installed_but_neither_enabled_nor_running_at_boot(lab: Lab) -> None:
    for name in lab.names:
        out = lab.ssh(name, "systemctl is-enabled postgresql.service redis-server.service; "
                      "systemctl is-active postgresql.service 'postgresql@*' redis-server.service; "
                      "test -x /usr/bin/redis-server && ls /usr/lib/postgresql", check=False).stdout
        lines = out.split()
        assert lines[:2] == ["disabled", "disabled"], out
        assert "active" not in lines[2:], out
        assert lines[-1].isdigit(), f"postgresql server missing on {name}: {out}"


def test_postgresql_and_redis_really_start_when_enabled(lab: Lab) -> None:
    host = lab.names[-1]
    try:
        lab.ssh(host, "systemctl enable --now postgresql.service redis-server.service", user="root")
        # The lab's Redis wants the lab's password (docs/LAB.md), given on stdin, never in a command line.
        assert lab.ssh(host, "redis-cli ping").stdout.strip() == "NOAUTH Authentication required."
        password = (lab.lab_dir / "redis-password").read_text()
        assert lab.ssh(host, "read -r REDISCLI_AUTH && export REDISCLI_AUTH && redis-cli ping",
                       input=password).stdout.strip() == "PONG"
        assert wait_for(lambda: lab.ssh(host, "runuser -u postgres -- psql -Atc 'select 1'",
                                        user="root", check=False).stdout.strip() == "1")
    finally:
        lab.ssh(host, "systemctl disable --now postgresql.service redis-server.service",
                user="root", check=False)


# -- the lab commands -------------------------------------------------------------------------


def test_lab_status_reports_every_host_up(lab: Lab) -> None:
    done = lab.command("status", "--json", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["up"] is True
    assert sorted(h["name"] for h in status["hosts"]) == lab.names
    assert all(h["reachable"] and h["system_state"] in ("running", "degraded")
               for h in status["hosts"])


def test_lab_ssh_runs_the_command_on_the_named_host(lab: Lab) -> None:
    for name in lab.names:
        done = lab.command("ssh", name, "hostname", timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == name


def test_lab_ssh_refuses_a_host_that_is_not_in_the_lab(lab: Lab) -> None:
    done = lab.command("ssh", "no-such-host", "true", timeout=60)
    assert done.returncode == 1
    assert "not a lab host" in done.stderr


def test_the_ssh_config_works_from_any_directory(lab: Lab, tmp_path: Path) -> None:
    name = lab.names[0]
    done = subprocess.run(["ssh", "-F", str(lab.ssh_config), name, "hostname"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.stdout.strip() == name


# -- teardown (last: it takes the lab down and brings it back) --------------------------------


def lab_leftovers() -> list[str]:
    """Everything of a lab still on this machine, found by its fixed names."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines()
              if line.startswith(NETNS_PREFIX)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {m}" for m in re.findall(r"^\d+: (fleetlab[^:@]*)", links, re.M)]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(str(RUNTIME)) or "fleetlab" in line:
            found.append(f"mount {point}")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm == "systemd-nspawn" and state != "Z":
            found.append(f"process {pid} systemd-nspawn")
    found += [f"cgroup {d}" for d in CGROUP_DIRS if d.exists()]
    if (RUNTIME / "hosts").exists():
        found.append(f"dir {RUNTIME / 'hosts'}")
    return found


def test_two_down_up_cycles_leave_nothing_behind_and_the_lab_comes_back(lab: Lab) -> None:
    sysctl = Path("/proc/sys/fs/inotify/max_user_instances")
    restored: list[int] = []
    try:
        for _ in range(2):
            done = lab.down()
            assert done.returncode == 0, done.stderr
            assert lab_leftovers() == []
            restored.append(int(sysctl.read_text()))
            assert lab.down().returncode == 0, "down must be idempotent"
            assert lab_leftovers() == []
            done = lab.up()
            assert done.returncode == 0, done.stderr
            assert int(sysctl.read_text()) >= 1024, "up raises the inotify limit for nspawn"
        assert restored[0] == restored[1], "down restores the machine's own inotify limit"
    finally:
        if lab.command("status", timeout=120).returncode != 0:
            lab.up()  # leave the session's lab up for the tests that follow
    assert lab.command("status", timeout=120).returncode == 0


def test_down_cleans_up_after_systemd_nspawn_was_killed(lab: Lab) -> None:
    try:
        pids = [int(p) for p in subprocess.run(["pgrep", "-x", "systemd-nspawn"],
                                               capture_output=True, text=True).stdout.split()
                if str(RUNTIME).encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert pids, "the lab should be up"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # the containers keep running, orphaned
        done = lab.down()
        assert done.returncode == 0, done.stderr
        assert lab_leftovers() == []
    finally:
        assert lab.up().returncode == 0
