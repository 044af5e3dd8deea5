"""The lab's Sidekiq stand-in (fleet/lab/standins/bundle) speaks Sidekiq 7's protocol to a real Redis:
run here against the throwaway redis-server of redis_server.py, read back with fleet's own Sidekiq
section, so that both ends of the protocol are held to each other (the lab tests then do it on the
lab's hosts)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from redis_server import PASSWORD, Redis

from fleet.sidekiq import SidekiqProcess, SidekiqView, parse_section, section_script

BUNDLE = Path(__file__).resolve().parents[2] / "fleet" / "lab" / "standins" / "bundle"
BEAT = "0.3"  # STANDIN_BEAT_SECONDS: Sidekiq's 10 s would make every wait 10 s long


def standin() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("fleet_lab_bundle", str(BUNDLE))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class Standin:
    """One stand-in process and what it has printed so far (read as it comes, by a thread)."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    @property
    def output(self) -> str:
        return "".join(self.lines)


class App:
    """/home/mastodon/live in miniature: .env.production, config/sidekiq.yml, processes started in it."""

    def __init__(self, root: Path, redis: Redis) -> None:
        self.root, self.redis = root, redis
        (root / "config").mkdir(parents=True, exist_ok=True)
        (root / ".env.production").write_text(redis.env())
        self.procs: list[Standin] = []

    def start(self, *args: str, **env: str) -> Standin:
        environ = {"PATH": os.environ["PATH"], "RAILS_ENV": "production", "STANDIN_BEAT_SECONDS": BEAT, **env}
        p = subprocess.Popen([sys.executable, str(BUNDLE), "exec", "sidekiq", *args], cwd=self.root, env=environ,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(Standin(p))
        return self.procs[-1]

    def view(self) -> SidekiqView:
        done = subprocess.run(["sh", "-c", section_script(str(self.root / ".env.production"))], capture_output=True,
                              text=True, timeout=30)
        lines = done.stdout.split("\n")
        assert lines[0] == "@@sidekiq", done.stdout + done.stderr
        return parse_section("local", lines[1:])

    def process(self, p: Standin) -> SidekiqProcess | None:
        return next((x for x in self.view().processes if x.pid == p.pid), None)

    def stop(self, p: Standin, sig: int = signal.SIGTERM) -> tuple[int, str]:
        p.popen.send_signal(sig)
        code = p.popen.wait(timeout=30)
        p.reader.join(timeout=10)
        return code, p.output


def until(what: Callable[[], Any], timeout: float = 15) -> Any:
    """Poll `what` until it returns something true (a heartbeat lands in Redis when it lands)."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def app(redis: Redis, tmp_path: Path) -> Iterator[App]:
    redis.flush()
    a = App(tmp_path / "live", redis)
    yield a
    for p in a.procs:
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait()


def test_it_heartbeats_like_sidekiq_7_with_its_queues_and_concurrency(app: App) -> None:
    p = app.start("-c", "25", "-q", "default,8", "-q", "ingress,6", "-q", "mailers,2")
    proc = until(lambda: app.process(p))
    assert proc.identity.startswith(f"{socket.gethostname()}:{p.pid}:") and len(proc.identity.split(":")[2]) == 12
    assert proc.hostname == socket.gethostname() and proc.concurrency == 25
    assert proc.queues == (("default", 8), ("ingress", 6), ("mailers", 2))
    assert proc.tag == "live" and proc.version.startswith("7.") and not proc.quiet and proc.rss > 0
    assert proc.started_at <= proc.beat <= time.time() + 1
    raw = app.redis.cli("HGETALL", proc.identity).splitlines()  # key, value, key, value … (no newline inside)
    fields = dict(zip(raw[::2], raw[1::2], strict=True))
    assert set(fields) == {"info", "busy", "beat", "quiet", "rss", "rtt_us"}  # Sidekiq 7's hash, nothing else
    info = json.loads(fields["info"])
    assert info["identity"] == proc.identity and info["weights"] == [{"default": 8, "ingress": 6, "mailers": 2}]
    assert info["embedded"] is False and info["labels"] == []
    assert 0 < int(app.redis.cli("TTL", proc.identity)) <= 60  # the heartbeat expires 60 s after the beat
    code, out = app.stop(p)
    assert code == 0 and "queues=default,8 ingress,6 mailers,2" in out


def test_without_q_it_serves_the_queues_of_config_sidekiq_yml(app: App) -> None:
    (app.root / "config" / "sidekiq.yml").write_text(
        "---\n:concurrency: 7\n:queues:\n  - [default, 8]\n  - [push, 6]\n  - [pull]\n  - mailers\n"
        ":scheduler:\n  :listened_queues_only: true\n")
    p = app.start()
    proc = until(lambda: app.process(p))
    assert proc.concurrency == 7 and proc.queues == (("default", 8), ("push", 6), ("pull", 0), ("mailers", 0))
    q = app.start("-c", "3", "-q", "fasp")  # -q replaces the file's queues; -c wins over its concurrency
    other = until(lambda: app.process(q))
    assert other.concurrency == 3 and other.queues == (("fasp", 0),)


def test_without_any_configuration_it_serves_default_with_five_threads(app: App) -> None:
    p = app.start()
    proc = until(lambda: app.process(p))
    assert proc.queues == (("default", 0),) and proc.concurrency == 5
    q = app.start(RAILS_MAX_THREADS="9")
    assert until(lambda: app.process(q)).concurrency == 9


def test_it_takes_jobs_off_its_queues_and_leaves_other_queues_alone(app: App) -> None:
    p = app.start("-q", "mailers,2", "-q", "default,1")
    until(lambda: app.process(p))
    job = json.dumps({"class": "MailJob", "jid": "a" * 24, "queue": "mailers", "enqueued_at": time.time()})
    app.redis.cli("SADD", "queues", "mailers", "pull")
    app.redis.cli("LPUSH", "queue:mailers", job, job)
    app.redis.cli("LPUSH", "queue:pull", job)
    until(lambda: app.redis.cli("LLEN", "queue:mailers").strip() == "0")
    assert app.redis.cli("LLEN", "queue:pull").strip() == "1"
    code, out = app.stop(p)
    assert out.count(f"sidekiq: done MailJob JID-{'a' * 24} from queue:mailers") == 2


def test_tstp_makes_it_quiet_and_it_stops_fetching(app: App) -> None:
    p = app.start("-q", "default")
    until(lambda: app.process(p))
    p.popen.send_signal(signal.SIGTSTP)
    proc = until(lambda: (x := app.process(p)) is not None and x.quiet and x)
    assert proc.quiet and p.said("Received TSTP, no longer accepting new work")
    until(lambda: p.said("sidekiq: fetcher stopped"))  # its last BRPOP has returned: it fetches no more
    app.redis.cli("LPUSH", "queue:default", json.dumps({"class": "J", "jid": "b" * 24}))
    until(lambda: (x := app.process(p)) is not None and x.beat > proc.beat)
    assert app.redis.cli("LLEN", "queue:default").strip() == "1"  # a quiet process takes no job
    code, _ = app.stop(p)
    assert code == 0


def test_term_lets_the_job_in_hand_finish_then_leaves_processes(app: App) -> None:
    p = app.start("-q", "default", "-t", "20", STANDIN_JOB_SECONDS="1")
    proc = until(lambda: app.process(p))
    app.redis.cli("LPUSH", "queue:default", json.dumps({"class": "Slow", "jid": "c" * 24}))
    until(lambda: p.said("sidekiq: start Slow"))
    code, out = app.stop(p)
    assert code == 0 and f"sidekiq: done Slow JID-{'c' * 24}" in out  # finished before leaving
    assert proc.identity not in app.redis.cli("SMEMBERS", "processes")
    assert app.redis.cli("LLEN", "queue:default").strip() == "0"
    assert app.redis.cli("EXISTS", f"{proc.identity}:work").strip() == "0"


def test_a_job_still_busy_at_the_shutdown_timeout_goes_back_to_its_queue(app: App) -> None:
    p = app.start("-q", "default", "-t", "1", STANDIN_JOB_SECONDS="300")
    until(lambda: app.process(p))
    job = json.dumps({"class": "Endless", "jid": "e" * 24})
    app.redis.cli("LPUSH", "queue:default", job)
    busy = until(lambda: (x := app.process(p)) is not None and x.busy == 1 and x)  # the job takes 300 s
    assert app.redis.cli("HLEN", f"{busy.identity}:work").strip() == "1"  # the job in hand, as Sidekiq shows it
    code, out = app.stop(p)
    assert code == 0 and "pushed back a job to default" in out
    assert app.redis.cli("LRANGE", "queue:default", "0", "-1").strip() == job
    assert busy.identity not in app.redis.cli("SMEMBERS", "processes")


def test_a_signal_left_in_its_signals_list_is_obeyed_as_sidekiqs_web_ui_expects(app: App) -> None:
    p = app.start("-q", "default")
    proc = until(lambda: app.process(p))
    app.redis.cli("LPUSH", f"{proc.identity}-signals", "TSTP")
    until(lambda: (x := app.process(p)) is not None and x.quiet)


def test_with_a_wrong_password_or_no_redis_it_keeps_running_and_never_prints_a_password(
        app: App, redis: Redis) -> None:
    (app.root / ".env.production").write_text(redis.env(REDIS_PASSWORD="wrong-secret-value"))
    p = app.start("-q", "default")
    until(lambda: p.said("sidekiq: heartbeat: RedisError: WRONGPASS"))
    assert p.popen.poll() is None and app.redis.cli("SCARD", "processes").strip() == "0"
    code, out = app.stop(p)
    assert code == 0 and "wrong-secret-value" not in out and PASSWORD not in out
    (app.root / ".env.production").write_text(redis.env(REDIS_PORT="1"))
    q = app.start("-q", "default")
    until(lambda: q.said("sidekiq: heartbeat: ConnectionRefusedError"))
    assert q.popen.poll() is None
    code, out = app.stop(q)
    assert code == 0


def test_the_environment_wins_over_the_env_file_like_dotenv(app: App, redis: Redis) -> None:
    (app.root / ".env.production").write_text(redis.env(REDIS_PORT="1"))
    p = app.start("-q", "default", REDIS_PORT=str(redis.port))
    until(lambda: f":{p.pid}:" in redis.cli("SMEMBERS", "processes"))  # (fleet's view reads the file: port 1)


@pytest.mark.parametrize("env_text", [
    "",
    "REDIS_HOST=127.0.0.2\nREDIS_PORT=6380\nREDIS_DB=2\nREDIS_PASSWORD=\"a \\\"b\\\" \\$c\"\n",
    "REDIS_URL=rediss://:p%40ss+word@127.0.0.3:7000/4\nREDIS_HOST=127.0.0.2\n",
    "REDIS_URL=redis://user:pw@127.0.0.3\n",
    "REDIS_URL=redis://only-password@127.0.0.3\n",
    "SIDEKIQ_REDIS_URL=redis://127.0.0.4/3\nREDIS_URL=redis://127.0.0.5\n",
    "SIDEKIQ_REDIS_HOST=127.0.0.4\nSIDEKIQ_REDIS_PASSWORD=sk\nREDIS_URL=redis://127.0.0.5\nREDIS_PASSWORD=base\n",
    "REDIS_USER=only-a-user\n",
    "export REDIS_HOST='127.0.0.6'\nREDIS_PORT=6390 # comment\r\n",
])
def test_the_stand_in_finds_redis_exactly_where_fleets_section_looks(tmp_path: Path, env_text: str) -> None:
    module = standin()
    env = tmp_path / ".env.production"
    env.write_text(env_text)
    c = module.redis_config(module.dotenv(str(env)))
    done = subprocess.run(["sh", "-c", section_script(str(env), timeout=1)], capture_output=True, text=True)
    view = parse_section("local", done.stdout.split("\n")[1:])
    assert view.target is not None
    assert (c["host"], c["port"], c["db"], c["tls"], bool(c["password"])) == (
        view.target.host, view.target.port, view.target.db, view.target.tls, view.target.auth)


def test_the_stand_in_reads_mastodons_config_sidekiq_yml(tmp_path: Path) -> None:
    module = standin()
    path = tmp_path / "sidekiq.yml"
    path.write_text("---\n:concurrency: 25\n:queues:\n  - [default, 8]\n  - [push, 6]\n  - [ingress, 4]\n"
                    "  - [mailers, 2]\n  - [pull]\n  - [scheduler]\n  - [fasp]\n:scheduler:\n  :listened_queues_only: "
                    "true\n  :schedule:\n    x:\n      every: '5m'\n")
    assert module.sidekiq_yml(str(path)) == {"concurrency": 25, "queues": [
        "default,8", "push,6", "ingress,4", "mailers,2", "pull", "scheduler", "fasp"]}
    assert module.sidekiq_yml(str(tmp_path / "missing.yml")) == {}
    assert module.default_tag("/home/mastodon/live") == "live"
    assert module.default_tag("/srv/mastodon/releases/20240101") == "mastodon"
