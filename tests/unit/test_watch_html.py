"""The status page: self-contained, every value escaped, no secret on it — and, loaded in a real
headless Chromium (Debian's, installed by scripts/setup.sh for the tests), it loads without a
single console message and its matrix shows the injected drift."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from observed import ENV_PATH
from watch_scenarios import HOSTILE_UNIT, T0, baseline, cycle, desired, incident, leaks

from fleet.audit import build_audit
from fleet.errors import FleetError
from fleet.model import HostError, HostResult
from fleet.output.html import CSS, csp_hash, status_page, write_status_page
from fleet.watch.events import Event, NotifiedState, advance

SCHEDULER = "mastodon-sidekiq-scheduler.service"
HOSTILE_TEXT = '<img src=x onerror="alert(1)"> "quoted" \'single\' & \x00\x07\u202e'


def page_for(results: dict[str, HostResult], *, previous: dict[str, HostResult] | None = None,
             extra_events: tuple[Event, ...] = ()) -> str:
    state = advance(NotifiedState(), cycle(previous or baseline(), at=T0)[0])[1]
    _, state = advance(state, cycle(results, at=T0 + 300, previous=previous or baseline())[0])
    return status_page(build_audit(desired(), results), (*state.recent, *extra_events), now=T0 + 300)


def drifted() -> dict[str, HostResult]:
    """The S3 hand edit on franz, the scheduler stopped on nietzsche, a hostile unit, an
    unreachable host with a hostile error message."""
    results = incident()
    results["freud"] = HostError("freud", "unreachable", f"freud: {HOSTILE_TEXT}", hint="is sshd running?")
    return results


# ---------------------------------------------------------------- reading a page


@dataclass
class Dom(HTMLParser):
    """The parts of a page the tests read: every element with its attributes and its text."""

    elements: list[tuple[str, dict[str, str], list[str]]] = field(default_factory=list)
    _open: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))
        if tag not in ("meta", "br", "link", "img", "input"):
            self._open.append(len(self.elements) - 1)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self.elements[self._open.pop()][0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for i in self._open:
            self.elements[i][2].append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict[str, str], str]]:
        return [(a, "".join(t)) for name, a, t in self.elements
                if name == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def cell(self, row: dict[str, str], host: str) -> tuple[dict[str, str], str]:
        """The matrix cell of `host` in the row with the attributes `row` (data-unit / data-env)."""
        rows = [i for i, (name, a, _) in enumerate(self.elements)
                if name == "tr" and all(a.get(k) == v for k, v in row.items())]
        assert len(rows) == 1, f"{len(rows)} rows match {row}"
        for name, a, t in self.elements[rows[0] + 1:]:
            if name == "tr":
                break
            if name == "td" and a.get("data-host") == host:
                return a, "".join(t)
        raise AssertionError(f"no cell for {host} in {row}")


def dom(text: str) -> Dom:
    d = Dom()
    d.feed(text)
    return d


# ---------------------------------------------------------------- the page as text


def test_the_matrix_marks_each_cell_with_its_status() -> None:
    d = dom(page_for(drifted()))
    attrs, text = d.cell({"data-unit": SCHEDULER}, "nietzsche")
    assert attrs["data-status"] == "drift" and "drift" in attrs["class"] and "should be active/running" in text
    attrs, text = d.cell({"data-env": ENV_PATH}, "franz")
    assert attrs["data-status"] == "drift" and "S3_ENABLED differs" in text
    assert d.cell({"data-env": ENV_PATH}, "fritz")[0]["data-status"] == "ok"
    assert d.cell({"data-unit": "mastodon-sidekiq.service"}, "franz")[0]["data-status"] == "unmanaged"
    assert d.cell({"data-unit": "mastodon-web.service"}, "fritz")[0]["data-status"] == "ok"
    assert d.cell({"data-unit": "mastodon-web.service"}, "freud")[0]["data-status"] == "unknown"
    assert d.cell({"data-unit": "mastodon-web.service"}, "nietzsche")[0]["data-status"] == "absent"


def test_the_page_shows_the_queues_the_findings_and_the_last_events_newest_first() -> None:
    d = dom(page_for(drifted()))
    [(_, scheduler)] = d.find("tr", data_queue="scheduler")
    assert "nobody" in scheduler
    [(_, push)] = d.find("tr", data_queue="push")
    assert "nietzsche:mastodon-sidekiq-push-pull.service" in push
    codes = [a["data-code"] for a, _ in d.find("li") if "data-code" in a]
    assert "env.not-boolean" in codes and "sidekiq.scheduler-count" in codes
    kinds = [a["data-kind"] for a, _ in d.find("li") if "data-kind" in a]
    assert kinds[0] == "finding.new" and "change.outside" in kinds and "host.unreachable" in kinds
    assert [a["data-kind"] for a, _ in dom(page_for(baseline())).find("li") if "data-kind" in a] == []


def test_every_value_is_escaped_and_nothing_can_run_or_load() -> None:
    hostile_event = Event("h", "finding.new", T0, "error", f"event {HOSTILE_TEXT}")
    page = page_for(drifted(), extra_events=(hostile_event,))
    assert "<script" not in page.lower() and "<img" not in page.lower() and "onerror=\"" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page  # the hostile unit, as text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202e]", page), "a control character reached the page"
    assert "\\x1b[31m" in page and "\\x00\\x07\\u202e" in page  # spelled out instead
    d = dom(page)
    assert any(HOSTILE_UNIT.split("<")[0] in a.get("data-unit", "") for _, a, _ in d.elements)
    assert {name for name, _, _ in d.elements} <= {"html", "head", "meta", "title", "style", "body", "header", "h1",
                                                   "h2", "p", "span", "main", "section", "div", "table", "thead",
                                                   "tbody", "tr", "th", "td", "ul", "ol", "li", "strong", "br",
                                                   "footer"}


def test_the_page_is_self_contained_and_its_policy_allows_only_its_own_style() -> None:
    page = page_for(drifted())
    d = dom(page)
    assert not [a for _, a, _ in d.elements if {"src", "href", "action", "srcset"} & set(a)]
    assert "url(" not in CSS and "@import" not in CSS
    [(csp, _)] = d.find("meta", http_equiv="Content-Security-Policy")
    assert csp["content"] == f"default-src 'none'; style-src '{csp_hash()}'; base-uri 'none'; form-action 'none'"
    [(_, style)] = d.find("style")
    assert style == CSS
    assert d.find("meta", name="viewport")[0][0]["content"] == "width=device-width, initial-scale=1"
    assert d.find("meta", http_equiv="refresh")[0][0]["content"] == "300"


def test_no_secret_fingerprint_or_url_password_reaches_the_page() -> None:
    page = page_for(drifted())
    assert "(sensitive)" in page  # the secrets' findings are there, masked
    assert leaks(page) == []


def test_the_page_is_written_atomically_and_readable_by_a_web_server(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "www" / "fleet"
    path = write_status_page(target, "<p>first</p>")
    assert path == target / "index.html" and path.read_text() == "<p>first</p>"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    def killed(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(FleetError, match="cannot write the status page"):
        write_status_page(target, "<p>second</p>")
    monkeypatch.undo()
    assert path.read_text() == "<p>first</p>" and [p.name for p in target.iterdir()] == ["index.html"]


def test_an_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FleetError) as e:
        write_status_page(blocker / "www", "x")
    assert str(blocker) in str(e.value) and e.value.hint


# ---------------------------------------------------------------- in a real browser


@dataclass(frozen=True)
class Loaded:
    dom: str
    console: list[str]  # every console message (errors, warnings, CSP violations, logs)


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs Debian's chromium for these tests)")
    return exe


def load(page: Path, profile: Path) -> Loaded:
    """Load `page` in headless Chromium; its DOM after load and what it said on the console.
    Chromium logs every console message (and every Content-Security-Policy violation) to stderr
    as `…:CONSOLE…] "message", source: …` with --enable-logging=stderr."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=412,915",
            "--dump-dom", page.as_uri()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180,  # hang guard
                          env={**os.environ, "HOME": str(profile)})
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if re.search(r":CONSOLE\b", line)]
    return Loaded(done.stdout, console)


def test_the_browser_harness_sees_console_errors_and_policy_violations(tmp_path: Path) -> None:
    """The check below can fail: a page that breaks its own policy is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(status_page(build_audit(desired(), baseline()), now=T0).replace(
        "</body>", '<script>console.error("boom")</script><p style="color:red">x</p></body>'))
    loaded = load(bad, tmp_path / "profile")
    assert any("Content Security Policy" in line for line in loaded.console), loaded.console


def test_the_page_loads_in_headless_chromium_without_console_messages_and_shows_the_drift(tmp_path: Path) -> None:
    path = write_status_page(tmp_path / "www", page_for(drifted()))
    loaded = load(path, tmp_path / "profile")
    assert loaded.console == [], loaded.console
    d = dom(loaded.dom)
    attrs, text = d.cell({"data-env": ENV_PATH}, "franz")
    assert attrs["data-status"] == "drift" and "S3_ENABLED differs" in text
    assert d.cell({"data-unit": SCHEDULER}, "nietzsche")[0]["data-status"] == "drift"
    assert d.cell({"data-unit": "mastodon-web.service"}, "freud")[0]["data-status"] == "unknown"
    assert not d.find("script") and not d.find("img"), "hostile markup became elements"
    assert any(HOSTILE_UNIT.split("<")[0] in a.get("data-unit", "") for a, _ in d.find("tr"))
    assert leaks(loaded.dom) == []
