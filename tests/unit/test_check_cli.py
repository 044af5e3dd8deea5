"""`fleet check` end to end: the real console script on copies of the shipped example, one defect each.

The per-defect table below is the acceptance test of the issue: every defect it lists, put alone
into a copy of the example, makes `fleet check` exit 1 and name it.  Each case runs twice: the
real `fleet` executable (human output), and `fleet.cli.main` in-process with --json (finding code,
key and line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import fleet_executable

from fleet import cli

FleetDir = Any  # conftest.FleetDir
DESIRED = "desired_state.toml"
FINDING_KEYS = {"severity", "code", "message", "file", "key", "line", "column", "hint", "host"}


@pytest.fixture(scope="session")
def fleet_exe() -> str:
    return fleet_executable()


def run_fleet(exe: str, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def run_main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def check_json(capsys: pytest.CaptureFixture[str], root: Path) -> tuple[int, dict[str, Any]]:
    code, out, _ = run_main(capsys, "--dir", root, "check", "--json")
    return code, json.loads(out)


# ------------------------------------------------------------------ the defects of the issue


@dataclass(frozen=True)
class Defect:
    """One defect: edits to the example (file, old, new; old must occur once) and how it is named."""

    id: str
    edits: tuple[tuple[str, str, str], ...]
    code: str
    key: str
    says: str  # a fragment of the message or hint that names the defect
    append: str = ""


SPLIT_ENV = """
[env_files.edge]
path = "/home/mastodon/live/.env.production"
hosts = ["franz"]
values = { LOCAL_DOMAIN = "hachyderm.io", S3_BUCKET = "edge-media" }
"""

DEFECTS = [
    Defect("toml-syntax-error", ((DESIRED, 'name = "hachyderm"\n', 'name = "hachyderm\n'),),
           "toml.syntax", "", "TOML syntax error: Illegal character"),
    Defect("wrong-type", ((DESIRED, "concurrency = 25", 'concurrency = "25"'),),
           "config.wrong-type", "services.sidekiq-default.concurrency", "must be an integer, not a string"),
    Defect("missing-required-key", ((DESIRED, 'unit = "mastodon-web.service"\n', ""),),
           "config.missing-key", "services.web.unit", "missing required key 'services.web.unit'"),
    Defect("unknown-key", ((DESIRED, "max_unavailable = 1\nhealth = { http", "max_unavailabel = 1\nhealth = { http"),),
           "config.unknown-key", "services.web.max_unavailabel", "did you mean max_unavailable?"),
    Defect("service-on-host-without-file", ((DESIRED, 'hosts = ["fritz", "franz"]', 'hosts = ["frtiz", "franz"]'),),
           "config.unknown-host", "services.web.hosts", "names host 'frtiz', which has no file in"),
    Defect("requires-unknown-service",
           ((DESIRED, 'hosts = ["fritz"]\nrequires = ["postgres", "redis"]',
             'hosts = ["fritz"]\nrequires = ["postgres", "rediss"]'),),
           "config.unknown-service", "services.streaming.requires", "requires unknown service 'rediss'"),
    Defect("dependency-cycle",
           ((DESIRED, 'unit = "redis-server.service"\n', 'unit = "redis-server.service"\nrequires = ["web"]\n'),),
           "config.cycle", "services.redis.requires", "dependency cycle: redis -> web -> redis"),
    Defect("two-services-one-unit",
           ((DESIRED, 'unit = "mastodon-sidekiq-scheduler.service"', 'unit = "mastodon-sidekiq-push-pull.service"'),),
           "config.duplicate-unit", "services.sidekiq-scheduler.unit",
           "both claim mastodon-sidekiq-push-pull.service on host nietzsche"),
    Defect("hosts-file-name-disagrees", (("hosts/franz.toml", 'name = "franz"', 'name = "frank"'),),
           "hosts.name-mismatch", "name", "franz.toml declares name = 'frank'"),
    Defect("queue-served-by-nobody",
           ((DESIRED, "queues = { push = 6, pull = 4, fasp = 1 }", "queues = { push = 6, fasp = 1 }"),),
           "sidekiq.queue-unserved", "services", "queue 'pull' is served by no declared Sidekiq process"),
    Defect("no-scheduler", ((DESIRED, "queues = { scheduler = 1 }", "queues = { default = 1 }"),),
           "sidekiq.scheduler-count", "services", "exactly one Sidekiq process fleet-wide; declared: 0"),
    Defect("two-schedulers",
           ((DESIRED, "queues = { default = 8, ingress = 6, mailers = 2 }",
             "queues = { default = 8, ingress = 6, mailers = 2, scheduler = 1 }"),),
           "sidekiq.scheduler-count", "services.sidekiq-default",
           "exactly one Sidekiq process fleet-wide; declared: 2"),
    Defect("db-pool-below-concurrency", ((DESIRED, 'DB_POOL = "25"', 'DB_POOL = "10"'),),
           "sidekiq.db-pool", "services.sidekiq-default", "runs 25 threads (-c 25) but DB_POOL=10"),
    Defect("unknown-queue", ((DESIRED, "queues = { scheduler = 1 }", "queues = { scheduler = 1, mailer = 1 }"),),
           "sidekiq.unknown-queue", "services.sidekiq-scheduler.queues", "serves queue 'mailer', which Mastodon never"),
    Defect("sidekiq-on-cdn-host", ((DESIRED, 'hosts = ["freud"]', 'hosts = ["freud", "franz"]'),),
           "placement.forbidden", "services.sidekiq-default.hosts", "on franz, whose role 'cdn' forbids sidekiq"),
    Defect("postgres-on-cdn-host",
           ((DESIRED, 'unit = "postgresql.service"\nhosts = ["nietzsche"]',
             'unit = "postgresql.service"\nhosts = ["nietzsche", "franz"]'),),
           "placement.forbidden", "services.postgres.hosts", "on franz, whose role 'cdn' forbids postgres"),
    Defect("misspelled-env-key", ((DESIRED, "S3_BUCKET =", "3_BUCKET ="),),
           "env.near-miss", "env_files.mastodon.values.3_BUCKET", "did you mean S3_BUCKET?"),
    Defect("s3-enabled-not-boolean", ((DESIRED, 'S3_ENABLED = "true"', 'S3_ENABLED = "yes"'),),
           "env.not-boolean", "env_files.mastodon.values.S3_ENABLED", "S3_ENABLED='yes' is not a boolean"),
    Defect("env-differs-between-hosts-of-a-service",
           ((DESIRED, 'services = ["web", "streaming", "sidekiq-default", "sidekiq-push-pull", "sidekiq-scheduler"]',
             'hosts = ["fritz", "freud", "nietzsche"]'),),
           "env.inconsistent", "services.web", "S3_BUCKET differs between hosts of service web", append=SPLIT_ENV),
    Defect("secret-value-in-clear", ((DESIRED, 'SMTP_PORT = "587"', 'SMTP_PORT = "587"\nDB_PASS = "hunter2"'),),
           "env.secret-in-clear", "env_files.mastodon.values.DB_PASS", "written in clear in the repository"),
    Defect("secret-written-as-its-source", ((DESIRED, 'DB_PASS = "file"', 'DB_PASS = "hunter2"'),),
           "env.bad-secret-source", "env_files.mastodon.sensitive.DB_PASS", "must say where the secret comes from"),
    Defect("db-host-where-no-postgres-runs",
           ((DESIRED, 'unit = "postgresql.service"\nhosts = ["nietzsche"]',
             'unit = "postgresql.service"\nhosts = ["freud"]'),
            (DESIRED, 'DB_HOST = "nietzsche.hachyderm.internal"', 'DB_HOST = "nietzsche"')),
           "store.setting-nowhere", "env_files.mastodon.values.DB_HOST",
           "points at nietzsche, where no postgres (or pgbouncer) service is declared; postgres is declared on freud"),
    Defect("redis-host-outside-the-inventory",
           ((DESIRED, 'REDIS_HOST = "nietzsche.hachyderm.internal"', 'REDIS_HOST = "redis.hachyderm.internal"'),),
           "store.setting-nowhere", "env_files.mastodon.values.REDIS_HOST",
           "points at redis.hachyderm.internal, which is no host of the inventory; redis is declared on nietzsche"),
    Defect("pgbouncer-port-without-pgbouncer", ((DESIRED, 'DB_PORT = "5432"', 'DB_PORT = "6432"'),),
           "store.setting-port", "env_files.mastodon.values.DB_HOST", "and no pgbouncer service is declared"),
    Defect("pgbouncer-with-prepared-statements", ((DESIRED, 'DB_PORT = "5432"', 'DB_PORT = "6432"'),),
           "store.pgbouncer-prepared-statements", "env_files.mastodon.values.DB_HOST",
           'set PREPARED_STATEMENTS = "false"',
           append='[services.pgbouncer]\nkind = "pgbouncer"\nunit = "pgbouncer.service"\nhosts = ["nietzsche"]\n'
                  'observe_only = true\n'),
    Defect("data-store-role-misspelled",
           ((DESIRED, 'health = { tcp = 5432, timeout = 15 }',
             'health = { tcp = 5432, timeout = 15 }\nrole = "primry"'),),
           "config.bad-value", "services.postgres.role", "did you mean primary?"),
]


def with_defect(example: FleetDir, defect: Defect) -> FleetDir:
    for file, old, new in defect.edits:
        example.edit(old, new, file=file)
    if defect.append:
        example.append(defect.append)
    return example


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.id for d in DEFECTS])
def test_fleet_check_exits_1_and_names_each_defect(fleet_exe: str, example: FleetDir, defect: Defect) -> None:
    with_defect(example, defect)
    r = run_fleet(fleet_exe, "check", cwd=example.root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert defect.says in r.stdout
    if defect.key:
        assert f"[{defect.key}]" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("check failed: ")


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.id for d in DEFECTS])
def test_fleet_check_json_reports_each_defect_with_code_key_and_line(
        capsys: pytest.CaptureFixture[str], example: FleetDir, defect: Defect) -> None:
    with_defect(example, defect)
    code, report = check_json(capsys, example.root)
    assert code == 1
    assert report["ok"] is False and report["errors"] >= 1
    matching = [f for f in report["findings"] if f["code"] == defect.code and f["key"] == defect.key]
    assert matching, json.dumps(report["findings"], indent=1)
    f = matching[0]
    assert f["severity"] == "error"
    assert defect.says in f["message"] + " " + f["hint"]
    assert f["file"].endswith(defect.edits[0][0])
    if defect.key != "services":  # "services" is the whole section: no single line to point at
        assert isinstance(f["line"], int) and f["line"] >= 1


def test_a_syntax_error_is_shown_at_its_line_and_column(fleet_exe: str, example: FleetDir) -> None:
    example.edit('name = "hachyderm"\n', 'name = "hachyderm\n')
    r = run_fleet(fleet_exe, "check", cwd=example.root)
    assert "error: desired_state.toml:10:18" in r.stdout  # paths as given: relative to the working directory


def test_a_finding_shows_file_line_key_message_and_hint(fleet_exe: str, example: FleetDir) -> None:
    example.edit("S3_BUCKET =", "3_BUCKET =")
    r = run_fleet(fleet_exe, "check", cwd=example.root)
    assert r.stdout.splitlines()[:3] == [
        "error: desired_state.toml:165 [env_files.mastodon.values.3_BUCKET]",
        "  '3_BUCKET' is not a Mastodon setting: Mastodon would silently ignore it",
        "  hint: did you mean S3_BUCKET? if it is intentional, list it in policy.env.extra_keys",
    ]


# ------------------------------------------------------------------ the shipped example


def test_the_shipped_example_passes_fleet_check_in_the_repository(fleet_exe: str) -> None:
    repo = Path(__file__).resolve().parents[2]
    r = run_fleet(fleet_exe, "check", cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "hachyderm: 4 hosts, 7 services, 1 env files — 0 errors, 0 warnings"
    assert r.stderr == ""


def test_the_shipped_example_passes_as_json(capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    code, report = check_json(capsys, example.root)
    assert code == 0
    assert report == {"format": 1, "ok": True, "errors": 0, "warnings": 0, "findings": []}


def test_every_defect_at_once_is_reported_in_one_run(fleet_exe: str, example: FleetDir) -> None:
    example.edit("max_unavailable = 1\nhealth = { http", "max_unavailabel = 1\nhealth = { http")
    example.edit('hosts = ["fritz", "franz"]', 'hosts = ["frtiz", "franz"]')
    example.edit("S3_BUCKET =", "3_BUCKET =")
    r = run_fleet(fleet_exe, "check", cwd=example.root)
    assert r.returncode == 1
    for text in ("did you mean max_unavailable?", "did you mean fritz?", "did you mean S3_BUCKET?"):
        assert text in r.stdout
    assert r.stdout.rstrip().endswith("check failed: 3 errors, 0 warnings")


def test_warnings_alone_exit_0(fleet_exe: str, example: FleetDir) -> None:
    example.edit('SINGLE_USER_MODE = "false"', 'SINGLE_USER_MODE = "no"')
    r = run_fleet(fleet_exe, "check", cwd=example.root)
    assert r.returncode == 0, r.stdout
    assert r.stdout.startswith("warning: ")
    assert r.stdout.rstrip().endswith("0 errors, 1 warning")


def test_documented_mastodon_keys_fleet_used_not_to_know_pass_check(
        capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    example.edit("S3_BUCKET =", 'REDIS_SENTINELS = "10.0.0.1:26379,10.0.0.2:26379"\nREDIS_SENTINEL_MASTER = "m"\n'
                 'MASTODON_USE_LIBVIPS = "true"\nS3_ENABLE_CHECKSUM_MODE = "when_required"\nS3_BUCKET =')
    clean = {"format": 1, "ok": True, "errors": 0, "warnings": 0, "findings": []}
    assert check_json(capsys, example.root) == (0, clean)


def test_a_key_of_ones_own_is_a_warning_and_check_passes(fleet_exe: str, example: FleetDir) -> None:
    example.edit("S3_BUCKET =", 'MY_OWN_SETTING = "1"\nS3_BUCKET =')
    r = run_fleet(fleet_exe, "check", cwd=example.root)
    assert r.returncode == 0, r.stdout
    assert r.stdout.startswith("warning: desired_state.toml:165 [env_files.mastodon.values.MY_OWN_SETTING]\n"
                               "  'MY_OWN_SETTING' is not a Mastodon setting: ")
    assert r.stdout.rstrip().endswith("0 errors, 1 warning")


def test_errors_are_listed_before_warnings(fleet_exe: str, example: FleetDir) -> None:
    example.edit('SINGLE_USER_MODE = "false"', 'SINGLE_USER_MODE = "no"')
    example.edit("S3_BUCKET =", "3_BUCKET =")
    out = run_fleet(fleet_exe, "check", cwd=example.root).stdout
    assert out.index("error: ") < out.index("warning: ")


def test_output_to_a_pipe_has_no_colour_codes(fleet_exe: str, example: FleetDir) -> None:
    example.edit("S3_BUCKET =", "3_BUCKET =")
    assert "\033[" not in run_fleet(fleet_exe, "check", cwd=example.root).stdout


# ------------------------------------------------------------------ --json


def test_json_findings_have_the_documented_fields(capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    example.edit('name = "franz"', 'name = "frank"', file="hosts/franz.toml")
    example.edit('SINGLE_USER_MODE = "false"', 'SINGLE_USER_MODE = "no"')
    code, report = check_json(capsys, example.root)
    assert code == 1
    assert set(report) == {"format", "ok", "errors", "warnings", "findings"}
    assert report["warnings"] == 1
    assert report["errors"] == len(report["findings"]) - 1
    for f in report["findings"]:
        assert set(f) == FINDING_KEYS
        assert f["severity"] in ("error", "warning")
        assert re.fullmatch(r"[a-z]+\.[a-z-]+", f["code"])
        assert all(isinstance(f[k], str) for k in ("message", "file", "key", "hint", "host"))
        assert f["line"] is None or isinstance(f["line"], int)
        assert f["column"] is None or isinstance(f["column"], int)


def test_json_of_a_syntax_error_carries_line_and_column(capsys: pytest.CaptureFixture[str],
                                                        example: FleetDir) -> None:
    example.edit('name = "hachyderm"\n', 'name = "hachyderm\n')
    _, report = check_json(capsys, example.root)
    (f,) = report["findings"]
    assert (f["code"], f["line"], f["column"]) == ("toml.syntax", 10, 18)


def test_json_from_the_real_executable_parses(fleet_exe: str, example: FleetDir) -> None:
    example.edit("S3_BUCKET =", "3_BUCKET =")
    r = run_fleet(fleet_exe, "--dir", example.root, "check", "--json")
    assert r.returncode == 1
    assert [f["code"] for f in json.loads(r.stdout)["findings"]] == ["env.near-miss"]


# ------------------------------------------------------------------ --dir, --desired, --hosts


def test_dir_points_fleet_at_another_directory(fleet_exe: str, example: FleetDir, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_fleet(fleet_exe, "--dir", example.root, "check", cwd=elsewhere)
    assert r.returncode == 0, r.stdout + r.stderr


def test_desired_and_hosts_override_the_dir_defaults(fleet_exe: str, example: FleetDir, tmp_path: Path) -> None:
    desired = tmp_path / "conf" / "prod.toml"
    desired.parent.mkdir()
    example.desired_path.rename(desired)
    inventory = tmp_path / "inventory"
    example.hosts_dir.rename(inventory)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_fleet(fleet_exe, "--dir", empty, "--desired", desired, "--hosts", inventory, "check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_desired_names_the_file_the_findings_point_at(capsys: pytest.CaptureFixture[str], example: FleetDir,
                                                      tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(example.text().replace("S3_BUCKET =", "3_BUCKET ="))
    code, out, _ = run_main(capsys, "--dir", example.root, "--desired", other, "check", "--json")
    assert code == 1
    assert [f["file"] for f in json.loads(out)["findings"]] == [str(other)]


def test_hosts_option_reads_the_inventory_from_there(capsys: pytest.CaptureFixture[str], example: FleetDir,
                                                     tmp_path: Path) -> None:
    inventory = tmp_path / "inv"
    shutil.copytree(example.hosts_dir, inventory)
    (inventory / "franz.toml").unlink()
    code, out, _ = run_main(capsys, "--dir", example.root, "--hosts", inventory, "check", "--json")
    assert code == 1
    assert "names host 'franz', which has no file in" in out


def test_a_missing_desired_file_is_a_one_line_error_without_traceback(fleet_exe: str, tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    r = run_fleet(fleet_exe, "check", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines()[0] == "fleet: error: desired state file desired_state.toml does not exist"
    assert "Traceback" not in r.stderr
    assert "--dir/--desired" in r.stderr  # the hint line says what to pass


def test_a_missing_hosts_directory_is_a_clear_error(fleet_exe: str, example: FleetDir, tmp_path: Path) -> None:
    r = run_fleet(fleet_exe, "--dir", example.root, "--hosts", tmp_path / "nope", "check")
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == f"fleet: error: hosts directory {tmp_path / 'nope'} does not exist"
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ help and usage


def test_fleet_help_explains_the_global_options_and_exit_codes(fleet_exe: str) -> None:
    r = run_fleet(fleet_exe, "--help")
    assert r.returncode == 0
    out = r.stdout
    for option in ("--dir DIR", "--desired FILE", "--hosts DIR"):
        assert option in out
    assert "default: current directory" in out
    assert "exit codes" in out
    assert re.search(r"^\s*0\s+success", out, re.M) and re.search(r"^\s*1\s+error", out, re.M)


def test_fleet_check_help_explains_json_and_exit_codes(fleet_exe: str) -> None:
    r = run_fleet(fleet_exe, "check", "--help")
    assert r.returncode == 0
    assert "--json" in r.stdout
    assert re.search(r"^\s*0\s+no errors \(warnings allowed\)", r.stdout, re.M)
    assert re.search(r"^\s*1\s+at least one error", r.stdout, re.M)


def test_fleet_check_help_explains_dir_desired_and_hosts(fleet_exe: str) -> None:
    out = run_fleet(fleet_exe, "check", "--help").stdout
    assert all(option in out for option in ("--dir", "--desired", "--hosts"))


def test_an_unknown_option_is_bad_usage(fleet_exe: str) -> None:
    r = run_fleet(fleet_exe, "check", "--bogus")
    assert r.returncode == 64
    assert "unrecognized arguments: --bogus" in r.stderr


# ------------------------------------------------------------------ docs/desired-state.md is kept true

DOC = Path(__file__).resolve().parents[2] / "docs" / "desired-state.md"


def test_every_finding_code_fleet_can_emit_is_documented() -> None:
    fleet_dir = Path(cli.__file__).parent
    source = (fleet_dir / "config.py").read_text() + (fleet_dir / "policy.py").read_text()
    emitted = set(re.findall(r'"((?:config|toml|hosts|env|sidekiq|placement|store)\.[a-z-]+)"', source))
    emitted.discard("config.invalid")  # _Ctx.error's default code, which no call site leaves in place
    documented = set(re.findall(r"^\| `([a-z]+\.[a-z-]+)`", DOC.read_text(), re.M))
    assert emitted - documented == set()
    assert documented - emitted == set()


def test_the_documented_check_output_and_json_are_what_fleet_prints(
        fleet_exe: str, capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    doc = DOC.read_text()
    example.edit("S3_BUCKET =", "3_BUCKET =")
    example.edit('SINGLE_USER_MODE = "false"', 'SINGLE_USER_MODE = "no"')
    human = re.search(r"\n\$ fleet check +# exit 1\b[^\n]*\n(error:.*?)```", doc, re.S)
    assert human is not None
    assert run_fleet(fleet_exe, "check", cwd=example.root).stdout == human.group(1)
    documented_json = re.search(r"### `--json`.*?```json\n(.*?)```", doc, re.S)
    assert documented_json is not None
    actual = json.loads(run_fleet(fleet_exe, "check", "--json", cwd=example.root).stdout)
    assert actual == json.loads(documented_json.group(1))
