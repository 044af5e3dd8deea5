"""Facts about Mastodon that fleet's policies rely on (keys of .env.production, secrets).

Kept apart from the rules so that a new Mastodon release is a data change, not a code change: the
documented keys are a list taken from Mastodon's configuration reference
(fleet/data/mastodon_env_keys.txt); which of them are secrets or booleans is fleet's own knowledge,
kept here.
"""

from __future__ import annotations

import pkgutil
import re

S3_KEYS = frozenset(
    {
        "S3_ENABLED", "S3_BUCKET", "S3_REGION", "S3_ENDPOINT", "S3_PROTOCOL", "S3_HOSTNAME",
        "S3_ALIAS_HOST", "S3_SIGNATURE_VERSION", "S3_OVERRIDE_PATH_STYLE", "S3_OPEN_TIMEOUT",
        "S3_READ_TIMEOUT", "S3_RETRY_LIMIT", "S3_FORCE_SINGLE_REQUEST", "S3_STORAGE_CLASS",
        "S3_MULTIPART_THRESHOLD", "S3_PERMISSION", "S3_BATCH_DELETE_LIMIT",
        "S3_BATCH_DELETE_RETRY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "EXTRA_MEDIA_HOSTS", "CDN_HOST", "PAPERCLIP_ROOT_PATH",
    }
)  # fmt: skip

# The keys of .env.production that Mastodon's configuration reference documents, kept as data (with
# the documentation commit they were taken from) in fleet/data/mastodon_env_keys.txt.
ENV_KEYS_DATA = "data/mastodon_env_keys.txt"


def parse_env_key_list(text: str) -> tuple[str, ...]:
    """The keys of a key list: one per line; `#` starts a comment, blank lines are skipped."""
    return tuple(k for line in text.splitlines() if (k := line.split("#", 1)[0].strip()))


def _package_data(name: str) -> str:
    """A data file of the package, read through its loader (a zip install too), as `importlib.resources`
    would read it, without importing `importlib.resources` (and `tempfile`, `zipfile`, `random` with it:
    ~5-10 ms of every command's start-up, for one small file)."""
    data = pkgutil.get_data("fleet", name)
    if data is None:
        raise FileNotFoundError(f"fleet/{name}: the package's loader cannot read its data files")
    return data.decode("utf-8")


DOCUMENTED_ENV_KEYS = frozenset(parse_env_key_list(_package_data(ENV_KEYS_DATA)))

# Not Mastodon settings but read from the same environment by what runs Mastodon: glibc's malloc
# (the stock mastodon-sidekiq.service sets MALLOC_ARENA_MAX=2) and the dynamic loader (jemalloc
# is commonly preloaded into Mastodon's Ruby processes).
RUNTIME_ENV_KEYS = frozenset({"MALLOC_ARENA_MAX", "LD_PRELOAD"})

KNOWN_ENV_KEYS = DOCUMENTED_ENV_KEYS | RUNTIME_ENV_KEYS

# Keys whose values are secrets even when nobody declared them sensitive.
SECRET_KEYS = frozenset(
    {
        "SECRET_KEY_BASE", "OTP_SECRET", "VAPID_PRIVATE_KEY", "DB_PASS", "REPLICA_DB_PASS",
        "REDIS_PASSWORD", "SIDEKIQ_REDIS_PASSWORD", "CACHE_REDIS_PASSWORD", "ES_PASS",
        "SMTP_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SWIFT_PASSWORD",
        "AZURE_STORAGE_ACCESS_KEY", "DEEPL_API_KEY", "LIBRE_TRANSLATE_API_KEY",
        "HCAPTCHA_SECRET_KEY", "ACTIVE_RECORD_ENCRYPTION_DETERMINISTIC_KEY",
        "ACTIVE_RECORD_ENCRYPTION_KEY_DERIVATION_SALT", "ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY",
    }
)  # fmt: skip

# Also used, as a POSIX ERE, by the remote collection script: keep it to plain alternation.
SECRET_NAME_PATTERN = "(SECRET|PASSWORD|PASSWD|_PASS$|PRIVATE_KEY|TOKEN|API_KEY|ACCESS_KEY)"
_SECRET_NAME = re.compile(SECRET_NAME_PATTERN)

BOOLEAN_KEYS = frozenset(
    {"S3_ENABLED", "SINGLE_USER_MODE", "AUTHORIZED_FETCH", "LIMITED_FEDERATION_MODE", "ES_ENABLED",
     "SWIFT_ENABLED", "AZURE_ENABLED", "RAILS_SERVE_STATIC_FILES", "S3_OVERRIDE_PATH_STYLE",
     "S3_FORCE_SINGLE_REQUEST", "DISALLOW_UNAUTHENTICATED_API_ACCESS", "PREPARED_STATEMENTS"}
)  # fmt: skip


def looks_secret(key: str) -> bool:
    """True for keys whose value must never be written in clear in the repository."""
    return key in SECRET_KEYS or bool(_SECRET_NAME.search(key))
