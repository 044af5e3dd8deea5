"""`fleet --lab audit`: the postmortem replayed on real hosts, then repaired and diffed."""

from __future__ import annotations

import json
from typing import Any

from helpers import converge, fleet, fleet_json, install_unit, sidekiq_unit

ENV = "/home/mastodon/live/.env.production"


def snapshots(lab: Any) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(fleet(lab, "history", "--json").stdout)["snapshots"]
    return data


def test_the_postmortem_incident_is_audited_attributed_and_repaired(lab: Any) -> None:
    converge(lab)  # test_adopt_on_lab, before this module, ends with the example converged
    clean = fleet_json(lab, "audit")
    assert [f for f in clean["findings"] if f["severity"] == "error"] == []
    baseline = clean["snapshot"]
    assert baseline in [s["id"] for s in snapshots(lab)]

    # The incident, by hand: a Sidekiq with only `-q default` on the CDN node, a hand-edited
    # .env.production there, and the only scheduler stopped.
    install_unit(lab, "franz", "mastodon-sidekiq.service", sidekiq_unit("-c 10 -q default"))
    lab.ssh("franz", f"sed -i -e 's/^S3_ENABLED=.*/S3_ENABLED=false/' -e 's/^S3_BUCKET=/3_BUCKET=/' {ENV}",
            user="root")
    lab.ssh("nietzsche", "systemctl stop mastodon-sidekiq-scheduler.service", user="root")

    done = fleet(lab, "audit", "--since", baseline, "--format", "json")
    assert done.returncode == 2, done.stderr  # error-level findings
    report = json.loads(done.stdout)
    messages = [f["message"] for f in report["findings"]]
    assert any("sidekiq (mastodon-sidekiq.service) on franz, whose role 'cdn' forbids sidekiq" in m for m in messages)
    assert any("'3_BUCKET' is not a Mastodon setting" in m for m in messages)
    bucket = next(f for f in report["findings"] if "3_BUCKET" in f["message"])
    assert "did you mean S3_BUCKET?" in bucket["hint"]
    assert any("S3_ENABLED in /home/mastodon/live/.env.production differs between hosts of web" in m
               and "franz=false" in m for m in messages)
    assert any("queue 'scheduler' is served by no running Sidekiq process" in m for m in messages)
    assert any("exactly one Sidekiq process" in m and "running: 0" in m for m in messages)
    classes = {(i["host"], i["target"]): i["class"] for i in report["drift"]["items"]}
    assert classes[("franz", "mastodon-sidekiq.service")] == "unmanaged"
    assert classes[("nietzsche", "mastodon-sidekiq-scheduler.service")] == "changed"
    assert classes[("franz", ENV)] == "changed"
    assert 0 < report["drift"]["coverage"] < 1

    changes = {c["change"]: c["attribution"] for c in report["changes"]}
    expected = [
        "on franz, mastodon-sidekiq.service appeared (active/running, enabled, "
        "`/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 10 -q default`)",
        f"on franz, S3_ENABLED in {ENV} changed from `true` to `false`",
        f"on franz, 3_BUCKET was added to {ENV} (`hachyderm-media`)",
        f"on franz, S3_BUCKET was removed from {ENV} (was `hachyderm-media`)",
        "on nietzsche, mastodon-sidekiq-scheduler.service went from active/running to inactive/dead",
    ]
    for sentence in expected:
        assert changes.get(sentence) == "changed outside fleet", (sentence, changes)

    md = fleet(lab, "audit", "--since", baseline, "--format", "md").stdout
    assert md.startswith("# Fleet audit: hachyderm")
    for heading in ("## Summary", "## What runs where", "### Sidekiq queues", "## Drift", "## Findings",
                    f"## Changes since snapshot {baseline}", "## Timeline"):
        assert heading in md
    assert "| scheduler | **nobody** |" in md
    assert "changed outside fleet" in md and "3_BUCKET" in md

    broken = report["snapshot"]
    repair = fleet(lab, "apply", "--yes", "--settle", "1", timeout=300)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    run_id = repair.stdout.rsplit("Journal: run ", 1)[1].split()[0]
    after = fleet_json(lab, "audit")
    assert [f for f in after["findings"] if f["severity"] == "error"] == []
    assert after["drift"]["coverage"] == 1

    diff = fleet(lab, "diff", broken, after["snapshot"], "--json")
    assert diff.returncode == 2, diff.stderr
    repaired = {c["change"]: c for c in json.loads(diff.stdout)["changes"]}
    gone = repaired["on franz, mastodon-sidekiq.service disappeared (was active/running, enabled, "
                    "`/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 10 -q default`)"]
    assert gone["run_id"] == run_id and gone["attribution"].startswith(f"fleet apply run {run_id} by ")
    s3 = repaired[f"on franz, S3_ENABLED in {ENV} changed from `false` to `true`"]
    assert s3["run_id"] == run_id
    sched = repaired["on nietzsche, mastodon-sidekiq-scheduler.service went from inactive/dead to active/running"]
    assert sched["run_id"] == run_id
    history = fleet(lab, "history").stdout
    assert broken in history and "audit" in history and "apply" in history
