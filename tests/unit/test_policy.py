"""The Mastodon domain rules: Sidekiq queues, placement by role, env keys and values, secrets.

The pure rules are exercised on small records (`SidekiqProcess`, key tuples); `policy.check` on
copies of the shipped example with one defect each, through the `example` fixture (conftest.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import pytest
from observed import example as example_desired

from fleet import policy
from fleet.model import SIDEKIQ_QUEUES, Desired, Finding, Kind
from fleet.policy import SidekiqProcess

FleetDir = Any  # conftest.FleetDir


def only(findings: Iterable[Finding], code: str) -> Finding:
    findings = list(findings)
    matching = [f for f in findings if f.code == code]
    assert len(matching) == 1, f"expected exactly one {code}, got:\n" + "\n".join(map(repr, findings))
    return matching[0]


def proc(host: str = "h1", unit: str = "sk.service", queues: Iterable[str] = SIDEKIQ_QUEUES,
         concurrency: int | None = 10, db_pool: int | None = 10, key: str = "services.sk") -> SidekiqProcess:
    return SidekiqProcess(host=host, unit=unit, queues=tuple(queues), concurrency=concurrency, db_pool=db_pool,
                          key=key, file="desired_state.toml")


def loaded_desired(example: FleetDir) -> Desired:
    loaded = example.load()
    assert loaded.findings == (), loaded.findings
    assert loaded.desired is not None
    return loaded.desired


# ------------------------------------------------------------------ Sidekiq queues


def test_one_process_serving_every_queue_is_fine() -> None:
    assert policy.check_queues([proc()]) == []


def test_a_queue_served_by_no_process_is_named_with_a_fix() -> None:
    f = only(policy.check_queues([proc(queues=[q for q in SIDEKIQ_QUEUES if q != "pull"])]),
             "sidekiq.queue-unserved")
    assert f.message == "queue 'pull' is served by no declared Sidekiq process: its jobs would pile up unprocessed"
    assert f.hint == "add 'pull' to the queues of a Sidekiq service (e.g. queues = { pull = 1 })"
    assert (f.file, f.key) == ("desired_state.toml", "services")


def test_the_postmortem_default_only_process_leaves_every_other_queue_unserved() -> None:
    findings = policy.check_queues([proc(queues=["default"])])
    unserved = [f.message.split("'")[1] for f in findings if f.code == "sidekiq.queue-unserved"]
    assert unserved == ["push", "ingress", "mailers", "pull", "scheduler", "fasp"]
    assert only(findings, "sidekiq.scheduler-count").message.endswith("declared: 0 (none)")


def test_the_scheduler_queue_in_two_processes_names_both() -> None:
    findings = policy.check_queues([proc(host="h1", key="services.a"), proc(host="h2", unit="b.service",
                                                                            queues=["scheduler"], key="services.b")])
    f = only(findings, "sidekiq.scheduler-count")
    assert "exactly one Sidekiq process fleet-wide; declared: 2 (sk.service on h1, b.service on h2)" in f.message
    assert f.key == "services.a"


def test_one_service_with_scheduler_on_two_hosts_counts_twice() -> None:
    findings = policy.check_queues([proc(host="h1"), proc(host="h2")])
    assert "declared: 2" in only(findings, "sidekiq.scheduler-count").message


def test_the_observed_wording_is_used_for_observed_processes() -> None:
    f = only(policy.check_queues([proc(queues=["default"])], what="observed"), "sidekiq.scheduler-count")
    assert "observed: 0" in f.message


def test_a_db_pool_below_the_concurrency_is_an_error_saying_how_much_is_needed() -> None:
    f = only(policy.check_queues([proc(concurrency=25, db_pool=10)]), "sidekiq.db-pool")
    assert f.message == ("sk.service on h1 runs 25 threads (-c 25) but DB_POOL=10: "
                         "threads would wait for database connections")
    assert f.hint == "set DB_POOL to at least 25, or lower the concurrency"
    assert (f.host, f.key) == ("h1", "services.sk")


@pytest.mark.parametrize(("concurrency", "db_pool"), [(25, 25), (5, 30), (None, 1), (25, None)])
def test_a_db_pool_at_or_above_the_concurrency_or_unknown_is_fine(concurrency: int | None,
                                                                  db_pool: int | None) -> None:
    assert policy.check_queues([proc(concurrency=concurrency, db_pool=db_pool)]) == []


def test_an_unknown_queue_name_suggests_the_mastodon_queue() -> None:
    f = only(policy.check_queues([proc(queues=[*SIDEKIQ_QUEUES, "mailer"])]), "sidekiq.unknown-queue")
    assert f.message == "sk.service on h1 serves queue 'mailer', which Mastodon never uses"
    assert (f.hint, f.key) == ("did you mean mailers?", "services.sk.queues")


def test_an_unknown_queue_far_from_any_lists_mastodons_queues() -> None:
    f = only(policy.check_queues([proc(queues=[*SIDEKIQ_QUEUES, "zzzzzzzz"])]), "sidekiq.unknown-queue")
    assert f.hint == "Mastodon's queues: default, push, ingress, mailers, pull, scheduler, fasp"


def test_the_same_unknown_queue_on_two_hosts_is_reported_per_host() -> None:
    findings = policy.check_queues([proc(host="h1", queues=[*SIDEKIQ_QUEUES, "x"]),
                                    proc(host="h2", queues=["x"])])
    assert [f.code for f in findings] == ["sidekiq.unknown-queue"] * 2
    assert sorted(f.host for f in findings if f.code == "sidekiq.unknown-queue") == ["h1", "h2"]


def test_the_shipped_example_declares_one_sidekiq_process_per_service_and_host(example: FleetDir) -> None:
    procs = policy.declared_sidekiq(loaded_desired(example))
    assert sorted((p.unit, p.host, p.concurrency, p.db_pool) for p in procs) == [
        ("mastodon-sidekiq-default.service", "freud", 25, 25),
        ("mastodon-sidekiq-push-pull.service", "freud", 20, 20),
        ("mastodon-sidekiq-push-pull.service", "nietzsche", 20, 20),
        ("mastodon-sidekiq-scheduler.service", "nietzsche", 5, 5),
    ]


def test_removing_pull_from_the_example_leaves_pull_unserved(example: FleetDir) -> None:
    example.edit("queues = { push = 6, pull = 4, fasp = 1 }", "queues = { push = 6, fasp = 1 }")
    f = only(policy.check(loaded_desired(example)), "sidekiq.queue-unserved")
    assert "queue 'pull'" in f.message


def test_adding_scheduler_to_a_second_service_breaks_exactly_once(example: FleetDir) -> None:
    example.edit("queues = { default = 8, ingress = 6, mailers = 2 }",
                 "queues = { default = 8, ingress = 6, mailers = 2, scheduler = 1 }")
    f = only(policy.check(loaded_desired(example)), "sidekiq.scheduler-count")
    assert "declared: 2 (mastodon-sidekiq-default.service on freud, mastodon-sidekiq-scheduler.service on " \
           "nietzsche)" in f.message


def test_an_explicit_db_pool_below_concurrency_in_the_example_is_caught(example: FleetDir) -> None:
    example.edit('DB_POOL = "25"', 'DB_POOL = "10"')
    f = only(policy.check(loaded_desired(example)), "sidekiq.db-pool")
    assert (f.key, f.host) == ("services.sidekiq-default", "freud")
    assert "-c 25" in f.message and "DB_POOL=10" in f.message


def test_a_db_pool_in_the_env_file_overrides_the_unit_environment(example: FleetDir) -> None:
    # systemd: EnvironmentFile= wins over Environment=, so a too-small pool there is the one that counts.
    example.edit('DB_PORT = "5432"', 'DB_PORT = "5432"\nDB_POOL = "5"')
    findings = [f for f in policy.check(loaded_desired(example)) if f.code == "sidekiq.db-pool"]
    assert sorted((f.key, f.host) for f in findings) == [
        ("services.sidekiq-default", "freud"),
        ("services.sidekiq-push-pull", "freud"),
        ("services.sidekiq-push-pull", "nietzsche"),
    ]  # the scheduler runs -c 5, so DB_POOL=5 is enough for it


def test_a_per_host_db_pool_override_is_judged_on_that_host_only(example: FleetDir) -> None:
    example.append('[env_files.mastodon.overrides.nietzsche]\nDB_POOL = "10"\n')
    f = only(policy.check(loaded_desired(example)), "sidekiq.db-pool")
    assert (f.key, f.host) == ("services.sidekiq-push-pull", "nietzsche")


def test_an_unparseable_db_pool_counts_as_too_small(example: FleetDir) -> None:
    example.edit('DB_POOL = "25"', 'DB_POOL = "twenty-five"')
    assert "DB_POOL=0" in only(policy.check(loaded_desired(example)), "sidekiq.db-pool").message


# ------------------------------------------------------------------ placement


def test_sidekiq_on_a_cdn_host_is_forbidden_by_the_example_policy(example: FleetDir) -> None:
    example.edit('hosts = ["freud"]', 'hosts = ["freud", "franz"]')
    f = only(policy.check(loaded_desired(example)), "placement.forbidden")
    assert f.message == "sidekiq (mastodon-sidekiq-default.service) on franz, whose role 'cdn' forbids sidekiq"
    assert (f.key, f.host) == ("services.sidekiq-default.hosts", "franz")
    assert f.hint == "move it to another host, or change policy.placement.cdn.forbid"
    assert f.file == str(example.desired_path)


@pytest.mark.parametrize(("service", "kind"), [("postgres", "postgres"), ("redis", "redis")])
def test_data_stores_on_a_cdn_host_are_forbidden(example: FleetDir, service: str, kind: str) -> None:
    unit = {"postgres": "postgresql.service", "redis": "redis-server.service"}[service]
    example.edit(f'unit = "{unit}"\nhosts = ["nietzsche"]', f'unit = "{unit}"\nhosts = ["nietzsche", "franz"]')
    f = only(policy.check(loaded_desired(example)), "placement.forbidden")
    assert f.message.startswith(f"{kind} ({unit}) on franz")


def test_web_on_a_cdn_host_is_allowed_by_the_example_policy(example: FleetDir) -> None:
    d = loaded_desired(example)
    assert "franz" in d.service("web").hosts
    assert policy.check(d) == []


def test_placement_is_policy_from_the_file_not_hard_coded(example: FleetDir) -> None:
    example.edit('[policy.placement.cdn]\nforbid = ["sidekiq", "postgres", "redis"]\n', "")
    example.edit('hosts = ["freud"]', 'hosts = ["freud", "franz"]')
    assert policy.check(loaded_desired(example)) == []


def test_a_new_placement_rule_in_the_file_is_enforced(example: FleetDir) -> None:
    example.append('[policy.placement.app]\nforbid = ["streaming"]\n')
    f = only(policy.check(loaded_desired(example)), "placement.forbidden")
    assert f.message == "streaming (mastodon-streaming.service) on fritz, whose role 'app' forbids streaming"


def test_check_placement_judges_observed_placements_too(example: FleetDir) -> None:
    d = loaded_desired(example)
    f = only(policy.check_placement(d, [("franz", Kind.SIDEKIQ, "sidekiq.service", "")]), "placement.forbidden")
    assert f.host == "franz"


# ------------------------------------------------------------------ env keys and values


def test_a_misspelled_bucket_key_is_an_error_that_suggests_S3_BUCKET() -> None:  # capitals: the key's own name
    (f,) = policy.check_env_keys([("d.toml", "env_files.m.values.3_BUCKET", "3_BUCKET", "")])
    assert (f.severity, f.code) == ("error", "env.near-miss")
    assert f.message == "'3_BUCKET' is not a Mastodon setting: Mastodon would silently ignore it"
    assert f.hint == "did you mean S3_BUCKET? if it is intentional, list it in policy.env.extra_keys"
    assert (f.file, f.key) == ("d.toml", "env_files.m.values.3_BUCKET")


def test_an_unknown_key_with_no_close_match_is_a_warning_that_only_mentions_extra_keys() -> None:
    (f,) = policy.check_env_keys([("d.toml", "k", "COMPLETELY_UNRELATED", "web1")])
    assert (f.severity, f.code) == ("warning", "env.unknown-key")
    assert f.message == ("'COMPLETELY_UNRELATED' is not a Mastodon setting (on web1): Mastodon's configuration "
                         "reference does not list it, so only something else that reads the environment would use it")
    assert f.hint == "if it is intentional, list it in policy.env.extra_keys"
    assert f.host == "web1"


def test_extra_keys_declared_in_policy_are_accepted() -> None:
    assert policy.check_env_keys([("d", "k", "MY_FEATURE", "")], extra_keys=["MY_FEATURE"]) == []


def test_every_documented_s3_key_is_known() -> None:
    keys = ["S3_ENABLED", "S3_BUCKET", "S3_REGION", "S3_ENDPOINT", "S3_PROTOCOL", "S3_HOSTNAME", "S3_ALIAS_HOST",
            "S3_SIGNATURE_VERSION", "S3_OVERRIDE_PATH_STYLE", "S3_OPEN_TIMEOUT", "S3_READ_TIMEOUT",
            "S3_RETRY_LIMIT", "S3_FORCE_SINGLE_REQUEST", "S3_STORAGE_CLASS", "S3_MULTIPART_THRESHOLD",
            "S3_PERMISSION", "S3_BATCH_DELETE_LIMIT", "S3_BATCH_DELETE_RETRY", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "EXTRA_MEDIA_HOSTS", "CDN_HOST", "PAPERCLIP_ROOT_PATH"]
    assert policy.check_env_keys([("d", k, k, "") for k in keys]) == []


def test_the_misspelled_bucket_key_in_the_example_is_found_with_its_line(example: FleetDir) -> None:
    example.edit("S3_BUCKET =", "3_BUCKET =")
    loaded = example.load()
    from fleet import config

    f = only(config.with_lines(policy.check(loaded.desired), loaded), "env.near-miss")
    assert (f.key, f.line) == ("env_files.mastodon.values.3_BUCKET", 165)
    assert f.hint.startswith("did you mean S3_BUCKET?")


def test_unknown_keys_in_sensitive_and_overrides_are_found_too(example: FleetDir) -> None:
    example.edit('SMTP_PASSWORD = "file"', 'SMTP_PASWORD = "file"')
    example.append('[env_files.mastodon.overrides.fritz]\nS3_BUKET = "x"\n')
    found = {(f.key, f.hint.split("?")[0]) for f in policy.check(loaded_desired(example))}
    assert found == {("env_files.mastodon.sensitive.SMTP_PASWORD", "did you mean SMTP_PASSWORD"),
                     ("env_files.mastodon.overrides.fritz.S3_BUKET", "did you mean S3_BUCKET")}


@pytest.mark.parametrize("value", ["yes", "True", "TRUE", "1", ""])
def test_s3_enabled_that_is_not_exactly_true_or_false_is_an_error(value: str) -> None:
    (f,) = policy.check_env_value("d", "env_files.m.values.S3_ENABLED", "S3_ENABLED", value)
    assert (f.severity, f.code) == ("error", "env.not-boolean")
    assert f.message == f"S3_ENABLED={value!r} is not a boolean Mastodon understands (exactly true or false)"
    assert f.hint == 'write S3_ENABLED = "true" or "false"'


@pytest.mark.parametrize("value", ["true", "false"])
def test_s3_enabled_true_or_false_is_fine(value: str) -> None:
    assert policy.check_env_value("d", "p", "S3_ENABLED", value) == []


def test_other_boolean_keys_that_are_not_boolean_are_warnings() -> None:
    (f,) = policy.check_env_value("d", "p", "SINGLE_USER_MODE", "no", host="web1")
    assert (f.severity, f.code, f.host) == ("warning", "env.not-boolean", "web1")
    assert f.message.endswith(" on web1")


def test_non_boolean_keys_take_any_value() -> None:
    assert policy.check_env_value("d", "p", "S3_BUCKET", "yes") == []


def test_s3_enabled_not_boolean_in_the_example_is_an_error(example: FleetDir) -> None:
    example.edit('S3_ENABLED = "true"', 'S3_ENABLED = "yes"')
    f = only(policy.check(loaded_desired(example)), "env.not-boolean")
    assert (f.severity, f.key) == ("error", "env_files.mastodon.values.S3_ENABLED")


def test_a_toml_boolean_for_s3_enabled_is_written_as_true(example: FleetDir) -> None:
    example.edit('S3_ENABLED = "true"', "S3_ENABLED = true")
    assert policy.check(loaded_desired(example)) == []


def test_a_non_boolean_override_names_the_host(example: FleetDir) -> None:
    example.append('[env_files.mastodon.overrides.franz]\nS3_ENABLED = "False"\n')
    f = only(policy.check(loaded_desired(example)), "env.not-boolean")
    assert (f.key, f.host) == ("env_files.mastodon.overrides.franz.S3_ENABLED", "franz")


# ------------------------------------------------------------------ per-host consistency


SPLIT_ENV = """
[env_files.edge]
path = "/home/mastodon/live/.env.production"
hosts = ["franz"]
values = { LOCAL_DOMAIN = "hachyderm.io", S3_BUCKET = "edge-media" }
"""


def split_env_file(example: FleetDir) -> None:
    """Give franz its own env file at the same path, so web's two hosts see different files."""
    example.edit('services = ["web", "streaming", "sidekiq-default", "sidekiq-push-pull", "sidekiq-scheduler"]',
                 'hosts = ["fritz", "freud", "nietzsche"]')
    example.append(SPLIT_ENV)


def test_a_value_differing_between_hosts_of_one_service_is_an_error(example: FleetDir) -> None:
    split_env_file(example)
    f = only(policy.check(loaded_desired(example)), "env.inconsistent")
    assert f.message == "S3_BUCKET differs between hosts of service web (franz='edge-media', fritz='hachyderm-media')"
    assert f.key == "services.web"
    assert "overrides" in f.hint


def test_a_difference_declared_as_an_override_is_fine(example: FleetDir) -> None:
    example.append('[env_files.mastodon.overrides.franz]\nS3_BUCKET = "edge-media"\n')
    assert policy.check(loaded_desired(example)) == []


def test_an_inconsistent_secret_does_not_show_its_values() -> None:
    from fleet.model import EnvFile, Host, Service, UnitSpec

    spec = UnitSpec(exec_start="/bin/x", environment_files=("/e",))
    d = Desired(name="t", hosts=(Host("a", "a"), Host("b", "b")),
                services=(Service("s", Kind.WEB, "s.service", ("a", "b"), unit_spec=spec),),
                env_files=(EnvFile("e1", "/e", ("a",), values=(("DB_PASS", "one"),)),
                           EnvFile("e2", "/e", ("b",), values=(("DB_PASS", "two"),))))
    f = only(policy.check(d), "env.inconsistent")
    assert f.message == "DB_PASS differs between hosts of service s (a, b)"


# ------------------------------------------------------------------ secrets in clear


def test_a_known_secret_in_values_is_flagged_and_the_hint_says_rotate(example: FleetDir) -> None:
    example.edit('SMTP_PORT = "587"', 'SMTP_PORT = "587"\nDB_PASS = "hunter2"')
    f = only(policy.check(loaded_desired(example)), "env.secret-in-clear")
    assert f.message == "DB_PASS is a secret, and its value is written in clear in the repository"
    assert f.key == "env_files.mastodon.values.DB_PASS"
    assert "[env_files.mastodon.sensitive]" in f.hint and "rotate" in f.hint
    assert "hunter2" not in f.message + f.hint


def test_a_key_that_looks_secret_by_name_is_flagged(example: FleetDir) -> None:
    example.edit('[policy.placement.cdn]', '[policy.env]\nextra_keys = ["MY_API_TOKEN"]\n\n[policy.placement.cdn]')
    example.edit('SMTP_PORT = "587"', 'SMTP_PORT = "587"\nMY_API_TOKEN = "abc"')
    f = only(policy.check(loaded_desired(example)), "env.secret-in-clear")
    assert f.key == "env_files.mastodon.values.MY_API_TOKEN"


def test_a_secret_in_a_per_host_override_is_flagged(example: FleetDir) -> None:
    example.append('[env_files.mastodon.overrides.fritz]\nSMTP_PASSWORD = "hunter2"\n')
    f = only(policy.check(loaded_desired(example)), "env.secret-in-clear")
    assert f.key == "env_files.mastodon.overrides.fritz.SMTP_PASSWORD"


def test_a_public_vapid_key_is_not_a_secret(example: FleetDir) -> None:
    assert "VAPID_PUBLIC_KEY" in dict(loaded_desired(example).env_files[0].values)
    assert policy.check(loaded_desired(example)) == []


def test_a_secret_in_a_unit_environment_is_flagged(example: FleetDir) -> None:
    example.edit('environment = { NODE_ENV = "production", PORT = "4000" }',
                 'environment = { NODE_ENV = "production", PORT = "4000", DB_PASS = "hunter2" }')
    f = only(policy.check(loaded_desired(example)), "env.secret-in-clear")
    assert f.key == "services.streaming.unit_file.environment.DB_PASS"


# ------------------------------------------------------------------ env file wiring


def test_an_env_file_a_service_does_not_load_is_a_warning(example: FleetDir) -> None:
    example.edit('environment = { NODE_ENV = "production", PORT = "4000" }\n'
                 'environment_files = ["/home/mastodon/live/.env.production"]\n',
                 'environment = { NODE_ENV = "production", PORT = "4000" }\n')
    f = only(policy.check(loaded_desired(example)), "env.not-loaded")
    assert f.severity == "warning"
    assert f.key == "services.streaming.unit_file.environment_files"
    assert "mastodon-streaming.service does not load it" in f.message


# ------------------------------------------------------------------ the whole example


def test_the_shipped_example_passes_every_policy(example: FleetDir) -> None:
    assert policy.check(loaded_desired(example)) == []


def test_a_fleet_without_sidekiq_still_says_which_file_to_fix(example: FleetDir) -> None:
    d = loaded_desired(example)
    d = dataclasses.replace(d, services=tuple(s for s in d.services if s.kind is not Kind.SIDEKIQ))
    findings = [f for f in policy.check(d) if f.code.startswith("sidekiq.")]
    assert findings and all(f.file == str(example.desired_path) for f in findings)


# ------------------------------------------------------------------ linear in the fleet's size


def _grown(n: int) -> Desired:
    """The example with `n` more web hosts like fritz, each reading the Mastodon env file (and so
    its DB_HOST and REDIS_HOST, which the store policies resolve against the inventory)."""
    d = example_desired()
    fritz = d.host("fritz")
    assert fritz is not None
    clones = tuple(dataclasses.replace(fritz, name=f"web{i:03d}", address=f"10.0.9.{i}") for i in range(n))
    names = tuple(c.name for c in clones)
    return dataclasses.replace(
        d, hosts=d.hosts + clones,
        services=tuple(dataclasses.replace(s, hosts=s.hosts + names) if s.name == "web" else s for s in d.services),
        env_files=tuple(dataclasses.replace(e, hosts=e.hosts + names) for e in d.env_files))


def test_the_policies_parse_each_address_a_bounded_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolving every host's settings against the inventory goes through an index: parsing the
    whole inventory's addresses per setting made `fleet check` quadratic (30 s at 1,000 hosts)."""
    calls = 0
    real = policy._address

    def counted(address: str) -> str:
        nonlocal calls
        calls += 1
        return real(address)

    monkeypatch.setattr(policy, "_address", counted)
    counts = []
    for n in (40, 80):
        calls = 0
        grown = _grown(n)
        assert not [f for f in policy.check(grown) if f.is_error]
        counts.append(calls)
    assert counts[1] - counts[0] <= 10 * 40, counts  # a few per added host, not one per pair of hosts
