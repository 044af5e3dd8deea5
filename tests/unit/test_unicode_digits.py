"""Numbers read from hostile text: a host's env file, its output, a saved plan.  `str.isdigit()`
says yes to '¹', '²' or '①', on which `int()` raises: a host whose `.env.production` held
`DB_PORT=¹` made `fleet plan` crash in the moves' pending check (found by hypothesis in
test_plan.py, one unit run in several).  Each reader now takes ASCII digits only
(fleet.textutil.digits) and treats anything else as it treats any other non-number."""

from __future__ import annotations

import pytest
from observed import example

from fleet import history, policy
from fleet.actions import Action
from fleet.resources import runbook_quiet
from fleet.resources.base import PayloadError
from fleet.resources.runbook import MoveSteps
from fleet.resources.stores import _port
from fleet.textutil import digits

NOT_ASCII = ["¹", "²³", "①", "5¹", "٣", "８"]  # superscripts, circled, Arabic-Indic, fullwidth
HEX = "a" * 64


@pytest.mark.parametrize("text", NOT_ASCII + ["", " 1", "1 ", "-1", "+1", "1.0"])
def test_only_ascii_digits_are_digits(text: str) -> None:
    assert not digits(text)


@pytest.mark.parametrize("text", ["0", "5432", "0065535", "9" * 40])
def test_ascii_digits_are(text: str) -> None:
    assert digits(text) and int(text) >= 0


@pytest.mark.parametrize("port", NOT_ASCII)
def test_a_host_env_file_port_that_is_not_ascii_points_nowhere_and_raises_nothing(port: str) -> None:
    desired = example()
    setting = next(s for s in policy.STORE_SETTINGS if s.key == "DB_HOST")
    values = {"DB_HOST": "nietzsche.hachyderm.internal", "DB_PORT": port}
    hosts = policy.setting_hosts(desired, "fritz", setting, values)
    assert hosts == policy.setting_hosts(desired, "fritz", setting, {**values, "DB_PORT": "five"})


@pytest.mark.parametrize("text", NOT_ASCII)
def test_store_output_ports_that_are_not_ascii_are_no_ports(text: str) -> None:
    assert _port(text) is None
    assert _port("5432") == 5432


@pytest.mark.parametrize("text", NOT_ASCII)
def test_host_output_numbers_that_are_not_ascii_are_not_read(text: str) -> None:
    assert history.parse_appended(f"@@history {text} {HEX}\n") is None
    assert history.parse_appended(f"@@history 7 {HEX}\n") == (7, HEX)
    assert runbook_quiet.read_tstp("fritz", f"@@quiet u.service 42 {text}\n") == []
    _, _, queues = runbook_quiet.read_poll(f"{runbook_quiet.MARK} q {text} default\n")
    assert queues == {"default": None}


@pytest.mark.parametrize("text", NOT_ASCII)
def test_a_saved_plan_move_whose_port_is_not_ascii_is_refused(text: str) -> None:
    meta = {"source": "nietzsche", "source_port": text, "source_unit": "redis-server.service",
            "target": "freud", "target_port": "6379"}
    fields = {"diff": "", "keys": [], "content_hash": "", "remove_files": [], "steps": [], "meta": meta}
    with pytest.raises(PayloadError, match="not numbers"):
        MoveSteps().load(Action.MOVE_CHECK, fields)
