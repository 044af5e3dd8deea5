"""Observed fleets, cycles and secret scans shared by the `fleet watch` building-block tests.

`incident()` is the shipped example gone wrong as in December 2022 (and worse): a Sidekiq serving
only `-q default` on the CDN node franz, S3 broken by hand there, a typo'd key, a stopped
scheduler, a hostile unit name.  `secret_needles()` lists every string that must never appear in
a message, metric, page or log: the example's secret values, their fingerprints (full and cut to
8 hex digits, bare and as fleet's mask), and the webhook URLs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from observed import (
    ENV_PATH,
    EXAMPLE_SECRETS,
    change_unit,
    converged,
    env_of,
    example,
    hand_made_unit,
    set_env_secret,
    set_env_value,
    stopped,
    undeclared_sidekiq,
    unreachable,
    with_unit,
)

from fleet.audit import AuditReport, attribute, build_audit, changes_between
from fleet.envfile import fingerprint
from fleet.model import Desired, HostResult, HostState
from fleet.textutil import mask, sha256_hex
from fleet.watch.events import Cycle

T0 = 1_800_000_000.0
HOSTILE_UNIT = 'mastodon-<script>alert("x")</script>\x1b[31m\'&.service'
# Values that look secret although their keys do not: a password inside a URL, a secret
# KEY=value inside a command line.
URL_PASSWORD = "pa55w0rd-in-url"
INLINE_SECRET = "inline-token-value-42"

WEBHOOK_URLS = (
    "https://discord.com/api/webhooks/123456789012345678/DiscordTokenSecretPart-abcdefghijklmnop",
    "https://hooks.slack.com/services/T000/B000/SlackSecretTokenXYZ",
    "https://alerts.example.org/hook?token=GenericHookSecret123",
)


def desired() -> Desired:
    return example()


def baseline() -> dict[str, HostResult]:
    return dict(converged(example(), EXAMPLE_SECRETS))


def host(results: Mapping[str, HostResult], name: str) -> HostState:
    r = results[name]
    assert isinstance(r, HostState), f"{name} is not observed"
    return r


def s3_hand_edit(results: Mapping[str, HostResult]) -> dict[str, HostResult]:
    """Somebody set S3_ENABLED=false in franz's .env.production by hand."""
    out = dict(results)
    out["franz"] = set_env_value(host(results, "franz"), "S3_ENABLED", "false")
    return out


def incident() -> dict[str, HostResult]:
    d = example()
    out = baseline()
    franz = host(out, "franz")
    franz = with_unit(franz, undeclared_sidekiq())  # a Sidekiq on the CDN node, -q default only
    franz = set_env_value(franz, "S3_ENABLED", "FALSE")
    franz = set_env_value(franz, "3_BUCKET", "hachyderm-media")
    franz = set_env_value(franz, "DATABASE_URL", f"postgres://mastodon:{URL_PASSWORD}@db/mastodon")
    franz = with_unit(franz, hand_made_unit(HOSTILE_UNIT, f"/usr/bin/evil --opt DB_PASS={INLINE_SECRET}"))
    for (_, key), value in EXAMPLE_SECRETS.items():  # every secret changed by hand on franz
        franz = set_env_secret(franz, key, value + "-changed")
    out["franz"] = franz
    out["nietzsche"] = stopped(host(out, "nietzsche"), "mastodon-sidekiq-scheduler.service")
    freud = host(out, "freud")
    out["freud"] = change_unit(freud, "mastodon-sidekiq-default.service",
                               environment=(("RAILS_ENV", "production"), ("DB_POOL", "5")))
    fritz = host(out, "fritz")
    env = env_of(fritz)
    out["fritz"] = dataclasses.replace(fritz, env_files=(dataclasses.replace(env, invalid_lines=2),))
    assert d.host("fritz") is not None
    return out


def cycle(results: Mapping[str, HostResult], *, at: float, previous: Mapping[str, HostResult] | None = None,
          **kw: object) -> tuple[Cycle, AuditReport]:
    """One cycle as `fleet watch` will build it: the audit, and the changes since `previous`
    (none of them fleet's: no journal steps)."""
    report = build_audit(example(), dict(results))
    changes = attribute(changes_between(previous, results), [], {}, at - 300, at) if previous is not None else []
    sensitive = {k for ef in example().env_files for k in ef.sensitive_keys()}
    return Cycle.from_audit(report, at=at, changes=changes, previous=previous, sensitive_keys=sensitive,
                            **kw), report  # type: ignore[arg-type]


def secret_needles(urls: Iterable[str] = WEBHOOK_URLS) -> list[str]:
    """Every string that must never leave fleet in a message, metric, page or log."""
    out: list[str] = []
    for (_, _key), value in EXAMPLE_SECRETS.items():
        for v in (value, value + "-changed"):
            fp = fingerprint(v)
            out += [v, fp, fp[:8], mask(v), sha256_hex(v)[:8]]
            out += [line for line in v.splitlines() if len(line) >= 6]  # a multi-line secret, line by line
    out += [URL_PASSWORD, INLINE_SECRET]
    for u in urls:
        out += [u, u.split("//", 1)[1]]
        out += [part for part in re.split(r"[/?=]", u) if len(part) >= 12 and "." not in part]  # the token parts
    return out


def leaks(text: str, urls: Iterable[str] = WEBHOOK_URLS) -> list[str]:
    """The needles found in `text` (an empty list is what every test wants)."""
    return [n for n in secret_needles(urls) if n in text]


__all__ = ["ENV_PATH", "HOSTILE_UNIT", "T0", "WEBHOOK_URLS", "baseline", "cycle", "desired", "host", "incident",
           "leaks", "s3_hand_edit", "secret_needles", "unreachable"]
