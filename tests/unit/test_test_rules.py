"""The rules the test suite enforces on itself (tests/conftest.py): under CI no test may skip.

Each test runs pytest on throwaway test files with a copy of the repository's root conftest, once
as CI runs it and once as a developer's machine does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SKIPPING = {
    "test_skips.py": """
import shutil
import pytest

def test_calls_skip():
    pytest.skip("needs a unicorn")

@pytest.mark.skipif(True, reason="the machine lacks a unicorn")
def test_skipped_by_a_marker():
    pass

@pytest.fixture
def unicorn():
    pytest.skip("no unicorn fixture here")

def test_skipped_by_its_fixture(unicorn):
    pass

@pytest.mark.xfail(reason="flaky unicorn")
def test_xfails_without_strict():
    assert False

def test_xfails_imperatively():
    pytest.xfail("an imperative xfail")
""",
    "test_module_skip.py": """
import pytest
pytest.importorskip("no_such_module_fleet_needs")

def test_never_collected():
    pass
""",
}

ALLOWED = """
import pytest

def test_passes():
    pass

@pytest.mark.xfail(strict=True, reason="bug: a known bug, fails once fixed")
def test_a_strict_xfail_is_a_known_bug():
    assert False
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("FLEET_REQUIRE_LAB", raising=False)
    pytester.makeconftest(ROOT_CONFTEST.read_text(encoding="utf-8"))
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    # hypothesis's plugin costs seconds per session and these files do not use it.
    return suite.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)


@pytest.mark.parametrize(("var", "value"), [("CI", "true"), ("CI", "TRUE"), ("CI", "True"),
                                            ("FLEET_REQUIRE_LAB", "1")])
def test_under_ci_every_kind_of_skip_fails_naming_its_reason(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                              var: str, value: str) -> None:
    suite.makepyfile(**SKIPPING)
    monkeypatch.setenv(var, value)
    result = run(suite, "--continue-on-collection-errors")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) == 0 and outcomes.get("xfailed", 0) == 0, outcomes
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) + outcomes.get("error", 0) == 6, outcomes
    assert result.ret != 0
    out = result.stdout.str()
    for reason in ("needs a unicorn", "the machine lacks a unicorn", "no unicorn fixture here", "flaky unicorn",
                   "an imperative xfail", "no_such_module_fleet_needs"):
        assert reason in out, f"the failure does not name the skip reason {reason!r}"
    assert "where no test may skip" in out


def test_without_ci_the_same_tests_skip_with_their_reasons(suite: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    suite.makepyfile(**SKIPPING)
    monkeypatch.setenv("CI", "false")
    result = run(suite, "-rsx")
    result.assert_outcomes(skipped=4, xfailed=2)
    assert "needs a unicorn" in result.stdout.str()


def test_under_ci_a_strict_xfail_and_a_passing_test_are_fine(suite: pytest.Pytester,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    suite.makepyfile(test_allowed=ALLOWED)
    monkeypatch.setenv("CI", "true")
    result = run(suite)
    result.assert_outcomes(passed=1, xfailed=1)
    assert result.ret == 0


def test_no_test_file_checks_ci_itself() -> None:
    # One switch: a test that read CI itself could disagree with it (a case-sensitive "true").
    tests = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(tests)) for p in tests.rglob("*.py")
                 if p != ROOT_CONFTEST and p != Path(__file__).resolve()
                 and any(s in p.read_text(encoding="utf-8") for s in ('environ.get("CI"', "environ['CI']",
                                                                      'environ["CI"]', '"FLEET_REQUIRE_LAB"'))]
    assert offenders == []
