"""The shell commands `fleet apply` runs on a host, built as strings.  Pure.

Every value that reaches the remote shell goes through `q` (shlex.quote); file contents travel
on stdin, never on a command line (so secrets never show in a process list).  Each builder
prints a `@@…` result line the executor checks, so a failure is never mistaken for success.
"""

from __future__ import annotations

import json
import shlex

from fleet.model import HealthCheck

STATE = "/var/lib/fleet"
LOCK = f"{STATE}/lock"
BACKUPS = f"{STATE}/backup"

q = shlex.quote


def backup_name(path: str) -> str:
    """A flat file name for a backup of `path` (slashes become %2F, % becomes %25)."""
    return path.replace("%", "%25").replace("/", "%2F")


def write_file(path: str, *, mode: str, run_id: str, owner: str | None = None, group: str | None = None,
               keep_keys: tuple[str, ...] = (), sha256: str | None = None) -> str:
    """Atomically replace `path` with stdin: temp file in the same directory, mode and owner set,
    then rename.  The previous file is kept in the run's backup directory for rollback.
    `keep_keys`: env keys whose lines are carried over from the old file (values fleet never
    sees: secrets declared "present").  `sha256`: the content's hash, checked before the rename."""
    p, bdir = q(path), q(f"{BACKUPS}/{run_id}")
    backup = q(f"{BACKUPS}/{run_id}/{backup_name(path)}")
    lines = [
        "set -e",
        "umask 077",
        f"mkdir -p {bdir}",
        f"if [ -e {p} ]; then cp -p -- {p} {backup}; else : > {backup}.absent; fi",
        f'tmp=$(mktemp -- "$(dirname -- {p})/.fleet.XXXXXX")',
        "trap 'rm -f -- \"$tmp\"' EXIT",
        'cat > "$tmp"',
    ]
    if sha256 is not None:  # a connection lost mid-transfer must not install a truncated file
        lines.append(f'set -- $(sha256sum "$tmp"); [ "$1" = {q(sha256)} ] || '
                     '{ echo "the content arrived incomplete; nothing was replaced" >&2; exit 1; }')
    if keep_keys:
        keys = " " + " ".join(keep_keys) + " "
        lines.append(
            f"if [ -f {p} ]; then awk -v keys={q(keys)} "
            "'{ l = $0; sub(/^[ \\t]*(export[ \\t]+)?/, \"\", l); k = l; sub(/[ \\t]*=.*/, \"\", k); "
            f"if (index(l, \"=\") && k !~ /[ \\t]/ && index(keys, \" \" k \" \")) print $0 }}' {p} >> \"$tmp\"; fi"
        )
    lines.append(f'chmod {q(mode)} "$tmp"')
    if owner or group:
        lines.append(f'chown {q((owner or "") + (":" + group if group else ""))} "$tmp"')
    else:  # keep the owner the file had
        lines.append(f'if [ -e {p} ]; then chown --reference={p} "$tmp"; fi')
    lines += [f'mv -f -- "$tmp" {p}', "trap - EXIT", "echo @@ok"]
    return "\n".join(lines) + "\n"


def restore_file(path: str, *, run_id: str) -> str:
    """Put `path` back as it was before this run wrote it (or remove it if it did not exist)."""
    p = q(path)
    backup = q(f"{BACKUPS}/{run_id}/{backup_name(path)}")
    return (f"set -e\nif [ -e {backup} ]; then cp -p -- {backup} {p}; "
            f"elif [ -e {backup}.absent ]; then rm -f -- {p}; fi\necho @@ok\n")


def remove_files(paths: tuple[str, ...], *, run_id: str) -> str:
    """Remove unit files/drop-ins, keeping backups."""
    if not paths:
        return "echo @@ok\n"
    bdir = f"{BACKUPS}/{run_id}"
    lines = ["set -e", "umask 077", f"mkdir -p {q(bdir)}"]
    for path in paths:
        lines.append(f"if [ -e {q(path)} ]; then cp -p -- {q(path)} {q(bdir + '/' + backup_name(path))}; "
                     f"rm -f -- {q(path)}; fi")
    lines.append("echo @@ok")
    return "\n".join(lines) + "\n"


def systemctl(verb: str, unit: str | None = None) -> str:
    target = f" -- {q(unit)}" if unit else ""
    return f"systemctl {verb}{target} && echo @@ok\n"


def reset_failed(unit: str) -> str:
    """Forget a unit's failed state and start-limit counter (never fails)."""
    return f"systemctl reset-failed -- {q(unit)} 2>/dev/null; "


def prune(unit: str, steps: tuple[str, ...], files: tuple[str, ...], *, run_id: str) -> str:
    """Stop, disable and (if fleet may) remove an undeclared unit, then reload systemd."""
    parts = ["set -e"]
    if "stop" in steps:
        parts.append(f"systemctl stop -- {q(unit)}")
    if "disable" in steps:
        parts.append(f"systemctl disable --quiet -- {q(unit)}")
    if "remove" in steps:
        parts.append(remove_files(files, run_id=run_id).replace("set -e\n", "").replace("echo @@ok\n", ""))
        parts.append("systemctl daemon-reload")
    parts.append("echo @@ok")
    return "\n".join(parts) + "\n"


def health_gate(unit: str, check: HealthCheck | None, *, settle: float, start_timeout: float,
                then: str = "") -> str:
    """After a start/restart: the unit must reach active (running, or exited for oneshot-style
    distro units such as Debian's postgresql.service), stay there
    without restarting for `settle` seconds, then the health check must pass within its timeout
    while the unit stays up (a stop or restart meanwhile fails the gate at once, with that reason).
    `then`: shell run last, which may use `$p0` (the unit's MainPID) and `up` (fails the gate if
    the unit stopped or restarted) — the Sidekiq check, whose output the caller judges.
    Prints `@@gate ok` or `@@gate fail REASON` followed by the unit's last journal lines; a fail
    line wins over an ok line that a subshell's failure is followed by."""
    u = q(unit)
    lines = [
        f"u={u}",
        "st() { systemctl show -p ActiveState -p SubState -p NRestarts -p MainPID -- \"$u\" | "
        "{ while IFS== read -r k v; do case $k in ActiveState) a=$v;; SubState) s=$v;; NRestarts) n=$v;; "
        "MainPID) p=$v;; esac; done; echo \"$a $s $n $p\"; }; }",
        "fail() { echo \"@@gate fail $1\"; journalctl -u \"$u\" -n 15 --no-pager -o short-iso 2>/dev/null "
        "| sed 's/^/| /'; exit 0; }",
        f"end=$(( $(date +%s) + {int(start_timeout) + 1} ))",
        "while :; do set -- $(st); case \"$1 $2\" in 'active running'|'active exited') break;; "
        "failed\\ *) fail \"unit failed to start ($1/$2)\";; esac; "
        "[ $(date +%s) -lt $end ] || fail \"unit did not reach active/running within "
        f"{int(start_timeout)}s (now $1/$2)\"; sleep 0.2; done",
        "n0=$3; p0=$4",
        # still up, as the same process? A counted restart is named first: a crash loop caught
        # between two of its restarts (activating/auto-restart) is a restart, not a stop.
        "up() { set -- $(st); r=\"(NRestarts $n0 -> $3, MainPID $p0 -> $4)\"; "
        "[ \"$3\" = \"$n0\" ] || fail \"unit restarted $when $r\"; "
        "[ \"$1\" = active ] || fail \"unit stopped $when (now $1/$2)\"; "
        "[ \"$4\" = \"$p0\" ] || fail \"unit restarted $when $r\"; }",
        f"sleep {settle:g}",
        "when='during the settle period'; up",
    ]
    if check is not None and not check.sidekiq:
        t = int(check.timeout)
        if check.http is not None:
            probe = f"curl -fsS -o /dev/null -m 3 {q(check.http)}"
        elif check.tcp is not None:
            probe = f"timeout 3 bash -c {q(f'exec 3<>/dev/tcp/127.0.0.1/{check.tcp}')}"
        else:
            probe = f"timeout {t} sh -c {q(check.command or 'true')}"
        # While waiting for the check, keep watching the unit: a unit that dies or restarts meanwhile
        # fails at once with that reason, not after the whole timeout as "did not pass".
        lines += [
            f"hend=$(( $(date +%s) + {t} ))",
            "when='before its health check passed'",
            f"until {probe} >/dev/null 2>&1; do up; [ $(date +%s) -lt $hend ] || "
            f"fail {q(f'health check {check.describe()} did not pass within {t}s')}; sleep 0.5; done",
        ]
    if then:
        lines += ["when='before its Sidekiq heartbeat was read'", then]
    lines.append("echo '@@gate ok'")
    return "\n".join(lines) + "\n"


def acquire_lock(holder_json: str) -> str:
    """mkdir is atomic: the first apply to create the lock directory holds the host."""
    return (f"mkdir -p {q(STATE)} && chmod 700 {q(STATE)} && if mkdir {q(LOCK)} 2>/dev/null; then "
            f"printf '%s\\n' {q(holder_json)} > {q(LOCK + '/holder')} && echo @@locked; "
            f"else echo @@held; cat {q(LOCK + '/holder')} 2>/dev/null; fi\n")


def _ours(token: str) -> str:
    """A test that the lock's holder record carries exactly our token (see apply.holder_info)."""
    return f"grep -qF -- {q(json.dumps({'token': token})[1:-1])} {q(LOCK + '/holder')} 2>/dev/null"


def release_lock(token: str) -> str:
    """Release only our own lock: another apply's lock is never removed by a release."""
    return f"if {_ours(token)}; then rm -rf -- {q(LOCK)}; fi; echo @@ok\n"


def update_lock(holder_json: str, token: str) -> str:
    """Rewrite the holder of a lock we hold (to add the run and plan ids)."""
    h = q(LOCK + "/holder")
    return (f"if {_ours(token)}; then printf '%s\\n' {q(holder_json)} > {h}.new && "
            f"mv -f {h}.new {h}; fi; echo @@ok\n")


def read_lock() -> str:
    return f"if [ -d {q(LOCK)} ]; then echo @@held; cat {q(LOCK + '/holder')} 2>/dev/null; else echo @@free; fi\n"


def break_lock() -> str:
    return f"rm -rf -- {q(LOCK)} && echo @@ok\n"
