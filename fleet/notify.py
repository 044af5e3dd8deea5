"""Telling the team: where to (targets), what (messages), and delivering each message once.

Targets come from `--notify SPEC` (repeatable) and from `[watch] notify = [SPEC, …]` in
desired_state.toml.  A SPEC is a URL, optionally prefixed by its kind — `discord:`, `slack:` or
`webhook:` — or `env:VAR` (also `slack:env:VAR` …), the URL then being read from the environment
variable VAR when fleet runs.  Without a prefix the kind follows from the URL:
`https://discord.com/api/webhooks/…` is Discord (`{"content": …}`), `https://hooks.slack.com/…`
is Slack (`{"text": …}`, which Slack-compatible receivers such as Mattermost accept), anything
else a generic JSON webhook that receives each event as data.

A webhook URL is a credential: whoever has it can post to the channel.  It is never printed in
full (`Target.shown`, `fleet.output.redact.redact_url`: scheme, host and its last 4 characters),
never stored (the outbox names a target by a hash), and never written in desired_state.toml,
which is committed — there, `env:VAR` (a loopback URL, which carries no credential, is allowed).

Delivery is at-least-once with one small, documented duplicate window:

* `Outbox.commit` renders the messages of a batch of events for every target and writes them,
  together with the caller's checkpoint (fleet watch's notified state), to the outbox in the
  state directory in ONE atomic write — before anything is sent (write-ahead).
* `Outbox.deliver` sends each pending message (timeouts, a bounded number of retries with
  exponential backoff) and removes it, with another atomic write, right after the receiver
  accepted it with a 2xx.  A message not accepted stays pending for the next cycle: never lost.
* The only duplicate: a crash after the receiver's 2xx and before that removal is on disk (the
  time of one small fsync'd write).  Every message carries its id (`Idempotency-Key` header, and
  the event ids in a generic webhook's body) so that a receiver can drop the repeat.
* Event ids are deterministic; the outbox remembers, per target, which event ids it delivered
  (for `DELIVERED_MEMORY_SECONDS`), and `commit` drops an event already delivered or pending —
  so `fleet apply` posting its start and `fleet watch` reading the same start from the journal
  give one message, when they share a state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fleet import __version__
from fleet.errors import FleetError
from fleet.model import Finding, WatchSettings
from fleet.output.files import write_atomic
from fleet.output.redact import redact, redact_url
from fleet.textutil import did_you_mean, printable, sha256_hex
from fleet.watch.events import APPLY_FINISHED, APPLY_STARTED, Event, utc

DISCORD, SLACK, WEBHOOK = "discord", "slack", "webhook"
TARGET_KINDS = (DISCORD, SLACK, WEBHOOK)

OUTBOX_FILE = "watch-outbox.json"
OUTBOX_FORMAT = 1
DELIVERED_MEMORY_SECONDS = 30 * 86400.0
# A dead receiver must not grow the outbox without end: past this many pending messages the
# oldest are dropped, and the drop is reported (DeliveryReport.dropped) — at 5-minute cycles with
# news in every cycle, more than two weeks of a receiver being down.
MAX_PENDING = 5000

DISCORD_LIMIT = 2000  # characters of `content` Discord accepts
SLACK_LIMIT = 3500  # Slack truncates long `text`; well below its limit, so one message stays readable
MAX_BODY_READ = 64 * 1024

_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

Hook = Callable[[str, "Pending"], None]


class NotifyError(FleetError):
    """A notification target cannot be used (its spec, its environment variable)."""


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    kind: str  # discord | slack | webhook
    url: str = field(repr=False)  # a credential: never print it; use `shown`
    origin: str = "--notify"  # where it was configured, for messages

    @property
    def key(self) -> str:
        """How the outbox names the target: stable, and useless to post with."""
        return "t-" + sha256_hex(f"{self.kind}|{self.url}")[:16]

    @property
    def shown(self) -> str:
        return f"{self.kind}:{redact_url(self.url)}"

    def __repr__(self) -> str:
        return f"Target({self.shown}, origin={self.origin!r})"

    __str__ = __repr__


def parse_target(spec: str, *, origin: str = "--notify", environ: Mapping[str, str] | None = None) -> Target:
    """A target from a SPEC (module docstring); `env:VAR` is read from `environ` (os.environ).
    Errors name the origin and never the URL (a credential)."""
    kind, rest = _split_kind(spec.strip())
    if rest.startswith("env:"):
        var = rest[4:]
        if not _ENV_VAR.fullmatch(var):
            raise NotifyError(f"{origin}: {var!r} is not an environment variable name",
                              hint="write env:VAR with letters, digits and underscores")
        env = os.environ if environ is None else environ
        value = env.get(var, "").strip()
        if not value:
            raise NotifyError(f"{origin}: the environment variable {var} is not set (it should hold the webhook URL)",
                              hint=f"export {var}=https://… before running fleet (for a service: its "
                                   "EnvironmentFile=)")
        origin = f"{origin} (env:{var})"
        if kind is None:
            kind, value = _split_kind(value)
        rest = value
    problem = url_problem(rest)
    if problem:
        raise NotifyError(f"{origin}: {problem}", hint="give an http(s) URL, e.g. discord:https://discord.com/api/"
                                                       "webhooks/ID/TOKEN, or env:VAR")
    return Target(kind or guess_kind(rest), rest, origin)


def _split_kind(spec: str) -> tuple[str | None, str]:
    head, sep, rest = spec.partition(":")
    if sep and head.lower() in TARGET_KINDS:
        return head.lower(), rest.strip()
    return None, spec


def guess_kind(url: str) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in ("discord.com", "discordapp.com") or host.endswith((".discord.com", ".discordapp.com")):
        if parts.path.startswith("/api/webhooks/"):
            return DISCORD
    if host == "hooks.slack.com":
        return SLACK
    return WEBHOOK


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook, or None.  The message shows the URL redacted only."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"the webhook URL {redact_url(url)} contains spaces or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError as e:
        return f"the webhook URL {redact_url(url)} is malformed ({e})"
    if parts.scheme not in ("http", "https"):
        return f"the webhook URL {redact_url(url)} must start with https:// (or http://)"
    if not host:
        return f"the webhook URL {redact_url(url)} names no host"
    return None


def is_loopback(url: str) -> bool:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- [watch] in desired_state.toml


WATCH_KEYS = ("notify", "remind_every")


def validate_watch(table: object, *, file: str) -> tuple[WatchSettings, list[Finding]]:
    """Check a `[watch]` table (None when absent); config.load calls it and adds the findings
    (config.with_lines points them at their lines).  Every problem is a finding; the settings
    keep what is usable.  A finding never holds a URL in full."""
    findings: list[Finding] = []

    def error(key: str, message: str, hint: str, code: str = "config.invalid") -> None:
        findings.append(Finding("error", code, message, file=file, key=key, hint=hint))

    if table is None:
        return WatchSettings(), findings
    if not isinstance(table, Mapping):
        error("watch", "'watch' must be a table", "write [watch] with notify = [...]", "config.wrong-type")
        return WatchSettings(), findings
    for key in table:
        if key not in WATCH_KEYS:
            error(f"watch.{key}", f"unknown key 'watch.{key}'",
                  did_you_mean(str(key), WATCH_KEYS) or f"allowed keys here: {', '.join(WATCH_KEYS)}",
                  "config.unknown-key")
    specs: list[str] = []
    raw = table.get("notify", [])
    if not isinstance(raw, list):
        error("watch.notify", "'watch.notify' must be an array of strings", 'write notify = ["env:FLEET_WEBHOOK"]',
              "config.wrong-type")
        raw = []
    for i, spec in enumerate(raw):
        where = f"watch.notify[{i}]"
        if not isinstance(spec, str):
            error("watch.notify", f"'{where}' must be a string", 'write notify = ["env:FLEET_WEBHOOK"]',
                  "config.wrong-type")
            continue
        problem = _spec_problem(spec)
        if problem:
            error("watch.notify", f"{where}: {problem[0]}", problem[1], problem[2])
            continue
        specs.append(spec.strip())
    remind: float | None = None
    if "remind_every" in table:
        remind = parse_duration(table["remind_every"])
        if remind is None:
            error("watch.remind_every", f"'watch.remind_every' must be a duration such as \"4h\", \"30m\" or a number "
                                        f"of seconds (at least 60), not {printable(repr(table['remind_every']))}",
                  'for example remind_every = "4h"; leave it out to announce a persisting finding once',
                  "config.bad-value")
    return WatchSettings(tuple(specs), remind), findings


def _spec_problem(spec: str) -> tuple[str, str, str] | None:
    """(message, hint, code) for a `[watch] notify` item that cannot be used, or None."""
    kind, rest = _split_kind(spec.strip())
    if rest.startswith("env:"):
        var = rest[4:]
        if not _ENV_VAR.fullmatch(var):
            return (f"{printable(var)!r} is not an environment variable name",
                    "write env:VAR with letters, digits and underscores", "config.bad-name")
        return None
    head = rest.partition(":")[0]
    if kind is None and head and head.lower() not in ("http", "https", "env") and "://" not in rest:
        return (f"unknown notification kind {printable(head)!r}",
                f"use one of {', '.join(f'{k}:' for k in TARGET_KINDS)}, a URL, or env:VAR", "config.bad-value")
    problem = url_problem(rest)
    if problem:
        return problem, "give env:VAR (the URL in the environment) or an http(s) URL", "config.bad-value"
    if not is_loopback(rest):
        return (f"the webhook URL {redact_url(rest)} is a credential, and desired_state.toml is committed",
                f'write notify = ["{kind + ":" if kind else ""}env:FLEET_WEBHOOK"] and set FLEET_WEBHOOK where '
                "fleet runs; revoke this webhook: it is in the history now", "config.credential-in-clear")
    return None


def parse_duration(value: object) -> float | None:
    """Seconds from a number or "90s" / "30m" / "4h" / "1d"; None when invalid or under a minute
    (a reminder every few seconds would be the noise `fleet watch` exists to avoid)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        return None
    return seconds if 60 <= seconds <= 365 * 86400 else None


# ---------------------------------------------------------------- messages

_LABEL = {
    "host.unreachable": "HOST DOWN", "host.back": "HOST BACK", "apply.started": "APPLY STARTED",
    "apply.finished": "APPLY FINISHED", "change.outside": "CHANGED OUTSIDE FLEET", "drift.new": "DRIFT",
    "drift.changed": "DRIFT CHANGED", "finding.new": "FINDING", "drift.resolved": "RESOLVED",
    "finding.resolved": "RESOLVED", "reminder": "REMINDER",
}
_DISCORD_SPECIAL = re.compile(r"([\\*_~`|\[\]()<>#])")


def event_line(e: Event) -> str:
    """One event as a line of plain text (before a target's own escaping)."""
    return f"[{_LABEL.get(e.kind, e.kind.upper())}] {e.text}"


def render(events: Sequence[Event], target: Target, *, fleet: str, urls: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The JSON bodies to post to `target` for `events`: chat targets get one digest message
    (split to the receiver's size limit), a generic webhook one body per event.  Everything
    shown goes through `redact` with every configured webhook URL."""
    return [body for body, _ in _messages(events, target, fleet=fleet, urls=urls)]


def _messages(events: Sequence[Event], target: Target, *, fleet: str,
              urls: Iterable[str] = ()) -> list[tuple[dict[str, Any], tuple[Event, ...]]]:
    """Each body with the events it carries."""
    hidden = [target.url, *urls]
    if target.kind == WEBHOOK:
        return [({"fleet": _safe(fleet, hidden), "source": "fleet watch", **_event_data(e, hidden)}, (e,))
                for e in events]
    title = _safe(_digest_title(events, fleet), hidden)
    lines = [_safe(event_line(e), hidden) for e in events]
    if target.kind == DISCORD:
        chunks = _chunks(_discord(title, bold=True), [_discord(x) for x in lines], DISCORD_LIMIT)
        return [({"content": text, "allowed_mentions": {"parse": []}}, tuple(events[i] for i in idx))
                for text, idx in chunks]
    chunks = _chunks(_slack(title, bold=True), [_slack(x) for x in lines], SLACK_LIMIT)
    return [({"text": text}, tuple(events[i] for i in idx)) for text, idx in chunks]


def _event_data(e: Event, hidden: list[str]) -> dict[str, Any]:
    d = e.as_dict()
    d["data"] = {k: _safe(v, hidden) for k, v in d["data"].items()}
    return {k: (_safe(v, hidden) if isinstance(v, str) else v) for k, v in d.items()}


def _digest_title(events: Sequence[Event], fleet: str) -> str:
    if len(events) == 1 and events[0].kind in (APPLY_STARTED, APPLY_FINISHED):
        return f"fleet {fleet}: {utc(events[0].at)}"
    return f"fleet {fleet}: {len(events)} event{'s' * (len(events) != 1)} ({utc(max(e.at for e in events))})"


def _safe(text: str, hidden: Iterable[str]) -> str:
    return redact(printable(text, multiline=False), urls=hidden)


def _discord(text: str, *, bold: bool = False) -> str:
    """Discord markdown: every character that formats, links or mentions is escaped (mentions are
    also switched off by `allowed_mentions`), so a hostile unit name cannot ping or phish."""
    text = _DISCORD_SPECIAL.sub(r"\\\1", text)
    return f"**{text}**" if bold else text


def _slack(text: str, *, bold: bool = False) -> str:
    """Slack's three control characters (its `<!channel>` mentions and `<url|text>` links)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"*{text}*" if bold else text


def _chunks(title: str, lines: list[str], limit: int) -> list[tuple[str, list[int]]]:
    """Lines grouped into messages of at most `limit` characters, each opened by the title (with
    `(part i/n)` when there are several), with the indices of the lines each holds; a line too
    long for one message is cut."""
    room = limit - len(title) - len(" (part 999/999)") - 1
    parts: list[list[int]] = [[]]
    texts: list[str] = []
    size = 0
    for i, line in enumerate(lines):
        if len(line) > room:
            line = line[: room - 1] + "…"
        if parts[-1] and size + len(line) + 1 > room:
            parts.append([])
            size = 0
        parts[-1].append(i)
        texts.append(line)
        size += len(line) + 1
    if len(parts) == 1:
        return [("\n".join([title, *texts]), parts[0])]
    return [("\n".join([f"{title} (part {n}/{len(parts)})", *(texts[i] for i in p)]), p)
            for n, p in enumerate(parts, 1)]


# ---------------------------------------------------------------- sending


@dataclass(frozen=True)
class Delivery:
    """How hard to try one message within one cycle.  The waits are bounded: a dead receiver
    costs a cycle at most attempts × timeout + the sum of the backoffs, then waits for the next."""

    timeout: float = 10.0  # seconds per attempt (connect and each read)
    attempts: int = 3
    backoff: float = 1.0  # seconds before the second attempt; doubled each time
    max_backoff: float = 8.0


@dataclass(frozen=True)
class SendResult:
    ok: bool
    status: int  # HTTP status; 0 when no response came (refused, timeout)
    attempts: int
    error: str = ""  # redacted


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is misconfigured; following it would re-send (urllib turns a POST
    into a GET on 302) or hand the body to another host.  The 3xx is reported instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post(url: str, body: bytes, *, timeout: float, headers: Mapping[str, str] | None = None) -> tuple[int, str]:
    """POST `body` as JSON; (status, reason) — status 0 when no HTTP response came.  Never raises
    for a network failure; the reason never holds the URL."""
    proxies = urllib.request.ProxyHandler({}) if is_loopback(url) else urllib.request.ProxyHandler()
    opener = urllib.request.build_opener(proxies, _NoRedirect())
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"fleet/{__version__}", **dict(headers or {})})
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read(MAX_BODY_READ)
            return int(response.status), str(response.reason or "")
    except urllib.error.HTTPError as e:
        with contextlib.suppress(Exception):
            e.read(MAX_BODY_READ)
        return int(e.code), f"HTTP {e.code} {e.reason or ''}".strip()
    except urllib.error.URLError as e:
        return 0, f"no response ({_reason(e.reason)})"
    except (TimeoutError, OSError, ValueError) as e:  # a read timeout, a reset, a bad status line
        return 0, f"no response ({_reason(e)})"


def _reason(e: object) -> str:
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _retryable(status: int) -> bool:
    return status == 0 or status in (408, 425, 429) or status >= 500


def send(target: Target, body: Mapping[str, Any], *, message_id: str, delivery: Delivery = Delivery(),
         sleep: Callable[[float], None] = time.sleep,
         poster: Callable[..., tuple[int, str]] = post) -> SendResult:
    """Post one message, retrying what may heal (no response, 408/425/429, 5xx) with
    exponential backoff; a 4xx is final for this cycle (the message stays pending)."""
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    wait = delivery.backoff
    status, reason = 0, ""
    for attempt in range(1, max(1, delivery.attempts) + 1):
        status, reason = poster(target.url, data, timeout=delivery.timeout, headers={"Idempotency-Key": message_id})
        if 200 <= status < 300:
            return SendResult(True, status, attempt)
        if not _retryable(status) or attempt >= delivery.attempts:
            break
        sleep(min(wait, delivery.max_backoff))
        wait *= 2
    return SendResult(False, status, attempt, redact(printable(reason, multiline=False), urls=[target.url]))


# ---------------------------------------------------------------- the outbox


@dataclass(frozen=True)
class Pending:
    """One message for one target, written before it is sent and removed once accepted."""

    id: str
    target: str  # Target.key
    shown: str  # Target.shown, for reports
    events: tuple[str, ...]  # the event ids it carries
    body: Mapping[str, Any] = field(hash=False)
    created: float
    attempts: int = 0
    last_error: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "target": self.target, "shown": self.shown, "events": list(self.events),
                "body": dict(self.body), "created": self.created, "attempts": self.attempts,
                "last_error": self.last_error}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Pending:
        return cls(id=str(d["id"]), target=str(d["target"]), shown=str(d["shown"]),
                   events=tuple(str(x) for x in d["events"]), body=dict(d["body"]), created=float(d["created"]),
                   attempts=int(d["attempts"]), last_error=str(d["last_error"]))


@dataclass
class DeliveryReport:
    sent: list[Pending] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # target shown -> why (redacted); its messages wait
    kept: int = 0  # messages still pending after this pass
    unknown_targets: int = 0  # pending for a target not configured now (kept, not sent)
    dropped: int = 0  # removed unsent because the outbox was full (MAX_PENDING)

    def lines(self) -> list[str]:
        out = [f"notify: {shown}: not delivered ({why}); kept for the next cycle" for shown, why in
               sorted(self.failed.items())]
        if self.unknown_targets:
            out.append(f"notify: {self.unknown_targets} message(s) wait for a target that is not configured now")
        if self.dropped:
            out.append(f"notify: the outbox was full; {self.dropped} oldest message(s) were dropped unsent")
        return out


@dataclass
class _Box:
    checkpoint: Any = None
    pending: list[Pending] = field(default_factory=list)
    delivered: dict[str, dict[str, float]] = field(default_factory=dict)  # target key -> event id -> when
    dropped: int = 0


class Outbox:
    """`STATE/watch-outbox.json` (mode 0600): pending messages, the event ids delivered per
    target, and the caller's checkpoint — one file, so one atomic write commits a cycle.
    Processes sharing a state directory (watch, apply) serialise on `.lock` for each read-modify-
    write and on `.deliver.lock` for delivery (one sender at a time: two would send twice)."""

    def __init__(self, state_dir: str | os.PathLike[str], *, now: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / OUTBOX_FILE
        self._now = now

    # -- reading --------------------------------------------------------------------------------

    def checkpoint(self) -> Any:
        """What the last `commit` stored as checkpoint (None when nothing was ever committed)."""
        with self._locked():
            return self._load().checkpoint

    def pending(self) -> list[Pending]:
        with self._locked():
            return list(self._load().pending)

    # -- writing --------------------------------------------------------------------------------

    def commit(self, events: Sequence[Event], targets: Sequence[Target], *, fleet: str,
               checkpoint: Any = None, keep_checkpoint: bool = False) -> list[Pending]:
        """Write the messages of `events` for every target, and `checkpoint` (unless
        `keep_checkpoint`: `fleet apply` posting leaves fleet watch's checkpoint alone), in one
        atomic write.  An event already pending or delivered for a target is left out for it."""
        urls = [t.url for t in targets]
        added: list[Pending] = []
        with self._locked():
            box = self._load()
            now = self._now()
            for t in targets:
                known = set(box.delivered.get(t.key, {}))
                known |= {eid for p in box.pending if p.target == t.key for eid in p.events}
                fresh = [e for e in events if e.id not in known]
                if not fresh:
                    continue
                for body, group in _messages(fresh, t, fleet=fleet, urls=urls):
                    ids = tuple(e.id for e in group)
                    mid = f"{t.key}:{sha256_hex('|'.join(ids))[:20]}"
                    added.append(Pending(mid, t.key, t.shown, ids, body, now))
            box.pending += added
            if len(box.pending) > MAX_PENDING:
                box.dropped += len(box.pending) - MAX_PENDING
                box.pending = box.pending[-MAX_PENDING:]
            if not keep_checkpoint:
                box.checkpoint = checkpoint
            self._save(box)
        return added

    def deliver(self, targets: Sequence[Target], *, delivery: Delivery = Delivery(),
                sleep: Callable[[float], None] = time.sleep, poster: Callable[..., tuple[int, str]] = post,
                hook: Hook | None = None) -> DeliveryReport:
        """Send what is pending, oldest first.  A target that fails is not tried again in this
        pass (its receiver is down: the rest of its messages wait too, in order).  `hook(step,
        message)` is called at "send" (before posting), "accepted" (after the 2xx, before the
        removal: the duplicate window) and "removed" — for tests that simulate a crash."""
        report = DeliveryReport()
        by_key = {t.key: t for t in targets}
        with self._locked(".deliver.lock"):
            with self._locked():
                box = self._load()
                report.dropped, box.dropped = box.dropped, 0
                if report.dropped:
                    self._save(box)
            for message in box.pending:
                target = by_key.get(message.target)
                if target is None:
                    report.unknown_targets += 1
                    continue
                if target.shown in report.failed:
                    continue
                if hook:
                    hook("send", message)
                result = send(target, message.body, message_id=message.id, delivery=delivery, sleep=sleep,
                              poster=poster)
                if result.ok:
                    if hook:
                        hook("accepted", message)
                    self._remove(message)
                    report.sent.append(message)
                    if hook:
                        hook("removed", message)
                else:
                    report.failed[target.shown] = result.error or f"HTTP {result.status}"
                    self._note_failure(message, result)
            report.kept = len(self.pending())
        return report

    def _remove(self, message: Pending) -> None:
        with self._locked():
            box = self._load()
            box.pending = [p for p in box.pending if p.id != message.id]
            seen = box.delivered.setdefault(message.target, {})
            now = self._now()
            for eid in message.events:
                seen[eid] = now
            self._save(box)

    def _note_failure(self, message: Pending, result: SendResult) -> None:
        with self._locked():
            box = self._load()
            box.pending = [Pending(p.id, p.target, p.shown, p.events, p.body, p.created, p.attempts + result.attempts,
                                   result.error) if p.id == message.id else p for p in box.pending]
            self._save(box)

    # -- the file -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, suffix: str = ".lock") -> Iterator[None]:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.dir / f"{OUTBOX_FILE}{suffix}", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise NotifyError(f"cannot open the outbox lock in {self.dir}: {e.strerror or e}",
                              hint="check the state directory's owner and permissions (--state-dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _load(self) -> _Box:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _Box()
        except OSError as e:
            raise NotifyError(f"cannot read the outbox {self.path}: {e.strerror or e}",
                              hint="check the state directory's owner and permissions") from None
        try:
            d = json.loads(raw)
            if d.get("format") != OUTBOX_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, not {OUTBOX_FORMAT}")
            delivered = {str(t): {str(e): float(at) for e, at in ids.items()} for t, ids in d["delivered"].items()}
            return _Box(checkpoint=d.get("checkpoint"), pending=[Pending.from_json(p) for p in d["pending"]],
                        delivered=delivered, dropped=int(d.get("dropped", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise NotifyError(f"the outbox {self.path} is damaged ({type(e).__name__}: {printable(str(e))})",
                              hint="move it away (its unsent messages are lost) and run again") from None

    def _save(self, box: _Box) -> None:
        horizon = self._now() - DELIVERED_MEMORY_SECONDS
        delivered = {t: {e: at for e, at in ids.items() if at >= horizon} for t, ids in box.delivered.items()}
        doc = {"format": OUTBOX_FORMAT, "checkpoint": box.checkpoint, "pending": [p.as_json() for p in box.pending],
               "delivered": {t: ids for t, ids in delivered.items() if ids}, "dropped": box.dropped}
        write_atomic(self.path, json.dumps(doc, ensure_ascii=False, indent=1).encode(), mode=0o600,
                     what="the notification outbox")
