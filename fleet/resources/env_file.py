"""Env files: a declared `.env` file with its keys, owner, group and mode (write-env).

Collected by its own `@@env PATH` section per declared file: `absent`, or `meta MODE OWNER GROUP
SIZE` then either `known SHA256` (the file hashes to the hash the client offered from its kept
observation, whose parse it fills in: `env_offers`, `fill_known`) or `V KEY raw`, `secret KEY
SHA256` and `invalid` lines and, last, `sha256 SHA256` of the whole file read after them.  Secrets never leave the host:
for keys that are declared sensitive or look secret the script prints only a sha256 of the raw
value.  Desired values arrive resolved in `secrets` and are compared by fingerprint; a change
holds only masked text, and its content hash is computed over fingerprints (`env_digest`), so
that apply can check that it writes what the plan showed without the plan ever holding a secret.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from fleet.actions import KEY_OPS, Action, Change, EnvFilePayload, KeyChange, ObservedKind, Payload, Phase
from fleet.collect.sections import Collected, SectionParser, to_int, too_much
from fleet.config import USER_NAME, env_path_ok
from fleet.envfile import fingerprint, key_problem, parse_value, render_file
from fleet.errors import FleetError, ParseError
from fleet.mastodon import SECRET_KEYS, SECRET_NAME_PATTERN, looks_secret
from fleet.model import Desired, EnvFile, EnvFileState, HostState
from fleet.resources.base import (
    ADDED,
    CHANGED,
    REMOVED,
    ActionSpec,
    AuditStep,
    Detail,
    Execution,
    HostDiff,
    PayloadError,
    Resource,
    StepView,
    empty,
    hash_problem,
    text,
    texts,
)
from fleet.textutil import mask, sha256_hex

MAX_ENV_LINES = 5000  # per file, in the collection script
MAX_ENV_FILES = 1_000  # per host, in a parse of its output
# What a kept observation may offer the script as a file's known hash: plain paths and hex only,
# still quoted where they are written into the script.
OFFER_PATH = re.compile(r"/[A-Za-z0-9/._:+@-]{1,4095}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_KEYS_SHOWN = 6  # in a journal sentence
_META = frozenset({"owner", "group", "mode", "name"})
_MODE = re.compile(r"0[0-7]{3}")


class EnvFiles(Resource):
    kind = "env file"
    actions = {Action.WRITE_ENV: ActionSpec(Phase.WRITE, "~", "change")}
    explained = {Action.WRITE_ENV: frozenset({ObservedKind.ENV_PRESENCE, ObservedKind.ENV_KEY,
                                              ObservedKind.ENV_META})}
    section = "env"

    # -- collection

    def to_collect(self, desired: Desired, host: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(path, sensitive keys) of each env file declared on the host."""
        return tuple((e.path, e.sensitive_keys()) for e in desired.env_files_on(host))

    def script(self, what: Any) -> str:
        """Per declared file: its meta, then either `known SHA256` — the file hashes (in the units'
        one `sha256sum`, `$hs`: fleet/collect/script.py) to the hash the client offered for it
        (`env_offers`), whose parse the client already holds — or its parse and, after it, the
        file's `sha256` again: the client keeps that hash with the parse only when it is the one
        `$hs` holds, i.e. the file did not change while it was read."""
        q = shlex.quote
        parts = []
        for path, sensitive, *offered in what:
            sens = " " + " ".join(sorted(set(sensitive) | SECRET_KEYS)) + " "
            p = q(path)
            fresh = (f"awk -v s={q(sens)} -v secret_re={q(SECRET_NAME_PATTERN)} -v maxl={MAX_ENV_LINES} "
                     f"{q(_ENV_AWK)} {p} | {{ {_HASH_SECRETS} }}; "
                     f"h=$(sha256sum <{p}) && echo \"sha256 ${{h%% *}}\"")
            known = offered[0] if offered else ""
            if known:
                if not (_SHA256_HEX.fullmatch(known) and OFFER_PATH.fullmatch(path)):
                    raise ValueError(f"env file {path!r}: offered hash {known!r} is not a sha256 of a plain path")
                fresh = (f"case \"$nl$hs$nl\" in *\"$nl\"{q(f'{known}  {path}')}\"$nl\"*) echo {q('known ' + known)};; "
                         f"*) {fresh};; esac")
            parts.append(
                f"echo '@@env '{p}\n"
                f"if [ -f {p} ]; then stat -c 'meta 0%a %U %G %s' -- {p}; {fresh}; "
                "else echo absent; fi"
            )
        return "\n".join(parts)

    def parser(self, host: str) -> SectionParser:
        return _EnvSections(host)

    # -- diff

    def diff_host(self, ctx: HostDiff) -> None:
        for ef in ctx.desired.env_files_on(ctx.host):
            c = _env_change(ef, ctx)
            if c is not None:
                ctx.add(c)
                ctx.written_paths.add(ef.path)

    def affects(self, change: Change, desired: Desired) -> Iterable[str]:
        """Every unit on the host that loads the file (each instance of a template) restarts after
        it is written."""
        return [u for s in desired.services_on(change.host)
                if s.unit_spec is not None and change.target in s.unit_spec.environment_files
                for u in s.units_on(change.host)]

    # -- plan file

    def load(self, action: Action, fields: Mapping[str, Any]) -> Payload:
        empty(fields, "diff", "remove_files", "steps")
        keys = fields.get("keys", [])
        if not isinstance(keys, list):
            raise PayloadError("its keys are not a list")
        changes = []
        for i, k in enumerate(keys):
            key = texts({"k": k}, "k")
            if len(key) != 4 or key[1] not in KEY_OPS:
                raise PayloadError(f"its key change {i + 1} is not (key, {'|'.join(KEY_OPS)}, before, after)")
            changes.append(KeyChange(*key))
        meta = fields.get("meta")
        if not isinstance(meta, dict) or set(meta) != _META:
            raise PayloadError(f"its meta does not hold exactly {', '.join(sorted(_META))}")
        return EnvFilePayload(keys=tuple(changes), content_hash=text(fields, "content_hash"), name=text(meta, "name"),
                              owner=text(meta, "owner"), group=text(meta, "group"), mode=text(meta, "mode"))

    def problem(self, change: Change) -> str | None:
        if not env_path_ok(change.target):
            return f"env file path {change.target!r} is not an absolute file path without '..'"
        p = _payload(change)
        problem = hash_problem(p.content_hash)
        if problem:
            return problem
        bad_key = next((k.key for k in p.keys if key_problem(k.key)), None)
        if bad_key is not None:
            return key_problem(bad_key)
        for name, value in (("owner", p.owner), ("group", p.group)):
            if value and not USER_NAME.fullmatch(value):
                return f"{name} {value!r} is not a user or group name"
        if not _MODE.fullmatch(p.mode):
            return f"mode {p.mode!r} is not an octal file mode"
        return None

    # -- apply

    def check_content(self, change: Change, desired: Desired, secrets: Mapping[tuple[str, str], str]) -> str | None:
        ef = _declared(desired, change)
        if ef is None or env_digest(ef, change.host, secrets) != _payload(change).content_hash:
            return f"{change.host}: {change.target} would differ from the plan (desired state or a secret changed)"
        return None

    def execute(self, change: Change, step: Execution) -> None:
        ef = _declared(step.desired, change)
        if ef is None:
            raise FleetError(f"the plan writes {change.target}, which the desired state no longer declares on "
                             f"{change.host}")
        text_ = render_file(desired_env_items(ef, change.host, step.secrets),
                            header="Managed by fleet: local edits are overwritten by `fleet apply`.")
        keep = tuple(k for k, src in ef.sensitive if src.kind == "present")
        step.write(change.target, text_, mode=ef.mode, owner=ef.owner, group=ef.group, keep_keys=keep)

    # -- journal, plan text and audit

    def sentence(self, step: StepView) -> str:
        if step.before == "absent":
            return f"wrote {step.target} (new file: {step.after})"
        changes = _key_changes(step.keys)
        return f"wrote {step.target} ({changes or f'was {step.before}; now {step.after}'})"

    def symbol(self, change: Change) -> str:
        return "+" if change.before == "absent" else "~"

    def bucket(self, change: Change) -> str:
        return "install" if change.before == "absent" else "change"

    def details(self, change: Change) -> list[Detail]:
        out: list[Detail] = []
        for key, op, before, after in _payload(change).keys:
            if op == "set":
                out.append((ADDED, f"+ {key} = {after}"))
            elif op == "remove":
                out.append((REMOVED, f"- {key} (was {before})"))
            else:
                out.append((CHANGED, f"~ {key}: {before} → {after}"))
        return out

    def explains(self, step: AuditStep, kind: ObservedKind, key: str) -> bool:
        # A write-env that did not touch a key does not explain that key's change.
        return super().explains(step, kind, key) and (kind != ObservedKind.ENV_KEY or key in step.keys)


# sh, reading the awk's lines: every secret of the file hashed by one `sha256sum` per
# SECRETS_PER_HASH secrets (it was one per secret), each value handed to it through a pipe of its
# own (`printf %b` in a subshell, /dev/fd/N): never in an argv, never in a file.  The lines come out
# in the file's order, each secret's as `secret KEY SHA256`.  Only variable *names* reach `eval`.
SECRETS_PER_HASH = 7  # file descriptors 3-9: the single-digit ones a POSIX sh can redirect
_HASH_SECRETS = (
    "n=0 m=0; while IFS= read -r l; do m=$((m + 1)); case $l in "
    "'S '*) n=$((n + 1)); k=${l#S }; eval \"s$n=\\${k#* } k$n=\\${k%% *} l$m=\\\"S $n\\\"\";; "
    "*) eval \"l$m=\\$l\";; esac; done; "
    "i=1; while [ $i -le $n ]; do c=; e=; f=3; j=$i; "
    f"while [ $j -le $n ] && [ $f -le {2 + SECRETS_PER_HASH} ]; do "
    "c=\"$c printf '%b' \\\"\\$s$j\\\" | { exec $f<&0;\"; e=\"$e /dev/fd/$f\"; f=$((f + 1)); j=$((j + 1)); done; "
    "c=\"$c sha256sum$e </dev/null\"; while [ $f -gt 3 ]; do c=\"$c; }\"; f=$((f - 1)); done; "
    "for w in $(eval \"$c\"); do case $w in /dev/fd/*) ;; *) eval \"h$i=\\$w\"; i=$((i + 1));; esac; done; "
    "[ $i -ge $j ] || break; done; "
    "i=1; while [ $i -le $m ]; do eval \"l=\\$l$i\"; case $l in "
    "'S '*) eval \"printf 'secret %s %s\\\\n' \\\"\\$k${l#S }\\\" \\\"\\$h${l#S }\\\"\";; "
    "*) printf '%s\\n' \"$l\";; esac; i=$((i + 1)); done;"
)

# awk: classify each line of an env file; sensitive values go to the shell loop for hashing
# and never to stdout.  A change to what it (or `parse_env`) makes of a file must raise
# fleet/snapshot.py ENV_PARSE: kept parses are reused for files that hash the same.
_ENV_AWK = r"""
# A double-quoted value may span lines (fleet writes a newline in a value that way): it ends at
# the first line ending in an unescaped quote.
function esc(v, dbl,   out, i, c) {
  out = ""
  for (i = 1; i <= length(v); i++) {
    c = substr(v, i, 1)
    if (c == "\n") out = out "\\n"; else if (dbl && c == "\\") out = out "\\\\"; else out = out c
  }
  return out
}
function closed(v,   n, i) {
  sub(/[ \t]+$/, "", v)
  if (length(v) < 2 || substr(v, length(v), 1) != "\"") return 0
  n = 0
  for (i = length(v) - 1; i >= 1 && substr(v, i, 1) == "\\"; i--) n++
  return n % 2 == 0
}
{ line = $0; sub(/^[ \t]+/, "", line); sub(/\r$/, "", line) }
line == "" || substr(line, 1, 1) == "#" { next }
NR > maxl { print "invalid"; exit }
{
  sub(/^export[ \t]+/, "", line)
  eq = index(line, "=")
  if (eq < 2) { print "invalid"; next }
  k = substr(line, 1, eq - 1); sub(/[ \t]+$/, "", k)
  v = substr(line, eq + 1); sub(/^[ \t]+/, "", v)
  if (substr(v, 1, 1) == "\"")
    while (!closed(v) && NR <= maxl && (getline nxt) > 0) { sub(/\r$/, "", nxt); v = v "\n" nxt }
  sub(/[ \t]+$/, "", v)
  if (k !~ /^[A-Za-z0-9_.]+$/) { print "invalid"; next }
  # one line per key on the way out: newlines travel as \n (and, for secrets, \ as \\, so that
  # the shell's printf %b restores the exact raw text before hashing it)
  if (index(s, " " k " ") || k ~ secret_re) print "S " k " " esc(v, 1)
  else print "V " k " " esc(v, 0)
}
"""



class _EnvSections:
    """The `@@env PATH` sections of one host's output; a `known SHA256` one is put in
    `Collected.known_env`, to be filled in from the kept parse the client offered
    (fleet.collect.parse, `fill_known_env`)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.files: list[EnvFileState] = []
        self.known: dict[str, str] = {}

    def section(self, arg: str, lines: Iterator[str]) -> None:
        if not arg:
            raise ParseError(f"{self.host}: an env section without its path", host=self.host, section="env")
        if len(self.files) >= MAX_ENV_FILES:
            raise too_much(self.host, "env", f"{MAX_ENV_FILES:,} env files")
        state, known = _parse_env(self.host, arg, lines)
        if known:
            self.known[arg] = state.sha256
        self.files.append(state)

    def finish(self, collected: Collected) -> None:
        collected.env_files = tuple(self.files)
        collected.known_env = dict(self.known)


def parse_env(host: str, path: str, lines: Iterable[str]) -> EnvFileState:
    """One env file's section, read as it is printed when nothing was offered as known."""
    state, known = _parse_env(host, path, lines)
    if known:
        raise ParseError(f"{host}: the script says {path} is known, but no hash was offered for it", host=host,
                         section="env")
    return state


def _parse_env(host: str, path: str, lines: Iterable[str]) -> tuple[EnvFileState, bool]:
    """(the file's state, whether the script said it hashes to a known hash: then its state holds
    only the meta and that hash, `sha256`)."""
    kept: list[str] = []
    for line in lines:
        if line:
            if len(kept) >= MAX_ENV_LINES + 3:  # meta, MAX_ENV_LINES keys at most, `invalid`, `sha256`
                raise too_much(host, "env", f"{MAX_ENV_LINES:,} keys for {path[:80]}")
            kept.append(line)
    lines = kept
    if lines == ["absent"]:
        return EnvFileState(path=path, present=False), False
    if not lines or not lines[0].startswith("meta "):
        raise ParseError(f"{host}: env file section for {path} lacks its meta line", host=host, section="env")
    meta = lines[0].split(" ")
    if len(meta) != 5:
        raise ParseError(f"{host}: malformed meta line for {path}: {lines[0][:80]!r}", host=host, section="env")
    mode = meta[1][-4:].rjust(4, "0")
    if len(lines) == 2 and lines[1].startswith("known "):
        known = lines[1][6:]
        if not _SHA256_HEX.fullmatch(known):
            raise ParseError(f"{host}: malformed known line in {path}", host=host, section="env")
        return EnvFileState(path=path, present=True, mode=mode, owner=meta[2], group=meta[3], size=to_int(meta[4]),
                            sha256=known), True
    keys: list[str] = []
    values: list[tuple[str, str]] = []
    secrets: list[tuple[str, str]] = []
    invalid = 0
    digest = ""
    for line in lines[1:]:
        if digest:
            raise ParseError(f"{host}: a line after the file's sha256 in the env file section for {path}",
                             host=host, section="env")
        if line.startswith("V "):
            key, _, raw = line[2:].partition(" ")
            keys.append(key)
            values.append((key, parse_value(raw)))
        elif line.startswith("secret "):
            parts = line.split(" ")
            if parts[3:] == ["", "-"]:  # `secret KEY SHA256  -`: sha256sum's own line (an older script
                parts = parts[:3]  # printed the hash alone)
            if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
                raise ParseError(f"{host}: malformed secret line in {path}", host=host, section="env")
            keys.append(parts[1])
            secrets.append((parts[1], parts[2]))
        elif line == "invalid":
            invalid += 1
        elif line.startswith("sha256 ") and _SHA256_HEX.fullmatch(line[7:]):
            digest = line[7:]
        else:
            raise ParseError(f"{host}: unexpected line in env file section for {path}: {line[:80]!r}",
                             host=host, section="env")
    return EnvFileState(path=path, present=True, mode=mode, owner=meta[2], group=meta[3], size=to_int(meta[4]),
                        keys=tuple(keys), values=tuple(values), secrets=tuple(secrets), invalid_lines=invalid,
                        sha256=digest), False


def env_offers(what: tuple[tuple[str, tuple[str, ...]], ...], kept: HostState | None
               ) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """`what` (to_collect's (path, sensitive keys) per file) with, for each file, the hash of the
    kept observation's parse of it when that parse may stand for the file while it hashes the
    same ("" otherwise): the file was present, its hash is known, and every key of it is a secret
    now exactly when it was one then (the script's split depends on the declared sensitive keys).
    What the script then does with the hash: `script`; what the client: `fill_known`."""
    out = []
    for path, sensitive in what:
        e = kept.env_file(path) if kept is not None else None
        ok = (e is not None and e.present and _SHA256_HEX.fullmatch(e.sha256) is not None
              and OFFER_PATH.fullmatch(path) is not None and _split_as_now(e, set(sensitive)))
        out.append((path, tuple(sensitive), e.sha256 if ok and e is not None else ""))
    return tuple(out)


def _split_as_now(e: EnvFileState, sensitive: set[str]) -> bool:
    secret = {k for k, _ in e.secrets}
    plain = {k for k, _ in e.values}
    return (not secret & plain and secret | plain == set(e.keys)
            and all((k in sensitive or looks_secret(k)) == (k in secret) for k in e.keys))


def fill_known(host: str, state: EnvFileState, offered: str, kept: EnvFileState | None) -> EnvFileState:
    """The file the script said hashes to `state.sha256`: the kept parse with today's meta.  Only
    for the hash the client offered for that path; anything else is not fleet's script talking."""
    if kept is None or not offered or state.sha256 != offered or kept.sha256 != offered:
        raise ParseError(f"{host}: the script says {state.path} hashes to {state.sha256[:16]}…, a hash fleet did "
                         "not offer for it", host=host, section="env",
                         hint="something on the host prints to stdout besides the script")
    return replace(kept, present=True, mode=state.mode, owner=state.owner, group=state.group, size=state.size)


def _payload(change: Change) -> EnvFilePayload:
    if not isinstance(change.payload, EnvFilePayload):
        raise FleetError(f"{change.id} carries no env file to write")  # only a Change built by hand lacks it
    return change.payload


def _declared(desired: Desired, change: Change) -> EnvFile | None:
    return next((e for e in desired.env_files if e.path == change.target and change.host in e.hosts), None)


def _key_changes(keys: tuple[KeyChange, ...]) -> str:
    parts = []
    for key, op, before, after in keys[:_MAX_KEYS_SHOWN]:
        if op == "remove":
            parts.append(f"removed {key}")
        elif op == "set":
            parts.append(f"added {key}: {after}")
        else:
            parts.append(f"{key}: {before} → {after}")
    if len(keys) > _MAX_KEYS_SHOWN:
        parts.append(f"… and {len(keys) - _MAX_KEYS_SHOWN} more")
    return "; ".join(parts)


def desired_env_items(ef: EnvFile, host: str, secrets: Mapping[tuple[str, str], str]) -> list[tuple[str, str]]:
    """The key/values fleet writes into `ef` on `host` ("present" secrets are kept by the
    writer from the host's own file and are not in this list)."""
    items = list(ef.values_for(host).items())
    for key, src in ef.sensitive:
        if src.kind != "present" and (ef.name, key) in secrets:
            items.append((key, secrets[(ef.name, key)]))
    return items


def env_digest(ef: EnvFile, host: str, secrets: Mapping[tuple[str, str], str],
               fingerprints: tuple[tuple[str, str], ...] | None = None) -> str:
    """A hash of exactly what fleet would write into `ef` on `host`, computed over secret
    fingerprints rather than values, so it can be stored in a plan and re-checked at apply."""
    lines = [f"{k}={v}" for k, v in ef.values_for(host).items()]
    lines += [f"{k}=sha256:{fp}" for k, fp in (fingerprints if fingerprints is not None
                                              else secret_fingerprints(ef, secrets))]
    return sha256_hex("\n".join(lines))


def secret_fingerprints(ef: EnvFile, secrets: Mapping[tuple[str, str], str],
                        cache: dict[str, Any] | None = None) -> tuple[tuple[str, str], ...]:
    """(key, fingerprint of its value) of each sensitive key of `ef` fleet writes, in order.
    `cache`: a diff()'s memo (one set of secrets): the same for every host of the file, so each
    value is fingerprinted once per diff, not twice per host."""
    memo: dict[int, tuple[EnvFile, tuple[tuple[str, str], ...]]] | None = \
        cache.setdefault("env file fingerprints", {}) if cache is not None else None
    hit = memo.get(id(ef)) if memo is not None else None
    if hit is not None and hit[0] is ef:  # the entry holds ef: its id is not reused meanwhile
        return hit[1]
    out = tuple((k, fingerprint(secrets[(ef.name, k)])) for k, src in ef.sensitive
                if src.kind != "present" and (ef.name, k) in secrets)
    if memo is not None:
        memo[id(ef)] = (ef, out)
    return out


def same_secret(have: str, want: str) -> bool:
    """Does the fingerprint a host reported (`have`) match `want`, a full sha256?  An observation
    kept in the journal or a status document holds only its first 8 hex digits, "sha256:…"
    (fleet/snapshot.py): a plan made from it (`--observed`) compares those."""
    if have.startswith("sha256:") and len(have) == 15:
        return want.startswith(have[7:])
    return have == want


# A declared env file missing on a host: its write is the same on every host that must hold the
# same values but for the host's name (a first install of 1,000 hosts made it 1,000 times), so
# it is made once per file and values and copied.  (file's id, its values there) -> (the file,
# the change made for the first such host).
_MISSING = "env file: missing"


def _env_change(ef: EnvFile, ctx: HostDiff) -> Change | None:
    host = ctx.host
    obs = ctx.state.env_file(ef.path)
    want_values = ef.values_for(host)
    if obs is not None and (obs.present or obs.keys or obs.values or obs.secrets):
        return _env_change_of(ef, ctx, obs, want_values)
    missing: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[EnvFile, Change | None]] | None = \
        ctx.cache.get(_MISSING)
    if missing is None:
        missing = ctx.cache[_MISSING] = {}
    key = (id(ef), tuple(want_values.items()))
    hit = missing.get(key)
    if hit is not None and hit[0] is ef and hit[1] is not None:
        c = hit[1]
        return Change(host, c.action, c.target, c.reason, c.service, before=c.before, after=c.after, payload=c.payload)
    problems = len(ctx.problems)
    made = _env_change_of(ef, ctx, obs or EnvFileState(path=ef.path, present=False), want_values)
    if hit is None or hit[0] is not ef:
        copyable = made is not None and len(ctx.problems) == problems \
            and host not in made.reason + made.before + made.after
        missing[key] = (ef, made if copyable else None)
    return made


def _env_change_of(ef: EnvFile, ctx: HostDiff, obs: EnvFileState, want_values: dict[str, str]) -> Change | None:
    host, secrets, problems = ctx.host, ctx.secrets, ctx.problems
    sensitive = dict(ef.sensitive)
    fingerprints = secret_fingerprints(ef, secrets, ctx.cache)
    want_secret = dict(fingerprints)
    have_values, have_secret = obs.value_map(), obs.secret_map()
    keys: list[KeyChange] = []

    def shown(key: str, value: str | None, fp: str | None) -> str:
        if fp is not None:
            return f"(sensitive, sha256:{fp.removeprefix('sha256:')[:8]})"
        return "" if value is None else value

    for k, v in want_values.items():
        if k in have_secret:  # the host holds it under a secret-looking name; compare by fingerprint
            if not same_secret(have_secret[k], fingerprint(v)):
                keys.append(KeyChange(k, "change", shown(k, None, have_secret[k]), mask(v)))
        elif k not in have_values:
            keys.append(KeyChange(k, "set", "", v))
        elif have_values[k] != v:
            keys.append(KeyChange(k, "change", have_values[k], v))
    for k, fp in want_secret.items():
        if k not in have_secret and k not in have_values:
            keys.append(KeyChange(k, "set", "", shown(k, None, fp)))
        elif k not in have_secret or not same_secret(have_secret[k], fp):
            before = shown(k, None, have_secret[k]) if k in have_secret else mask(have_values[k])
            keys.append(KeyChange(k, "change", before, shown(k, None, fp)))
    for k, src in ef.sensitive:
        if src.kind == "present" and k not in have_secret and k not in have_values and obs.present:
            problems.append(f"on {host}, {ef.path} lacks {k}, declared \"present\" (fleet never writes its value): "
                            "add it on the host by hand")
    for k in dict.fromkeys(obs.keys):
        if k not in want_values and k not in sensitive:
            before = shown(k, have_values.get(k), have_secret.get(k))
            keys.append(KeyChange(k, "remove", before, ""))
    reasons = []
    if not obs.present:
        reasons.append("file is missing")
    elif keys:
        reasons.append(f"{len(keys)} key(s) differ")
    if obs.present and len(obs.keys) != len(set(obs.keys)):
        reasons.append("a key appears more than once")
    if obs.present and obs.invalid_lines:
        reasons.append(f"{obs.invalid_lines} line(s) are not KEY=value")
    mode = ef.mode if len(ef.mode) == 4 else "0" + ef.mode
    meta_wrong = obs.present and (obs.mode != mode or (ef.owner and obs.owner != ef.owner)
                                  or (ef.group and obs.group != ef.group))
    if meta_wrong:
        reasons.append(f"owner/mode {obs.owner}:{obs.group} {obs.mode}, should be "
                       f"{ef.owner or obs.owner}:{ef.group or obs.group} {mode}")
    if not reasons:
        return None
    return Change(host, Action.WRITE_ENV, ef.path, "; ".join(reasons), None,
                  before="absent" if not obs.present else f"{len(obs.keys)} keys, {obs.owner}:{obs.group} {obs.mode}",
                  after=f"{len(want_values) + len(sensitive)} keys, {ef.owner or 'root'}:{ef.group or 'root'} {mode}",
                  payload=EnvFilePayload(keys=tuple(keys), content_hash=env_digest(ef, host, secrets, fingerprints),
                                         name=ef.name, owner=ef.owner or "", group=ef.group or "", mode=mode))
