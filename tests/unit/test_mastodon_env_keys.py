"""Mastodon's documented env keys (fleet/data/mastodon_env_keys.txt) and the near-miss rule over them.

The list is data taken from Mastodon's configuration reference: these tests pin its size, its source
and the keys operators asked for.  The rule (`policy.near_miss`, `policy.check_env_keys`): a key one
slip from a known key (two from a long one) is an error with a did-you-mean, any other unknown key a
warning, a known key nothing.  The properties check the rule in both directions against an
independent enumeration of every single-edit neighbour of every known key.
"""

from __future__ import annotations

import re
import string
from importlib import resources

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fleet import mastodon, policy
from fleet.envfile import key_problem
from fleet.mastodon import DOCUMENTED_ENV_KEYS, ENV_KEYS_DATA, KNOWN_ENV_KEYS, S3_KEYS, looks_secret, parse_env_key_list
from fleet.textutil import damerau_levenshtein, edit_distance

DATA = resources.files("fleet").joinpath(ENV_KEYS_DATA).read_text(encoding="utf-8")
KEY_CHARS = string.ascii_letters + string.digits + "_"
KNOWN = sorted(KNOWN_ENV_KEYS)
LONG = [k for k in KNOWN if len(k) >= policy.LONG_KEY]


# ------------------------------------------------------------------ the list


def test_the_list_holds_as_many_keys_as_its_header_says_and_none_twice() -> None:
    keys = parse_env_key_list(DATA)
    (count,) = re.findall(r"^# count: (\d+)$", DATA, re.MULTILINE)
    assert len(keys) == int(count) == len(set(keys)) == len(DOCUMENTED_ENV_KEYS) == 273


def test_the_list_is_read_through_the_package_loader_as_importlib_resources_reads_it() -> None:
    """fleet reads it with pkgutil (not importlib.resources, whose import costs every command
    ~5-10 ms: issue 19's ninth round): the same text, the same keys."""
    assert mastodon._package_data(ENV_KEYS_DATA) == DATA
    assert DOCUMENTED_ENV_KEYS == frozenset(parse_env_key_list(DATA))
    with pytest.raises(OSError):
        mastodon._package_data("data/no-such-file.txt")


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


def test_every_listed_key_is_a_valid_env_name_long_enough_to_have_near_misses() -> None:
    assert [k for k in KNOWN if key_problem(k) or len(k) < policy.SHORT_KEY] == []


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


# ------------------------------------------------------------------ the rule, by example


def one(key: str, extra: tuple[str, ...] = ()) -> tuple[str, str, str]:
    (f,) = policy.check_env_keys([("d.toml", f"env_files.m.values.{key}", key, "")], extra)
    return f.severity, f.code, f.hint


@pytest.mark.parametrize("typo", ["3_BUCKET", "S3_BUCKE", "S3BUCKET", "S3_BUKCET", "S3_BUCKETT", "s3_bucket"])
def test_a_slip_of_S3_BUCKET_is_an_error_that_names_it(typo: str) -> None:  # capitals: the key's own name
    assert one(typo) == ("error", "env.near-miss",
                         "did you mean S3_BUCKET? if it is intentional, list it in policy.env.extra_keys")


@pytest.mark.parametrize("key", [
    "MY_OWN_SETTING",
    "FASP_ENABLED",  # two edits from CAS_ENABLED, which is too short for two
    "SMTP_HOST",  # two from SMTP_PORT
    "OTEL_SERVICE_NAME",  # a prefix of OTEL_SERVICE_NAME_PREFIX, seven edits away
    "REDIS_DB", "AZURE_ENABLED", "DB_SSLROOTCERT", "RAILS_LOG_TO_STDOUT", "OIDC_ENABLED",
])
def test_a_key_far_from_every_known_key_is_only_a_warning(key: str) -> None:
    assert one(key) == ("warning", "env.unknown-key", "if it is intentional, list it in policy.env.extra_keys")


def test_two_slips_in_a_long_key_are_still_a_near_miss_but_not_in_a_shorter_one() -> None:
    assert one("MASTODON_PROMETHEUS_EXPORTR_ENABLD")[:2] == ("error", "env.near-miss")
    assert "MASTODON_PROMETHEUS_EXPORTER_ENABLED?" in one("MASTODON_PROMETHEUS_EXPORTR_ENABLD")[2]
    assert one("SIDEKQ_REDIS_UL")[:2] == ("warning", "env.unknown-key")  # SIDEKIQ_REDIS_URL: 17 chars


def test_the_closest_known_key_is_suggested() -> None:
    # one edit from SMTP_TLS, two from SMTP_SSL
    assert policy.near_miss("SMTP_TLX", KNOWN_ENV_KEYS) == "SMTP_TLS"


@pytest.mark.parametrize(("a", "b", "distance"), [
    ("S3_BUCKET", "S3_BUCKET", 0), ("s3_bucket", "S3_BUCKET", 0), ("3_BUCKET", "S3_BUCKET", 1),
    ("S3_BUKCET", "S3_BUCKET", 1), ("", "ABC", 3), ("ABC", "", 3), ("KITTEN", "SITTING", 3),
    ("CA", "ABC", 2), ("ACTIVE", "TAIVE", 2),  # an edit on an edit: optimal string alignment says 3
])
def test_two_slips_count_as_two_even_when_the_second_touches_the_first(a: str, b: str, distance: int) -> None:
    assert damerau_levenshtein(a, b) == damerau_levenshtein(b, a) == distance
    assert edit_distance(a, b) == (distance + 1 if (a, b) in {("CA", "ABC"), ("ACTIVE", "TAIVE")} else distance)


def test_extra_keys_silence_both_and_are_near_miss_targets_themselves() -> None:
    assert policy.check_env_keys([("d", "k", "3_BUCKET", ""), ("d", "k", "MY_OWN_SETTING", "")],
                                 extra_keys=["3_BUCKET", "MY_OWN_SETTING"]) == []
    assert one("MY_OWN_SETING", ("MY_OWN_SETTING",))[:2] == ("error", "env.near-miss")
    assert one("TZZ", ("TZ",))[:2] == ("warning", "env.unknown-key")  # too short to have near misses


def test_runtime_keys_of_the_stock_units_are_known() -> None:
    assert policy.check_env_keys([("d", "k", k, "") for k in ("MALLOC_ARENA_MAX", "LD_PRELOAD")]) == []


def test_audit_judges_the_keys_of_observed_env_files_by_the_same_rule() -> None:
    from observed import set_env_value
    from watch_scenarios import baseline, desired, host

    from fleet.audit import build_audit

    observed = baseline()
    franz = host(observed, "franz")
    for key in ("3_BUCKET", "MY_OWN_SETTING", "REDIS_SENTINELS"):
        franz = set_env_value(franz, key, "x")
    observed["franz"] = franz
    found = {(f.severity, f.code, f.host, f.hint.split("?")[0]) for f in build_audit(desired(), observed).findings
             if f.code.startswith("env.")}
    assert found == {("error", "env.near-miss", "franz", "did you mean S3_BUCKET"),
                     ("warning", "env.unknown-key", "franz", "if it is intentional, list it in policy.env.extra_keys")}


# ------------------------------------------------------------------ the rule, as properties


def single_edits(key: str) -> set[str]:
    """Every string one deletion, insertion, substitution or adjacent transposition away from `key`,
    over the characters env names use, letter case folded (the rule ignores case)."""
    k = key.lower()
    chars = string.ascii_lowercase + string.digits + "_"
    out = {k[:i] + k[i + 1:] for i in range(len(k))}
    out |= {k[:i] + k[i + 1] + k[i] + k[i + 2:] for i in range(len(k) - 1)}
    out |= {k[:i] + c + k[i + 1:] for i in range(len(k)) for c in chars}
    out |= {k[:i] + c + k[i:] for i in range(len(k) + 1) for c in chars}
    return out | {k}


# Built once at import (≈0.4 s): inside the first example it would count against hypothesis's deadline.
ONE_SLIP_FROM_A_KNOWN_KEY = frozenset(s for k in KNOWN for s in single_edits(k))


def edit(key: str, op: int, at: int, char: str) -> str:
    i = at % (len(key) + 1)
    if op == 0:
        return key[:i] + key[i + 1:]
    if op == 1:
        return key[:i] + char + key[i:]
    if op == 2:
        return key[:i] + char + key[i + 1:]
    return key[:i] + key[i + 1:i + 2] + key[i:i + 1] + key[i + 2:]


EDITS = st.tuples(st.integers(0, 3), st.integers(0, 60), st.sampled_from(KEY_CHARS))


def test_no_known_key_is_ever_flagged() -> None:
    assert policy.check_env_keys([("d", k, k, "h") for k in KNOWN]) == []


@given(key=st.sampled_from(KNOWN), slip=EDITS)
def test_every_single_slip_of_a_known_key_that_is_not_itself_known_is_an_error(
        key: str, slip: tuple[int, int, str]) -> None:
    typo = edit(key, *slip)
    assume(typo not in KNOWN_ENV_KEYS and typo)
    ((severity, code, hint),) = [(f.severity, f.code, f.hint) for f in policy.check_env_keys([("d", "k", typo, "")])]
    assert (severity, code) == ("error", "env.near-miss")
    meant = re.fullmatch(r"did you mean (\S+)\? if it is intentional, list it in policy.env.extra_keys", hint)
    assert meant and meant.group(1) in KNOWN_ENV_KEYS and damerau_levenshtein(typo, meant.group(1)) <= 1


@given(key=st.sampled_from(LONG), first=EDITS, second=EDITS)
def test_every_two_slips_of_a_long_known_key_are_an_error(
        key: str, first: tuple[int, int, str], second: tuple[int, int, str]) -> None:
    typo = edit(edit(key, *first), *second)
    assume(typo not in KNOWN_ENV_KEYS)
    assert [f.code for f in policy.check_env_keys([("d", "k", typo, "")])] == ["env.near-miss"]


@given(key=st.one_of(
    st.text(KEY_CHARS, min_size=1, max_size=30),
    st.builds(lambda k, a, b: edit(edit(k, *a), *b), st.sampled_from(KNOWN), EDITS, EDITS)))
def test_a_key_is_a_near_miss_exactly_when_one_slip_from_a_known_key_or_two_from_a_long_one(key: str) -> None:
    assume(key and key not in KNOWN_ENV_KEYS)
    expected = key.lower() in ONE_SLIP_FROM_A_KNOWN_KEY or any(damerau_levenshtein(key, k) <= 2 for k in LONG)
    (f,) = policy.check_env_keys([("d", "k", key, "")])
    assert (f.severity, f.code) == (("error", "env.near-miss") if expected else ("warning", "env.unknown-key"))
