"""Tables of a results JSON: `python -m bench.report bench/results/DATE.json` (markdown)."""

from __future__ import annotations

import json
import sys
from typing import Any

from tabulate import tabulate as _tabulate


def tabulate(*args: Any, **kwargs: Any) -> str:
    return str(_tabulate(*args, **kwargs))


def _ms(s: float | None) -> str:
    return "—" if s is None else f"{s * 1000:.0f} ms"


def _s(s: float | None) -> str:
    return "—" if s is None else (f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s")


def machine_table(m: dict[str, Any]) -> str:
    rows = [[k, ", ".join(map(str, v)) if isinstance(v, list | tuple) else v] for k, v in m.items()]
    return tabulate(rows, headers=["machine", ""], tablefmt="github")


def status_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        c = r.get("counts", {})
        out.append([
            r["hosts"], r["runs"], _ms(r["floor_median_s"]), _ms(r["fleet_median_s"]),
            f"{r['ratio_median']:.2f}", f"{r['ratio_of_medians']:.2f}",
            _ms(r["minimal_median_s"]) if "minimal_median_s" in r else "—",
            f"{r['ratio_minimal_median']:.2f}" if "ratio_minimal_median" in r else "—",
            f"{min(x['ratio'] for x in r['rows']):.2f}–{max(x['ratio'] for x in r['rows']):.2f}",
            _ms(r["fleet_cpu_median_s"]), _ms(r["floor_client_cpu_median_s"]),
            f"{r['fleet_maxrss_max_mb']:.0f} MB",
            f"{r['floor_machine_utilisation']:.0%} / {r['fleet_machine_utilisation']:.0%}"
            if "floor_machine_utilisation" in r else "—",
            f"{c.get('max_connections', '?')} / {c.get('max_channels', '?')}" if c else "—",
            f"{c.get('sshd_max_connections', '?')} / {c.get('sshd_max_channels', '?')}" if c else "—",
        ])
    return tabulate(out, tablefmt="github", headers=[
        "N", "runs", "OpenSSH floor (median)", "fleet status (median)", "ratio (median of runs)",
        "ratio of medians", "minimal collector (median)", "ratio to minimal (median of runs)",
        "ratio range", "fleet CPU", "ssh clients' CPU", "fleet peak RSS",
        "machine CPU busy, floor / fleet",
        "conn / chan per host (stats)", "conn / chan per host (sshd log)"])


def status_runs_table(r: dict[str, Any]) -> str:
    return tabulate([[x["run"], x["first"], _ms(x["floor_s"]), _ms(x["minimal_s"]) if "minimal_s" in x else "—",
                      _ms(x["fleet_s"]), f"{x['ratio']:.2f}",
                      f"{x['ratio_minimal']:.2f}" if "ratio_minimal" in x else "—"] for x in r["rows"]],
                    headers=["run", "first", "floor", "minimal", "fleet", "ratio", "ratio to minimal"],
                    tablefmt="github")


def profile_table(p: dict[str, Any]) -> str:
    rows = [[k, _ms(v["wall_s"]), _ms(v["cpu_s"])] for k, v in p["steps"].items()]
    rows.append(["total, measured inside", _ms(p["total_wall_s"]), _ms(p["total_cpu_s"])])
    if "process_wall_s" in p:
        rows.append(["the process seen from outside (+ the bench's wait for paramiko's threads, exit)",
                     _ms(p["process_wall_s"]), _ms(p["process_cpu_s"])])
    return tabulate(rows, headers=[f"fleet status, N={p['hosts']}: step", "wall", "CPU (all threads)"],
                    tablefmt="github")


def phase_table(p: dict[str, Any]) -> str:
    rows = [[k, v["calls"], _ms(v["mean_s"]), _ms(v["max_s"])] for k, v in p["phases"].items()]
    return tabulate(rows, headers=[f"collect phase, N={p['hosts']}", "calls", "mean wall per call", "max"],
                    tablefmt="github")


def thread_table(p: dict[str, Any]) -> str:
    rows = [[k, _ms(v), _ms(v / p["hosts"])] for k, v in p["thread_cpu_s"].items()]
    return tabulate(rows, headers=[f"collect CPU by thread, N={p['hosts']}", "total", "per host"],
                    tablefmt="github")


def core_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["hosts"], r["scenario"], "—", "—", "—", r["error"], *["—"] * 9])
            continue
        out.append([r["hosts"], r["scenario"], r["changes"], r["edges"], r["waves"], _s(r["median_s"]),
                    _s(r.get("diff_s")), _s(r.get("graph_s")),
                    "— (too slow)" if r.get("tracemalloc_peak_mb") is None else f"{r['tracemalloc_peak_mb']:.1f} MB",
                    f"{r['maxrss_mb']:.0f} MB", f"{r['plan_json_bytes'] / 2**20:.1f} MB", _s(r.get("to_json_s")),
                    _s(r.get("render_s")), _s(r.get("load_s")), _s(r.get("status_s"))])
    return tabulate(out, tablefmt="github", headers=[
        "hosts ×20 svc", "scenario", "changes", "edges", "waves", "build_plan (median)", "of it: diff",
        "graph (order)", "peak (tracemalloc)", "process max RSS", "plan JSON", "to_json (once)",
        "plan_text (once)", "load JSON (once)", "build_status (median)"])


def growth_table(rows: list[dict[str, Any]]) -> str:
    return tabulate([[g["scenario"], f"{g['from']} → {g['to']}", f"{g['time_exponent']:.2f}",
                      "—" if g["memory_exponent"] is None else f"{g['memory_exponent']:.2f}",
                      "—" if g.get("status_exponent") is None else f"{g['status_exponent']:.2f}"] for g in rows],
                    headers=["scenario", "hosts", "time exponent", "memory exponent", "build_status exponent"],
                    tablefmt="github")


def remote_cost_table(rc: dict[str, Any]) -> str:
    rows = [[k, _ms(v["wall_s"]), _ms(v["client_cpu_s"]), _ms(v["remote_cpu_s"])] for k, v in rc["cases"].items()]
    return tabulate(rows, headers=["one host, alone (OpenSSH client, median)", "wall", "client CPU",
                                   "remote-side CPU (sshd, PAM, sudo, script, PID 1)"], tablefmt="github")


def imports_table(rows: list[dict[str, Any]]) -> str:
    return tabulate([[r["case"], _ms(r["cpu_median_s"]), _ms(r["wall_median_s"])] for r in rows],
                    headers=["fresh process", "CPU (median)", "wall (median)"], tablefmt="github")


def apply_table(a: dict[str, Any]) -> str:
    rows = [[w["wave"], w["steps"], w.get("hosts", 0), ", ".join(w.get("actions", [])),
             _s(w.get("slowest_step_s")), f"{_s(w.get('slowest_lane_s'))} ({w.get('slowest_lane_host', '')}, "
             f"{w.get('lane_steps', 0)} steps)", _s(w.get("wall_s"))] for w in a["waves"]]
    return tabulate(rows, headers=["wave", "steps", "hosts", "actions", "slowest step", "slowest host lane",
                                   "wave wall"], tablefmt="github")


def apply_summary(a: dict[str, Any]) -> str:
    rows = [
        ["fleet apply (whole command)", _s(a["apply_wall_s"])],
        ["executor (first step start → last step end)", _s(a["executor_wall_s"])],
        ["fixed cost (lock, observe, plan check, relabel, unlock, start-up)", _s(a["overhead_s"])],
        ["sum of the waves' slowest steps", _s(a["sum_slowest_step_s"])],
        ["sum of the waves' slowest host lanes", _s(a["sum_slowest_lane_s"])],
        ["sum of all steps", _s(a["sum_all_steps_s"])],
    ]
    return tabulate(rows, headers=[f"apply of the example: {a['changes']} changes, {a['n_waves']} waves, "
                                   f"settle {a['settle_s']:g} s", ""], tablefmt="github")


def render(results: dict[str, Any]) -> str:
    parts = ["## Machine", machine_table(results["machine"])]
    if results.get("status"):
        parts += ["## fleet status vs the OpenSSH floor", status_table(results["status"])]
        for r in results["status"]:
            parts += [f"### N={r['hosts']}: runs", status_runs_table(r)]
            if r.get("remote_cost", {}).get("cases"):
                parts += [remote_cost_table(r["remote_cost"])]
            if r.get("profile", {}).get("steps"):
                parts += [profile_table(r["profile"]), phase_table(r["profile"]), thread_table(r["profile"])]
    if results.get("imports"):
        parts += ["## fixed cost: interpreter and imports", imports_table(results["imports"])]
    if results.get("apply"):
        parts += ["## apply", apply_summary(results["apply"]), apply_table(results["apply"])]
    if results.get("core"):
        run = results.get("core_run")  # the pure core measured in a later run than the rest
        title = f"## pure core (run of {run['started']}, commit {run['machine'].get('fleet_commit')})" if run else \
            "## pure core"
        parts += [title, core_table(results["core"]["cases"]), growth_table(results["core"]["growth"])]
    if results.get("whole"):
        parts += ["## whole fleet processes (--observed)", whole_table(results["whole"]["cases"]),
                  whole_growth_table(results["whole"]["growth"])]
    return "\n\n".join(parts) + "\n"


def whole_table(rows: list[dict[str, Any]]) -> str:
    return tabulate([[r["hosts"], r["scenario"], r["command"], _s(r["wall_s"]), _s(r["cpu_s"]),
                      f"{r['maxrss_mb']:.0f} MB",
                      "" if r.get("plan_file_bytes") is None else f"{r['plan_file_bytes'] / 1e6:.2f} MB",
                      r.get("error", "")[:60]] for r in rows],
                    headers=["hosts", "scenario", "command", "wall (median)", "CPU (median)", "peak RSS", "plan file",
                             "error"], tablefmt="github")


def whole_growth_table(rows: list[dict[str, Any]]) -> str:
    return tabulate([[g["scenario"], g["command"], f"{g['from']} → {g['to']}", f"{g['wall_exponent']:.2f}",
                      "—" if g["cpu_exponent"] is None else f"{g['cpu_exponent']:.2f}"] for g in rows],
                    headers=["scenario", "command", "hosts", "wall exponent", "CPU exponent"], tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS.json", file=sys.stderr)
        return 64
    with open(args[0], encoding="utf-8") as f:
        sys.stdout.write(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
