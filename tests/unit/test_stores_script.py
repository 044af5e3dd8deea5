"""The `@@stores` section's shell, run for real with `sh` (dash, as the collector runs it).

Postgres's tools are stand-ins on PATH (systemctl, pg_lsclusters, pg_isready, runuser, psql) that
print what the lab's real ones printed and log how they were called; Redis is the throwaway Debian
redis-server with a password (redis_server.py), found through an env file as Mastodon finds it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from redis_server import PASSWORD, REDIS_CLI, Redis

from fleet.collect.sections import Collected
from fleet.resources.stores import Asked, DataStores, StoreFacts, ToCollect, _covers_cluster_units, section_script

SH = shutil.which("sh") or "/bin/sh"
REAL = "/usr/sbin:/usr/bin:/sbin:/bin"
BASICS = ("sh", "head", "cut", "sed", "awk", "timeout", "cat", "env", "tr")  # what the section needs besides the tools

# What the lab's tools printed (tests/fixtures/collect/stores-*-nietzsche.txt, without the prefixes).
LSCLUSTERS = ("15 main    5432 online,auto          postgres /var/lib/postgresql/15/main    /var/log/pg-main.log\n"
              "15 standby 5433 online,recovery,auto postgres /var/lib/postgresql/15/standby /var/log/pg-sb.log\n"
              "13 old     5434 down,manual          postgres /var/lib/postgresql/13/old     /var/log/pg-old.log\n")
UNITS = ("postgresql@15-main.service    loaded active   running PostgreSQL Cluster 15-main\n"
         "postgresql@15-standby.service loaded active   running PostgreSQL Cluster 15-standby\n")
ROWS = {"5432": "recovery|false||\nlsn|0/3016B78|-|-\nreplica|local|streaming|0/3016B78\n",
        "5433": "recovery|true||\nlsn|0/3016B78|0/3016B78|2\nupstream|streaming|/var/run/postgresql|5432\n"}


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def basics(directory: Path) -> Path:
    """A directory holding only the basic tools: the machine's own Postgres or Redis tools stay out."""
    directory.mkdir()
    for tool in BASICS:
        found = shutil.which(tool)
        if found:
            os.symlink(found, directory / tool)
    return directory


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """A bin directory of stand-ins, and `pg/15/bin` for the version's own tools; calls are logged.
    Run with PATH=`path(tools)`: the stand-ins and the basic tools, nothing else."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    basics(tmp_path / "basics")
    log = tmp_path / "calls.log"
    (tmp_path / "lsclusters.txt").write_text(LSCLUSTERS)
    stub(bin_, "systemctl", f'echo "systemctl $*" >>{log}\nprintf %s {_q(UNITS)}\n')
    stub(bin_, "pg_lsclusters", f'echo "pg_lsclusters $*" >>{log}\ncat {tmp_path}/lsclusters.txt\n')
    stub(bin_, "stat", 'echo postgres\n')  # the data directory's owner
    # The clusters of LSCLUSTERS as files (pg_clusters reads those, not pg_lsclusters): postgresql.conf,
    # start.conf, the external PID file and the process it names, standby.signal.
    for version, name, port, pid, start, signal in (("15", "main", 5432, 101, "auto", ""),
                                                    ("15", "standby", 5433, 102, "auto", "standby.signal"),
                                                    ("13", "old", 5434, None, "manual", "")):
        conf, data = tmp_path / "etc" / version / name, tmp_path / "data" / version / name
        conf.mkdir(parents=True)
        data.mkdir(parents=True)
        (conf / "postgresql.conf").write_text(f"data_directory = '{data}'\nport = {port}\n"
                                              f"external_pid_file = '{tmp_path}/{version}-{name}.pid'\n")
        (conf / "start.conf").write_text(start + "\n")
        if signal:
            (data / signal).write_text("")
        if pid is not None:
            (tmp_path / f"{version}-{name}.pid").write_text(f"{pid}\n")
            (tmp_path / "proc" / str(pid)).mkdir(parents=True)
            (tmp_path / "proc" / str(pid) / "cmdline").write_text(f"/usr/lib/postgresql/{version}/bin/postgres\0-D\0x")
    stub(bin_, "runuser", f'echo "runuser $*" >>{log}\nwhile [ "$1" != -- ]; do shift; done; shift; exec "$@"\n')
    for version in ("15", "13"):
        pg = tmp_path / "pg" / version / "bin"
        pg.mkdir(parents=True)
        (pg / "postgres").write_text("")
        stub(pg, "pg_isready", f'echo "pg_isready{version} $*" >>{log}\n'
                               'case " $* " in *" -p 5432 "*|*" -p 5433 "*) exit 0;; esac\nexit 2\n')
        rows = "".join(f'  *" -p {port} "*) printf %s {_q(text)};;\n' for port, text in ROWS.items())
        stub(pg, "psql", f'echo "psql{version} PGOPTIONS=$PGOPTIONS $*" >>{log}\n'
                         f'case " $* " in\n{rows}  *) echo "psql: error: no such cluster" >&2; exit 2;;\nesac\n')
    return tmp_path


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def run(what: ToCollect, root: Path, path: str) -> tuple[StoreFacts, str]:
    done = subprocess.run([SH, "-c", section_script(what, pg_lib=str(root / "pg"), pg_conf=str(root / "etc"),
                                                     proc=str(root / "proc"))], capture_output=True, text=True,
                          env={"PATH": path, "LC_ALL": "C"}, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "@@stores" and not any(x.startswith("@@") for x in lines[1:]), done.stdout
    parser = DataStores().parser("nietzsche")
    parser.section("", iter(lines[1:]))
    collected = Collected("nietzsche")
    parser.finish(collected)
    found = collected.extra["stores"]
    assert isinstance(found, StoreFacts)
    return found, done.stdout


def path(root: Path) -> str:
    return f"{root}/bin:{root}/basics"


def calls(root: Path) -> list[str]:
    log = root / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


PG = Asked("postgresql.service", "postgres", 5432)


def test_without_probe_the_section_asks_systemd_the_files_and_pg_isready_and_never_psql_or_perl(tools: Path) -> None:
    found, _ = run(ToCollect((PG,)), tools, path(tools))
    assert [c.id for c in found.clusters or ()] == ["13-old", "15-main", "15-standby"]  # pg_lsclusters' order
    assert [u.unit for u in found.units] == ["postgresql@15-main.service", "postgresql@15-standby.service"]
    assert dict(found.ready) == {5432: 0, 5433: 0, 5434: 2}
    assert found.probes == ()
    log = calls(tools)
    assert not [c for c in log if c.startswith(("psql", "runuser"))], log
    # the version's own pg_isready (no pg_wrapper), the right one for each cluster
    assert "pg_isready15 -q -t 5 -p 5432" in log and "pg_isready13 -q -t 5 -p 5434" in log
    assert not [c for c in log if c.startswith("pg_lsclusters")], log  # the files decided: no Perl


def test_with_probe_psql_runs_read_only_as_postgres_for_each_online_cluster_only(tools: Path) -> None:
    found, _ = run(ToCollect((Asked("postgresql.service", "postgres", 5432, probe=True),)), tools,
                   path(tools))
    assert {p.port: p.role for p in found.probes} == {5432: "primary", 5433: "standby"}  # 13/old is down
    log = calls(tools)
    psql = [c for c in log if c.startswith("psql")]
    assert len(psql) == 2
    for c in psql:
        assert "default_transaction_read_only=on" in c and "statement_timeout=5000" in c
        assert " -X -A -t -q -F | -d postgres " in c and "pg_is_in_recovery()" in c
    assert [c for c in log if c.startswith("runuser")][0].startswith("runuser -u postgres -- env ")


SHOW = ("Id=postgresql@15-standby.service\nLoadState=loaded\nActiveState=inactive\nSubState=dead\nMainPID=0\n\n"
        "Id=postgresql.service\nLoadState=loaded\nActiveState=active\nSubState=exited\n\n"
        "Id=postgresql@15-main.service\nLoadState=loaded\nActiveState=failed\nSubState=failed\nResult=signal")


def test_the_cluster_units_come_from_the_units_show_when_a_discovery_glob_named_them_all(tools: Path) -> None:
    what = ToCollect((PG,), units_shown=True)
    script = section_script(what, pg_lib=str(tools / "pg"), pg_conf=str(tools / "etc"), proc=str(tools / "proc"))
    done = subprocess.run([SH, "-c", f"show={_q(SHOW)}\n{script}"], capture_output=True, text=True,
                          env={"PATH": path(tools), "LC_ALL": "C"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [x for x in done.stdout.splitlines() if x.startswith("pg-unit ")] == [
        "pg-unit postgresql@15-main.service loaded failed failed",
        "pg-unit postgresql@15-standby.service loaded inactive dead"]  # list-units' order: by name
    assert not [c for c in calls(tools) if c.startswith("systemctl")]


@pytest.mark.parametrize(("pattern", "covers"), [("postgresql*", True), ("postgresql@*", True), ("*", True),
                                                 ("postgres*", True), ("postgresql@1*", False), ("redis*", False),
                                                 ("postgresql@*.service", False), ("p?stgresql*", False)])
def test_only_a_plain_prefix_glob_is_trusted_to_have_named_every_cluster_unit(pattern: str, covers: bool) -> None:
    assert _covers_cluster_units(pattern) is covers


def test_a_probe_on_one_cluster_unit_asks_only_that_cluster(tools: Path) -> None:
    found, _ = run(ToCollect((Asked("postgresql@15-standby.service", "postgres", 5433, probe=True),
                              Asked("postgresql@15-main.service", "postgres", 5432))), tools, path(tools))
    assert [p.port for p in found.probes] == [5433]


def test_without_pg_lsclusters_the_declared_ports_are_asked(tools: Path) -> None:
    (tools / "bin" / "pg_lsclusters").unlink()
    stub(tools / "bin", "pg_isready", f'echo "pg_isready $*" >>{tools}/calls.log\nexit 1\n')
    stub(tools / "bin", "psql", 'echo "recovery|true||"; echo "lsn|0/10|0/8|-"\n')
    found, _ = run(ToCollect((Asked("postgresql.service", "postgres", 6000, probe=True),)), tools,
                   path(tools))
    assert found.clusters is None and dict(found.ready) == {6000: 1}
    (probe,) = found.probes
    assert (probe.port, probe.role, probe.lag_bytes, probe.replay_age) == (6000, "standby", 8, None)


def test_hostile_pg_lsclusters_output_never_reaches_a_path_or_a_command(tools: Path) -> None:
    (tools / "lsclusters.txt").write_text("../../tmp/x main 5432 online postgres\n15 main $(touch) online postgres\n")
    (tools / "etc" / "15" / "main" / "postgresql.conf").write_text("a line pg_clusters cannot read\n")  # ask Perl
    done = subprocess.run([SH, "-c", section_script(ToCollect((Asked("postgresql.service", "postgres", 5432, True),)),
                                                     pg_lib=str(tools / "pg"), pg_conf=str(tools / "etc"),
                                                     proc=str(tools / "proc"))],
                          capture_output=True, text=True, env={"PATH": path(tools), "LC_ALL": "C"}, timeout=60)
    assert "pg-cluster ../../tmp/x main 5432 online postgres" in done.stdout  # printed: the parser refuses it
    assert not [c for c in calls(tools) if c.startswith(("pg_isready", "psql"))], calls(tools)


def test_pgbouncer_is_asked_with_pg_isready_on_its_port(tools: Path) -> None:
    stub(tools / "bin", "pg_isready", f'echo "pg_isready $*" >>{tools}/calls.log\nexit 0\n')
    found, _ = run(ToCollect((Asked("pgbouncer.service", "pgbouncer", 6432),)), tools, path(tools))
    assert dict(found.ready) == {6432: 0} and found.clusters == ()
    assert not [c for c in calls(tools) if c.startswith("pg_lsclusters")]


# ------------------------------------------------------------------ Redis, for real


def env_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env.production"
    path.write_text(text)
    return path


needs_redis = pytest.mark.skipif(REDIS_CLI is None, reason="needs redis-cli (scripts/setup.sh installs it)")


@needs_redis
def test_redis_is_asked_with_the_env_files_password_and_counts_the_queued_sidekiq_jobs(
        redis: Redis, tmp_path: Path) -> None:
    redis.flush()
    redis.cli(stdin="SADD queues default mailers\nLPUSH queue:default a b c\nLPUSH queue:mailers x\nSET k v\n")
    quoted = PASSWORD.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    env = env_file(tmp_path, f'REDIS_HOST=redis.example\nREDIS_PASSWORD="{quoted}"\n')
    found, out = run(ToCollect((Asked("redis-server.service", "redis", redis.port),), str(env)), tmp_path, REAL)
    (r,) = found.redis
    assert (r.ping, r.role, r.keys, r.queued, r.queues) == ("PONG", "master", 4, 4, 2)
    assert PASSWORD not in out


@needs_redis
def test_the_redis_password_never_reaches_an_argv_and_is_never_printed(redis: Redis, tmp_path: Path) -> None:
    """redis-cli wrapped: it logs its argv and whether REDISCLI_AUTH is set, then runs for real."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "argv.log"
    stub(bin_, "redis-cli", f'echo "argv: $* auth:${{REDISCLI_AUTH:+set}}" >>{log}\nexec {REDIS_CLI} "$@"\n')
    env = env_file(tmp_path, f"REDIS_URL=redis://:{PASSWORD.replace('%', '%25').replace('#', '%23')}"
                             "@localhost:1/0\n".replace(" ", "%20").replace("'", "%27").replace('"', "%22")
                   .replace("\\", "%5C").replace("$", "%24").replace("+", "%2B"))
    found, out = run(ToCollect((Asked("redis-server.service", "redis", redis.port),), str(env)), tmp_path,
                     f"{bin_}:{REAL}")
    assert found.redis[0].ping == "PONG", out
    text = log.read_text()
    assert "auth:set" in text and PASSWORD not in text and PASSWORD not in out


@needs_redis
def test_without_an_env_file_redis_answers_noauth_which_is_up_but_unread(redis: Redis, tmp_path: Path) -> None:
    found, out = run(ToCollect((Asked("redis-server.service", "redis", redis.port),)), tmp_path, REAL)
    (r,) = found.redis
    assert r.answers and r.ping.startswith("NOAUTH") and r.role == ""


@needs_redis
def test_a_wrong_password_is_said_and_redis_still_counts_as_up(redis: Redis, tmp_path: Path) -> None:
    env = env_file(tmp_path, "REDIS_PASSWORD=not-the-password\n")
    found, _ = run(ToCollect((Asked("redis-server.service", "redis", redis.port),), str(env)), tmp_path, REAL)
    (r,) = found.redis
    assert r.answers and r.auth.startswith("WRONGPASS")


@needs_redis
def test_a_port_nothing_listens_on_is_a_connection_error(tmp_path: Path) -> None:
    found, _ = run(ToCollect((Asked("redis-server.service", "redis", 1),)), tmp_path, REAL)
    (r,) = found.redis
    assert not r.answers and r.error.startswith("Could not connect to Redis at 127.0.0.1:1")


def test_a_host_without_redis_cli_says_so(tmp_path: Path) -> None:
    found_, _ = run(ToCollect((Asked("redis-server.service", "redis", 6379),)), tmp_path, str(basics(tmp_path / "b")))
    (r,) = found_.redis
    assert r.error == "redis-cli is not installed" and not r.installed


def test_the_example_reads_its_cluster_units_from_the_show_and_a_fleet_without_the_glob_asks_systemd() -> None:
    import dataclasses

    from observed import example

    desired = example()  # discovers `postgresql*`: the units' show named every cluster unit
    what = DataStores().to_collect(desired, "nietzsche")
    assert what.units_shown
    assert "list-units" not in section_script(what)
    bare = dataclasses.replace(desired, discover=tuple(p for p in desired.discover
                                                        if not p.pattern.startswith("postgres")))
    what = DataStores().to_collect(bare, "nietzsche")
    assert not what.units_shown
    assert "systemctl list-units --all" in section_script(what)
