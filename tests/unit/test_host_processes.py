"""Fewer processes on the host (docs/PERFORMANCE.md, "Fifth status round"): the database host's sections
start no `head`, `cut`, `sed` or `grep` any more, and what replaced them prints what they printed.

Each replaced pipeline is kept here as it was (`OLD_…`) and run next to the section's own text on
tricky inputs, with `sh` (dash) and the machine's awk, byte for byte."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from logged_tools import logging_tools, started
from redis_server import PASSWORD, REDIS_CLI, Redis
from test_stores_script import PG, path, run, tools  # noqa: F401  (`tools`: the stand-ins' fixture)

from fleet.resources import stores
from fleet.resources.stores import Asked, ToCollect
from fleet.sidekiq import section_script as sidekiq_script

SH = shutil.which("sh") or "/bin/sh"
LOGGED = ("head", "cut", "sed", "grep")


def sh(script: str, stdin: bytes = b"", **env: str) -> bytes:
    done = subprocess.run([SH, "-c", script], input=stdin, capture_output=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ------------------------------------------------------------------ no head, cut, sed or grep


def test_the_stores_section_starts_no_head_cut_or_sed(tools: Path) -> None:  # noqa: F811
    log = logging_tools(tools / "logged", LOGGED)
    what = ToCollect((Asked(PG.unit, "postgres", 5432, probe=True), Asked("pgbouncer.service", "pgbouncer", 6432)))
    found, _ = run(what, tools, f"{tools / 'logged'}:{path(tools)}")
    assert found.units and found.clusters and found.probes  # every part ran
    assert started(log) == []


needs_redis = pytest.mark.skipif(REDIS_CLI is None, reason="needs redis-cli (scripts/setup.sh installs it)")


@needs_redis
def test_the_redis_probe_and_sidekiqs_view_start_no_head_cut_sed_or_grep(redis: Redis, tmp_path: Path) -> None:
    redis.flush()
    redis.cli("SADD", "processes", "h:1:ab")
    redis.cli("HSET", "h:1:ab", "info", "{}", "beat", "1")
    redis.cli("SADD", "queues", "default")
    redis.cli("LPUSH", "queue:default", "x")
    env = tmp_path / ".env.production"
    env.write_text(redis.env())
    log = logging_tools(tmp_path / "logged", LOGGED)
    logged = f"{tmp_path / 'logged'}:/usr/sbin:/usr/bin:/sbin:/bin"
    found, out = run(ToCollect((Asked("redis-server.service", "redis", redis.port),), str(env)), tmp_path, logged)
    assert found.redis[0].queued == 1 and PASSWORD not in out
    text = sh(sidekiq_script(str(env)), PATH=logged).decode()
    assert "\nP " in text and "\nL 1\n" in text and text.endswith("end\n") and PASSWORD not in text, text
    assert started(log) == []


# ------------------------------------------------------------------ the same output as before


def _lines(n: int, width: int = 10) -> bytes:
    return b"".join(b"%d %s\n" % (i, b"x" * width) for i in range(n))


TRICKY = [
    b"", b"\n", b"one line without a newline", b"\n\n\nblank lines\n\n", _lines(11), _lines(12), _lines(13),
    _lines(12).rstrip(b"\n"), b"y" * 299 + b"\n" + b"z" * 300 + b"\n" + b"w" * 301 + b"\n" + b"v" * 5000,
    b"tab\there\r\nCR\r\n", b"bytes \xff\xfe\xe9\xc3\xa9 \x01\x7f\n" * 3, b"back\\slash \\n \\\\ & / % $1 \"q\" 'q'\n",
    b'ERROR,"NOAUTH Authentication required."\nERROR,"x"\nexit 0\n', b"exit 124\n",
]

OLD_BOUND = 'head -n 12 | cut -c1-300 | sed "s/^/redis $1 /"'
NEW_BOUND = 'awk -v n=12 -v w=300 -v p="redis $1 " "$bound_awk"'


@pytest.mark.parametrize("text", TRICKY)
def test_one_awk_bounds_and_prefixes_as_head_cut_and_sed_did(text: bytes) -> None:
    for old, new in ((OLD_BOUND, NEW_BOUND),
                     (OLD_BOUND.replace("redis", "pg-sql").replace("12", "41"),
                      NEW_BOUND.replace("redis", "pg-sql").replace("12", "41")),
                     ("head -n 64 | cut -c1-300", 'awk -v n=64 -v w=300 -v p= "$bound_awk"')):
        script = f'set -- 6379\nbound_awk={stores.shlex.quote(stores.BOUND_AWK)}\n'
        assert sh(script + new, text) == sh(script + old, text)


OLD_UNITS_ASKED = 'head -n 64 | while read -r u l a s _; do echo "pg-unit $u $l $a $s"; done'
OLD_UNITS_FROM_SHOW_END = ("      for (i = 1; i <= n; i++) print u[i] }'"
                           ' | head -n 64 |\n  while read -r u l a s _; do echo "pg-unit $u $l $a $s"; done')
LIST_UNITS = [
    b"", b"postgresql@15-main.service    loaded active   running PostgreSQL Cluster 15-main\n",
    b"  postgresql@15-main.service\tloaded  failed failed\n\npostgresql@x.service loaded\n   \n",
    b"".join(b"postgresql@%d-main.service loaded active running X Y\n" % i for i in range(70)),
    b"a b c d e f g\r\npostgresql@a\\x2db.service \xff\n",
]


@pytest.mark.parametrize("text", LIST_UNITS)
def test_the_cluster_units_asked_of_systemd_print_as_the_read_loop_printed_them(text: bytes) -> None:
    new = stores._fill(stores._UNITS_ASKED).split("|\n", 1)[1]
    assert sh(new, text) == sh(OLD_UNITS_ASKED, text)


def test_a_backslash_is_printed_as_systemd_printed_it_where_dashs_echo_read_escapes() -> None:
    """The one difference: dash's `echo` turned `\\\\` into one backslash and `\\c` into the end of the
    output; systemd escapes a unit name with `\\xNN` only, which both print as is."""
    new = stores._fill(stores._UNITS_ASKED).split("|\n", 1)[1]
    assert sh(new, b"postgresql@a\\\\b\\c.service loaded\n") == b"pg-unit postgresql@a\\\\b\\c.service loaded  \n"


def _show(n: int) -> str:
    return "".join(f"Id=postgresql@{i:02d}-main.service\nLoadState=loaded\nActiveState=active\nSubState=running\n\n"
                   for i in reversed(range(n)))


@pytest.mark.parametrize("show", [
    "", _show(1), _show(70), "Id=postgresql@15-main.service\nLoadState=\nActiveState=a b\nSubState=\tx\n\n"
    "Id=postgresql.service\nLoadState=loaded\n\nId=postgresql@15-main.service\nLoadState=dup\n\n"
    "Id=postgresql@a\\x2db.service\nSubState=dead\nFailed to get unit\n",
])
def test_the_cluster_units_read_from_the_show_print_as_the_read_loop_printed_them(show: str) -> None:
    new = stores._fill(stores._UNITS_FROM_SHOW)
    old_end = ("      for (i = 1; i <= n && i <= 64; i++) "
               "{ $0 = u[i]; print \"pg-unit \" $1 \" \" $2 \" \" $3 \" \" $4 } }'")
    assert old_end in new
    old = new.replace(old_end, OLD_UNITS_FROM_SHOW_END)
    prefix = f"show={stores.shlex.quote(show)}\n"
    assert sh(prefix + new) == sh(prefix + old)


OLD_COUNT = """np=$(printf '%s\\n' "$out" | grep -c '^p "')
nq=$(printf '%s\\n' "$out" | grep -c '^q "')
echo "$np $nq\""""


@pytest.mark.parametrize("out", [
    'time "1","2"\nprocesses 0\nqueues 0',
    'time "1","2"\nprocesses 2\np "a:1"\np "*"\nqueues 3\nq "?"\nq "default"\nq "[a]"',
    'p "\nq "\npp "x"\n p "x"\nqq "\n\n\np "" \nq "/*"', "\n".join(f'p "h{i}:1:{i}"' for i in range(256)),
])
def test_the_shell_counts_the_members_as_grep_counted_them(out: str) -> None:
    script = sidekiq_script("/nonexistent")
    start = script.index("# the members counted by the shell")
    new = script[start:script.index("if [ \"$np\" -gt 0 ]", start)] + 'echo "$np $nq"'
    prefix = f"out={stores.shlex.quote(out)}\ncd {Path(__file__).parent}\n"  # a glob would match files here
    assert sh(prefix + new) == sh(prefix + OLD_COUNT)


OLD_ERROR = """printf 'error redis %s\\n' "$(printf '%s\\n' "$r1" | head -n 1 | cut -c7-300)\""""


@pytest.mark.parametrize("r1", ['ERROR,"NOAUTH Authentication required."', "ERROR,", "ERROR,x\nERROR,y",
                                "ERROR," + "e" * 400, 'ERROR,"WRONGPASS \\xff"\r'])
def test_a_redis_error_line_prints_as_head_and_cut_printed_it(r1: str) -> None:
    script = sidekiq_script("/nonexistent")
    line = next(x for x in script.splitlines() if x.startswith("ERROR,*) "))
    new = line[len("ERROR,*) "):].rsplit("; exit 0;;", 1)[0]
    prefix = f"r1={stores.shlex.quote(r1)}\n"
    assert sh(prefix + new) == sh(prefix + OLD_ERROR)


# ------------------------------------------------------------------ every host: hashes, Sidekiq config

OLD_HASH_PATHS = ("paths=$(printf '%s\\n' \"$show\" | awk '/^FragmentPath=./{print substr($0,14)} "
                  "/^DropInPaths=./{n=split(substr($0,13),a,\" \");for(i=1;i<=n;i++)print a[i]}')")
SHOWN = [
    "",
    "Id=a.service\nFragmentPath=\nDropInPaths=\n",
    "Id=mastodon-streaming@4000.service\nFragmentPath=/etc/systemd/system/mastodon-streaming@.service\n"
    "DropInPaths=/etc/systemd/system/mastodon-streaming@.service.d/a.conf "
    "/etc/systemd/system/mastodon-streaming@4000.service.d/b.conf\nEnvironment=A=1\n\n"
    "Id=b.service\nFragmentPath=/lib/systemd/system/b.service\nDropInPaths=/run/x.conf\t/run/y.conf  /run/z.conf \n",
    "FragmentPath=/a b/c *.service\nDropInPaths=/d/[ab].conf /e/?.conf\n FragmentPath=/indented\nxFragmentPath=/x\n"
    "Failed to get properties: Unit name a@.service is neither a valid invocation ID nor unit name.\n"
    "FragmentPath=/last/without/newline",
]


@pytest.mark.parametrize("show", SHOWN)
def test_the_shell_finds_the_files_to_hash_as_the_awk_found_them(show: str) -> None:
    from fleet.collect.script import HASH_PATHS_SH

    words = "\nprintf '<%s>\\n' $paths; [ -n \"$paths\" ] && echo nonempty; true"
    prefix = f"set -f\nshow={stores.shlex.quote(show)}\n"
    assert sh(prefix + HASH_PATHS_SH + words) == sh(prefix + OLD_HASH_PATHS + words)


def _sidekiqs(n: int, argv: str) -> str:
    return "".join(f"Id=mastodon-sidekiq-{i}@x.service\nWorkingDirectory=!/home/m/live\n"
                   f"ExecStart={{ path=/usr/bin/bundle ; argv[]={argv} ; ignore_errors=no ; pid=0 }}\n\n"
                   for i in range(n))


@pytest.mark.parametrize("show", [
    "", _sidekiqs(3, "bundle exec sidekiq -c 5"), _sidekiqs(250, "bundle exec sidekiq -C config/x.yml"),
    _sidekiqs(2, "bundle exec sidekiq -q default") + _sidekiqs(201, "/x/bin/sidekiq -r /srv/app -C=/a b.yml"),
])
def test_the_sidekiq_config_candidates_are_bounded_by_the_awk_as_head_bounded_them(show: str) -> None:
    from fleet.resources.sidekiq_config import _FIND_AWK, MAX_UNITS

    prefix = f"show={stores.shlex.quote(show)}\n"
    find = f"printf '%s\\n\\n' \"$show\" | awk -v max={MAX_UNITS} {stores.shlex.quote(_FIND_AWK)}"
    old_awk = _FIND_AWK.replace(" && ++found <= max", "")
    assert old_awk != _FIND_AWK
    old = f"printf '%s\\n\\n' \"$show\" | awk {stores.shlex.quote(old_awk)} | head -n {MAX_UNITS}"
    assert sh(prefix + find) == sh(prefix + old)
    if show:
        assert sh(prefix + find)


def test_the_hashes_part_starts_no_awk_and_the_sidekiq_config_part_no_head(tmp_path: Path) -> None:
    from fleet.collect.script import CollectSpec, script_parts

    log = logging_tools(tmp_path / "logged", (*LOGGED, "awk"))
    unit = tmp_path / "u.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    show = f"Id=u.service\nFragmentPath={unit}\nDropInPaths=\n\n" + _sidekiqs(1, "bundle exec sidekiq")
    parts = dict(script_parts(CollectSpec(units=("u.service",), kinds=(("sidekiqconf", True),))))
    out = sh(f"set -f\nshow={stores.shlex.quote(show)}\n{parts['hashes']}\n{parts['sidekiqconf']}",
             PATH=f"{tmp_path / 'logged'}:/usr/sbin:/usr/bin:/sbin:/bin").decode()
    assert f"  {unit}\n" in out and "@@sidekiqconf mastodon-sidekiq-0@x.service\n!none /home/m/live/config/" in out
    assert started(log) == ["awk"]  # the Sidekiq config's own; the hashes' paths need none


OLD_COMMANDS_AWK = (
    '/^p "/ { print "HMGET " substr($0, 3) " info busy beat quiet rss rtt_us concurrency" }\n'
    '/^q "/ { t = "\\"queue:" substr($0, 4); print "LLEN " t; print "LINDEX " t " -1" }\n'
)


@pytest.mark.parametrize("out", [
    'time "1","2"\nprocesses 1\np "h:1:ab"\nqueues 2\nq "default"\nq "mailers"',
    'p "a\\"b\\\\\\\\c"\nq "x\\"y"\nq "\\\\"\np "*"\nq "?"\nq "q \\"z"\np "-n %s %d \\\\n"\np ""\n'
    'pp "no"\n p "no"\nq "$(echo no)" `no`\nq "${HOME}"',
    "\n".join(f'q "q{i}"' for i in range(64)) + "\n" + "\n".join(f'p "h{i}:1:{"x" * 1000}"' for i in range(256)),
])
def test_the_shell_prints_the_second_rounds_commands_as_the_awk_printed_them(out: str) -> None:
    from fleet.sidekiq import _COMMANDS_SH

    prefix = "set -f\nnl='\n'\nout=$(cat)\n"  # on stdin: 256 long identities pass no argv limit
    old = f"printf '%s\\n' \"$out\" | awk {stores.shlex.quote(OLD_COMMANDS_AWK)}"
    assert sh(prefix + _COMMANDS_SH, out.encode()) == sh(prefix + old, out.encode())


@pytest.mark.parametrize("text", [b"", b"\n", b":queues:\n  - default\n", b"".join(b"- q%d\n" % i for i in range(2001)),
                                  b"\r\n\t x \\ & / \xff\n" * 3])
def test_a_config_file_prints_as_head_and_sed_printed_it_when_it_ends_with_a_newline(tmp_path: Path,
                                                                                     text: bytes) -> None:
    from fleet.resources.sidekiq_config import _PRINT_SH, MAX_LINES

    (tmp_path / "f").write_bytes(text)
    new = next(x for x in _PRINT_SH.splitlines() if 'echo "!file $f"' in x).split("; ", 1)[1].rsplit("; fi", 1)[0]
    new = new % {"lines": MAX_LINES}
    assert sh(f"f={tmp_path / 'f'}\n{new}") == sh(f"f={tmp_path / 'f'}\nhead -n {MAX_LINES} \"$f\" | sed 's/^/|/'")


def test_the_sidekiq_config_loop_splits_on_a_written_tab_as_on_printfs() -> None:
    from fleet.resources.sidekiq_config import SidekiqConfigs

    script = SidekiqConfigs().script(True)
    assert "$(printf" not in script and "while IFS='\t' read -r u wd c r; do" in script
    lines = b"u1\t+/w d\t+\t+\nu@2.service\t+\t+-C x.yml\t+ /r \n\t+\t+\t+\nu3 \t+a\tb\t+c\t+d\n"
    loop = ' read -r u wd c r; do printf "<%s|%s|%s|%s>\\n" "$u" "$wd" "$c" "$r"; done'
    assert sh("while IFS='\t'" + loop, lines) == sh("while IFS=\"$(printf '\\t')\"" + loop, lines)


def test_the_drop_ins_part_starts_nothing_where_no_directory_exists_and_prints_as_before(tmp_path: Path) -> None:
    from fleet.resources.drop_ins import DropIns

    log = logging_tools(tmp_path / "logged", LOGGED)
    logged = f"{tmp_path / 'logged'}:/usr/sbin:/usr/bin:/sbin:/bin"
    gone, there = tmp_path / "gone.service.d", tmp_path / "there.service.d"
    script = DropIns().script((str(gone), str(there)))
    assert sh(script, PATH=logged) == b"@@dropins\n" and started(log) == []
    there.mkdir()
    (there / "a.conf").write_text("[Service]\n")
    (there / "b.txt").write_text("")
    old = script.replace("[ -z \"$dd\" ] || ", "")
    assert sh(script) == sh(old) and sh(script).count(b".conf\n") == 1
