"""The fleet's state as Prometheus metrics, in node_exporter's textfile-collector format.

`fleet watch --metrics-file PATH` writes this each cycle; node_exporter (started with
`--collector.textfile.directory`) serves it, Prometheus scrapes it and Alertmanager pages on it,
e.g. `fleet_drift == 1` or `fleet_host_up == 0`.  The file is written atomically (a temporary
file in the same directory, then a rename — fleet.output.files), so the collector never reads
half of it; node_exporter only reads files ending in `.prom`.

Format (Prometheus text exposition format 0.0.4): one `# HELP` and one `# TYPE` line per metric
family, then its samples, `\\n` line endings, the last line ending too; in a label value the
backslash, the double quote and the line feed are escaped as `\\\\`, `\\"` and `\\n`, and in a
HELP text the backslash and the line feed.  No timestamps on samples: the textfile collector
refuses them; the time of the observation is its own gauge.

Every series carries a `fleet` label (the fleet's name), so that two fleets watched from one
host (production and the lab) do not collide in one node_exporter.  Label values come from host
and unit names, paths and rule codes — never from env values, so no secret can reach a label.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence

from fleet.audit import MATCHING, AuditReport
from fleet.model import HostState
from fleet.output.files import write_atomic
from fleet.status import ABSENT, DRIFT, OK, PRESENT, UNKNOWN, UNMANAGED
from fleet.textutil import printable

UNIT_STATUSES = (OK, DRIFT, UNMANAGED, PRESENT, UNKNOWN)

_FAMILIES: dict[str, str] = {
    "fleet_unit_state": "Status of a unit on a host: one series per status, 1 for the current one. ok: as declared; "
                        "drift: declared there but not as declared; unmanaged: running where nobody declared it; "
                        "present: installed, not declared there, not running; unknown: the host was not observed.",
    "fleet_drift": "A drift item (driftctl's classes): 1 for each unit or env file that is changed, missing or "
                   "unmanaged.",
    "fleet_drift_coverage_ratio": "Share of what fleet found on the hosts that is declared and as declared.",
    "fleet_findings": "Open findings of the domain policies on the observed fleet, by severity and rule.",
    "fleet_host_up": "1 when the host answered the last observation, 0 when it could not be observed.",
    "fleet_last_observation_timestamp_seconds": "When fleet last observed the fleet (UNIX seconds).",
    "fleet_sidekiq_queue_size": "Jobs waiting in a Sidekiq queue (LLEN queue:NAME), as Sidekiq's Redis says.",
    "fleet_sidekiq_queue_latency_seconds": "Seconds the oldest job of a Sidekiq queue has waited (0 when empty), "
                                           "at Redis's clock.",
}


def metrics_text(report: AuditReport, *, now: float) -> str:
    """The textfile-collector document for one observation (`report` from fleet.audit.build_audit)."""
    fleet = report.fleet
    status = report.status
    out: list[str] = []

    samples: list[tuple[dict[str, str], float]] = []
    for row in status.rows:
        for c in row.cells:
            if c.status == ABSENT:
                continue  # not declared there and not there: nothing to say, no series
            labels = {"fleet": fleet, "host": c.host, "unit": row.unit, "service": row.service or ""}
            samples += [({**labels, "status": s}, 1.0 if c.status == s else 0.0) for s in UNIT_STATUSES]
    out += _family("fleet_unit_state", samples)

    out += _family("fleet_drift", [({"fleet": fleet, "host": d.host, "kind": d.kind, "target": d.target,
                                     "class": d.cls}, 1.0) for d in report.drift.items if d.cls != MATCHING])
    out += _family("fleet_drift_coverage_ratio", [({"fleet": fleet}, report.drift.coverage)])

    counts = Counter((f.severity, f.code) for f in report.findings)
    out += _family("fleet_findings", [({"fleet": fleet, "severity": sev, "rule": code}, float(n))
                                      for (sev, code), n in counts.items()])

    out += _family("fleet_host_up", [({"fleet": fleet, "host": h}, 1.0 if isinstance(r, HostState) else 0.0)
                                     for h, r in status.results.items()])
    out += _family("fleet_last_observation_timestamp_seconds", [({"fleet": fleet}, now)])
    out += _sidekiq_queues(report)
    return "".join(out)


def _sidekiq_queues(report: AuditReport) -> list[str]:
    """Size and latency per queue Sidekiq's Redis lists; no series (not zeros) when its view was not
    read: an absent series is "unknown" to an alert, a zero would be "all is well"."""
    live = report.status.live
    if live is None or live.view.error:
        return []
    queues = [q for q in live.queues if q.size is not None]
    return (_family("fleet_sidekiq_queue_size", [({"fleet": report.fleet, "queue": q.name}, float(q.size or 0))
                                                 for q in queues])
            + _family("fleet_sidekiq_queue_latency_seconds",
                      [({"fleet": report.fleet, "queue": q.name}, float(q.latency or 0.0)) for q in queues]))


def write_metrics(path: str | os.PathLike[str], text: str) -> None:
    """Replace the metrics file atomically, readable by node_exporter (0644)."""
    write_atomic(path, text.encode("utf-8"), mode=0o644, what="the metrics file")


def metrics_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` would not be read by node_exporter's textfile collector, or None."""
    name = os.path.basename(os.fspath(path))
    if not name.endswith(".prom") or name.startswith("."):
        return (f"{printable(os.fspath(path))}: node_exporter's textfile collector only reads files named "
                "*.prom (and not hidden ones); name it e.g. fleet.prom")
    return None


def _family(name: str, samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {escape_help(_FAMILIES[name])}\n", f"# TYPE {name} gauge\n"]
    rendered = sorted(f"{name}{_labels(labels)} {_value(v)}\n" for labels, v in samples)
    return lines + rendered


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items()) + "}"


def escape_label_value(value: str) -> str:
    """A label value as the exposition format wants it.  Control characters other than the line
    feed have no escape in the format; they are spelled out first (`\\x1b`, fleet.textutil), so a
    hostile unit name can neither break the line structure nor reach a console raw."""
    text = printable(value, multiline=True)  # keeps \n for the format's own escape below
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return printable(text, multiline=True).replace("\\", "\\\\").replace("\n", "\\n")


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


__all__: Sequence[str] = ("metrics_text", "write_metrics", "metrics_path_problem", "escape_label_value",
                          "UNIT_STATUSES")
