"""`python -m bench`: fleet's benchmarks.  See docs/PERFORMANCE.md.

As root on a Debian 12 machine with the lab available (`fleet lab up` works):

    python -m bench                 # everything: pure core, apply of the example, status at N = 4, 16, 32
    python -m bench --quick         # smoke, no lab: pure core (100 and 1,000 hosts), whole processes (10, 20), ~1 min
    python -m bench --no-lab        # pure core and whole processes only, all sizes
    python -m bench --quick --no-core   # smoke: whole processes at 10 and 20 hosts, ~20 s (a unit test runs it)
    python -m bench --sizes 16 --runs 7 --no-core --no-apply

The lab parts take the machine-wide lab lock (/tmp/fleet-lab-session.lock, as `flock -x` does)
for the whole lab session and always end with `fleet lab down --state-dir STATE`.  Results go to
bench/results/<date>.json (or --out) and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import core, imports, machine, report
from bench.lab import Lab, fleet_argv, lab_lock, measure

REPO = Path(__file__).resolve().parent.parent


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: pure core at 100 and 1,000 hosts (converged, drift), whole processes at 10 and 20 "
                        "hosts, one repeat, no lab")
    p.add_argument("--sizes", type=_ints, default=[4, 16, 32], metavar="N,N", help="lab fleet sizes (default 4,16,32)")
    p.add_argument("--runs", type=int, default=5, help="alternating floor/fleet runs per size (default 5)")
    p.add_argument("--converge-settle", type=float, default=0.5, metavar="S",
                   help="--settle of the apply that converges each generated fleet (default 0.5)")
    p.add_argument("--apply-settle", type=float, default=None, metavar="S",
                   help="--settle of the timed apply of the example (default: fleet's own default, 3 s)")
    p.add_argument("--core-sizes", type=_ints, default=[100, 1000, 5000], metavar="N,N",
                   help="synthetic fleet sizes for the pure core (default 100,1000,5000)")
    p.add_argument("--core-services", type=int, default=20, help="services per synthetic host (default 20)")
    p.add_argument("--core-scenarios", default="converged,drift,bare",
                   help=f"comma-separated, of {', '.join(core.SCENARIOS)}")
    p.add_argument("--core-repeats", type=int, default=3, help="build_plan repeats per case (default 3)")
    p.add_argument("--core-budget", type=float, default=150.0, metavar="S",
                   help="seconds one pure-core case may take before it is killed and reported; a size predicted "
                        "to exceed it from the smaller sizes is skipped (default 150)")
    p.add_argument("--no-core", action="store_true", help="skip the pure core")
    p.add_argument("--whole-sizes", type=_ints, default=[100, 1000, 5000], metavar="N,N",
                   help="fleet sizes for the whole `fleet` processes run with --observed (default 100,1000,5000)")
    p.add_argument("--whole-scenarios", default="converged,drift,bare",
                   help=f"comma-separated, of {', '.join(core.SCENARIOS)}")
    p.add_argument("--whole-runs", type=int, default=3, help="interleaved runs of every whole process (default 3)")
    p.add_argument("--no-whole", action="store_true", help="skip the whole processes")
    p.add_argument("--no-lab", action="store_true", help="skip everything that needs the lab")
    p.add_argument("--no-apply", action="store_true", help="skip the apply benchmark")
    p.add_argument("--no-status", action="store_true", help="skip the status benchmark")
    p.add_argument("--state-dir", type=Path, default=Path("/tmp/bench-state/.fleet"),
                   help="the benchmark's own fleet state dir (default /tmp/bench-state/.fleet)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-work"),
                   help="generated inventories, plans and process logs (default /tmp/bench-work)")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/<UTC date>.json; "
                                            "--quick: WORK/quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.no_lab = True
        args.core_sizes = [100, 1000]
        args.core_scenarios = "converged,drift"
        args.core_repeats = 1
        args.whole_sizes = [10, 20]
        args.whole_runs = 1
    return args


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_core(args: argparse.Namespace) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    scenarios = [s for s in args.core_scenarios.split(",") if s]
    for scenario in scenarios:
        gave_up = False
        done: list[dict[str, Any]] = []
        for n in sorted(args.core_sizes):
            skip = "skipped: a smaller size already exceeded the budget" if gave_up else None
            predicted = _predict(done, n)
            if skip is None and predicted is not None and predicted > args.core_budget:
                skip = (f"skipped: predicted ~{predicted:.0f} s per build_plan from the growth measured "
                        f"below it, over the {args.core_budget:g} s budget")
            if skip:
                log(f"[core] {n} hosts, {scenario}: {skip}")
                cases.append({"hosts": n, "services_per_host": args.core_services, "scenario": scenario,
                              "host_services": n * args.core_services, "error": skip})
                continue
            log(f"[core] {n} hosts × {args.core_services} services, {scenario}")
            r = core.run_case(n, args.core_services, scenario, args.core_repeats, args.core_budget)
            if "error" in r:
                log(f"[core]   {r['error']}")
                gave_up = True
            else:
                log(f"[core]   build_plan {r['median_s']:.3f} s (diff {r.get('diff_s', 0):.3f}, graph "
                    f"{r.get('graph_s', 0):.3f}); {r['changes']} changes, {r['edges']} edges; tracemalloc peak "
                    f"{r['tracemalloc_peak_mb'] or 0:.1f} MB; max RSS {r['maxrss_mb']:.0f} MB")
                done.append(r)
            cases.append(r)
    growth = [g for s in scenarios for g in core.growth(cases, s)]
    return {"cases": cases, "growth": growth}


def _predict(done: list[dict[str, Any]], n: int) -> float | None:
    """Seconds per build_plan at n hosts, extrapolated with the exponent of the last two sizes
    (linear from one size)."""
    import math

    if not done:
        return None
    b = done[-1]
    exponent = 1.0
    if len(done) >= 2:
        a = done[-2]
        exponent = max(1.0, math.log(b["median_s"] / a["median_s"]) / math.log(b["hosts"] / a["hosts"]))
    return float(b["median_s"] * (n / b["hosts"]) ** exponent)


def run_lab(args: argparse.Namespace, results: dict[str, Any], out: Path) -> None:
    from bench.apply_bench import bench_apply
    from bench.remote_cost import measure_remote_cost
    from bench.status import bench_status

    args.work.mkdir(parents=True, exist_ok=True)
    lab = Lab(args.state_dir, args.work, report=log)
    with lab_lock(report=log) as waited:
        results["lab_lock_waited_s"] = waited
        log(f"lab lock taken (waited {waited:.0f} s); state dir {args.state_dir}")
        try:
            if not args.no_apply:
                results["apply"] = bench_apply(lab, REPO, args.work, log, settle=args.apply_settle)
                _save(results, out)
            if not args.no_status:
                results["status"] = []
                for n in args.sizes:
                    cost = None
                    if n == min(args.sizes):
                        def cost(d: Path) -> dict[str, Any]:
                            return measure_remote_cost(lab, d)
                    r = bench_status(lab, n, args.runs, args.work, log, settle=args.converge_settle,
                                     profile=lambda d, n=n: _profile(lab, d, n), remote_cost=cost)
                    results["status"].append(r)
                    _save(results, out)
        finally:
            down = lab.down()
            log(f"fleet lab down: rc {down.rc} ({down.wall_s:.1f} s)")
            results["lab_down_rc"] = down.rc


def _profile(lab: Lab, directory: Path, n: int) -> dict[str, Any]:
    m = measure([sys.executable, "-m", "bench.collect_profile", "--dir", str(directory),
                 "--state-dir", str(lab.state_dir)], out_dir=lab.work / "logs", tag=f"profile-{n}")
    if m.rc != 0:
        return {"error": m.stderr[-2000:]}
    data: dict[str, Any] = json.loads(m.stdout)
    data["process_wall_s"] = m.wall_s  # seen from outside: includes interpreter teardown
    data["process_cpu_s"] = m.cpu_s
    for key, extra in (("memory", []), ("memory_tracemalloc", ["--tracemalloc"])):
        mem = measure([sys.executable, "-m", "bench.collect_profile", "--dir", str(directory), "--state-dir",
                       str(lab.state_dir), "--memory", *extra], out_dir=lab.work / "logs", tag=f"{key}-{n}")
        data[key] = json.loads(mem.stdout) if mem.rc == 0 else {"error": mem.stderr[-2000:]}
        data[key]["process_maxrss_mb"] = mem.maxrss_mb
    return data


def _save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC)
    out = args.out or (args.work / "quick.json" if args.quick else
                       REPO / "bench" / "results" / f"{stamp:%Y-%m-%d}.json")
    results: dict[str, Any] = {
        "started": stamp.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine.details(REPO),
        "fleet_argv": fleet_argv(),
    }
    started = time.monotonic()
    if not args.no_lab:  # first: the lab is shared, take it while nobody waits for it
        run_lab(args, results, out)
    if not args.quick:
        log("[imports] interpreter start and imports")
        results["imports"] = imports.measure()
        _save(results, out)
    if not args.no_whole:
        from bench import whole

        log(f"[whole] fleet processes at {args.whole_sizes} hosts, {args.whole_runs} interleaved run(s)")
        results["whole"] = whole.run(args.work, args.whole_sizes, [s for s in args.whole_scenarios.split(",") if s],
                                     args.whole_runs, log=log)
        _save(results, out)
    if not args.no_core:
        results["core"] = run_core(args)
        _save(results, out)
    results["machine"]["loadavg_end"] = __import__("os").getloadavg()
    results["duration_s"] = time.monotonic() - started
    _save(results, out)
    sys.stdout.write(report.render(results))
    log(f"results: {out} ({results['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
