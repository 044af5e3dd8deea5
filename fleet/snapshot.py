"""Observed state as a compact, masked record, and back.  Pure.

Every collection (status, plan, apply, audit) is kept in the journal as a snapshot, so that
after an incident one can say what the fleet looked like at any point and what changed since.
A snapshot keeps what an audit compares (unit states, command lines, unit file hashes, env
keys and non-secret values, Sidekiq's view of its processes and queues) and drops what is bulky
(unit texts).  Secret fingerprints are cut to the same 8 hex digits fleet shows everywhere
else: enough to tell that a secret changed, useless for guessing it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

from fleet.errors import FleetError
from fleet.model import EnvFileState, HostError, HostFacts, HostResult, HostState, UnitState
from fleet.sidekiq import SECTION, SidekiqView, view_from_record, view_record

FORMAT = 1
_UNIT_FIELDS = ("unit", "load_state", "active_state", "sub_state", "unit_file_state", "main_pid", "fragment_path",
                "active_enter", "n_restarts", "result", "text_hash")


def short_secret(fp: str) -> str:
    return fp if fp.startswith("sha256:") else f"sha256:{fp[:8]}"


def to_record(results: Mapping[str, HostResult]) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    for name, r in results.items():
        if isinstance(r, HostError):
            hosts[name] = {"error": {"kind": r.kind, "message": r.message}, "at": r.collected_at}
            continue
        f = r.facts
        hosts[name] = {
            "at": r.collected_at,
            "facts": {"hostname": f.hostname, "os": f.os, "kernel": f.kernel, "systemd": f.systemd_version,
                      "state": f.system_state, "uptime": f.uptime_seconds, "load": list(f.load),
                      "mem_total_kb": f.mem_total_kb, "mem_available_kb": f.mem_available_kb},
            "units": [{k: getattr(u, k) for k in _UNIT_FIELDS} | {
                "exec_start": list(u.exec_start), "drop_ins": list(u.drop_in_paths),
                "environment": [list(kv) for kv in u.environment], "environment_files": list(u.environment_files),
                "file_hashes": [list(fh) for fh in u.file_hashes]} for u in r.units],
            "env_files": [{"path": e.path, "present": e.present, "mode": e.mode, "owner": e.owner, "group": e.group,
                           "keys": list(e.keys), "values": [list(kv) for kv in e.values],
                           "secrets": [[k, short_secret(v)] for k, v in e.secrets], "invalid": e.invalid_lines}
                          for e in r.env_files],
        }
        view = r.facts_of(SECTION)
        if isinstance(view, SidekiqView):  # Sidekiq's view, on the host it was read from (audit, watch)
            hosts[name]["sidekiq"] = view_record(view)
    return {"format": FORMAT, "hosts": hosts}


def from_record(record: Mapping[str, Any]) -> dict[str, HostResult]:
    if record.get("format") != FORMAT:
        raise FleetError(f"snapshot format {record.get('format')!r} is not {FORMAT}", hint="upgrade fleet")
    out: dict[str, HostResult] = {}
    for name, h in record["hosts"].items():
        if "error" in h:
            out[name] = HostError(host=name, kind=h["error"]["kind"], message=h["error"]["message"],
                                  collected_at=h.get("at", 0.0))
            continue
        f = h["facts"]
        facts = HostFacts(hostname=f["hostname"], os=f["os"], kernel=f["kernel"], systemd_version=f["systemd"],
                          system_state=f["state"], uptime_seconds=f["uptime"],
                          load=(f["load"][0], f["load"][1], f["load"][2]),
                          mem_total_kb=f["mem_total_kb"], mem_available_kb=f["mem_available_kb"])
        units = tuple(UnitState(**{k: u[k] for k in _UNIT_FIELDS}, exec_start=tuple(u["exec_start"]),
                                drop_in_paths=tuple(u["drop_ins"]),
                                environment=tuple((k, v) for k, v in u["environment"]),
                                environment_files=tuple(u["environment_files"]),
                                file_hashes=tuple((p, x) for p, x in u["file_hashes"]))
                      for u in h["units"])
        envs = tuple(EnvFileState(path=e["path"], present=e["present"], mode=e["mode"], owner=e["owner"],
                                  group=e["group"], keys=tuple(e["keys"]),
                                  values=tuple((k, v) for k, v in e["values"]),
                                  secrets=tuple((k, v) for k, v in e["secrets"]), invalid_lines=e["invalid"])
                     for e in h["env_files"])
        extra = ((SECTION, view_from_record(h["sidekiq"])),) if "sidekiq" in h else ()
        out[name] = HostState(host=name, facts=facts, units=units, env_files=envs, collected_at=h["at"], extra=extra)
    return out


def pack(results: Mapping[str, HostResult]) -> bytes:
    return zlib.compress(json.dumps(to_record(results), separators=(",", ":")).encode(), 6)


def unpack(data: bytes) -> dict[str, HostResult]:
    try:
        return from_record(json.loads(zlib.decompress(data)))
    except FleetError:
        raise
    except (zlib.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise FleetError(f"a snapshot in the journal is damaged ({type(e).__name__}: {e})",
                         hint="pick another snapshot (fleet history)") from e


def host_summary(results: Mapping[str, HostResult]) -> dict[str, str]:
    return {h: ("ok" if isinstance(r, HostState) else r.kind) for h, r in results.items()}
