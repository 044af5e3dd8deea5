"""`fleet watch` on the lab, with a real HTTP server on 127.0.0.1 receiving its webhooks (the lab
hosts are observed over SSH; they take no part in delivery) — issue 18's "done when":

* a hand edit of S3_ENABLED on franz → the next `watch --once` posts exactly one message naming
  franz, S3_ENABLED and "outside fleet"; the next, with nothing changed, posts nothing;
* the metrics file parses with Prometheus' own parser and holds the drift as a series valued 1;
  the status page loads in headless Chromium with no console message and shows the drift;
* the fix by `fleet apply` posts the apply's start and result, and the next cycle the resolution
  — with the receiver down for that cycle, delivered on the following one, once;
* `fleet watch` SIGKILLed in the middle of a cycle (its post held unanswered) and restarted
  loses and repeats nothing; SIGTERM ends a long-running watch between cycles, with exit 0;
* no secret value, fingerprint or webhook URL in any message, metric, page, outbox, output or
  debug log of the watch (all scanned).

Run it under the machine-wide lab lock:
    flock -x /tmp/fleet-lab-session.lock \\
        python -m pytest -q -p no:cacheprovider tests/integration/test_watch_on_lab.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, converge, fleet, fleet_argv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the receiver and the browser harness

from prometheus_client.parser import text_string_to_metric_families
from test_watch_html import dom, load
from webhook_server import HANG, Receiver

from fleet.envfile import fingerprint
from fleet.textutil import mask, sha256_hex

ENV = "/home/mastodon/live/.env.production"
HOOK_VAR = "FLEET_TEST_WATCH_WEBHOOK"
NOTIFY = ("--notify", f"slack:env:{HOOK_VAR}")  # the URL only in the environment: never on a command line


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    r = Receiver()
    monkeypatch.setenv(HOOK_VAR, r.url("/chat"))
    try:
        yield r
    finally:
        r.close()


class Watching:
    """The watch's files and everything it said, to scan at the end."""

    def __init__(self, lab: Any, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.metrics = tmp / "fleet.prom"
        self.www = tmp / "www"
        self.debug_log = tmp / "watch-debug.log"
        self.said: list[str] = []

    def argv(self, *extra: str) -> list[str]:
        return ["watch", *NOTIFY, "--metrics-file", str(self.metrics), "--html", str(self.www), *extra]

    def once(self) -> subprocess.CompletedProcess[str]:
        done = fleet(self.lab, "--debug-log", str(self.debug_log), *self.argv("--once"), timeout=300)
        self.said += [done.stdout, done.stderr]
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def start(self, *extra: str) -> subprocess.Popen[str]:
        argv = [*fleet_argv(), "--lab", "--dir", str(REPO), "--state-dir", str(self.lab.state_dir), "--debug-log",
                str(self.debug_log), *self.argv(*extra)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)

    def ended(self, proc: subprocess.Popen[str]) -> int:
        out, err = proc.communicate(timeout=120)  # hang guard
        self.said += [out, err]
        return proc.returncode


def texts(receiver: Receiver, start: int = 0) -> list[str]:
    return [str(b["text"]) for b in receiver.bodies()[start:]]


def wait_for(what: str, condition: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout  # hang guard: each condition is an event, not a timing
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def needles(lab: Any, receiver: Receiver, *, short: bool = True) -> list[str]:
    """The lab's secret values, their fingerprints (full, masked, and with `short` cut to 8 hex
    digits bare — left out for the debug log, whose megabyte of hex would match one by chance
    one run in a few hundred) and the webhook URL."""
    values: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, str) and len(node) >= 6:
            values.append(node)

    collect(tomllib.loads((lab.lab_dir / "secrets.toml").read_text()))
    assert values, "the lab has secrets to leak"
    out = [receiver.url("/chat"), f"127.0.0.1:{receiver.port}/chat"]
    for v in values:
        out += [v, fingerprint(v), sha256_hex(v), mask(v), f"sha256:{fingerprint(v)[:8]}"]
        out += [fingerprint(v)[:8], sha256_hex(v)[:8]] if short else []
    return out


def test_watch_tells_a_hand_edit_once_the_fix_and_survives_a_dead_receiver_and_a_kill(
        lab: Any, receiver: Receiver, tmp_path: Path) -> None:
    converge(lab)  # test_stores_on_lab, before this module, ends with the example converged
    (lab.state_dir / "watch-outbox.json").unlink(missing_ok=True)  # a watch starting afresh on this fleet
    w = Watching(lab, tmp_path)

    w.once()
    before = len(receiver.requests)  # a first cycle announces what is open already (a converged fleet: nothing)

    # The hand edit, and the next cycle: one message naming the host, the key and "outside fleet".
    lab.ssh("franz", f"sed -i 's/^S3_ENABLED=.*/S3_ENABLED=false/' {ENV}", user="root")
    told = w.once()
    [message] = texts(receiver, before)
    assert "franz" in message and "S3_ENABLED" in message and "outside fleet" in message
    assert "[CHANGED OUTSIDE FLEET]" in told.stdout and "S3_ENABLED" in told.stdout

    # The metrics and the page show the drift.
    families = {f.name: f for f in text_string_to_metric_families(w.metrics.read_text())}
    drift = {(s.labels["host"], s.labels["target"]): s.value for s in families["fleet_drift"].samples}
    assert drift.get(("franz", ENV)) == 1, drift
    loaded = load(w.www / "index.html", tmp_path / "profile")
    assert loaded.console == [], loaded.console
    attrs, cell = dom(loaded.dom).cell({"data-env": ENV}, "franz")
    assert attrs["data-status"] == "drift" and "S3_ENABLED" in cell

    # Nothing changed: nothing posted.
    quiet = w.once()
    assert len(receiver.requests) == before + 1 and "[" not in quiet.stdout

    # The fix by fleet apply: its start and its result.
    fix = fleet(lab, "apply", "--yes", "--settle", "1", *NOTIFY, timeout=300)
    assert fix.returncode == 0, fix.stdout + fix.stderr
    run_id = fix.stdout.rsplit("Journal: run ", 1)[1].split()[0]
    started, finished = texts(receiver, before + 1)
    assert f"run {run_id} started by" in started and f"run {run_id} by" in finished and "finished: ok" in finished

    # The resolution, with the receiver down for that cycle: delivered on the next, once.
    receiver.down()
    missed = w.once()
    assert "not delivered" in missed.stderr and "kept for the next cycle" in missed.stderr
    receiver.up()
    w.once()
    [resolution] = texts(receiver, before + 3)
    assert "[RESOLVED]" in resolution and "S3_ENABLED" in resolution
    assert "outside fleet" not in resolution, "fleet's own fix is not a change outside fleet"
    assert run_id not in resolution, "the apply was told once, by the apply itself"
    w.once()
    assert len(receiver.requests) == before + 4, "delivered once"

    # Killed with SIGKILL in the middle of a cycle — its post held without an answer — and restarted.
    lab.ssh("franz", f"sed -i 's/^S3_ENABLED=.*/S3_ENABLED=false/' {ENV}", user="root")
    receiver.answers = [HANG]
    proc = w.start("--once")
    wait_for("the watch's post", lambda: len(receiver.requests) == before + 5)
    proc.send_signal(signal.SIGKILL)
    w.ended(proc)
    held = receiver.requests[-1]
    w.once()
    w.once()
    after_kill = receiver.requests[before + 5:]
    assert len(after_kill) == 1, [r.body for r in after_kill]
    assert after_kill[0].headers["idempotency-key"] == held.headers["idempotency-key"], "the same message, once"
    assert "S3_ENABLED" in str(after_kill[0].body["text"]) and "outside fleet" in str(after_kill[0].body["text"])

    # SIGTERM ends a long-running watch between cycles, cleanly.
    w.metrics.unlink()
    proc = w.start("--every", "600")
    wait_for("the first cycle's metrics", w.metrics.exists)
    proc.send_signal(signal.SIGTERM)
    assert w.ended(proc) == 0, w.said[-1]
    assert len(receiver.requests) == before + 6, "nothing new to tell"

    # Nothing secret anywhere the watch wrote or said.
    scanned = {f"message {i}": str(b) for i, b in enumerate(receiver.bodies())}
    scanned |= {f"output {i}": s for i, s in enumerate(w.said)}
    scanned |= {"metrics": w.metrics.read_text(), "page": (w.www / "index.html").read_text(),
                "outbox": (lab.state_dir / "watch-outbox.json").read_text()}
    leaked = [(where, n) for n in needles(lab, receiver) for where, text in scanned.items() if n in text]
    debug_log = w.debug_log.read_text(errors="replace")
    leaked += [("debug log", n) for n in needles(lab, receiver, short=False) if n in debug_log]
    assert leaked == []
    assert os.environ[HOOK_VAR] == receiver.url("/chat")

    lab.ssh("franz", f"sed -i 's/^S3_ENABLED=.*/S3_ENABLED=true/' {ENV}", user="root")  # leave it as declared
