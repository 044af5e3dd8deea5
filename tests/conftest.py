"""The one switch that makes a skip a failure under CI, for every test in the repository.

Locally a test may skip when this machine lacks what it needs (root, sshd, the lab): the skip
says why.  In CI (`CI=true` in any case, as CI services set it, or `FLEET_REQUIRE_LAB=1`, which
scripts/test.sh sets) a skipped test would be a test that silently did not run, so every skip
— `pytest.skip()`, `skipif`, `importorskip`, a module-level skip, a skipping fixture, and an
`xfail` that is not strict — is reported as a failure whose message names the skip's reason.

A strict xfail stays allowed: it marks a known bug and fails as soon as the bug is fixed, so it
cannot pass silently.  Tests and conftests must not check CI themselves; they skip with a reason
and this switch decides (docs/RELIABILITY.md, "Test rules enforced").
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest
from hypothesis import settings

# No per-example time limit for hypothesis: its default deadline (200 ms) is a timing assertion,
# and under CI's load a test of the env keys' near-miss rule exceeded it once with nothing wrong.
# Speed is measured in bench/, never asserted in a test (docs/RELIABILITY.md).
settings.register_profile("fleet", deadline=None)
settings.load_profile("fleet")

pytest_plugins = ["pytester"]  # tests/unit/test_test_rules.py runs pytest on throwaway test files

SWITCH = "CI=true or FLEET_REQUIRE_LAB=1"


def skips_are_failures() -> bool:
    """True in CI: there, no test may skip."""
    return os.environ.get("CI", "").strip().lower() == "true" or os.environ.get("FLEET_REQUIRE_LAB", "").strip() == "1"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail (not strict): {report.wasxfail or 'no reason given'}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


def _strict_xfail(item: pytest.Item) -> bool:
    mark = item.get_closest_marker("xfail")
    if mark is None:  # an imperative pytest.xfail() is never strict
        return False
    return bool(mark.kwargs.get("strict", item.config.getini("xfail_strict")))


def _as_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _skip_reason(report)
    if hasattr(report, "wasxfail"):
        del report.wasxfail
    report.outcome = "failed"
    report.longrepr = f"skipped under {SWITCH}, where no test may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and skips_are_failures() and not (hasattr(report, "wasxfail") and _strict_xfail(item)):
        _as_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped and skips_are_failures():  # pytest.skip(allow_module_level=True), importorskip
        _as_failure(report)
