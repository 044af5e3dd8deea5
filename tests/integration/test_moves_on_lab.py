"""Moving Postgres freud -> nietzsche on the lab's real Postgres (fleet/moves.py, the runbook in
fleet/resources/runbook.py): undeclared, the plan is refused with the table to declare; declared,
`fleet plan` shows the runbook with the data gates as the hosts' own tools answer them — a real
streaming standby of freud, found by its WAL receiver's address, and a paused replay reported as
bytes behind.  `fleet apply` then halts at the first gate while the standby lags, before any env
file changes, and `fleet log` says why; once it replays again, the move runs end to end: freud
read-only, the standby caught up and promoted, DB_HOST repointed only after that, Mastodon
restarted against it, freud's server stopped last, and the rows written on freud are there."""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, enqueue, fleet, redis_cli, reset_all
from test_sidekiq_on_lab import DECLARED as SIDEKIQ
from test_sidekiq_on_lab import main_pid, poll, process_of, read_view

from fleet.journal import Journal, journal_path

SOURCE, TARGET = "freud", "nietzsche"
STANDBY_UNIT = "postgresql@15-moved.service"  # a second cluster on the target: its 15/main stays as it is
ENV = "/home/mastodon/live/.env.production"
POSTGRES = 'unit = "postgresql.service"\nhosts = ["nietzsche"]\nobserve_only = true'
ORPHANS = "fleet-move-test"  # a queue no declared Sidekiq process serves: its jobs stay queued
DECLARED = '\n[moves.postgres]\nfrom = "freud"\nto = "nietzsche"\nmethod = "streaming-replica"\n'


def fleet_dir(root: Path, *, postgres_on: str, db_port: str = "5432", extra: str = "") -> Path:
    """The example with postgres (probed) on `postgres_on` and DB_HOST pointing there."""
    shutil.copytree(REPO / "hosts", root / "hosts")
    text = (REPO / "desired_state.toml").read_text()
    assert text.count(POSTGRES) == 1 and text.count('DB_HOST = "nietzsche.hachyderm.internal"') == 1
    port = "\nport = 5433" if db_port == "5433" else ""
    text = text.replace(POSTGRES, POSTGRES.replace("nietzsche", postgres_on) + f"\nprobe = true{port}")
    text = text.replace('DB_HOST = "nietzsche.hachyderm.internal"', f'DB_HOST = "{postgres_on}.hachyderm.internal"')
    text = text.replace('DB_PORT = "5432"', f'DB_PORT = "{db_port}"')
    (root / "desired_state.toml").write_text(text + extra)
    return root


def psql(lab: Any, host: str, sql: str, port: int = 5432) -> str:
    done = lab.ssh(host, ["runuser", "-u", "postgres", "--", "psql", "-X", "-A", "-t", "-q", "-p", str(port),
                          "-c", sql], user="root")
    return str(done.stdout).strip()


def last_ok_run_steps_by_action(lab: Any, *, since: float) -> dict[str, list[Any]]:
    """The steps of the last run since `since` that ended ok, from the session's journal, grouped by
    action (each action's steps in the journal's order)."""
    with Journal.open(journal_path(lab.state_dir)) as journal:
        ok = [r for r in journal.runs(since=since) if r.outcome == "ok"]
        assert ok, f"no run ended ok since {since}"
        steps = journal.steps(run_id=ok[-1].id)
    by_action: dict[str, list[Any]] = {}
    for st in steps:
        by_action.setdefault(st.action, []).append(st)
    return by_action


@pytest.fixture
def before(lab: Any, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """The fleet before the move: postgres on freud (converged), a table written there, freud
    open to replication from the lab network, and a new cluster 15/moved on nietzsche, port 5433,
    made a streaming standby of freud with pg_basebackup (what the operator's replication does)."""
    reset_all(lab)
    root = fleet_dir(tmp_path / "before", postgres_on=SOURCE)
    done = fleet(lab, "apply", "--yes", "--settle", "1", directory=root, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    hba = "/etc/postgresql/15/main/pg_hba.conf"
    lab.ssh(SOURCE, f"cp -p {hba} {hba}.fleet-test && echo 'host replication all 10.251.0.0/24 trust' >> {hba} && "
                    "pg_conftool 15 main set listen_addresses '*' && systemctl restart postgresql@15-main.service",
            user="root")
    psql(lab, SOURCE, "CREATE TABLE IF NOT EXISTS moved_rows (n int); INSERT INTO moved_rows SELECT "
                      "generate_series(1, 100)")
    source_address = lab.addresses[SOURCE]
    lab.ssh(TARGET, "pg_createcluster 15 moved -p 5433 >/dev/null && rm -rf /var/lib/postgresql/15/moved/* && cd / && "
                    f"runuser -u postgres -- pg_basebackup -h {source_address} -p 5432 -U postgres "
                    f"-D /var/lib/postgresql/15/moved -R -X stream && systemctl start {STANDBY_UNIT}",
            user="root", timeout=120)
    yield lab, tmp_path
    redis_cli(lab, [["DEL", f"queue:{ORPHANS}"], ["SREM", "queues", ORPHANS]])
    lab.ssh(TARGET, "pg_dropcluster --stop 15 moved", user="root", check=False)
    # The move leaves freud's server stopped and read-only (ALTER SYSTEM): back as it was, then
    # restarted with its own pg_hba.conf and listen_addresses (which reads postgresql.auto.conf anew).
    lab.ssh(SOURCE, "systemctl start postgresql@15-main.service; runuser -u postgres -- "
                    "env PGOPTIONS='-c default_transaction_read_only=off' psql -X -q "
                    "-c 'ALTER SYSTEM RESET default_transaction_read_only' -c 'DROP TABLE IF EXISTS moved_rows'",
            user="root", check=False)
    lab.ssh(SOURCE, f"mv {hba}.fleet-test {hba}; pg_conftool 15 main remove listen_addresses; "
                    "systemctl restart postgresql@15-main.service", user="root", check=False)
    try:  # said, not hoped for: freud's Postgres takes writes again, without the test's table
        seen = lab.ssh(SOURCE, "pg_lsclusters; systemctl status --no-pager -n 20 postgresql@15-main.service; "
                               "cat /var/lib/postgresql/15/main/postgresql.auto.conf", user="root", check=False)
        assert "online" in seen.stdout.split("\n", 2)[1], seen.stdout + seen.stderr
        assert psql(lab, SOURCE, "SHOW default_transaction_read_only") == "off"
        assert psql(lab, SOURCE, "SELECT to_regclass('moved_rows') IS NULL") == "t"
    finally:
        reset_all(lab)  # (which stops the databases)


def test_moving_postgres_is_refused_undeclared_and_declared_runs_its_runbook_halting_while_the_standby_lags(
        before: tuple[Any, Path]) -> None:
    lab, tmp = before
    assert psql(lab, TARGET, "SELECT count(*) FROM moved_rows", port=5433) == "100"  # the standby has the rows

    undeclared = fleet(lab, "plan", directory=fleet_dir(tmp / "after", postgres_on=TARGET, db_port="5433"))
    assert undeclared.returncode == 1, undeclared.stdout + undeclared.stderr
    assert undeclared.stderr.startswith("fleet: error: refusing to plan: postgres would move from freud to nietzsche "
                                        "without a move declaration (postgresql.service runs on freud"), \
        undeclared.stderr
    assert '    [moves.postgres]\n    from = "freud"\n    to = "nietzsche"\n    method = "streaming-replica"' \
        in undeclared.stderr
    assert "Traceback" not in undeclared.stderr

    declared = fleet_dir(tmp / "declared", postgres_on=TARGET, db_port="5433", extra=DECLARED)
    psql(lab, TARGET, "SELECT pg_wal_replay_pause()", port=5433)  # the standby falls behind …
    psql(lab, SOURCE, "INSERT INTO moved_rows SELECT generate_series(101, 200)")  # … as freud is written
    lagging = fleet(lab, "plan", directory=declared)
    assert lagging.returncode == 2, lagging.stdout + lagging.stderr  # changes are pending
    out = lagging.stdout
    address = lab.addresses[SOURCE]
    assert "? move-check postgres:5433" in out and "      now: ok: freud is the primary: 15/main on freud is a " \
        "primary at WAL " in out, out
    assert (f"      now: ok: nietzsche is a standby of freud: 15/moved on nietzsche streams from {address}:5432 "
            "(streaming)\n      now: NOT YET: caught up: ") in out, out
    behind = int(out.split("NOT YET: caught up: ", 1)[1].split(" ", 1)[0])
    assert behind > 0 and " bytes of WAL behind freud\n" in out
    order = out.split("Order (", 1)[1]
    assert order.index("1. nietzsche:move-check") < order.index("2. nietzsche:move-quiet") < order.index(
        "3. nietzsche:move-drained") < order.index("4. freud:move-read-only") < order.index(
        "5. nietzsche:move-caught-up") < order.index("6. nietzsche:move-promote") < order.index("write-env") < \
        order.index("freud:move-stop-source"), order
    assert "\n      now: jobs queued: " in out, out  # Sidekiq's view, under move-drained

    # Applied while it lags: the first gate halts the move, nothing is repointed, `fleet log` says why.
    halted = fleet(lab, "apply", "--yes", "--settle", "1", "--start-timeout", "2", directory=declared, timeout=300)
    assert halted.returncode != 0, halted.stdout + halted.stderr
    log = fleet(lab, "log", "--since", "10m", directory=declared)
    assert "on nietzsche, checked the move's data on postgres:5433" in log.stdout, log.stdout
    assert "FAILED: gate 'caught up' did not pass: " in log.stdout and " bytes of WAL behind freud (at " in \
        log.stdout, log.stdout
    assert "DB_HOST=freud.hachyderm.internal" in lab.ssh(TARGET, f"grep ^DB_HOST= {ENV}", user="root").stdout
    assert psql(lab, SOURCE, "SHOW default_transaction_read_only") == "off"  # never made read-only
    assert lab.ssh(SOURCE, "systemctl is-active postgresql@15-main.service", user="root").stdout.strip() == "active"

    # Replaying again, but 7 jobs wait in a queue no Sidekiq process serves: quiet Sidekiq leaves them
    # queued, so the move halts at move-drained naming them, before anything is read-only or rewritten,
    # and restarts the Sidekiq units it quieted.
    psql(lab, TARGET, "SELECT pg_wal_replay_resume()", port=5433)
    enqueue(lab, ORPHANS, 7, enqueued_at=time.time())
    queued = fleet(lab, "apply", "--yes", "--settle", "1", directory=declared, timeout=300)
    assert queued.returncode != 0, queued.stdout + queued.stderr
    log = fleet(lab, "log", "--since", "10m", directory=declared)
    assert f"FAILED: gate 'queues drained' did not pass: 7 ({ORPHANS}: 7) job(s) still queued" in log.stdout, \
        log.stdout
    assert "apply again with --accept-queued 7" in log.stdout, log.stdout
    assert "restarted the Sidekiq units quieted for the move, which resume against the source: " in log.stdout, \
        log.stdout
    assert "DB_HOST=freud.hachyderm.internal" in lab.ssh(TARGET, f"grep ^DB_HOST= {ENV}", user="root").stdout
    assert psql(lab, SOURCE, "SHOW default_transaction_read_only") == "off"

    def working() -> bool:  # every declared Sidekiq unit's (new) process heartbeats, and not quiet
        view, _ = read_view(lab)
        procs = [process_of(view, h, main_pid(lab, h, u)) for h, u, _, _ in SIDEKIQ]
        return all(p is not None and not p.quiet for p in procs)

    poll(working, 30, "the Sidekiq units quieted for the halted move are not all working again")

    # Accepted: the move runs end to end, the 7 jobs still queued.
    started = time.time()
    moved = fleet(lab, "apply", "--yes", "--settle", "1", "--accept-queued", "7", directory=declared, timeout=300)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert psql(lab, TARGET, "SELECT count(*) FROM moved_rows", port=5433) == "200"  # every row freud had
    assert psql(lab, TARGET, "SELECT pg_is_in_recovery()", port=5433) == "f"  # promoted: takes writes
    psql(lab, TARGET, "INSERT INTO moved_rows VALUES (201)", port=5433)
    for host in lab.names:
        assert "DB_HOST=nietzsche.hachyderm.internal" in lab.ssh(host, f"grep ^DB_HOST= {ENV}", user="root").stdout
    assert lab.ssh(SOURCE, "systemctl is-active postgresql@15-main.service", user="root",
                   check=False).stdout.strip() == "inactive"

    # From the journal: DB_HOST was rewritten on no host before the promote's gate passed, every
    # gate before it passed, and freud's server stopped after every Mastodon (re)start.
    by_action = last_ok_run_steps_by_action(lab, since=started)
    gates = [by_action[a][0] for a in ("move-check", "move-quiet", "move-drained", "move-read-only",
                                       "move-caught-up", "move-promote")]
    assert [g.outcome for g in gates] == ["ok"] * 6
    assert all(a.ended <= b.started for a, b in zip(gates, gates[1:], strict=False))
    writes = [st for st in by_action["write-env"] if "DB_HOST" in str(st.details.get("keys"))]
    assert writes and gates[-1].ended <= min(st.started for st in writes)
    [stop] = by_action["move-stop-source"]
    runs = by_action.get("restart", []) + by_action.get("start", [])
    assert runs and stop.outcome == "ok" and max(st.ended for st in runs) <= stop.started
    # Sidekiq quiet before the source went read-only, and every quieted unit restarted after the promote.
    assert gates[1].ended <= gates[3].started
    restarted = {(st.host, st.target) for st in runs if st.outcome == "ok" and gates[-1].ended <= st.started}
    assert {(h, u) for h, u, _, _ in SIDEKIQ} <= restarted, restarted
    assert redis_cli(lab, [["LLEN", f"queue:{ORPHANS}"]]) == ["7"]  # accepted, still queued (nobody serves it)


# ------------------------------------------------------------------ moving Redis (runbook_redis.py)

REDIS = 'unit = "redis-server.service"\nhosts = ["nietzsche"]'
REDIS_HOST = 'REDIS_HOST = "nietzsche.hachyderm.internal"'
REDIS_DECLARED = '\n[moves.redis]\nfrom = "freud"\nto = "nietzsche"\nmethod = "redis-replica"\n'
KEYS = 50  # written on freud before the move, read on nietzsche after it


def redis_dir(root: Path, *, redis_on: str, extra: str = "") -> Path:
    """The example with redis (and REDIS_HOST) on `redis_on`; postgres stays on nietzsche."""
    shutil.copytree(REPO / "hosts", root / "hosts")
    text = (REPO / "desired_state.toml").read_text()
    assert text.count(REDIS) == 1 and text.count(REDIS_HOST) == 1
    text = text.replace(REDIS, REDIS.replace("nietzsche", redis_on))
    text = text.replace(REDIS_HOST, REDIS_HOST.replace("nietzsche", redis_on))
    (root / "desired_state.toml").write_text(text + extra)
    return root


def rcli(lab: Any, host: str, *args: str, check: bool = True) -> str:
    """redis-cli on the host's Redis, with the lab's password (read there, in the environment only)."""
    done = lab.ssh(host, "REDISCLI_AUTH=$(sed -n 's/^requirepass //p' /etc/redis/fleet-lab.conf) redis-cli "
                         + " ".join(shlex.quote(a) for a in args), user="root", check=check)
    return str(done.stdout).strip()


@pytest.fixture
def redis_before(lab: Any, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """The fleet before the move: redis on freud (converged, Sidekiq and all pointing there), keys
    written there; nietzsche's own Redis started beside it, empty and a master of its own."""
    reset_all(lab)
    done = fleet(lab, "apply", "--yes", "--settle", "1", directory=redis_dir(tmp_path / "before", redis_on=SOURCE),
                 timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lab.ssh(SOURCE, "REDISCLI_AUTH=$(sed -n 's/^requirepass //p' /etc/redis/fleet-lab.conf) && export REDISCLI_AUTH "
                    f"&& for i in $(seq {KEYS}); do echo \"SET fleet-test:moved:$i $i\"; done | redis-cli >/dev/null",
            user="root")
    lab.ssh(TARGET, "systemctl start redis-server.service", user="root")
    rcli(lab, TARGET, "FLUSHALL")
    yield lab, tmp_path
    # The move leaves freud's Redis stopped, nietzsche's a master holding the test's keys: both
    # back as they were (min-replicas-to-write, REPLICAOF and masterauth are runtime settings only).
    lab.ssh(SOURCE, "systemctl start redis-server.service", user="root", check=False)
    for host in (SOURCE, TARGET):  # one session each: REDISCLI_AUTH read there, commands on stdin
        lab.ssh(host, "REDISCLI_AUTH=$(sed -n 's/^requirepass //p' /etc/redis/fleet-lab.conf) redis-cli", user="root",
                check=False, input="REPLICAOF NO ONE\nCONFIG SET min-replicas-to-write 0\nCONFIG SET masterauth ''\n"
                                   "EVAL \"for _, k in ipairs(redis.call('KEYS', 'fleet-test:moved:*')) do "
                                   "redis.call('DEL', k) end\" 0\n")
    try:  # said, not hoped for: freud's Redis takes writes again, without the test's keys
        seen = lab.ssh(SOURCE, "REDISCLI_AUTH=$(sed -n 's/^requirepass //p' /etc/redis/fleet-lab.conf) redis-cli",
                       user="root", input="SET fleet-test:write 1\nDEL fleet-test:write\nKEYS fleet-test:moved:*\n")
        assert seen.stdout.split() == ["OK", "1"], seen.stdout + seen.stderr
    finally:
        reset_all(lab)  # (which stops the Redis servers)


def test_moving_redis_halts_while_the_target_is_no_replica_then_runs_its_runbook_end_to_end(
        redis_before: tuple[Any, Path]) -> None:
    lab, tmp = redis_before
    declared = redis_dir(tmp / "declared", redis_on=TARGET, extra=REDIS_DECLARED)

    # nietzsche's Redis is empty, a master of its own: the move halts at its first gate.
    halted = fleet(lab, "apply", "--yes", "--settle", "1", "--start-timeout", "2", directory=declared, timeout=300)
    assert halted.returncode != 0, halted.stdout + halted.stderr
    log = fleet(lab, "log", "--since", "10m", directory=declared)
    assert "on nietzsche, checked the move's data on redis:6379" in log.stdout, log.stdout
    assert ("FAILED: gate 'nietzsche is a replica of freud' did not pass: redis on nietzsche is a master of its own"
            in log.stdout), log.stdout
    assert "REDIS_HOST=freud.hachyderm.internal" in lab.ssh(TARGET, f"grep ^REDIS_HOST= {ENV}", user="root").stdout
    assert rcli(lab, SOURCE, "CONFIG", "GET", "min-replicas-to-write").split() == ["min-replicas-to-write", "0"]

    # The operator's replication: nietzsche a replica of freud (masterauth is the operator's setup).
    lab.ssh(TARGET, "P=$(sed -n 's/^requirepass //p' /etc/redis/fleet-lab.conf) && export REDISCLI_AUTH=$P && "
                    "printf 'CONFIG SET masterauth %s\\n' \"$P\" | redis-cli", user="root")  # no password in an argv
    rcli(lab, TARGET, "REPLICAOF", lab.addresses[SOURCE], "6379")
    lab.ssh(TARGET, "for i in $(seq 100); do REDISCLI_AUTH=$(sed -n 's/^requirepass //p' /etc/redis/fleet-lab.conf) "
                    "redis-cli INFO replication | grep -q '^master_link_status:up' && exit 0; sleep 0.1; done; exit 1",
            user="root")
    # Sidekiq stopped first (by hand, while freud takes writes, so each leaves `processes`): its
    # restarts would each wait ~52 s for the old process's entry, replicated to nietzsche and left
    # there by a process that cannot remove it from a source refusing writes, to expire (measured;
    # docs/apply.md).  Stopped, the plan starts them, after the promote, like every other change.
    for host in (SOURCE, TARGET):
        lab.ssh(host, "systemctl stop 'mastodon-sidekiq*'", user="root")
    started = time.time()
    moved = fleet(lab, "apply", "--yes", "--settle", "1", directory=declared, timeout=300)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert [rcli(lab, TARGET, "GET", f"fleet-test:moved:{i}") for i in (1, KEYS)] == ["1", str(KEYS)]
    assert "role:master" in rcli(lab, TARGET, "INFO", "replication")  # promoted: takes writes
    assert rcli(lab, TARGET, "SET", "fleet-test:moved:after", "1") == "OK"
    for host in lab.names:
        assert "REDIS_HOST=nietzsche.hachyderm.internal" in lab.ssh(host, f"grep ^REDIS_HOST= {ENV}",
                                                                    user="root").stdout
    assert lab.ssh(SOURCE, "systemctl is-active redis-server.service", user="root",
                   check=False).stdout.strip() == "inactive"

    # From the journal: REDIS_HOST rewritten on no host before the promote's gate passed, every gate
    # before it passed, and freud's Redis stopped after every Mastodon (re)start.
    by_action = last_ok_run_steps_by_action(lab, since=started)
    gates = [by_action[a][0] for a in ("move-check", "move-read-only", "move-caught-up", "move-promote")]
    assert [g.outcome for g in gates] == ["ok"] * 4
    assert all(a.ended <= b.started for a, b in zip(gates, gates[1:], strict=False))
    writes = [st for st in by_action["write-env"] if "REDIS_HOST" in str(st.details.get("keys"))]
    assert writes and gates[-1].ended <= min(st.started for st in writes)
    [stop] = by_action["move-stop-source"]
    runs = by_action.get("restart", []) + by_action.get("start", [])
    assert runs and stop.outcome == "ok" and max(st.ended for st in runs) <= stop.started
