"""Where the time of one `fleet status` goes, measured inside one fresh Python process.

`python -m bench.collect_profile --dir DIR --state-dir STATE` does what `fleet --lab status
--json` does, step by step, and prints one JSON object:

* wall and CPU (getrusage, all threads) of each top-level step: interpreter start to here,
  `import fleet.cli` (fleet, paramiko, networkx, tabulate …), loading the desired state,
  opening the transport, collecting, building and printing the status JSON;
* inside the collection, wall per host of each phase, from thin wrappers around fleet's and
  paramiko's own functions: TCP connect, SSH handshake (version exchange + key exchange +
  NEWKEYS: `Transport.start_client`), host-key check, private-key loading, authentication,
  the command's channel (open, exec, remote run, read to exit status), parsing the output;
* CPU by thread kind: the calling thread (parsing runs there, in `on_done`), the worker pool
  threads (fleet's transport code), and paramiko's one packet thread per connection (key
  exchange crypto, encryption, MACs, the auth signature).

Only this process is patched; fleet's code is untouched.

`--memory` instead runs the real `fleet --lab status --json` in this process (`fleet.cli.main`)
and says where its resident memory goes: VmRSS and VmHWM (the peak so far) before and after each
step of the workflow (import, kept snapshot, history, collection, snapshot, status), the peak
sampled every 5 ms with the threads alive then, and tracemalloc's peak of Python's own
allocations (`--tracemalloc`: a second run, since tracing costs memory itself).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections import defaultdict
from typing import Any

T_START = time.perf_counter()
T_START_MONO = time.monotonic()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _vm() -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of this process, from /proc/self/status."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def memory(directory: str, state_dir: str, trace: bool) -> dict[str, Any]:
    """Where one `fleet --lab status --json` process's resident memory goes (see the docstring)."""
    marks: list[dict[str, Any]] = []

    def mark(what: str) -> None:
        v = _vm()
        marks.append({"at": what, "rss_mb": v.get("VmRSS", 0) / 1024, "hwm_mb": v.get("VmHWM", 0) / 1024,
                      "threads": v.get("Threads", 0)})

    mark("interpreter")
    if trace:
        import tracemalloc

        tracemalloc.start(1)
    import fleet.cli as cli

    mark("import fleet.cli")
    from fleet.workflows import observe
    from fleet.workflows import status as status_flow

    def wrap(module: Any, name: str) -> None:
        real = getattr(module, name)

        def wrapped(*a: Any, **kw: Any) -> Any:
            mark(f"before {name}")
            try:
                return real(*a, **kw)
            finally:
                mark(f"after {name}")

        setattr(module, name, wrapped)

    for module, name in ((observe, "kept_states"), (observe, "history_asks"), (observe, "open_transport"),
                         (observe, "collect_all"), (observe, "merge_history"), (observe, "keep_snapshot"),
                         (observe, "previous_quiet"), (status_flow, "build_status")):
        if hasattr(module, name):
            wrap(module, name)
    peak = {"rss_mb": 0.0, "threads": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            v = _vm()
            if v.get("VmRSS", 0) / 1024 > peak["rss_mb"]:
                peak["rss_mb"], peak["threads"] = v.get("VmRSS", 0) / 1024, v.get("Threads", 0)

    threading.Thread(target=sample, daemon=True).start()
    real_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # the status JSON, discarded
    try:
        rc = cli.main(["--lab", "--dir", directory, "--state-dir", state_dir, "status", "--json"])
    finally:
        sys.stdout.close()
        sys.stdout = real_stdout
        done.set()
    mark("end")
    out: dict[str, Any] = {"rc": rc, "marks": marks, "sampled_peak": peak,
                           "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if trace:
        out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.collect_profile")
    p.add_argument("--dir", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--memory", action="store_true", help="where the resident memory of `fleet status` goes")
    p.add_argument("--tracemalloc", action="store_true", help="with --memory: also tracemalloc's peak")
    args = p.parse_args(argv)
    if args.memory:
        json.dump(memory(args.dir, args.state_dir, args.tracemalloc), sys.stdout)
        sys.stdout.write("\n")
        return 0

    steps: dict[str, dict[str, float]] = {}
    cpu0 = _cpu()
    # BENCH_T0: the parent's time.monotonic() just before it started this process (the same
    # system-wide CLOCK_MONOTONIC), so interpreter start-up is counted as well.
    launched = float(os.environ.get("BENCH_T0", T_START_MONO))
    steps["interpreter start"] = {"wall_s": T_START_MONO - launched, "cpu_s": cpu0}

    def step(name: str, t0: float, c0: float) -> tuple[float, float]:
        t1, c1 = time.perf_counter(), _cpu()
        steps[name] = {"wall_s": t1 - t0, "cpu_s": c1 - c0}
        return t1, c1

    t, c = time.perf_counter(), _cpu()
    import paramiko

    import fleet.cli  # the import is what is measured
    from fleet import config
    from fleet.collect import collector
    from fleet.output.json import status_json
    from fleet.status import build_status
    from fleet.targets import resolve
    from fleet.transport import ssh as transport

    t, c = step("import fleet.cli", t, c)
    fleet.cli.build_parser().parse_args(["--lab", "--dir", args.dir, "--state-dir", args.state_dir, "status", "--json"])
    t, c = step("build the argument parser", t, c)
    loaded = config.load(__import__("pathlib").Path(args.dir) / "desired_state.toml",
                         __import__("pathlib").Path(args.dir) / "hosts")
    assert loaded.desired is not None
    desired = loaded.desired
    from fleet import policy

    policy.check(desired)
    targets = resolve(desired, state_dir=args.state_dir, lab=True)
    t, c = step("load + check desired state", t, c)
    from pathlib import Path

    from fleet.workflows.base import Common
    from fleet.workflows.observe import kept_states

    kept_now = kept_states(Common(desired=Path("desired_state.toml"), hosts=Path("hosts"),
                                  state_dir=Path(args.state_dir), lab=True), desired, targets.hosts)
    t, c = step("read the kept snapshot", t, c)

    phases: dict[str, list[float]] = defaultdict(list)
    thread_cpu: dict[str, float] = defaultdict(float)
    peak_threads = [threading.active_count()]
    lock = threading.Lock()

    def timed(owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                with lock:
                    phases[phase].append(time.perf_counter() - t0)
                    peak_threads[0] = max(peak_threads[0], threading.active_count())

        setattr(owner, name, wrapper)

    import socket  # fleet's transport calls socket.create_connection

    real_create = socket.create_connection

    def create_connection(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_create(*a, **kw)
        finally:
            with lock:
                phases["tcp connect"].append(time.perf_counter() - t0)

    socket.create_connection = create_connection
    timed(paramiko.Transport, "start_client", "ssh handshake (version + kex)")
    timed(transport.SSHTransport, "_verify_host_key", "host-key check")
    timed(transport.SSHTransport, "_load_key", "private-key load (per lookup; parsed once)")
    timed(transport.SSHTransport, "_authenticate", "authentication")
    timed(transport.SSHTransport, "_exec", "channel: open + exec + remote run + read")
    timed(transport.SSHTransport, "_connect", "connection total (tcp + handshake + auth)")
    real_parse = vars(collector)["parse_host"]

    def parse_host(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_parse(*a, **kw)
        finally:
            phases["parse output"].append(time.perf_counter() - t0)

    vars(collector)["parse_host"] = parse_host

    # CPU per thread kind: paramiko's packet thread is Transport.run; pool workers run SSHTransport.run.
    real_ptrun = paramiko.Transport.run

    def ptrun(self: Any) -> None:
        try:
            real_ptrun(self)
        finally:
            with lock:
                thread_cpu["paramiko packet threads"] += time.thread_time()

    paramiko.Transport.run = ptrun  # type: ignore[method-assign]
    real_run = transport.SSHTransport.run

    def run(self: Any, *a: Any, **kw: Any) -> Any:
        c0 = time.thread_time()
        try:
            return real_run(self, *a, **kw)
        finally:
            with lock:
                thread_cpu["pool workers (fleet transport)"] += time.thread_time() - c0

    transport.SSHTransport.run = run  # type: ignore[method-assign]

    main_c0 = time.thread_time()
    tr = transport.SSHTransport(ssh_config=targets.ssh_config, known_hosts=targets.known_hosts)
    t, c = step("open transport (parse ssh_config)", t, c)
    # as `fleet status` after a first collection: the lab's newest kept snapshot handed over
    results = collector.collect(desired, tr, targets.hosts, kept=kept_now)
    thread_cpu["calling thread (run_many, parsing)"] = time.thread_time() - main_c0
    stats = tr.stats()
    t, c = step("collect (all hosts)", t, c)
    tr.close()
    t, c = step("close transport", t, c)
    report = build_status(desired, results)
    text = json.dumps(status_json(report), indent=2)
    t, c = step("build + render status JSON", t, c)
    total_wall, total_cpu = time.monotonic() - launched, _cpu()
    for th in threading.enumerate():  # not timed: lets paramiko's packet threads account their CPU
        if isinstance(th, paramiko.Transport):
            th.join(2.0)
    n = len(targets.hosts)
    out = {
        "hosts": n,
        "steps": steps,
        "total_wall_s": total_wall,
        "total_cpu_s": total_cpu,
        "phases": {k: {"calls": len(v), "sum_s": sum(v), "max_s": max(v), "mean_s": sum(v) / len(v)}
                   for k, v in phases.items()},
        "thread_cpu_s": dict(thread_cpu),
        "peak_threads": peak_threads[0],
        "stats": stats,
        "observed": sum(1 for r in results.values() if type(r).__name__ == "HostState"),
        "status_json_bytes": len(text),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
