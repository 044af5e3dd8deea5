"""Mastodon's settings checked against where the data stores are declared (policy.check_store_settings):
DB_HOST, REDIS_HOST, REPLICA_DB_HOST, ES_HOST and the *_URL forms, read on every host that gets the
env file (overrides included), must name a host where a service of that kind is declared, at its
port; PgBouncer in front (DB_PORT=6432) is a declared kind and needs PREPARED_STATEMENTS=false."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.model import Finding

FleetDir = Any  # conftest.FleetDir
DB_HOST = 'DB_HOST = "nietzsche.hachyderm.internal"'
REDIS_HOST = 'REDIS_HOST = "nietzsche.hachyderm.internal"'
POSTGRES_HOSTS = 'unit = "postgresql.service"\nhosts = ["nietzsche"]'
BOUNCER = """
[services.pgbouncer]
kind = "pgbouncer"
unit = "pgbouncer.service"
hosts = ["nietzsche"]
observe_only = true
"""


def store_findings(example: FleetDir) -> list[Finding]:
    return [f for f in example.check() if f.code.startswith("store.")]


def test_the_shipped_example_points_every_setting_at_its_data_stores(example: FleetDir) -> None:
    assert store_findings(example) == []


def test_db_host_naming_a_host_without_postgres_fails_with_the_host_it_could_mean(example: FleetDir) -> None:
    example.edit(POSTGRES_HOSTS, 'unit = "postgresql.service"\nhosts = ["freud"]')
    example.edit(DB_HOST, 'DB_HOST = "nietzsche"')
    (f,) = store_findings(example)
    assert (f.severity, f.code, f.key) == ("error", "store.setting-nowhere", "env_files.mastodon.values.DB_HOST")
    assert f.message == ("DB_HOST = 'nietzsche' points at nietzsche, where no postgres (or pgbouncer) service is "
                         "declared; postgres is declared on freud (freud.hachyderm.internal) "
                         "(read on fritz, franz, freud, nietzsche)")
    assert f.hint == "point DB_HOST at freud, or declare postgres on nietzsche"
    assert f.line is not None and "DB_HOST" in example.text("desired_state.toml").split("\n")[f.line - 1]


def test_a_setting_matches_a_host_by_inventory_name_or_any_spelling_of_its_address(example: FleetDir) -> None:
    example.edit(DB_HOST, 'DB_HOST = "NIETZSCHE.hachyderm.internal."')
    example.edit(REDIS_HOST, 'REDIS_HOST = "nietzsche"')
    assert store_findings(example) == []
    example.edit('address = "nietzsche.hachyderm.internal"', 'address = "10.0.0.7"', file="hosts/nietzsche.toml")
    example.edit('DB_HOST = "NIETZSCHE.hachyderm.internal."', 'DB_HOST = "::ffff:10.0.0.7"')
    (f,) = store_findings(example)  # an IPv4-mapped IPv6 address is another address
    assert "which is no host of the inventory; postgres is declared on nietzsche (10.0.0.7)" in f.message
    example.edit('DB_HOST = "::ffff:10.0.0.7"', 'DB_HOST = "10.0.0.7"')
    assert store_findings(example) == []


def test_a_dns_name_whose_first_label_is_an_inventory_name_is_that_host(example: FleetDir) -> None:
    """Inventories often hold IP addresses or ssh aliases while .env.production names hosts by DNS."""
    example.edit('address = "nietzsche.hachyderm.internal"', 'address = "10.0.0.7"', file="hosts/nietzsche.toml")
    assert store_findings(example) == []  # nietzsche.hachyderm.internal is nietzsche
    example.edit(REDIS_HOST, 'REDIS_HOST = "freud.hachyderm.internal"')
    (f,) = store_findings(example)
    assert f.message.startswith("REDIS_HOST = 'freud.hachyderm.internal' points at freud, where no redis")
    example.edit('REDIS_HOST = "freud.hachyderm.internal"', 'REDIS_HOST = "10.0.0.8"')
    (f,) = store_findings(example)  # an address is never read as a name
    assert "points at 10.0.0.8, which is no host of the inventory" in f.message


def test_a_setting_pointing_outside_the_inventory_is_an_error_only_when_fleet_declares_that_store(
        example: FleetDir) -> None:
    example.edit(REDIS_HOST, 'REDIS_HOST = "redis.elsewhere.example"')
    (f,) = store_findings(example)
    assert f.code == "store.setting-nowhere" and f.key == "env_files.mastodon.values.REDIS_HOST"
    assert "points at redis.elsewhere.example, which is no host of the inventory; redis is declared on nietzsche" \
        in f.message
    # With no redis declared at all, it is an external Redis fleet knows nothing about.
    example.edit('[services.redis]\nkind = "redis"', '[services.redis]\nkind = "generic"')
    assert store_findings(example) == []


def test_localhost_means_each_host_that_reads_it_and_overrides_count(example: FleetDir) -> None:
    example.edit(REDIS_HOST, 'REDIS_HOST = "localhost"')
    (f,) = store_findings(example)
    assert f.message.startswith("REDIS_HOST = 'localhost' points at the host reading it, where no redis service is "
                                "declared; redis is declared on nietzsche (nietzsche.hachyderm.internal)")
    assert f.message.endswith("(read on fritz, franz, freud)")  # nietzsche runs redis itself
    example.append('[env_files.mastodon.overrides.fritz]\nREDIS_HOST = "nietzsche"\n'
                   '[env_files.mastodon.overrides.franz]\nREDIS_HOST = "127.0.0.1"\n')
    messages = sorted((f.key, f.message.rsplit("(read on ", 1)[1]) for f in store_findings(example))
    assert messages == [("env_files.mastodon.overrides.franz.REDIS_HOST", "franz)"),
                        ("env_files.mastodon.values.REDIS_HOST", "freud)")]


def test_a_unix_socket_directory_is_the_host_itself(example: FleetDir) -> None:
    example.edit(DB_HOST, 'DB_HOST = "/var/run/postgresql"')
    (f,) = store_findings(example)
    assert f.message.startswith("DB_HOST = '/var/run/postgresql' points at the host reading it")
    assert f.message.endswith("(read on fritz, franz, freud)")


def test_the_port_must_be_the_one_the_store_listens_on(example: FleetDir) -> None:
    example.edit('REDIS_PORT = "6379"', 'REDIS_PORT = "6380"')
    (f,) = store_findings(example)
    assert (f.code, f.key) == ("store.setting-port", "env_files.mastodon.values.REDIS_HOST")
    assert "with port 6380 points at nietzsche, where redis (redis) listens on 6379" in f.message
    example.edit('health = { tcp = 6379, timeout = 10 }', 'health = { tcp = 6379, timeout = 10 }\nport = 6380')
    assert store_findings(example) == []


def test_db_port_6432_without_a_declared_pgbouncer_says_to_declare_it(example: FleetDir) -> None:
    example.edit('DB_PORT = "5432"', 'DB_PORT = "6432"')
    (f,) = store_findings(example)
    assert f.code == "store.setting-port"
    assert f.message.startswith("DB_HOST = 'nietzsche.hachyderm.internal' with port 6432 points at nietzsche, "
                                "where postgres (postgres) listens on 5432 and no pgbouncer service is declared")
    assert 'kind "pgbouncer"' in f.hint


def test_pgbouncer_in_front_needs_prepared_statements_false(example: FleetDir) -> None:
    example.edit('DB_PORT = "5432"', 'DB_PORT = "6432"')
    example.append(BOUNCER)
    (f,) = store_findings(example)
    assert (f.code, f.key) == ("store.pgbouncer-prepared-statements", "env_files.mastodon.values.DB_HOST")
    assert "points at PgBouncer (pgbouncer) on nietzsche, and PREPARED_STATEMENTS is not set" in f.message
    assert "docs.joinmastodon.org/admin/scaling" in f.hint
    example.edit('DB_PORT = "6432"', 'DB_PORT = "6432"\nPREPARED_STATEMENTS = "true"')
    (f,) = store_findings(example)
    assert "PREPARED_STATEMENTS is 'true'" in f.message
    example.edit('PREPARED_STATEMENTS = "true"', 'PREPARED_STATEMENTS = "false"')
    assert store_findings(example) == []


def test_the_replica_reads_its_own_keys_then_the_primarys(example: FleetDir) -> None:
    example.append(BOUNCER)
    example.edit(DB_HOST, f'{DB_HOST}\nREPLICA_DB_HOST = "nietzsche"\nREPLICA_DB_PORT = "6432"')
    (f,) = store_findings(example)
    assert "REPLICA_PREPARED_STATEMENTS or PREPARED_STATEMENTS is not set" in f.message
    example.edit('REPLICA_DB_PORT = "6432"', 'REPLICA_DB_PORT = "6432"\nPREPARED_STATEMENTS = "false"')
    assert store_findings(example) == []
    example.edit('REPLICA_DB_PORT = "6432"\n', "")  # falls back to DB_PORT: Postgres itself
    assert store_findings(example) == []


def test_db_host_pointing_at_a_declared_standby_is_an_error(example: FleetDir) -> None:
    example.edit('health = { tcp = 5432, timeout = 15 }', 'health = { tcp = 5432, timeout = 15 }\nrole = "standby"')
    (f,) = store_findings(example)
    assert f.code == "store.setting-standby" and "declared a standby" in f.message


def test_urls_are_resolved_and_never_shown_with_their_password(example: FleetDir) -> None:
    example.edit(REDIS_HOST, 'REDIS_URL = "redis://:hunter2@freud.hachyderm.internal:6379/0"')
    (f,) = store_findings(example)
    assert f.key == "env_files.mastodon.values.REDIS_URL"
    assert "REDIS_URL = 'redis://freud.hachyderm.internal:6379/…' points at freud" in f.message
    assert "hunter2" not in f.message + f.hint
    example.edit('"redis://:hunter2@freud.hachyderm.internal:6379/0"', '"unix:///run/redis/redis.sock"')
    assert [x.message.rsplit("(read on ", 1)[1] for x in store_findings(example)] == ["fritz, franz, freud)"]
    example.edit('"unix:///run/redis/redis.sock"', '"mysql://nietzsche/0"')
    (f,) = store_findings(example)
    assert f.code == "store.setting-invalid"


def test_database_url_with_a_socket_host_parameter_and_sensitive_urls_are_left_alone(example: FleetDir) -> None:
    example.edit(DB_HOST, 'DATABASE_URL = "postgresql:///mastodon?host=/var/run/postgresql"')
    assert [x.key for x in store_findings(example)] == ["env_files.mastodon.values.DATABASE_URL"]
    example.edit('DATABASE_URL = "postgresql:///mastodon?host=/var/run/postgresql"\n', "")
    example.edit('DB_PASS = "file"', 'DB_PASS = "file"\nDATABASE_URL = "file"')
    assert store_findings(example) == []  # its value is a secret fleet never sees


def test_es_host_is_checked_only_when_elasticsearch_is_enabled(example: FleetDir) -> None:
    example.edit(DB_HOST, f'{DB_HOST}\nES_HOST = "localhost"\nES_ENABLED = "false"')
    assert store_findings(example) == []
    example.edit('ES_ENABLED = "false"', 'ES_ENABLED = "true"')
    (f,) = store_findings(example)
    assert "no elasticsearch service is declared anywhere" in f.message
    example.append('[services.search]\nkind = "elasticsearch"\nunit = "opensearch.service"\nhosts = ["fritz", '
                   '"franz", "freud", "nietzsche"]\nobserve_only = true\n')
    assert store_findings(example) == []


@pytest.mark.parametrize(("key", "value", "error"), [
    ("role", '"leader"', "role 'leader' is neither \"primary\" nor \"standby\""),
    ("role", '"primry"', "did you mean primary?"),
    ("port", "0", "port 0 is outside 1–65535"),
    ("probe", '"yes"', "must be a boolean"),
])
def test_data_store_keys_are_validated(example: FleetDir, key: str, value: str, error: str) -> None:
    example.edit('health = { tcp = 5432, timeout = 15 }', f'health = {{ tcp = 5432, timeout = 15 }}\n{key} = {value}')
    found = [f for f in example.check() if f.key == f"services.postgres.{key}"]
    assert found and error in found[0].message + " " + found[0].hint, found


@pytest.mark.parametrize(("key", "value", "kind"), [("role", '"primary"', "web"), ("probe", "true", "redis"),
                                                     ("port", "3000", "web")])
def test_data_store_keys_only_apply_to_their_kinds(example: FleetDir, key: str, value: str, kind: str) -> None:
    service = "web" if kind == "web" else "redis"
    anchor = 'hosts = ["fritz", "franz"]' if kind == "web" else 'unit = "redis-server.service"'
    example.edit(anchor, f"{anchor}\n{key} = {value}")
    (f,) = [f for f in example.check() if f.key == f"services.{service}.{key}"]
    assert f.code == "config.bad-key" and "only applies to" in f.message
