"""`fleet --lab apply` of the shipped example on a bare lab, against what its waves allow.

The example (the repo's desired_state.toml and hosts/, 4 hosts) is planned and saved with
`fleet plan -o`, then that saved plan is applied.  The journal has start and end of every step;
grouped by the plan's waves they give, for each wave:

* its slowest step — the wave's duration if every step of the wave ran in parallel;
* its slowest host lane — the sum of one host's steps in that wave (the executor runs a host's
  steps of one wave one after another, hosts in parallel), the max over hosts;
* its wall time in the journal (first start to last end).

An apply bounded by waves takes about the sum of the waves' slowest steps (plus the fixed cost
of locking, observing and planning); one bounded by steps takes about the sum of all steps.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.lab import Lab


def wave_breakdown(plan: dict[str, Any], steps: list[Any]) -> dict[str, Any]:
    """Per wave: slowest step, slowest host lane, journal wall; and the sums."""
    wave_of = {cid: i for i, wave in enumerate(plan["waves"]) for cid in wave}
    by_wave: dict[int, list[Any]] = defaultdict(list)
    for s in steps:
        if s.started is not None and s.ended is not None and s.change_id in wave_of:
            by_wave[wave_of[s.change_id]].append(s)
    waves: list[dict[str, Any]] = []
    for i in range(len(plan["waves"])):
        ss = by_wave.get(i, [])
        if not ss:
            waves.append({"wave": i + 1, "steps": 0})
            continue
        lanes: dict[str, float] = defaultdict(float)
        for s in ss:
            lanes[s.host] += s.ended - s.started
        slowest = max(ss, key=lambda s: s.ended - s.started)
        lane_host = max(lanes, key=lanes.__getitem__)
        waves.append({
            "wave": i + 1, "steps": len(ss), "hosts": len(lanes),
            "slowest_step_s": slowest.ended - slowest.started, "slowest_step": slowest.change_id,
            "slowest_lane_s": lanes[lane_host], "slowest_lane_host": lane_host,
            "lane_steps": sum(1 for s in ss if s.host == lane_host),
            "wall_s": max(s.ended for s in ss) - min(s.started for s in ss),
            "actions": sorted({s.action for s in ss}),
        })
    timed = [s for s in steps if s.started is not None and s.ended is not None]
    return {
        "waves": waves,
        "sum_slowest_step_s": sum(w.get("slowest_step_s", 0.0) for w in waves),
        "sum_slowest_lane_s": sum(w.get("slowest_lane_s", 0.0) for w in waves),
        "sum_wave_wall_s": sum(w.get("wall_s", 0.0) for w in waves),
        "sum_all_steps_s": sum(s.ended - s.started for s in timed),
        "executor_wall_s": (max(s.ended for s in timed) - min(s.started for s in timed)) if timed else 0.0,
        "steps": len(timed),
        "outcomes": dict(sorted({o: sum(1 for s in steps if s.outcome == o) for o in {s.outcome for s in steps}}
                                .items(), key=lambda kv: str(kv[0]))),
    }


def bench_apply(lab: Lab, repo: Path, work: Path, report: Any, *, settle: float | None = None) -> dict[str, Any]:
    from fleet.journal import Journal, journal_path

    out = work / "apply"
    out.mkdir(parents=True, exist_ok=True)
    state = str(lab.state_dir)
    report("[apply] lab up with the example's 4 hosts (bare)")
    up = lab.up(repo / "hosts", tag="up-example")
    plan_path = out / "plan.json"
    base = ["--lab", "--dir", str(repo), "--state-dir", state]
    planned = lab.fleet(*base, "plan", "-o", str(plan_path), tag="apply-plan")
    if planned.rc not in (0, 2):
        raise RuntimeError(f"fleet plan failed (rc {planned.rc}):\n{planned.stderr[-2000:]}")
    plan = json.loads(plan_path.read_text())
    report(f"[apply] plan: {len(plan['changes'])} changes in {len(plan['waves'])} waves; applying it")
    extra = ["--settle", str(settle)] if settle is not None else []
    applied = lab.fleet(*base, "apply", str(plan_path), *extra, tag="apply-run")
    run_id = next((ln.split("run ", 1)[1].split(" ", 1)[0] for ln in applied.stdout.splitlines()
                   if ln.startswith("Journal: run ")), None)
    with Journal.open(journal_path(state)) as journal:
        if run_id is None:
            runs = journal.runs()
            run_id = runs[-1].id if runs else None
        steps = journal.steps(run_id=run_id) if run_id else []
    breakdown = wave_breakdown(plan, steps)
    result = {
        "lab_up_s": up.wall_s,
        "plan_s": planned.wall_s,
        "apply_rc": applied.rc,
        "apply_wall_s": applied.wall_s,
        "apply_cpu_s": applied.cpu_s,
        "apply_maxrss_mb": applied.maxrss_mb,
        "settle_s": settle if settle is not None else 3.0,
        "changes": len(plan["changes"]),
        "n_waves": len(plan["waves"]),
        "run_id": run_id,
        **breakdown,
    }
    result["overhead_s"] = result["apply_wall_s"] - result["executor_wall_s"]
    report(f"[apply] rc {applied.rc}: wall {applied.wall_s:.1f} s; executor {result['executor_wall_s']:.1f} s; "
           f"sum of waves' slowest step {result['sum_slowest_step_s']:.1f} s; slowest lanes "
           f"{result['sum_slowest_lane_s']:.1f} s; all steps {result['sum_all_steps_s']:.1f} s")
    return result
