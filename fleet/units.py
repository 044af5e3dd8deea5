"""The unit files fleet writes for a service: a pure function of the declaration.

The text is deterministic (same declaration, same bytes), so a hash comparison with what the
collector saw on a host says whether the unit must be rewritten.  A service's files are its unit
(for a template, the template file its instances load) and its wrapper's; the text is either
rendered from the keyed `unit_file` form or the operator's own (written byte for byte).
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Iterable
from functools import lru_cache

from fleet.mastodon import looks_secret
from fleet.model import Service, UnitState, instance_of, template_of
from fleet.textutil import mask, sha256_hex
from fleet.unitfile import literal_percent

UNIT_DIR = "/etc/systemd/system"


def unit_path(unit: str) -> str:
    return f"{UNIT_DIR}/{unit}"


def _own_names(unit: str) -> tuple[str, ...]:
    """The unit's own file name, and its template's for an instance (`a@1.service` → `a@.service`)."""
    if "@" in unit and "." in unit:
        return unit, unit[:unit.index("@") + 1] + unit[unit.rindex("."):]
    return (unit,)


def removable_unit_file(path: str, unit: str) -> bool:
    """May fleet remove `path`, which a host reports as a file of `unit` (its FragmentPath or a
    DropInPaths entry)?  A host's report is data, and may lie (`/etc/systemd/system/../../etc/
    shadow`): only a plain file of this very unit directly in UNIT_DIR (the fragment) or a
    `*.conf` directly in UNIT_DIR/UNIT.d/ (a drop-in) is fleet's to remove.  The one rule for
    every removal a host's report decides (diff's prunes and rewrites, the executor, saved plans)."""
    if not path or any(ord(c) < 32 or c == "\x7f" for c in path) or posixpath.normpath(path) != path:
        return False
    names = _own_names(unit)
    parent, name = posixpath.split(path)
    if parent == UNIT_DIR:
        return name in names
    top, directory = posixpath.split(parent)
    return (top == UNIT_DIR and directory in {n + ".d" for n in names}
            and name.endswith(".conf") and name != ".conf")


def refused_unit_files(unit: str, paths: Iterable[str]) -> tuple[str, ...]:
    """The paths in fleet's unit directory that a host reports for `unit` and that fleet still
    may not remove (see removable_unit_file): reported, never touched."""
    return tuple(p for p in paths if p.startswith(UNIT_DIR + "/") and not removable_unit_file(p, unit))


def _literal(value: str) -> str:
    """A path fleet also writes itself (an env file): systemd must read exactly it, so every %
    is literal (%%), never a specifier."""
    return value.replace("%", "%%")


def _env_assignment(key: str, value: str) -> str:
    # systemd expands %-specifiers in Environment=: the operator's (%i for a template's instance)
    # pass, a % that starts none is doubled.  Quoting the whole assignment keeps spaces;
    # backslashes and quotes are escaped C-style.
    v = literal_percent(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{key}={v}"'


# A service's unit is the same on each of its hosts: rendered once.  Looked up first by the
# service object itself (the diff asks once per host for the same object): an lru_cache alone
# hashes the frozen Service — every host name it lists — on every call, 20,000 times at 1,000
# hosts × 20 services.  The entry holds the service, so its id is not reused while it is kept.
_RENDERED: dict[int, tuple[Service, str]] = {}


def render_unit(service: Service) -> str:
    """The unit file text for a managed service (a template's: the template file).  Raises
    ValueError for observe-only ones."""
    hit = _RENDERED.get(id(service))
    if hit is not None and hit[0] is service:
        return hit[1]
    text = _render_unit(service)
    if len(_RENDERED) >= 4096:
        _RENDERED.clear()
    _RENDERED[id(service)] = (service, text)
    return text


@lru_cache(maxsize=4096)  # equal services (a desired state loaded again) rendered once
def _render_unit(service: Service) -> str:
    spec = service.unit_spec
    if spec is None:
        raise ValueError(f"service {service.name} is observe-only: fleet never writes its unit")
    if spec.text is not None:
        return spec.text  # the operator's: byte for byte
    lines = [
        f"# Managed by fleet (service {service.name}). Local edits are overwritten by `fleet apply`.",
        "[Unit]",
        f"Description={literal_percent(spec.description or service.name)}",
    ]
    if spec.after:
        lines.append(f"After={' '.join(spec.after)}")
    lines += ["", "[Service]", "Type=simple"]
    if spec.user:
        lines.append(f"User={spec.user}")
    if spec.group:
        lines.append(f"Group={spec.group}")
    if spec.working_directory:
        lines.append(f"WorkingDirectory={literal_percent(spec.working_directory)}")
    for key, value in spec.environment:
        lines.append(f"Environment={_env_assignment(key, value)}")
    for path in spec.environment_files:
        lines.append(f"EnvironmentFile={_literal(path)}")
    lines.append(f"ExecStart={spec.exec_start}")
    if spec.exec_reload:
        lines.append(f"ExecReload={spec.exec_reload}")
    if spec.restart:
        lines.append(f"Restart={spec.restart}")
    if spec.restart_sec:
        lines.append(f"RestartSec={spec.restart_sec}")
    if spec.wanted_by:
        lines += ["", "[Install]", f"WantedBy={' '.join(spec.wanted_by)}"]
    return "\n".join(lines) + "\n"


def file_text(service: Service, unit: str) -> str | None:
    """The text fleet writes for `unit`, one of the service's unit files (its unit or its
    wrapper's); None when the service writes no such file."""
    if service.unit_spec is not None and unit == service.unit:
        return render_unit(service)
    if service.wrapper is not None and unit == service.wrapper.unit:
        return service.wrapper.unit_spec.text
    return None


def unit_files(service: Service, host: str) -> tuple[tuple[str, str, str], ...]:
    """(file's unit, its text, the unit whose state shows that file on `host`) for each unit file
    the service writes: the fragment of an instance is its template's file, so a template is
    judged by its first instance on the host."""
    out = []
    if service.unit_spec is not None:
        probe = service.units_on(host)[:1] or (service.unit,)
        out.append((service.unit, render_unit(service), probe[0]))
    if service.wrapper is not None and service.wrapper.unit_spec.text is not None:
        out.append((service.wrapper.unit, service.wrapper.unit_spec.text, service.wrapper.unit))
    return tuple(out)


def unit_file_texts(u: UnitState) -> dict[str, str]:
    """path -> text of each file of `u` (fragment, then drop-ins) that came back byte for byte in
    its dump (`# PATH` then the file, fleet/collect/parse.py), checked against the file's sha256.
    A file whose text did not (a masked secret, no final newline) is missing, and so is every file
    after it: where it ends cannot be told."""
    if u.text is None:
        return {}
    out: dict[str, str] = {}
    pos = 0
    files = list(u.file_hashes)
    for i, (path, want) in enumerate(files):
        head = f"# {path}\n"
        if not u.text.startswith(head, pos):
            break
        start = pos + len(head)
        if i + 1 == len(files):
            ends = [len(u.text)]
        else:
            nxt = f"# {files[i + 1][0]}\n"
            ends = _all(u.text, nxt, start)
        end = next((e for e in ends if sha256_hex(u.text[start:e]) == want), None)
        if end is None:
            break
        out[path] = u.text[start:end]
        pos = end
    return out


def _all(text: str, needle: str, start: int) -> list[int]:
    found = []
    i = text.find(needle, start)
    while i >= 0:
        found.append(i)
        i = text.find(needle, i + 1)
    return found


def desired_text_hash(service: Service, content_hash: str | None = None, unit: str | None = None) -> str:
    """The text hash the collector would report for this unit once fleet has written it
    (fragment in /etc/systemd/system, no drop-ins); see fleet.collect.parse.  `content_hash`:
    sha256 of `render_unit(service)`, when the caller has it already; `unit`: another of the
    service's unit files (its wrapper's)."""
    unit = unit or service.unit
    path = unit_path(unit)
    return sha256_hex(f"{path} {content_hash or sha256_hex(file_text(service, unit) or '')}")


def as_observed_text(service: Service, unit: str | None = None) -> str:
    """The rendered unit in the collector's `systemctl cat`-like form, for unified diffs."""
    unit = unit or service.unit
    return f"# {unit_path(unit)}\n{file_text(service, unit) or ''}"


def masked_environment(value: str) -> tuple[tuple[str, str], ...]:
    """KEY=value pairs of an `Environment=` value (systemd's quoting), secret-looking values
    replaced by their mask at once."""
    try:
        words = shlex.split(value)
    except ValueError:
        words = value.split()
    out = []
    for w in words:
        k, sep, v = w.partition("=")
        if sep:
            masked = looks_secret(k) and v != "(masked-on-host)"
            out.append((k, mask(v) if masked else v))
    return tuple(out)


def mask_unit_text(text: str) -> str:
    """A hand-edited unit may carry a secret in Environment=: mask it before the text is kept
    anywhere (plans show unit texts as diffs).  An assignment continued on the next lines (a
    trailing backslash, fleet/unitfile.py) is masked on every one of its lines."""
    lines = []
    cont = False  # inside an Environment= assignment continued from the line before
    for line in text.split("\n"):
        stripped = line.lstrip()
        env = stripped.startswith("Environment=")
        if env or (cont and not stripped.startswith(("#", ";"))):
            body = stripped[len("Environment="):] if env else stripped
            more = _continued(body)
            words = body[:-1] if more else body
            pairs = masked_environment(words)
            if any(looks_secret(k) for k, _ in pairs):
                line = ("Environment=" if env else "  ") + " ".join(f'"{k}={v}"' for k, v in pairs) + (
                    " \\" if more else "")
            cont = more
        lines.append(line)
    return "\n".join(lines)


def _continued(line: str) -> bool:
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def drop_in_dir(unit: str) -> str:
    """The directory of the unit's drop-ins that fleet may own: `/etc/systemd/system/UNIT.d`."""
    return f"{unit_path(unit)}.d"


def foreign_drop_ins(service: Service, unit: str, u: UnitState) -> tuple[str, ...]:
    """The drop-ins `u` loads that the rewrite of the service's file `unit` would answer for: all of
    them, unless the service declares its drop-ins (`dropins`): then those in the unit's own
    directory are the drop-in resource's to write and remove (fleet/resources/drop_ins.py)."""
    if service.dropins is None or unit != service.unit:
        return u.drop_in_paths
    own = drop_in_dir(unit) + "/"
    return tuple(p for p in u.drop_in_paths if not p.startswith(own))


def unit_file_differs(service: Service, u: UnitState | None, content_hash: str | None = None,
                      unit: str | None = None) -> bool:
    """Would fleet rewrite this managed unit file?  Drop-ins outside /etc/systemd/system (a
    package's, `systemctl edit --runtime`) are not fleet's to remove, so only the fragment and
    drop-ins in fleet's own directory count.  `content_hash`: sha256 of the file's text, when
    the caller has it already (a plan asks for every host of a service).  `unit`: which of the
    service's files (default its unit; for a template, `u` is one of its instances)."""
    unit = unit or service.unit
    if u is None or not u.exists or any(removable_unit_file(p, unit) for p in foreign_drop_ins(service, unit, u)):
        return True
    want = content_hash or sha256_hex(file_text(service, unit) or "")
    if u.file_hashes:
        fragment = dict(u.file_hashes).get(u.fragment_path)
        return u.fragment_path != unit_path(unit) or fragment != want
    return u.text_hash != desired_text_hash(service, want, unit)  # plain data without per-file hashes


def is_up(service: Service, u: UnitState) -> bool:
    """Does `u`, one of the service's units, run as declared?  active/running; an observe-only
    unit may be active/exited (Debian's postgresql.service parent), and so may a unit whose text
    says Type=oneshot with RemainAfterExit=yes."""
    if u.active_state != "active":
        return False
    spec = service.wrapper.unit_spec if service.wrapper is not None and u.unit == service.wrapper.unit \
        else service.unit_spec
    return u.sub_state == "running" or service.observe_only or (spec is not None and spec.remain_after_exit)


def up_state(service: Service, unit: str) -> str:
    """How the unit looks when it is up, as a plan says it will be."""
    spec = service.wrapper.unit_spec if service.wrapper is not None and unit == service.wrapper.unit \
        else service.unit_spec
    return "active/exited" if spec is not None and spec.remain_after_exit else "active/running"


def not_there(u: UnitState | None) -> bool:
    """Is nothing of this unit on the host: not reported, or not found with no unit file state,
    no drop-in, no text, not active?  What fleet does for such a unit depends on its service
    alone (fleet/resources/unit_file.py and unit_state.py copy it from host to host)."""
    return u is None or (u.load_state in ("not-found", "") and not u.unit_file_state and not u.drop_in_paths
                         and u.text is None and u.active_state != "active")


def describe_unit(u: UnitState | None) -> str:
    """`active/running, enabled, -c 10 -q default` — what a reader needs to recognise it."""
    if u is None or not u.exists:
        return "not installed"
    parts = [u.state(), u.unit_file_state or "no unit file"]
    args = _interesting_args(u.exec_start)
    if args:
        parts.append(f"`{args}`")
    return ", ".join(parts)


def _interesting_args(argv: tuple[str, ...]) -> str:
    """The part of a command line that tells processes apart (Sidekiq's -c/-q, puma's -C)."""
    if not argv:
        return ""
    for i, a in enumerate(argv):
        if a.startswith("-"):
            return shlex.join(argv[i:])
    return ""


def instance_owner(services: Iterable[Service], unit: str) -> Service | None:
    """The observe-only service an instance unit is part of: Debian's `postgresql@15-main.service`
    is what its `postgresql.service` parent runs.  Only a distro parent hides its instances: an
    instance of a unit fleet manages (`mastodon-streaming@4002.service` next to a declared
    `mastodon-streaming@.service` or `mastodon-streaming.service`) is declared or shown."""
    if instance_of(unit) is None:
        return None
    stem = unit.split("@", 1)[0]
    return next((s for s in services if s.observe_only and s.unit.rsplit(".", 1)[0] == stem), None)


def prunable_files(u: UnitState) -> tuple[str, ...]:
    """The files a prune of `u` removes: its own fragment and the drop-ins of its own directory.
    An instance shares its template's file and drop-ins (`x@.service`, `x@.service.d/`) with the
    other instances, declared ones included: a prune of one instance never removes them."""
    own = (u.unit,) if template_of(u.unit) is not None else None
    files = (u.fragment_path, *u.drop_in_paths)
    if own is None:
        return tuple(p for p in files if p and removable_unit_file(p, u.unit))
    return tuple(p for p in files if p and removable_unit_file(p, u.unit)
                 and posixpath.basename(p if p == u.fragment_path else posixpath.dirname(p)).removesuffix(".d")
                 == u.unit)
