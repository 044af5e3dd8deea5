"""Resolving sensitive env values at plan/apply time, from the operator's side only.

Sources (declared per key in [env_files.NAME.sensitive]):
  "file"     the local secrets file (TOML: [NAME] KEY = "value"), default <state>/secrets.toml
  "env:VAR"  the operator's environment variable VAR
  "present"  never resolved: the host keeps its own value
Values are returned in memory only; nothing here prints or stores them.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path

from fleet.envfile import ENV_KEY_HINT, key_problem
from fleet.errors import FleetError
from fleet.model import Desired, Finding


def load_secrets(desired: Desired, secrets_file: Path,
                 environ: Mapping[str, str] | None = None) -> tuple[dict[tuple[str, str], str], list[Finding]]:
    """(env file name, key) -> value for every resolvable secret, plus findings for the rest."""
    env = os.environ if environ is None else environ
    findings: list[Finding] = []
    table: dict[str, object] = {}
    needs_file = any(src.kind == "file" for ef in desired.env_files for _, src in ef.sensitive)
    if needs_file and secrets_file.is_file():
        mode = secrets_file.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            findings.append(Finding("warning", "secrets.mode",
                                    f"{secrets_file} is readable by others (mode {oct(mode & 0o777)})",
                                    file=str(secrets_file), hint=f"chmod 600 {secrets_file}"))
        try:
            table = tomllib.loads(secrets_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
            # The parser's message may quote the offending line, which may hold a secret.
            where = ""
            if isinstance(e, tomllib.TOMLDecodeError):
                where = str(e)[str(e).find("(at line"):] if "(at line" in str(e) else ""
            elif isinstance(e, RecursionError):
                where = "(it nests too deeply to be read)"
            findings.append(Finding("error", "secrets.unreadable", f"cannot read the secrets file {where}".strip(),
                                    file=str(secrets_file),
                                    hint="fix its TOML syntax: [ENV_FILE_NAME] KEY = \"value\""))
            return {}, findings
    for name, section in table.items():
        for key in section if isinstance(section, dict) else ():
            problem = key_problem(key)  # the same rule as for every declared key
            if problem:
                findings.append(Finding("error", "secrets.bad-key", f"section {name!r}: {problem}",
                                        file=str(secrets_file), key=name if key_problem(name) is None else "",
                                        hint=f"rename or remove it: a key is an env variable name ({ENV_KEY_HINT})"))
    values: dict[tuple[str, str], str] = {}

    def usable(key: str, value: str, where: str, file: str) -> bool:
        """Like `fleet check` for declared values: no control character but tab and newline."""
        if any(ord(c) < 32 and c not in "\t\n" or c == "\x7f" for c in value):
            findings.append(Finding("error", "secrets.bad-value",
                                    f"{key}: the value holds a control character (NUL, CR, escape …) that no "
                                    "env file can carry", file=file, key=where,
                                    hint="fix the value (it is not shown here)"))
            return False
        return True

    for ef in desired.env_files:
        section = table.get(ef.name, {})
        for key, src in ef.sensitive:
            where = f"env_files.{ef.name}.sensitive.{key}"
            if src.kind == "env":
                assert src.var is not None
                if src.var in env:
                    if usable(key, env[src.var], where, desired.source):
                        values[(ef.name, key)] = env[src.var]
                else:
                    findings.append(Finding("error", "secrets.missing",
                                            f"{key}: environment variable {src.var} is not set",
                                            file=desired.source, key=where,
                                            hint=f"export {src.var}=… before running fleet"))
            elif src.kind == "file":
                value = section.get(key) if isinstance(section, dict) else None
                if isinstance(value, str):
                    if usable(key, value, f"{ef.name}.{key}", str(secrets_file)):
                        values[(ef.name, key)] = value
                else:
                    findings.append(Finding(
                        "error", "secrets.missing",
                        f"{key}: no value in the secrets file" + ("" if secrets_file.is_file() else " (file missing)"),
                        file=str(secrets_file), key=f"{ef.name}.{key}",
                        hint=f"add [{ef.name}] {key} = \"…\" to {secrets_file} (mode 0600), or pass --secrets FILE"))
    return values, findings


LAB_REDIS_PASSWORD_FILE = "redis-password"  # in the lab's state directory, next to the lab secrets file
LAB_REDIS_KEYS = ("REDIS_PASSWORD", "SIDEKIQ_REDIS_PASSWORD")
_LAB_PASSWORD = re.compile(r"[0-9a-f]{32,128}")


def ensure_lab_redis_password(lab_dir: Path) -> str:
    """The password of the lab's Redis (requirepass): random, made once per lab state directory and
    kept (mode 0600) like the lab's client key, so that a lab brought up again keeps it."""
    path = lab_dir / LAB_REDIS_PASSWORD_FILE
    try:
        value = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        value = ""
    except (OSError, UnicodeDecodeError):
        value = "?"
    if value and not _LAB_PASSWORD.fullmatch(value):
        raise FleetError(f"the lab's Redis password file {path} does not hold a password fleet made",
                         hint="remove it: `fleet lab up` and `fleet --lab` make a new one")
    if not value:
        import secrets as random_source  # only the lab makes secrets: `plan` need not import `random`

        value = random_source.token_hex(24)
        _write_private(path, value + "\n")
    return value


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_lab_secrets(desired: Desired, path: Path) -> bool:
    """The lab has no real secrets: make random ones for every "file" key that lacks a value,
    so that `fleet --lab plan/apply` work out of the box.  Returns True if it wrote the file.
    Only ever called for the lab's own secrets file.  A Redis password key (REDIS_PASSWORD,
    SIDEKIQ_REDIS_PASSWORD) gets the lab's Redis password instead, which `fleet lab up` gave the
    lab's Redis: the lab secrets file lives in the lab's state directory, next to it."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
        # Never overwrite what cannot be read: it may hold values someone put there on purpose.
        why = "it nests too deeply to be read" if isinstance(e, RecursionError) else "it is not a readable TOML file"
        raise FleetError(f"cannot read the lab secrets file {path}: {why}",
                         hint="fix it, or remove it to have fleet --lab generate new random secrets") from None
    import secrets as random_source  # only the lab makes secrets: `plan` need not import `random`

    changed = False
    redis_password = ""
    for ef in desired.env_files:
        section = table.setdefault(ef.name, {})
        for key, src in ef.sensitive:
            if src.kind != "file":
                continue
            if key in LAB_REDIS_KEYS:
                redis_password = redis_password or ensure_lab_redis_password(path.parent)
                if section.get(key) != redis_password:
                    section[key] = redis_password
                    changed = True
            elif not isinstance(section.get(key), str):
                section[key] = random_source.token_hex(24)
                changed = True
    if changed:
        lines = ["# Random secrets for the lab only (written by fleet --lab). Never use them elsewhere."]
        for name, section in table.items():
            lines.append(f"\n[{name}]")
            lines += [f'{k} = "{v}"' for k, v in section.items() if isinstance(v, str)]
        _write_private(path, "\n".join(lines) + "\n")
    return changed
