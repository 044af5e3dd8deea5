"""What one host's collection costs the machine, split into the SSH client, the connection on the
remote side (sshd, PAM, sudo) and fleet's script (its shell, systemctl, awk, sha256sum, and the
work systemd's PID 1 does to answer systemctl).

On the lab every host shares the machine's cores, so the remote side is part of the measured
wall time.  Each case runs alone, one at a time, `repeats` times (OpenSSH client, like the floor):
client CPU comes from wait4, the machine's busy CPU from /proc/stat around the run, minus the
machine's idle-lab baseline for the same duration.  remote = machine - client - baseline.

`profile_parts` then splits the script's own cost by part (facts, discovery, units, hashes, each
kind's section …), measured on the host itself next to the minimal collector's one `systemctl
show` (issue 19's yardstick): `python -m bench.remote_cost --dir DIR --state-dir STATE` on a
running lab of a generated inventory.
"""

from __future__ import annotations

import os
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

from bench.lab import Lab, run_parallel
from bench.status import BASELINE, KEX, _load, floor_argvs, history_asks_for, kept, machine_busy


def _baseline(seconds: float = 3.0) -> float:
    b0 = machine_busy()
    time.sleep(seconds)
    return (machine_busy() - b0) / seconds


def measure_remote_cost(lab: Lab, directory: Path, repeats: int = 15) -> dict[str, Any]:
    from fleet.collect.script import spec_for

    desired, targets = _load(directory, lab.state_dir)
    floors = {argv[argv.index("-o") + 2]: argv for argv in floor_argvs(lab, directory)}
    root = next(h for h in targets.hosts if not h.sudo)
    deploy = next(h for h in targets.hosts if h.sudo)
    kex = ["-o", f"KexAlgorithms={KEX}"]
    cases = {
        f"ssh {root.name} true (root login)": lab.ssh_argv(root.name, "true", *kex),
        f"ssh {deploy.name} 'sudo -n -- sh -c true' (deploy login)":
            lab.ssh_argv(deploy.name, "sudo -n -- sh -c true", *kex),
        f"fleet's script on {root.name} (root login; 7 units)": floors[root.name],
        f"fleet's script on {deploy.name} (deploy login, sudo; 4 units)": floors[deploy.name],
        f"minimal collector on {root.name} (one systemctl show)":
            lab.ssh_argv(root.name, minimal_command(spec_for(desired, root.name).units), *kex),
        f"minimal collector on {deploy.name} (one systemctl show, no sudo)":
            lab.ssh_argv(deploy.name, minimal_command(spec_for(desired, deploy.name).units), *kex),
    }
    baseline = _baseline()
    out: dict[str, Any] = {"baseline_busy_cores": baseline, "repeats": repeats, "cases": {}}
    for label, argv in cases.items():
        rows = []
        for i in range(repeats):
            time.sleep(0.2)
            b0 = machine_busy()
            wall, (m,) = run_parallel([argv], out_dir=lab.work / "logs", tag=f"remote-cost-{i}")
            busy = machine_busy() - b0
            rows.append({"wall_s": wall, "client_cpu_s": m.cpu_s, "machine_cpu_s": busy,
                         "remote_cpu_s": busy - m.cpu_s - baseline * wall, "rc": m.rc})
        med = statistics.median
        out["cases"][label] = {
            "wall_s": med(r["wall_s"] for r in rows),
            "client_cpu_s": med(r["client_cpu_s"] for r in rows),
            "remote_cpu_s": med(r["remote_cpu_s"] for r in rows),
            "machine_cpu_s": med(r["machine_cpu_s"] for r in rows),
            "failures": sum(1 for r in rows if r["rc"] != 0),
        }
    out["parts"] = profile_parts(lab, directory)
    return out


MINIMAL_PROPERTIES = "Id,ActiveState,SubState,UnitFileState,ExecStart"  # issue 19's minimal collector


def minimal_command(units: tuple[str, ...]) -> str:
    """What the minimal OpenSSH collector runs on a host: one `systemctl show` of the declared units."""
    return f"systemctl show --no-pager -p {MINIMAL_PROPERTIES} -- " + " ".join(shlex.quote(u) for u in units)


def _marked(parts: list[tuple[str, str]], repeats: int, mark: str) -> str:
    """The parts run `repeats` times in one shell, stdout discarded; after each part (and once
    before the first), `mark` with the part's `{name}`, which writes to fd 3."""
    body = "\n".join(f"{text}\n{mark.format(name=name)}" for name, text in parts)
    return (f"exec 3>&1\n{mark.format(name='start')}\n"
            f"i=0; while [ $i -lt {int(repeats)} ]; do\n{body}\ni=$((i + 1)); done >/dev/null 2>&1\n")


def _instrumented(parts: list[tuple[str, str]], repeats: int) -> str:
    """`_marked` with the part's name, PID 1's utime/stime (ticks: the work systemd does to answer
    systemctl) and `times` (the shell's and its children's CPU).  Only builtins measure: no fork is
    counted twice."""
    return _marked(parts, repeats, "read -r _ _ _ _ _ _ _ _ _ _ _ _ _ u1 s1 _ </proc/1/stat; "
                                   "echo \"@prof {name} $u1 $s1\" >&3; times >&3")


def _pid_marked(parts: list[tuple[str, str]], repeats: int) -> str:
    """`_marked` with the last PID the host's PID namespace gave out (/proc/loadavg): the processes
    each part started (forks, subshells included), whatever the machine's load — the lab host runs
    little else."""
    return _marked(parts, repeats, 'read -r _ _ _ _ lp _ </proc/loadavg; echo "@pid {name} $lp" >&3')


def _forks_per_part(out: str) -> dict[str, float]:
    """Median processes started per part per run, from `_pid_marked`'s output (the `read` of the
    mark itself is a builtin: it starts none)."""
    samples = [(w[1], int(w[2])) for w in (line.split() for line in out.splitlines()) if w[:1] == ["@pid"]]
    seen: dict[str, list[int]] = {}
    for (_, before), (name, after) in zip(samples, samples[1:], strict=False):
        seen.setdefault(name, []).append(after - before)
    return {name: statistics.median(n) for name, n in seen.items()}


def _seconds(word: str) -> float:
    minutes, _, rest = word.partition("m")
    return int(minutes) * 60 + float(rest.rstrip("s"))


def _per_part(out: str, repeats: int) -> dict[str, float]:
    """CPU seconds per part per run (shell + children + PID 1) from the instrumented output."""
    tick = 1 / os.sysconf("SC_CLK_TCK")
    lines = out.splitlines()
    samples: list[tuple[str, float]] = []
    for i, line in enumerate(lines):
        if line.startswith("@prof "):
            _, name, u1, s1 = line.split()
            shell = [_seconds(w) for w in lines[i + 1].split()] + [_seconds(w) for w in lines[i + 2].split()]
            samples.append((name, sum(shell) + (int(u1) + int(s1)) * tick))
    totals: dict[str, float] = {}
    for (_, before), (name, after) in zip(samples, samples[1:], strict=False):
        totals[name] = totals.get(name, 0.0) + after - before
    return {name: t / repeats for name, t in totals.items()}


def profile_parts(lab: Lab, directory: Path, repeats: int = 20) -> dict[str, Any]:
    """Host CPU per part of fleet's script (and of the minimal collector's one `systemctl show`),
    measured on the host itself, as root, `repeats` runs in one shell: no SSH session counted.
    `fleet` is the script as fleet sends it after a first collection (what the lab's newest kept
    snapshot lets it skip offered: idle units, part `idle`; env files whose hash it knows; the
    host history read from where the journal last saw it, part `history`), `fleet_first` as a first
    collection sends it (the whole history read), and with BENCH_BASELINE_PYTHONPATH set,
    `baseline` as that fleet sends it after a first collection.  Each case also counts the processes
    each part starts (`per_part_processes`, the median of 5 runs): CPU shares the machine's noise,
    that count does not."""
    from fleet.collect.collector import HistoryAsk, _history_section
    from fleet.collect.script import build_script, known_env, reuse_offers, script_parts, spec_for

    desired, targets = _load(directory, lab.state_dir)
    seen = kept(desired, targets, lab.state_dir)
    asks = history_asks_for(targets, lab.state_dir)
    out: dict[str, Any] = {"repeats": repeats, "hosts": {}}
    for host in (next(h for h in targets.hosts if not h.sudo), next(h for h in targets.hosts if h.sudo)):
        first = spec_for(desired, host.name)
        spec = reuse_offers(first, seen.get(host.name))
        once = lab.root(host.name, host.sudo, build_script(spec), timeout=120).stdout
        reused = once.split("@@reused\n", 1)[1].split("@@", 1)[0].split() if "@@reused\n" in once else []
        history = _history_section(asks.get(host.name))
        cases = {"fleet": script_parts(spec, history=history),
                 "fleet_first": script_parts(first, history=_history_section(HistoryAsk())),
                 "minimal": [("systemctl_show", minimal_command(spec.units))]}
        if BASELINE:
            cases["baseline"] = _baseline_parts(directory, lab.state_dir, host.name)
        # Can the manager's facts ride in the units' `show`?  What systemctl prints when the
        # manager's properties are asked next to a unit's (issue 19's question), kept as seen.
        mixed = lab.root(host.name, host.sudo, "systemctl show --no-pager -p Version -p SystemState -p Id -- "
                         + shlex.quote(spec.units[0]), timeout=60)
        known = [s.split("\n", 1)[0] for s in once.split("\n@@env ")[1:] if "\nknown " in s.split("\n@@", 1)[0]]
        out["hosts"][host.name] = {"offered": [u.unit for u in spec.idle], "reused": reused,
                                   "env_offered": sorted(known_env(spec)), "env_known": known,
                                   "manager_with_unit": {"rc": mixed.returncode, "stdout": mixed.stdout[-500:],
                                                         "stderr": mixed.stderr[-500:]}}
        for label, ps in cases.items():
            run = lab.root(host.name, host.sudo, _instrumented(ps, repeats), timeout=300)
            per = _per_part(run.stdout, repeats)
            forks = _forks_per_part(lab.root(host.name, host.sudo, _pid_marked(ps, 5), timeout=120).stdout)
            out["hosts"][host.name][label] = {"rc": run.returncode, "per_part_cpu_s": per,
                                              "total_cpu_s": sum(per.values()), "units": len(spec.units),
                                              "per_part_processes": forks, "processes": sum(forks.values())}
    return out


_BASELINE_PARTS = """
import json, sys
from pathlib import Path
from bench.status import _load, kept
from fleet.collect import script
desired, targets = _load(Path(sys.argv[1]), Path(sys.argv[2]))
state = kept(desired, targets, Path(sys.argv[2])).get(sys.argv[3])
# what that fleet offers: its kept idle units, and the env files whose hash it knows where it can
offers = getattr(script, "reuse_offers", None) or script.idle_offers
print(json.dumps(script.script_parts(offers(script.spec_for(desired, sys.argv[3]), state))))
"""


def _baseline_parts(directory: Path, state_dir: Path, host: str) -> list[tuple[str, str]]:
    """The script parts the baseline fleet (BENCH_BASELINE_PYTHONPATH, bench/status.py) sends `host`
    after a first collection (what the lab's newest kept snapshot lets it skip offered: idle units,
    and known env files where that fleet has `reuse_offers`), made by that fleet in a process of its own."""
    import json
    import subprocess
    import sys

    # cwd "/": with `-c`, the working directory comes first on sys.path, before PYTHONPATH
    env = {**os.environ, "PYTHONPATH": f"{BASELINE}:{Path(__file__).resolve().parents[1]}"}
    done = subprocess.run([sys.executable, "-c", _BASELINE_PARTS, str(directory), str(state_dir), host],
                          capture_output=True, text=True, env=env, check=True, timeout=120, cwd="/")
    return [(name, text) for name, text in json.loads(done.stdout)]


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.remote_cost --dir DIR --state-dir STATE`: the per-part profile on a running
    lab of a generated inventory (take the lab lock yourself)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.remote_cost")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ssh", action="store_true", help="also the whole-session cost through ssh (15 runs per case)")
    args = p.parse_args(argv)
    lab = Lab(args.state_dir, Path("/tmp/bench-work"))
    result: dict[str, Any] = {"parts": profile_parts(lab, args.dir, args.repeats)}
    if args.ssh:
        result["sessions"] = measure_remote_cost(lab, args.dir)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
