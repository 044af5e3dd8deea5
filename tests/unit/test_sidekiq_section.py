"""The Sidekiq collection section, run for real: `sh` (dash, as the collector's `sh -c`) with the
machine's awk and redis-cli against a throwaway Debian redis-server with a password (redis_server.py),
then parsed.  Redis is found from an env file exactly as Mastodon finds it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from redis_server import PASSWORD, Redis

from fleet.errors import ParseError
from fleet.output.text import sidekiq_live_text
from fleet.sidekiq import Match, SidekiqReport, SidekiqView, parse_section, section_script

NOW = float(int(time.time()) - 100)  # heartbeats and jobs are stamped relative to it (Redis's clock is real)


SH = shutil.which("sh") or "/bin/sh"


def run(script: str, *, path: str | None = None) -> str:
    env = {"PATH": path or os.environ["PATH"], "LC_ALL": "C"}
    done = subprocess.run([SH, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def section(tmp_path: Path, env_text: str | None, path: str | None = None, **kw: Any) -> tuple[SidekiqView, str]:
    env = tmp_path / ".env.production"
    if env_text is not None:
        env.write_text(env_text)
    out = run(section_script(str(env), **kw), path=path)
    lines = out.split("\n")
    assert lines[0] == "@@sidekiq"
    assert not any(line.startswith("@@") for line in lines[1:]), out
    return parse_section("nietzsche", lines[1:]), out


def heartbeat(redis: Redis, identity: str, info: dict[str, Any] | str, **fields: Any) -> None:
    """What Sidekiq's launcher writes each beat (SADD processes, HSET identity …)."""
    values = {"busy": 0, "beat": NOW, "quiet": "false", "rss": 123456, "rtt_us": 321, **fields}
    text = info if isinstance(info, str) else json.dumps(info, separators=(",", ":"))
    pairs = "".join(f" {word(k)} {word(str(v))}" for k, v in values.items())
    redis.cli(stdin=f"SADD processes {word(identity)}\nHSET {word(identity)} info {word(text)}{pairs}\n")


def word(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def push(redis: Redis, queue: str, *jobs: dict[str, Any] | str) -> None:
    texts = [j if isinstance(j, str) else json.dumps(j, separators=(",", ":")) for j in jobs]
    redis.cli(stdin=f"SADD queues {word(queue)}\nLPUSH {word('queue:' + queue)} {' '.join(word(t) for t in texts)}\n")


def info7(hostname: str, pid: int, queues: dict[str, int], concurrency: int = 25, **extra: Any) -> dict[str, Any]:
    """A Sidekiq 7.3 `info` document, as Launcher#to_data builds it."""
    return {"hostname": hostname, "started_at": NOW - 3600.5, "pid": pid, "tag": "live", "concurrency": concurrency,
            "queues": list(queues), "weights": [queues], "labels": [], "identity": f"{hostname}:{pid}:0123456789ab",
            "version": "7.3.9", "embedded": False, **extra}


@pytest.fixture
def r(redis: Redis) -> Redis:
    redis.flush()
    return redis


def test_the_section_reads_sidekiq_7_and_8_processes_and_queues_from_a_real_redis(r: Redis, tmp_path: Path) -> None:
    heartbeat(r, "freud:101:0123456789ab", info7("freud", 101, {"default": 8, "ingress": 6, "mailers": 2}),
              busy=3, quiet="false")
    # Sidekiq 8: the thread count moved to the hash, capsules describe the weights.
    heartbeat(r, "nietzsche:202:abcdefabcdef",
              {"hostname": "nietzsche", "started_at": NOW - 10, "pid": 202, "tag": "live",
               "capsules": {"default": {"concurrency": 5, "mode": "strict", "weights": {"scheduler": 0}}},
               "queues": ["scheduler"], "weights": [{"scheduler": 0}], "labels": ["leader"],
               "identity": "nietzsche:202:abcdefabcdef", "version": "8.0.4", "embedded": False},
              concurrency=5, quiet="true", beat=NOW - 5.25)
    r.cli("SADD", "processes", "gone:1:ffffffffffff")  # died without leaving: its hash expired
    push(r, "mailers", {"retry": True, "queue": "mailers", "args": [1], "class": "MailJob", "jid": "a" * 24,
                        "created_at": NOW - 700.5, "enqueued_at": NOW - 600.25},
         {"class": "MailJob", "jid": "b" * 24, "enqueued_at": NOW - 5.0})
    push(r, "default", {"class": "Job", "jid": "c" * 24, "created_at": int(NOW - 900) * 1000,
                        "enqueued_at": int(NOW - 800) * 1000 + 250})  # Sidekiq 8: integer milliseconds
    r.cli("SADD", "queues", "push")  # known, empty
    view, out = section(tmp_path, r.env())
    assert view.target is not None and view.target.describe() == f"redis://127.0.0.1:{r.port}/0 (from REDIS_HOST)"
    assert view.target.auth and not view.target.tls
    assert view.error == "" and view.complete and view.processes_total == 3 and view.queues_total == 3
    assert view.stale == ("gone:1:ffffffffffff",)
    freud, nietzsche = view.processes
    assert freud.identity == "freud:101:0123456789ab" and (freud.hostname, freud.pid) == ("freud", 101)
    assert freud.queues == (("default", 8), ("ingress", 6), ("mailers", 2)) and freud.concurrency == 25
    assert (freud.busy, freud.beat, freud.quiet, freud.rss, freud.rtt_us) == (3, NOW, False, 123456, 321)
    assert (freud.tag, freud.version, freud.started_at) == ("live", "7.3.9", NOW - 3600.5)
    assert nietzsche.queues == (("scheduler", 0),) and nietzsche.concurrency == 5 and nietzsche.quiet
    assert nietzsche.labels == ("leader",) and nietzsche.beat == NOW - 5.25
    mailers, default, push_queue = view.queue("mailers"), view.queue("default"), view.queue("push")
    assert mailers is not None and mailers.size == 2 and mailers.oldest_enqueued_at == NOW - 600.25
    assert mailers.latency == pytest.approx(view.redis_time - (NOW - 600.25))
    assert default is not None and default.oldest_enqueued_at == NOW - 800 + 0.25
    assert push_queue is not None and (push_queue.size, push_queue.oldest_enqueued_at, push_queue.latency) == (
        0, None, 0.0)
    assert PASSWORD not in out


def test_a_beat_newer_than_the_sections_time_is_read_as_written_and_shown_as_just_now(r: Redis,
                                                                                      tmp_path: Path) -> None:
    """The section reads Redis's TIME in its first round and the heartbeats in its second: a beat
    that lands between them (or from a client whose clock is ahead) is newer than the view's clock.
    That is a state a read can return — a lab test once failed asserting it could not — and it is
    shown as a beat just now, never as a negative age or a finding."""
    ahead = time.time() + 30  # in the future of any TIME this read can take
    heartbeat(r, "freud:101:0123456789ab", info7("freud", 101, {"default": 1}), beat=ahead)
    view, _ = section(tmp_path, r.env())
    (p,) = view.processes
    assert p.beat == ahead and p.beat > view.redis_time
    report = SidekiqReport(host="nietzsche", view=view, now=view.redis_time, matches=(Match(p, "freud", None),),
                           silent=(), queues=(), findings=())
    (row,) = [line for line in sidekiq_live_text(report).splitlines() if line.startswith("freud ")]
    assert row.split()[6:8] == ["0s", "ago"], row


def test_the_password_reaches_redis_cli_in_its_environment_and_never_in_an_argv(r: Redis, tmp_path: Path) -> None:
    real = shutil.which("redis-cli")
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    wrapper = bin_dir / "redis-cli"
    # Records every redis-cli argv, its parent's (timeout's) argv and whether it got the password.
    wrapper.write_text(f"""#!/bin/sh
{{ printf 'argv:'; printf ' %s' "$@"; printf '\\nparent:'; tr '\\0' ' ' </proc/$PPID/cmdline
  printf '\\nauth:%s\\n' "${{REDISCLI_AUTH:+set}}"; }} >>{log}
exec {real} "$@"
""")
    wrapper.chmod(0o755)
    heartbeat(r, "freud:101:0123456789ab", info7("freud", 101, {"default": 1}))
    push(r, "default", {"class": "Job", "jid": "c" * 24, "enqueued_at": NOW})
    view, out = section(tmp_path, r.env(), path=f"{bin_dir}:{os.environ['PATH']}")
    assert len(view.processes) == 1 and view.queue("default") is not None
    calls = log.read_text()
    assert calls.count("argv:") == 2 and calls.count("auth:set") == 2  # both rounds authenticated …
    assert PASSWORD not in calls and "pa ss" not in calls  # … and no argv held the password
    assert PASSWORD not in out


def test_the_section_never_prints_the_password_whatever_happens(r: Redis, tmp_path: Path) -> None:
    for env_text in (r.env(), r.env(REDIS_PORT="1"), r.env(REDIS_NAMESPACE="x"),
                     f"REDIS_URL=redis://:{PASSWORD}@127.0.0.1:1/0\n",
                     f"REDIS_URL=redis://127.0.0.1:{r.port}\nREDIS_PASSWORD={PASSWORD}\n"):
        _, out = section(tmp_path, env_text, timeout=5)
        assert PASSWORD not in out and "pa ss" not in out


# ------------------------------------------------------------------------- finding Redis like Mastodon


def target(tmp_path: Path, env_text: str) -> tuple[str, str, int, int, bool, bool] | str:
    view, _ = section(tmp_path, env_text, timeout=3)
    if view.target is None:
        return view.error
    t = view.target
    return t.source, t.host, t.port, t.db, t.tls, t.auth


# Hosts are loopback addresses or localhost: nothing here may resolve a name or leave the machine.
@pytest.mark.parametrize(("env_text", "expected"), [
    ("", ("default", "localhost", 6379, 0, False, False)),
    ("REDIS_HOST=127.0.0.2\nREDIS_PORT=6380\nREDIS_DB=2\n", ("REDIS_HOST", "127.0.0.2", 6380, 2, False, False)),
    ("REDIS_URL=rediss://:pw@127.0.0.3:7000/4\nREDIS_HOST=127.0.0.2\n",
     ("REDIS_URL", "127.0.0.3", 7000, 4, True, True)),
    ("REDIS_URL=redis://[::1]:7001\n", ("REDIS_URL", "::1", 7001, 0, False, False)),
    ("SIDEKIQ_REDIS_URL=redis://127.0.0.4/3\nREDIS_URL=redis://127.0.0.5\nREDIS_HOST=127.0.0.2\n",
     ("SIDEKIQ_REDIS_URL", "127.0.0.4", 6379, 3, False, False)),
    ("SIDEKIQ_REDIS_HOST=127.0.0.4\nREDIS_URL=redis://127.0.0.5\nREDIS_PASSWORD=notthisone\n",
     ("SIDEKIQ_REDIS_HOST", "127.0.0.4", 6379, 0, False, False)),
    ("SIDEKIQ_REDIS_URL=\nREDIS_HOST=127.0.0.2\n", ("REDIS_HOST", "127.0.0.2", 6379, 0, False, False)),
    ("export REDIS_HOST='127.0.0.6'  \nREDIS_PORT=6390 # a comment\r\n",
     ("REDIS_HOST", "127.0.0.6", 6390, 0, False, False)),
    ("REDIS_HOST=127.0.0.7\nREDIS_HOST=localhost\n", ("REDIS_HOST", "localhost", 6379, 0, False, False)),
    ("REDIS_USER=only-a-user\n", ("default", "localhost", 6379, 0, False, True)),  # redis-client: the password
    # a quoted value of another key spanning lines is not read as assignments
    ('OTHER="line one\nREDIS_HOST=127.0.0.9\n"\nREDIS_HOST=127.0.0.8\n',
     ("REDIS_HOST", "127.0.0.8", 6379, 0, False, False)),
    ("REDIS_NAMESPACE=mastodon\n", "REDIS_NAMESPACE is set: Sidekiq 7 has no namespaces (Mastodon refuses it)"),
    ("REDIS_SENTINEL_MASTER=m\nREDIS_SENTINELS=127.0.0.2:26379\n",
     "Sidekiq's Redis is behind Sentinel (REDIS_SENTINELS), which fleet does not read"),
    ("SIDEKIQ_REDIS_SENTINEL_MASTER=m\nSIDEKIQ_REDIS_SENTINELS=127.0.0.2\n",
     "Sidekiq's Redis is behind Sentinel (SIDEKIQ_REDIS_SENTINELS), which fleet does not read"),
    ("REDIS_URL=unix:///run/redis.sock\n", "REDIS_URL is not a redis:// or rediss:// URL"),
    ("REDIS_HOST=\"bad host;rm -rf /\"\n", "the Redis host from REDIS_HOST is not a host name or address"),
    ("REDIS_HOST=127.0.0.2\nREDIS_PORT=70000\n", "the Redis port from REDIS_HOST is not a port number"),
    ("REDIS_URL=redis://127.0.0.2/x\n", "the Redis database from REDIS_URL is not a number"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_redis_is_found_from_the_env_file_as_mastodon_finds_it(tmp_path: Path, env_text: str,
                                                              expected: object) -> None:
    assert target(tmp_path, env_text) == expected


@pytest.mark.parametrize(("make_env", "password"), [
    # in a URL the password is percent-encoded, + for a space (decode_www_form_component)
    (lambda port: f"REDIS_URL=redis://:{_form(PASSWORD)}@127.0.0.1:{port}/0\n", PASSWORD),
    (lambda port: f"REDIS_URL=redis://{_form(PASSWORD)}@127.0.0.1:{port}\n", PASSWORD),  # a user alone: password
    (lambda port: f"SIDEKIQ_REDIS_HOST=127.0.0.1\nSIDEKIQ_REDIS_PORT={port}\n"
                  f"SIDEKIQ_REDIS_PASSWORD={_quote(PASSWORD)}\nREDIS_PASSWORD=wrong\n", PASSWORD),
    (lambda port: f"REDIS_HOST=127.0.0.1\nREDIS_PORT={port}\nREDIS_PASSWORD='single quoted \"$x\"'\n",
     'single quoted "$x"'),
], ids=["url", "url-user-only", "sidekiq-host", "single-quoted"])
def test_the_section_authenticates_with_the_password_however_the_env_file_gives_it(
        redis: Redis, tmp_path: Path, make_env: Any, password: str) -> None:
    redis.flush()
    redis.cli("CONFIG", "SET", "requirepass", password)
    server = Redis(redis.port, redis.dir, password)
    try:
        heartbeat(server, "h:1:0123456789ab", info7("h", 1, {"default": 0}))
        view, out = section(tmp_path, make_env(redis.port))
        assert view.error == "" and [p.pid for p in view.processes] == [1], out
        assert password not in out
    finally:
        server.cli("CONFIG", "SET", "requirepass", PASSWORD)


def _form(text: str) -> str:
    from urllib.parse import quote_plus

    return quote_plus(text)


def _quote(text: str) -> str:
    from fleet.envfile import render_value

    return render_value(text)


def test_an_acl_user_and_a_database_number_are_used(r: Redis, tmp_path: Path) -> None:
    r.cli("ACL", "SETUSER", "sidekiq", "on", ">user pass", "~*", "+@all")
    r.cli("-n", "3", "SADD", "queues", "db3-queue")
    try:
        view, out = section(tmp_path, f"REDIS_URL=redis://sidekiq:user+pass@127.0.0.1:{r.port}/3\n")
        assert view.error == "" and [q.name for q in view.queues] == ["db3-queue"], out
        assert "user pass" not in out
    finally:
        r.cli("ACL", "DELUSER", "sidekiq")


# ------------------------------------------------------------------------- when nothing can be read


def test_a_missing_env_file_an_unreachable_redis_or_a_wrong_password_is_an_error_not_a_view(
        r: Redis, tmp_path: Path) -> None:
    assert section(tmp_path, None)[0].error == "the env file is not on the host"
    view, _ = section(tmp_path, r.env(REDIS_PORT="1"))
    assert view.error.startswith("cannot reach Redis: Could not connect to Redis at 127.0.0.1:1")
    view, _ = section(tmp_path, r.env(REDIS_PASSWORD="wrong"))
    assert view.error.startswith("Redis refused: ") and "NOAUTH" in view.error


def test_a_host_without_redis_cli_says_so(r: Redis, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("awk", "timeout", "grep", "cut", "head", "cat"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    assert section(tmp_path, r.env(), path=str(bin_dir))[0].error == "redis-cli is not installed on the host"


# ------------------------------------------------------------------------- bounds and hostile data


def test_a_flood_of_processes_is_read_only_up_to_the_bound_and_flagged_incomplete(r: Redis, tmp_path: Path) -> None:
    lines = "".join(f"SADD processes flood:{n}:000000000000\n" for n in range(300))
    r.cli(stdin=lines)
    for n in range(3):
        heartbeat(r, f"flood:{n}:000000000000", info7("flood", n, {"default": 0}))
    view, out = section(tmp_path, r.env(), max_processes=5, max_queues=2)
    assert view.processes_total == 300 and len(view.processes) + len(view.stale) == 5
    assert not view.complete
    assert out.count("\nP ") == 5 and len(out) < 10_000


def test_a_huge_queue_and_a_huge_job_cost_one_short_line(r: Redis, tmp_path: Path) -> None:
    big = {"retry": True, "queue": "ingress", "args": ["x" * 2_000_000, {"enqueued_at": 1.0}], "class": "Big",
           "jid": "d" * 24, "created_at": NOW - 30.0, "enqueued_at": NOW - 20.5}
    push(r, "ingress", big)
    r.cli(stdin="".join(f"RPUSH queue:ingress {n}\n" for n in range(2000)))  # newer jobs, at the head side
    r.cli("LPUSH", "queue:ingress", "newest")
    view, out = section(tmp_path, r.env())
    ingress = view.queue("ingress")
    assert ingress is not None and ingress.size == 2002
    j = [line for line in out.splitlines() if line.startswith("J ")]
    assert j == ['J - - 6']  # the oldest is the last number pushed to the tail, "1999": no timestamps
    r.cli("DEL", "queue:ingress")
    push(r, "ingress", big)
    view, out = section(tmp_path, r.env())
    ingress = view.queue("ingress")
    assert ingress is not None and ingress.oldest_enqueued_at == NOW - 20.5
    assert max(len(line) for line in out.splitlines()) < 1000


def test_a_heartbeat_or_an_identity_beyond_the_bounds_is_refused_naming_the_section(r: Redis, tmp_path: Path) -> None:
    heartbeat(r, "h:1:0123456789ab", info7("h", 1, {"default": 0}, labels=["x" * 5000]))
    with pytest.raises(ParseError) as e:
        section(tmp_path, r.env(), max_line=2000)
    assert e.value.section == "sidekiq" and "heartbeat longer than" in e.value.message
    r.flush()
    r.cli("SADD", "processes", "i" * 2000)
    with pytest.raises(ParseError) as e:
        section(tmp_path, r.env())
    assert e.value.section == "sidekiq" and "process identity longer than" in e.value.message


def test_hostile_identities_and_queue_names_are_read_exactly_and_cannot_inject_commands(
        r: Redis, tmp_path: Path) -> None:
    evil = ['a" "b', 'x"\nFLUSHALL\n"', "@@end", "ünï\tcödé\\", 'q" info busy "']
    for n, identity in enumerate(evil):
        heartbeat(r, identity, info7("h", 100 + n, {"default": 0}))
    for name in evil:
        push(r, name, {"class": "J", "enqueued_at": NOW})
    view, out = section(tmp_path, r.env())
    assert sorted(p.identity for p in view.processes) == sorted(evil)
    assert sorted(q.name for q in view.queues) == sorted(evil) and all(q.size == 1 for q in view.queues)
    assert r.cli("DBSIZE").strip() == str(1 + 1 + len(evil) * 2)  # nothing was flushed or written


def test_data_sidekiq_did_not_write_is_refused_naming_the_section(r: Redis, tmp_path: Path) -> None:
    cases: list[tuple[str, str]] = [
        ("HSET h:1:x info not-json", "info is not JSON"),
        ("HSET h:1:x info \"[1,2]\"", "not a JSON object"),
        ("HSET h:1:x info \"" + "[" * 3000 + "]" * 3000 + "\"", "info is not JSON"),
        ("HSET h:1:x info \"{\\\"pid\\\":\\\"x\\\"}\"", "malformed 'pid'"),
        ("HSET h:1:x info {} beat 1", "malformed 'concurrency'"),
        ("HSET h:1:x info \"{\\\"concurrency\\\":5}\" beat soon", "malformed 'beat'"),
        ("HSET h:1:x info \"{\\\"concurrency\\\":5,\\\"queues\\\":[1]}\" beat 1", "malformed queues"),
        ("HSET h:1:x info \"{\\\"concurrency\\\":5,\\\"weights\\\":[{\\\"a\\\":-1}]}\" beat 1",
         "malformed 'weights'"),
        ("SET h:1:x a-string", "malformed"),
    ]
    for command, message in cases:
        r.flush()
        r.cli(stdin=f"SADD processes h:1:x\n{command}\n")
        with pytest.raises(ParseError) as e:
            section(tmp_path, r.env())
        assert e.value.section == "sidekiq" and message in e.value.message, command
    r.flush()
    r.cli(stdin="SADD queues q\nHSET queue:q a b\n")
    with pytest.raises(ParseError, match="number was expected"):
        section(tmp_path, r.env())
    r.flush()
    r.cli("SET", "processes", "not a set")
    assert "WRONGTYPE" in section(tmp_path, r.env())[0].error


def test_the_section_script_is_plain_posix_sh() -> None:
    script = section_script("/home/mastodon/live/.env.production")
    for shell in ("sh", "bash", "dash"):
        found = shutil.which(shell)
        assert found is not None, shell
        done = subprocess.run([found, "-n", "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
