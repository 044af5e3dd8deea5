"""The pure core without any host: diff + graph + plan on synthetic fleets.

A synthetic fleet of N hosts where every host runs 20 managed services (web, streaming and 18
Sidekiq processes), postgres and redis (observe-only) run on the first host, and every host has
one `.env.production` (18 values, 7 secrets).  Observed states are built the way the collector
reports them (fleet.collect.parse conventions), for three scenarios:

* `converged` — every host already matches: the plan is empty (the everyday `fleet plan`);
* `drift`     — a realistic mix: 10 % of hosts have one edited unit file, 5 % a wrong env value
                (which restarts all 20 units there), 2 % an undeclared Sidekiq to prune, 1 % a
                stopped service;
* `bare`      — nothing installed anywhere: the first apply of a new fleet (~62 changes/host).

Each (hosts, scenario) runs in its own Python process (`python -m bench.core ...` prints one
JSON object), so peak RSS is per case and a case that blows its time budget can be killed.
Timing uses time.perf_counter without tracemalloc; peak memory is a second, separate pass under
tracemalloc (which slows Python down), plus the process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Mapping
from typing import Any

from fleet.diff import diff
from fleet.envfile import fingerprint
from fleet.graph import order
from fleet.mastodon import SECRET_KEYS, looks_secret
from fleet.model import (
    Desired,
    DiscoveryPattern,
    EnvFile,
    EnvFileState,
    HealthCheck,
    Host,
    HostFacts,
    HostResult,
    HostState,
    Kind,
    PlacementRule,
    SecretSource,
    Service,
    SidekiqSpec,
    UnitSpec,
    UnitState,
)
from fleet.output.text import plan_text
from fleet.plan import Plan, build_plan, plan_from_json
from fleet.status import build_status
from fleet.textutil import mask, sha256_hex
from fleet.units import as_observed_text, render_unit, unit_path

SCENARIOS = ("converged", "drift", "bare")
TRACEMALLOC_UNDER_S = 60.0
ENV_PATH = "/home/mastodon/live/.env.production"
QUEUES = ("default", "push", "ingress", "mailers", "pull", "fasp")
VALUES = (
    ("LOCAL_DOMAIN", "bench.example"), ("SINGLE_USER_MODE", "false"), ("DB_HOST", "db.bench.internal"),
    ("DB_PORT", "5432"), ("DB_NAME", "mastodon_production"), ("DB_USER", "mastodon"),
    ("REDIS_HOST", "db.bench.internal"), ("REDIS_PORT", "6379"), ("S3_ENABLED", "true"),
    ("S3_BUCKET", "bench-media"), ("S3_REGION", "us-west-1"), ("S3_PROTOCOL", "https"),
    ("S3_HOSTNAME", "s3.us-west-1.amazonaws.com"), ("S3_ALIAS_HOST", "media.bench.example"),
    ("SMTP_SERVER", "smtp.bench.internal"), ("SMTP_PORT", "587"),
    ("SMTP_FROM_ADDRESS", "notifications@bench.example"), ("VAPID_PUBLIC_KEY", "BPublic0000"),
)  # fmt: skip
SECRET_NAMES = ("SECRET_KEY_BASE", "OTP_SECRET", "VAPID_PRIVATE_KEY", "DB_PASS", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "SMTP_PASSWORD")


# ------------------------------------------------------------------------------ the fleet


def host_name(i: int) -> str:
    return f"h{i:05d}"


def synthetic_desired(n_hosts: int, n_services: int = 20) -> Desired:
    """N hosts, each running `n_services` managed services; postgres and redis on the first."""
    names = tuple(host_name(i) for i in range(n_hosts))
    hosts = tuple(Host(name=n, address=f"{n}.bench.internal", user="deploy", sudo=True,
                       roles=("db", "worker") if i == 0 else ("app",)) for i, n in enumerate(names))
    common_env = (("RAILS_ENV", "production"), ("MALLOC_ARENA_MAX", "2"))
    services: list[Service] = [
        Service(name="postgres", kind=Kind.POSTGRES, unit="postgresql.service", hosts=names[:1], observe_only=True,
                health=HealthCheck(tcp=5432, timeout=15)),
        Service(name="redis", kind=Kind.REDIS, unit="redis-server.service", hosts=names[:1], observe_only=True,
                health=HealthCheck(tcp=6379, timeout=10)),
    ]
    requires = ("postgres", "redis")
    for k in range(n_services):
        if k == 0:
            name, kind = "web", Kind.WEB
            spec = UnitSpec(exec_start="/home/mastodon/.rbenv/shims/bundle exec puma -C config/puma.rb",
                            description="mastodon-web", user="mastodon", working_directory="/home/mastodon/live",
                            environment=(("RAILS_ENV", "production"), ("PORT", "3000")),
                            environment_files=(ENV_PATH,), exec_reload="/bin/kill -SIGUSR1 $MAINPID",
                            restart="always")
            sk = None
            health = HealthCheck(http="http://127.0.0.1:3000/health", timeout=30)
        elif k == 1:
            name, kind = "streaming", Kind.STREAMING
            spec = UnitSpec(exec_start="/usr/bin/node ./streaming", description="mastodon-streaming",
                            user="mastodon", working_directory="/home/mastodon/live",
                            environment=(("NODE_ENV", "production"), ("PORT", "4000")),
                            environment_files=(ENV_PATH,), restart="always")
            sk = None
            health = HealthCheck(http="http://127.0.0.1:4000/api/v1/streaming/health", timeout=30)
        else:
            name, kind = f"sidekiq-{k - 1:02d}", Kind.SIDEKIQ
            first = QUEUES[k % len(QUEUES)]
            second = QUEUES[(k + 2) % len(QUEUES)]
            sk = SidekiqSpec(concurrency=10 + k % 3 * 5, queues=((first, 6), (second, 2)))
            spec = UnitSpec(exec_start=sk.exec_start(), description=f"mastodon-sidekiq ({first}, {second})",
                            user="mastodon", working_directory="/home/mastodon/live",
                            environment=(*common_env, ("DB_POOL", str(sk.concurrency))),
                            environment_files=(ENV_PATH,), restart="always")
            health = HealthCheck(command=f"systemctl is-active --quiet mastodon-{name}.service", timeout=10)
        services.append(Service(name=name, kind=kind, unit=f"mastodon-{name}.service", hosts=names,
                                requires=requires, unit_spec=spec, sidekiq=sk, health=health, max_unavailable=1))
    env = EnvFile(name="mastodon", path=ENV_PATH, hosts=names, services=tuple(s.name for s in services[2:]),
                  values=VALUES, sensitive=tuple((k, SecretSource("file")) for k in SECRET_NAMES),
                  owner="mastodon", group="mastodon", mode="0600")
    return Desired(
        name="bench", hosts=hosts, services=tuple(services), env_files=(env,),
        discover=(DiscoveryPattern("mastodon-*", prune=True), DiscoveryPattern("sidekiq*", prune=True),
                  DiscoveryPattern("postgresql*"), DiscoveryPattern("redis*")),
        placement=(PlacementRule("cdn", ("sidekiq", "postgres", "redis")),),
    )


def synthetic_secrets() -> dict[tuple[str, str], str]:
    return {("mastodon", k): f"secret-{k.lower()}-0123456789" for k in SECRET_NAMES}


def _hashed(path: str, content: str) -> dict[str, Any]:
    file_hashes = ((path, sha256_hex(content)),)
    return {"file_hashes": file_hashes, "text_hash": sha256_hex(f"{path} {file_hashes[0][1]}")}


def _managed(s: Service, *, stopped: bool = False, edited: bool = False) -> UnitState:
    spec = s.unit_spec
    assert spec is not None
    text = render_unit(s) + ("# edited by hand\n" if edited else "")
    path = unit_path(s.unit)
    return UnitState(
        unit=s.unit, load_state="loaded", active_state="inactive" if stopped else "active",
        sub_state="dead" if stopped else "running", unit_file_state="enabled",
        exec_start=tuple(spec.exec_start.split()), main_pid=0 if stopped else 4242, fragment_path=path,
        active_enter="Mon 2026-11-23 10:00:00 UTC", result="success", **_hashed(path, text),
        text=f"# {path}\n{text}" if edited else as_observed_text(s),
        environment=tuple((k, mask(v) if looks_secret(k) else v) for k, v in spec.environment),
        environment_files=spec.environment_files,
    )


def _missing(unit: str) -> UnitState:
    return UnitState(unit=unit, load_state="not-found", active_state="inactive", sub_state="dead",
                     unit_file_state="")


def _distro(unit: str, sub: str) -> UnitState:
    path = f"/lib/systemd/system/{unit}"
    return UnitState(unit=unit, load_state="loaded", active_state="active", sub_state=sub,
                     unit_file_state="enabled", main_pid=900, fragment_path=path, result="success",
                     **_hashed(path, f"[Unit]\nDescription={unit}\n"))


def _env(ef: EnvFile, secrets: Mapping[tuple[str, str], str], *, wrong: bool = False) -> EnvFileState:
    values = [(k, "FALSE" if wrong and k == "S3_ENABLED" else v) for k, v in ef.values]
    secret_keys = set(ef.sensitive_keys()) | set(SECRET_KEYS)
    secret_fps = [(k, fingerprint(secrets[("mastodon", k)])) for k, _ in ef.sensitive]
    keys = [k for k, _ in values] + [k for k, _ in secret_fps]
    assert not any(k in secret_keys or looks_secret(k) for k, _ in values)
    return EnvFileState(path=ef.path, present=True, mode="0600", owner="mastodon", group="mastodon",
                        size=2048, keys=tuple(keys), values=tuple(values), secrets=tuple(secret_fps))


def _facts(host: str) -> HostFacts:
    return HostFacts(hostname=host, os="Debian GNU/Linux 12 (bookworm)", kernel="6.1.0-27-amd64",
                     systemd_version="252", system_state="running", uptime_seconds=86400.0,
                     load=(0.1, 0.2, 0.3), mem_total_kb=8_000_000, mem_available_kb=4_000_000)


def synthetic_observed(desired: Desired, scenario: str,
                       secrets: Mapping[tuple[str, str], str]) -> dict[str, HostResult]:
    """What the collector would report for every host in `scenario` (see the module docstring)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}")
    ef = desired.env_files[0]
    managed = [s for s in desired.services if not s.observe_only]
    out: dict[str, HostResult] = {}
    for i, h in enumerate(desired.hosts):
        units: list[UnitState] = []
        if scenario == "bare":
            units = [_missing(s.unit) for s in managed]
            if i == 0:
                # installed by the distro package, disabled in the lab image
                units += [UnitState(unit=u, load_state="loaded", active_state="inactive", sub_state="dead",
                                    unit_file_state="disabled", fragment_path=f"/lib/systemd/system/{u}")
                          for u in ("postgresql.service", "redis-server.service")]
            env = EnvFileState(path=ef.path, present=False)
        else:
            drift = scenario == "drift"
            for k, s in enumerate(managed):
                units.append(_managed(s, edited=drift and i % 10 == 1 and k == i // 10 % len(managed),
                                      stopped=drift and i % 100 == 4 and k == 3))
            if i == 0:
                units += [_distro("postgresql.service", "exited"), _distro("redis-server.service", "running")]
            if drift and i % 50 == 3:
                path = "/etc/systemd/system/mastodon-sidekiq.service"
                content = "[Service]\nExecStart=/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 10 -q default\n"
                units.append(UnitState(
                    unit="mastodon-sidekiq.service", load_state="loaded", active_state="active",
                    sub_state="running", unit_file_state="enabled",
                    exec_start=tuple(content.split("=", 2)[-1].split()), main_pid=3131, fragment_path=path,
                    **_hashed(path, content), text=f"# {path}\n{content}"))
            env = _env(ef, secrets, wrong=drift and i % 20 == 2)
        out[h.name] = HostState(host=h.name, facts=_facts(h.name), units=tuple(units), env_files=(env,),
                                collected_at=1_790_000_000.0, duration=0.2)
    return out


# ------------------------------------------------------------------------------ measuring


def _phases(desired: Desired, observed: Mapping[str, HostResult],
            secrets: Mapping[tuple[str, str], str]) -> dict[str, float]:
    """Wall time of diff and of graph (order), measured separately (the rest of build_plan is
    the plan's hashes and fingerprints)."""
    t0 = time.perf_counter()
    d = diff(desired, observed, secrets)
    t1 = time.perf_counter()
    order(d.changes, desired)
    t2 = time.perf_counter()
    return {"diff_s": t1 - t0, "graph_s": t2 - t1}


def measure(n_hosts: int, n_services: int, scenario: str, repeats: int) -> dict[str, Any]:
    """One case: build the inputs, then time build_plan `repeats` times, then one tracemalloc pass."""
    t0 = time.perf_counter()
    desired = synthetic_desired(n_hosts, n_services)
    secrets = synthetic_secrets()
    observed = synthetic_observed(desired, scenario, secrets)
    build_inputs = time.perf_counter() - t0
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    times: list[float] = []
    plan: Plan | None = None
    deadline = time.perf_counter() + 60  # stop repeating slow cases
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        plan = build_plan(desired, observed, secrets)
        times.append(time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    assert plan is not None
    t = time.perf_counter()
    text = plan.to_json()
    to_json_s = time.perf_counter() - t
    # what `fleet plan` prints and `fleet show`/`apply FILE` read back: the paths that touch every change
    t = time.perf_counter()
    plan_text(plan)
    render_s = time.perf_counter() - t
    t = time.perf_counter()
    plan_from_json(text)
    load_s = time.perf_counter() - t

    phases = _phases(desired, observed, secrets) if times[0] < 20 else {}

    # `fleet status` on the same observations: the matrix every incident starts with
    status_times = []
    for _ in range(min(repeats, 3)):
        gc.collect()
        t = time.perf_counter()
        build_status(desired, dict(observed))
        status_times.append(time.perf_counter() - t)

    peak = None
    if min(times) < TRACEMALLOC_UNDER_S:  # tracemalloc makes Python 2-3x slower
        gc.collect()
        tracemalloc.start()
        build_plan(desired, observed, secrets)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    edges = sum(len(plan.waits_for(cid)) for cid in plan.deps)  # spelled out, one per pair, as before issue 19
    deps_stored = sum(map(len, plan.deps.values())) + sum(map(len, plan.groups.values()))  # what the plan holds
    return {
        "hosts": n_hosts, "services_per_host": n_services, "scenario": scenario,
        "host_services": n_hosts * n_services,
        "changes": len(plan.changes), "edges": edges, "deps_stored": deps_stored, "waves": len(plan.waves),
        "plan_json_bytes": len(text),
        "runs": len(times), "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
        **phases, "to_json_s": to_json_s, "render_s": render_s, "load_s": load_s,
        "status_s": statistics.median(status_times),
        "tracemalloc_peak_mb": None if peak is None else peak / 2**20,
        "maxrss_inputs_mb": rss_inputs / 1024,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "build_inputs_s": build_inputs,
    }


def profile(n_hosts: int, n_services: int, scenario: str, top: int = 15) -> str:
    """cProfile of one build_plan, the top functions by cumulative and by own time."""
    desired = synthetic_desired(n_hosts, n_services)
    secrets = synthetic_secrets()
    observed = synthetic_observed(desired, scenario, secrets)
    prof = cProfile.Profile()
    prof.enable()
    build_plan(desired, observed, secrets)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def run_case(n_hosts: int, n_services: int, scenario: str, repeats: int, budget: float) -> dict[str, Any]:
    """`measure` in a fresh Python process, killed after `budget` seconds."""
    cmd = [sys.executable, "-m", "bench.core", "--hosts", str(n_hosts), "--services", str(n_services),
           "--scenario", scenario, "--repeats", str(repeats)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, check=False)
    except subprocess.TimeoutExpired:
        return {"hosts": n_hosts, "services_per_host": n_services, "scenario": scenario,
                "host_services": n_hosts * n_services, "timeout_s": budget,
                "error": f"did not finish within {budget:g} s"}
    if done.returncode != 0:
        return {"hosts": n_hosts, "services_per_host": n_services, "scenario": scenario,
                "host_services": n_hosts * n_services,
                "error": (done.stderr.strip().splitlines() or ["(no output)"])[-1]}
    result: dict[str, Any] = json.loads(done.stdout)
    result["process_wall_s"] = time.perf_counter() - started
    return result


def growth(results: list[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    """Empirical exponent between successive sizes: log(t2/t1) / log(n2/n1); 1.0 is linear."""
    import math

    rows = sorted((r for r in results if r["scenario"] == scenario and "median_s" in r), key=lambda r: r["hosts"])
    out = []
    for a, b in zip(rows, rows[1:], strict=False):
        if a["median_s"] > 0:
            ma, mb = a.get("tracemalloc_peak_mb"), b.get("tracemalloc_peak_mb")
            out.append({"scenario": scenario, "from": a["hosts"], "to": b["hosts"],
                        "time_exponent": math.log(b["median_s"] / a["median_s"]) / math.log(b["hosts"] / a["hosts"]),
                        "memory_exponent": math.log(mb / ma) / math.log(b["hosts"] / a["hosts"])
                        if ma and mb else None,
                        "status_exponent": math.log(b["status_s"] / a["status_s"]) / math.log(b["hosts"] / a["hosts"])
                        if a.get("status_s") and b.get("status_s") else None})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.core", description="one pure-core case, JSON on stdout")
    p.add_argument("--hosts", type=int, required=True)
    p.add_argument("--services", type=int, default=20)
    p.add_argument("--scenario", choices=SCENARIOS, default="drift")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print a cProfile of one build_plan instead")
    args = p.parse_args(argv)
    if args.profile:
        print(profile(args.hosts, args.services, args.scenario))
        return 0
    json.dump(measure(args.hosts, args.services, args.scenario, args.repeats), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
