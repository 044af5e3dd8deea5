"""The fleet's history lives with the fleet (issue 17), on the lab: a team's applies attributed
whoever ran them, from wherever.

Each "checkout" is a state directory of its own (the lab's access copied, no journal: a fresh
clone).  A applies; B, which never applied anything, credits A's change to A's run with its
user, machine, run id and commit, and shows it in `fleet log`; with A's state directory gone a
fresh checkout still shows every step A applied; a hand edit or a truncation of a host's history
file is a broken chain `fleet audit` reports (exit 2).  Tampered files are put back byte for
byte before any other checkout reads them, so the shared lab state never sees a break."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from helpers import HISTORY, REPO, checkout_state, fleet, fleet_json, host_history, recorded_twice

from fleet.journal import Journal, journal_path, operator
from fleet.provenance import desired_paths, git_provenance

WEB = "mastodon-web.service"


def provenance_words() -> str:
    """What a run from this repository says of its desired state (as the runs compute it)."""
    prov = git_provenance(desired_paths(REPO / "desired_state.toml", REPO / "hosts"))
    return "" if prov is None else f", desired state at git {prov.commit[:12]}" + (" (dirty)" if prov.dirty else "")


def run_id_of(stdout: str) -> str:
    m = re.search(r"Journal: run (\S+)", stdout)
    assert m, stdout
    return m.group(1)


def test_a_checkout_that_never_applied_credits_another_checkouts_apply_and_logs_it(lab: Any, tmp_path: Path) -> None:
    a = checkout_state(lab, tmp_path / "a" / ".fleet")
    b = checkout_state(lab, tmp_path / "b" / ".fleet")
    converge = fleet(lab, "apply", "--yes", "--settle", "1", state_dir=a, timeout=300)
    assert converge.returncode == 0, converge.stdout + converge.stderr
    lab.ssh("fritz", f"systemctl stop {WEB}", user="root")
    seen = fleet(lab, "status", "--json", state_dir=b, timeout=120)  # B's first observation: web stopped
    assert json.loads(seen.stdout)["hosts"]["fritz"]["reachable"], seen.stderr
    applied = fleet(lab, "apply", "--yes", "--settle", "1", "--limit", "fritz", state_dir=a, timeout=300)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    run_id = run_id_of(applied.stdout)

    done = fleet(lab, "audit", "--since", "1h", "--format", "json", state_dir=b, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    changes = {c["change"]: c for c in json.loads(done.stdout)["changes"]}
    started = changes[f"on fritz, {WEB} went from inactive/dead to active/running"]
    assert started["run_id"] == run_id
    assert started["attribution"] == f"fleet apply run {run_id} by {operator()}{provenance_words()}"
    with Journal.open(journal_path(b)) as journal:
        assert journal.runs() == []  # B never applied anything

    log = fleet(lab, "log", "--host", "fritz", state_dir=b, timeout=120)
    assert log.returncode == 0 and log.stderr == "", log.stderr
    heading = f"run {run_id} by {operator()}{provenance_words() or ', desired state not in git'}"
    assert heading in log.stdout.splitlines(), log.stdout
    assert f"{operator()}: on fritz, started {WEB}" in log.stdout and " — ok" in log.stdout

    # A's state directory is lost: a fresh checkout still shows every step A applied.
    a_steps = fleet_json(lab, "log", "--cached", state_dir=a)["steps"]
    shutil.rmtree(a)
    c = checkout_state(lab, tmp_path / "c" / ".fleet")
    c_steps = fleet_json(lab, "log", state_dir=c, timeout=180)["steps"]
    applied_by_a = {(s["run_id"], s["change_id"], s["outcome"]) for s in a_steps if s["outcome"] != "skipped"}
    assert applied_by_a and applied_by_a <= {(s["run_id"], s["change_id"], s["outcome"]) for s in c_steps}
    for s in c_steps:
        if s["run_id"] == run_id:
            assert s["operator"] == operator()
    for host in lab.names:
        assert recorded_twice(host_history(lab, host)) == [], host


def edited(text: str) -> str:
    """The second to last record with one digit of its time changed: still a well-formed record."""
    lines = text.splitlines()
    k = len(lines) - 2
    lines[k] = re.sub(r'(\d)Z"', lambda m: f'{(int(m.group(1)) + 1) % 10}Z"', lines[k], count=1)
    return "\n".join(lines) + "\n"


def truncated(text: str) -> str:
    """The file cut in the middle of its last record."""
    return text[: len(text) - len(text.splitlines()[-1]) // 2 - 1]


def test_a_hand_edited_or_truncated_history_file_is_a_broken_chain_the_audit_reports(lab: Any,
                                                                                      tmp_path: Path) -> None:
    lab.ssh("fritz", f"systemctl stop {WEB}", user="root")  # so that fritz's history holds a fresh run
    applied = fleet(lab, "apply", "--yes", "--settle", "1", "--limit", "fritz", timeout=300)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    original = lab.ssh("fritz", f"cat {HISTORY}", user="root").stdout
    assert len(original.splitlines()) >= 3
    for name, tamper in (("edited", edited), ("truncated", truncated)):
        state = checkout_state(lab, tmp_path / name / ".fleet")
        first = fleet(lab, "log", "--host", "fritz", state_dir=state, timeout=120)  # it has read fritz's history
        assert first.returncode == 0 and first.stderr == "", first.stderr
        try:
            lab.ssh("fritz", f"cat > {HISTORY}", user="root", input=tamper(original))
            done = fleet(lab, "audit", "--limit", "fritz", "--format", "json", state_dir=state, timeout=180)
        finally:
            lab.ssh("fritz", f"cat > {HISTORY}", user="root", input=original)
        assert done.returncode == 2, done.stdout + done.stderr
        broken = [f for f in json.loads(done.stdout)["findings"] if f["code"] == "history.broken"]
        assert broken and all(f["host"] == "fritz" and f["severity"] == "error" for f in broken), broken
        assert all(f["message"].startswith("history on fritz was edited or truncated after record ") for f in broken)
    assert lab.ssh("fritz", f"cat {HISTORY}", user="root").stdout == original
    clean = fleet_json(lab, "audit", "--limit", "fritz", ok_codes=(0, 2), timeout=180)  # never saw the tampering
    assert [f for f in clean["findings"] if f["code"].startswith("history.")] == []
