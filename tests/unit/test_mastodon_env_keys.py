"""Mastodon's documented env keys (fleet/data/mastodon_env_keys.txt).

The list is data taken from Mastodon's configuration reference: these tests pin its size, its source
and the keys operators asked for.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest

from fleet.envfile import key_problem
from fleet.mastodon import DOCUMENTED_ENV_KEYS, ENV_KEYS_DATA, KNOWN_ENV_KEYS, S3_KEYS, looks_secret, parse_env_key_list

DATA = resources.files("fleet").joinpath(ENV_KEYS_DATA).read_text(encoding="utf-8")
KNOWN = sorted(KNOWN_ENV_KEYS)


# ------------------------------------------------------------------ the list


def test_the_list_holds_as_many_keys_as_its_header_says_and_none_twice() -> None:
    keys = parse_env_key_list(DATA)
    (count,) = re.findall(r"^# count: (\d+)$", DATA, re.MULTILINE)
    assert len(keys) == int(count) == len(set(keys)) == len(DOCUMENTED_ENV_KEYS) == 273


def test_the_list_names_the_reference_and_the_documentation_commit_it_was_taken_from() -> None:
    header = DATA[:DATA.index("\n\n")]
    assert "https://docs.joinmastodon.org/admin/config/" in header
    assert "https://github.com/mastodon/documentation/blob/2903485da54a20f1da5e7dfb8b34712e6196e8f7/" in header
    assert "2026-07-02" in header and "Mastodon up to 4.5" in header


@pytest.mark.parametrize("key", [
    "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "CACHE_REDIS_SENTINELS", "SIDEKIQ_REDIS_SENTINEL_PASSWORD",
    "MASTODON_USE_LIBVIPS", "S3_ENABLE_CHECKSUM_MODE", "LDAP_HOST", "LDAP_UID_CONVERSION_ENABLED", "SAML_ENABLED",
    "SAML_ATTRIBUTES_STATEMENTS_VERIFIED_EMAIL", "CAS_SECURITY_ASSUME_EMAIL_IS_VERIFIED", "PAM_CONTROLLED_SERVICE",
    "MASTODON_PROMETHEUS_EXPORTER_ENABLED", "MASTODON_PROMETHEUS_EXPORTER_SIDEKIQ_DETAILED_METRICS", "ES_CA_FILE",
    "SMTP_ENABLE_STARTTLS", "BULK_SMTP_SERVER", "BULK_SMTP_PASSWORD", "ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY",
    "OTEL_SERVICE_NAME_SEPARATOR", "http_proxy", "ALLOW_ACCESS_TO_HIDDEN_SERVICE", "REPLICA_DB_TASKS",
    "UPDATE_CHECK_URL", "SECRET_KEY_BASE", "S3_BUCKET",
])
def test_keys_of_the_reference_are_documented(key: str) -> None:
    assert key in DOCUMENTED_ENV_KEYS


@pytest.mark.parametrize("key", ["WHITELIST_MODE", "OTEL_SERVICE_NAME", "HTTP_PROXY", "OIDC_ENABLED", "REDIS_DB"])
def test_names_the_reference_does_not_document_as_settings_are_not_in_the_list(key: str) -> None:
    assert key not in DOCUMENTED_ENV_KEYS


def test_every_listed_key_is_a_valid_env_name() -> None:
    assert [k for k in KNOWN if key_problem(k)] == []


def test_the_s3_keys_fleet_relies_on_are_documented() -> None:
    assert S3_KEYS - DOCUMENTED_ENV_KEYS == set()


def test_every_documented_secret_is_treated_as_one() -> None:
    # fleet's own knowledge (SECRET_KEYS, the name pattern) must cover the reference's secrets
    secrets = {"SECRET_KEY_BASE", "OTP_SECRET", "VAPID_PRIVATE_KEY", "DB_PASS", "REDIS_SENTINEL_PASSWORD",
               "LDAP_PASSWORD", "SAML_PRIVATE_KEY", "CACHE_BUSTER_SECRET", "BULK_SMTP_PASSWORD", "GITHUB_API_TOKEN",
               "HCAPTCHA_SECRET_KEY", "ACTIVE_RECORD_ENCRYPTION_KEY_DERIVATION_SALT"}
    assert secrets <= DOCUMENTED_ENV_KEYS
    assert [k for k in sorted(secrets) if not looks_secret(k)] == []


def test_comments_and_blank_lines_are_not_keys() -> None:
    assert parse_env_key_list("# head\n\nA_KEY\nB_KEY   # removed in 4.5.0\n  # indented comment\n") == (
        "A_KEY", "B_KEY")
