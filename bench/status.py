"""`fleet --lab status --json` against the OpenSSH floor, on a converged generated fleet.

Two floors: OpenSSH running fleet's own script (below), and issue 19's minimal collector
(`minimal_argvs`: one `systemctl show` of the declared units per host, what fleet's target is
measured against).  The three alternate, in a rotating order.

The floor: one OpenSSH client process per host, all started at once, each running fleet's own
remote collection script for that host, history section included, exactly as the transport sends
it (`floor_wires`), with the key exchange paramiko negotiates forced on OpenSSH (`-o
KexAlgorithms=…`).  Floor and fleet runs alternate, so both see the same machine load; each run's
ratio is fleet / floor of that run.

With BENCH_BASELINE_PYTHONPATH set to a directory holding another fleet package (e.g. `git archive
COMMIT fleet | tar -x -C DIR`), a fourth variant runs the same `fleet` command with that package
first on PYTHONPATH: an older fleet measured in the same rounds, under the same load, with a state
directory of its own (a copy taken after converging), so that each collects with its own kept
snapshots.

Every fleet package measured has its bytecode compiled first (`compileall`), as `pip install`
leaves it: with PYTHONDONTWRITEBYTECODE set (as on the shared machine) and no .pyc, every `fleet`
process would compile its modules from source (~170 ms of CPU measured on 2026-12-02).
"""

from __future__ import annotations

import compileall
import json
import logging
import os
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.inventory import write_inventory
from bench.lab import Lab, Measured, fleet_argv, measure, run_parallel

KEX = "curve25519-sha256@libssh.org"  # verified per run by `negotiated_algorithms`


def _load(directory: Path, state_dir: Path) -> tuple[Any, Any]:
    from fleet import config
    from fleet.targets import resolve

    loaded = config.load(directory / "desired_state.toml", directory / "hosts")
    if loaded.desired is None:
        raise RuntimeError(f"generated inventory in {directory} does not load: {loaded.findings}")
    return loaded.desired, resolve(loaded.desired, state_dir=str(state_dir), lab=True)


def kept(desired: Any, targets: Any, state_dir: Path) -> dict[str, Any]:
    """The hosts as the lab's newest kept snapshots saw them: what `fleet status` hands its script
    (fleet.workflows.observe.kept_states), so that OpenSSH runs the same script fleet would."""
    from fleet.workflows.base import Common
    from fleet.workflows.observe import kept_states

    common = Common(desired=Path("desired_state.toml"), hosts=Path("hosts"), state_dir=state_dir, lab=True)
    return kept_states(common, desired, targets.hosts)


class _Quiet:
    """A workflow reporter that keeps what it is told (the bench prints none of it)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, line: str) -> None:
        self.lines.append(line)

    def progress(self, line: str) -> None:
        self.lines.append(line)


def floor_wires(directory: Path, state_dir: Path) -> dict[str, str]:
    """Host name -> the exact text fleet's transport sends that host for `fleet status` now: the
    collection script with what the newest kept snapshot lets it skip offered (idle units, known
    env files), the host history's section asked from where the journal last saw it, the
    transport's `exec </dev/null` and, for `sudo = true` hosts, its sudo wrapping.  (Until
    3 December the floor left the history section out, so it ran less than fleet's script.)"""
    from fleet.collect.collector import collection_scripts
    from fleet.transport.ssh import _eof_safe

    desired, targets = _load(directory, state_dir)
    _, scripts = collection_scripts(desired, targets.hosts, history_of=history_asks_for(targets, state_dir),
                                    kept=kept(desired, targets, state_dir))
    return {h.name: _eof_safe(scripts[h.name], None, h.sudo) for h in targets.hosts}


def history_asks_for(targets: Any, state_dir: Path) -> dict[str, Any]:
    """What `fleet status` asks each host's history for now (fleet.workflows.observe.history_asks)."""
    from fleet.workflows.base import Common
    from fleet.workflows.observe import history_asks

    common = Common(desired=Path("desired_state.toml"), hosts=Path("hosts"), state_dir=state_dir, lab=True)
    return history_asks(common, targets.hosts, _Quiet())


def floor_argvs(lab: Lab, directory: Path, kex: str = KEX) -> list[list[str]]:
    """One OpenSSH command line per host, carrying fleet's exact remote command for it
    (`floor_wires`)."""
    return [lab.ssh_argv(host, wire, "-o", f"KexAlgorithms={kex}")
            for host, wire in floor_wires(directory, lab.state_dir).items()]


def minimal_argvs(lab: Lab, directory: Path, kex: str = KEX) -> list[list[str]]:
    """The minimal OpenSSH collector of issue 19: one `ssh` per host running one `systemctl show`
    of the host's declared units (Id, ActiveState, SubState, UnitFileState, ExecStart) as the
    login user, no sudo: what someone would script instead of fleet."""
    from bench.remote_cost import minimal_command
    from fleet.collect.script import spec_for

    desired, targets = _load(directory, lab.state_dir)
    return [lab.ssh_argv(h.name, minimal_command(spec_for(desired, h.name).units), "-o", f"KexAlgorithms={kex}")
            for h in targets.hosts]


def negotiated_algorithms(lab: Lab, directory: Path) -> dict[str, Any]:
    """What paramiko (through fleet's transport) and OpenSSH actually negotiate with a lab host."""
    from fleet.transport.ssh import SSHTransport

    desired, targets = _load(directory, lab.state_dir)
    host = targets.hosts[-1]
    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("paramiko.transport")
    handler = Grab(level=logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with SSHTransport(ssh_config=targets.ssh_config, known_hosts=targets.known_hosts) as t:
            t.run(host, "true")
            slot = t._slots[host.name]  # read-only look at the negotiated transport
            assert slot.transport is not None
            pt = slot.transport
            paramiko_side = {
                "kex": next((ln.split(": ", 1)[1] for ln in lines if ln.startswith("Kex: ")), "?"),
                "host_key": pt.host_key_type, "cipher": pt.local_cipher, "mac": pt.local_mac,
            }
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    verbose = lab.ssh(host.name, "true", "-v", "-o", f"KexAlgorithms={KEX}")
    openssh = {k: next((ln.split(f"{k}: ", 1)[1].strip() for ln in verbose.stderr.splitlines()
                        if f"debug1: kex: {k}: " in ln), "?") for k in ("algorithm", "host key algorithm")}
    cipher = next((ln for ln in verbose.stderr.splitlines() if "debug1: kex: server->client cipher:" in ln), "")
    openssh["cipher"] = cipher.split("cipher: ", 1)[1].split()[0] if cipher else "?"
    default = lab.ssh(host.name, "true", "-v")
    openssh_default = next((ln.split("algorithm: ", 1)[1].strip() for ln in default.stderr.splitlines()
                            if "debug1: kex: algorithm: " in ln), "?")
    return {"host": host.name, "paramiko": paramiko_side, "openssh_forced": openssh,
            "openssh_default_kex": openssh_default}


def count_connections(lab: Lab, directory: Path) -> dict[str, Any]:
    """Connections and channels per host during one collection, as fleet status runs it
    (SSHTransport.stats() in-process), cross-checked with each host's sshd log."""
    from fleet.collect.collector import collect
    from fleet.transport.ssh import SSHTransport

    desired, targets = _load(directory, lab.state_dir)
    # sshd at LogLevel VERBOSE logs "Starting session: command …" per channel (INFO only logs
    # the connection's "Accepted publickey").  The lab hosts are disposable.  Read by syslog
    # identifier, not by unit: a non-root login's session process runs in its session scope.
    for h in targets.hosts:
        lab.root(h.name, h.sudo, "echo 'LogLevel VERBOSE' > /etc/ssh/sshd_config.d/zz-bench-verbose.conf"
                                 " && systemctl reload ssh")
    time.sleep(1.2)
    since = int(time.time())
    time.sleep(1.1)
    with SSHTransport(ssh_config=targets.ssh_config, known_hosts=targets.known_hosts) as t:
        results = collect(desired, t, targets.hosts)
        stats = t.stats()
    time.sleep(1.1)
    until = int(time.time())
    time.sleep(1.1)
    sshd: dict[str, dict[str, int]] = {}
    for h in targets.hosts:
        log = lab.root(h.name, h.sudo, f"journalctl -q -t sshd --since @{since} --until @{until} -o cat").stdout
        sshd[h.name] = {"connections": log.count("Accepted publickey"),
                        "channels": log.count("Starting session: command")}
    ok = all(type(r).__name__ == "HostState" for r in results.values())
    per_host = {h.name: {"fleet": stats.get(h.name, {}), "sshd": sshd.get(h.name, {})} for h in targets.hosts}
    return {
        "all_observed": ok,
        "per_host": per_host,
        "max_connections": max(s.get("connections", 0) for s in stats.values()),
        "max_channels": max(s.get("channels", 0) for s in stats.values()),
        "sshd_max_connections": max(s["connections"] for s in sshd.values()),
        "sshd_max_channels": max(s["channels"] for s in sshd.values()),
        "one_and_one": all(s == {"connections": 1, "channels": 1} for s in stats.values())
        and len(stats) == len(targets.hosts),
        "sshd_agrees": all(sshd[h] == stats.get(h) for h in sshd),
    }


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat, 10 ms ticks):
    sampled around a run, it includes the lab hosts' sshd and scripts, not only the client."""
    fields = open("/proc/stat").readline().split()[1:]
    ticks = [int(x) for x in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def _check_status(m: Measured, n: int) -> dict[str, Any]:
    doc = json.loads(m.stdout)
    reachable = sum(1 for h in doc["hosts"].values() if h["reachable"])
    cells = [c for row in doc["services"] for c in row["cells"].values() if c["declared"]]
    ok_cells = sum(1 for c in cells if c["status"] == "ok")
    durations = [h["duration"] for h in doc["hosts"].values() if h["reachable"]]
    return {"rc": m.rc, "reachable": reachable, "hosts": n, "declared_cells": len(cells), "ok_cells": ok_cells,
            "remote_duration_median_s": statistics.median(durations) if durations else None,
            "remote_duration_max_s": max(durations) if durations else None}


BASELINE = os.environ.get("BENCH_BASELINE_PYTHONPATH", "")


def compile_bytecode() -> list[str]:
    """Compile fleet's modules (and the baseline's) as an installed package has them."""
    import fleet

    dirs = [str(Path(fleet.__file__).parent)] + ([str(Path(BASELINE) / "fleet")] if BASELINE else [])
    for d in dirs:
        compileall.compile_dir(d, quiet=1)
    return dirs


def bench_status(lab: Lab, n: int, runs: int, work: Path, report: Any, *, settle: float = 0.5,
                 counts: bool = True, profile: Any = None, remote_cost: Any = None) -> dict[str, Any]:
    """Boot n generated hosts, converge them, then alternate floor and fleet `runs` times."""
    directory = write_inventory(work / f"fleet-{n}", n)
    state = str(lab.state_dir)
    result: dict[str, Any] = {"hosts": n, "runs": runs, "bytecode_compiled": compile_bytecode(),
                              "baseline": BASELINE}
    report(f"[status N={n}] lab up")
    up = lab.up(directory / "hosts", tag=f"up-{n}")
    result["lab_up_s"] = up.wall_s
    report(f"[status N={n}] converging: fleet --lab apply --yes --settle {settle}")
    conv = lab.fleet("--lab", "--dir", str(directory), "--state-dir", state, "apply", "--yes",
                     "--settle", str(settle), tag=f"converge-{n}")
    result["converge"] = {"rc": conv.rc, "wall_s": conv.wall_s, "summary": conv.stdout.strip().splitlines()[-2:]}
    if conv.rc != 0:
        raise RuntimeError(f"converging {n} hosts failed:\n{conv.stdout[-2000:]}\n{conv.stderr[-2000:]}")
    fleet_args = ["--lab", "--dir", str(directory), "--state-dir", state, "status", "--json"]
    first = lab.fleet(*fleet_args, tag=f"status-{n}-check")
    result["check"] = _check_status(first, n)
    report(f"[status N={n}] converged: {result['check']}")
    result["algorithms"] = negotiated_algorithms(lab, directory)
    floors = floor_argvs(lab, directory)
    minimal = minimal_argvs(lab, directory)
    result["script_bytes_max"] = max(len(a[-1]) for a in floors)
    # warm-up of all three (page cache, sshd's first fork after boot)
    run_parallel(floors, out_dir=work / "logs", tag=f"floor-{n}-warm")
    _, warm = run_parallel(minimal, out_dir=work / "logs", tag=f"minimal-{n}-warm")
    result["minimal_check"] = {"failures": sum(1 for m in warm if m.rc != 0),
                               "units_shown": sum(m.stdout.count("Id=") for m in warm),
                               "stderr": next((m.stderr[-300:] for m in warm if m.rc != 0), "")}
    lab.fleet(*fleet_args, tag=f"status-{n}-warm")
    baseline_env = {**os.environ, "PYTHONPATH": BASELINE} if BASELINE else None
    baseline_args = fleet_args
    if baseline_env is not None:
        # The baseline keeps its snapshots in a state directory of its own (a copy, lab record and
        # journal): each fleet then collects with its own newest kept observation, as it would
        # alone — a snapshot of one is not what the other would offer the hosts as known.
        own = Path(f"{state}-baseline")
        shutil.rmtree(own, ignore_errors=True)
        shutil.copytree(state, own, symlinks=True)
        baseline_args = [str(own) if a == state else a for a in fleet_args]
        result["baseline_state_dir"] = str(own)
        m = measure([*fleet_argv(), *baseline_args], out_dir=work / "logs", tag=f"baseline-{n}-warm",
                    env=baseline_env)
        result["baseline_check"] = _check_status(m, n)
    rows = []
    variants = ["floor", "minimal", "fleet"] + (["baseline"] if baseline_env is not None else [])
    orders = [tuple(variants[k:] + variants[:k]) for k in range(len(variants))]
    for i in range(runs):
        order = orders[i % len(orders)]
        row: dict[str, Any] = {"run": i + 1, "first": order[0]}
        for which in order:
            time.sleep(0.3)
            busy0 = machine_busy()
            if which in ("floor", "minimal"):
                argvs = floors if which == "floor" else minimal
                wall, each = run_parallel(argvs, out_dir=work / "logs", tag=f"{which}-{n}-{i}")
                bad = [m.rc for m in each if m.rc != 0]
                row[f"{which}_s"] = wall
                row[f"{which}_client_cpu_s"] = sum(m.cpu_s for m in each)
                row[f"{which}_failures"] = len(bad)
                row[f"{which}_stdout_bytes"] = sum(len(m.stdout) for m in each)
            elif which == "baseline":
                m = measure([*fleet_argv(), *baseline_args], out_dir=work / "logs", tag=f"baseline-{n}-{i}",
                            env=baseline_env)
                row["baseline_s"] = m.wall_s
                row["baseline_cpu_s"] = m.cpu_s
                row["baseline_maxrss_mb"] = m.maxrss_mb
                row["baseline_hwm_mb"] = m.hwm_mb
                row["baseline_rc"] = m.rc
            else:
                m = lab.fleet(*fleet_args, tag=f"status-{n}-{i}")
                row["fleet_s"] = m.wall_s
                row["fleet_cpu_s"] = m.cpu_s
                row["fleet_maxrss_mb"] = m.maxrss_mb
                row["fleet_hwm_mb"] = m.hwm_mb
                row["fleet_rc"] = m.rc
            row[f"{which}_machine_cpu_s"] = machine_busy() - busy0
        row["ratio"] = row["fleet_s"] / row["floor_s"]
        row["ratio_minimal"] = row["fleet_s"] / row["minimal_s"]
        if "baseline_s" in row:
            row["ratio_minimal_baseline"] = row["baseline_s"] / row["minimal_s"]
        rows.append(row)
        report(f"[status N={n}] run {i + 1}/{runs}: floor {row['floor_s'] * 1000:.0f} ms, minimal "
               f"{row['minimal_s'] * 1000:.0f} ms, fleet {row['fleet_s'] * 1000:.0f} ms, ratio {row['ratio']:.2f}, "
               f"vs minimal {row['ratio_minimal']:.2f}"
               + (f", baseline vs minimal {row['ratio_minimal_baseline']:.2f}" if "baseline_s" in row else ""))
    result["rows"] = rows
    med = statistics.median
    result["floor_median_s"] = med(r["floor_s"] for r in rows)
    result["fleet_median_s"] = med(r["fleet_s"] for r in rows)
    result["ratio_median"] = med(r["ratio"] for r in rows)
    result["ratio_of_medians"] = result["fleet_median_s"] / result["floor_median_s"]
    result["minimal_median_s"] = med(r["minimal_s"] for r in rows)
    result["ratio_minimal_median"] = med(r["ratio_minimal"] for r in rows)
    result["minimal_client_cpu_median_s"] = med(r["minimal_client_cpu_s"] for r in rows)
    result["minimal_machine_cpu_median_s"] = med(r["minimal_machine_cpu_s"] for r in rows)
    result["fleet_cpu_median_s"] = med(r["fleet_cpu_s"] for r in rows)
    result["floor_client_cpu_median_s"] = med(r["floor_client_cpu_s"] for r in rows)
    result["fleet_maxrss_max_mb"] = max(r["fleet_maxrss_mb"] for r in rows)
    # the process's own peak (VmHWM): ru_maxrss above also counts this bench process's size at the fork
    result["fleet_hwm_max_mb"] = max(r["fleet_hwm_mb"] for r in rows)
    result["bench_parent_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["floor_machine_cpu_median_s"] = med(r["floor_machine_cpu_s"] for r in rows)
    result["fleet_machine_cpu_median_s"] = med(r["fleet_machine_cpu_s"] for r in rows)
    ncpu = os.cpu_count() or 1
    result["floor_machine_utilisation"] = result["floor_machine_cpu_median_s"] / (ncpu * result["floor_median_s"])
    result["fleet_machine_utilisation"] = result["fleet_machine_cpu_median_s"] / (ncpu * result["fleet_median_s"])
    if baseline_env is not None:
        result["baseline_median_s"] = med(r["baseline_s"] for r in rows)
        result["ratio_minimal_baseline_median"] = med(r["ratio_minimal_baseline"] for r in rows)
        result["baseline_cpu_median_s"] = med(r["baseline_cpu_s"] for r in rows)
    result["load_average"] = os.getloadavg()
    result["all_ok"] = all(r["fleet_rc"] == 0 and r["floor_failures"] == 0 and r["minimal_failures"] == 0
                           for r in rows)
    if profile is not None:
        report(f"[status N={n}] in-process profile of one collection")
        try:
            result["profile"] = profile(directory)
        except Exception as exc:
            result["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    if remote_cost is not None:
        report(f"[status N={n}] remote cost of one host's collection, one at a time")
        try:
            result["remote_cost"] = remote_cost(directory)
        except Exception as exc:  # a side measurement must not lose the main one
            result["remote_cost"] = {"error": f"{type(exc).__name__}: {exc}"}
    if counts:
        report(f"[status N={n}] counting connections and channels per host")
        result["counts"] = count_connections(lab, directory)
    return result
