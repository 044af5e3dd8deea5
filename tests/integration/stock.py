"""Shaping lab hosts like a stock Mastodon install, as an operator following Mastodon's docs would.

`shape_stock(lab)` resets the hosts of the stock fleet (tests/fixtures/stock/) and installs on each
the unit files that fleet declares there, by hand — `cat > /etc/systemd/system/UNIT`,
`daemon-reload`, `enable`, `start` — with no fleet involved: the stock units of
tests/fixtures/stock/units/ (written for fleet in the shape of Mastodon 4.3's dist/ units: the
hardened web and Sidekiq units, the `mastodon-streaming@.service` template with instances 4000
and 4001, and the `mastodon-streaming.service` wrapper), and a `config/sidekiq.yml` listing every
queue in the working directory of the Sidekiq unit, which runs `bundle exec sidekiq -c 25`
without `-q`.

Every hardening directive of those units starts under the lab's nspawn hosts (measured on
systemd 252: `PrivateUsers=true`, `ProtectSystem=strict`, `ProtectProc=invisible`,
`ProcSubset=pid`, `SystemCallFilter=`, `RestrictAddressFamilies=`, `PrivateDevices=`,
`ProtectClock=`, `ProtectKernel*=` … all of them), so the units are installed unchanged.
"""

from __future__ import annotations

import base64
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from helpers import REPO, reset_host

from fleet import config
from fleet.model import Desired

STOCK = REPO / "tests" / "fixtures" / "stock"
LIVE = "/home/mastodon/live"

# Mastodon 4.x's config/sidekiq.yml shape (symbol keys, [name, weight] pairs, the scheduler
# section), written for fleet's lab: every queue Mastodon uses, served by this one process.
SIDEKIQ_YML = """\
---
# config/sidekiq.yml of fleet's stock-shaped lab: every queue Mastodon uses, with weights.
:concurrency: 5
:queues:
  - [default, 8]
  - [push, 6]
  - [ingress, 4]
  - [mailers, 2]
  - [pull]
  - [scheduler]
  - [fasp]

:scheduler:
  :listened_queues_only: true
"""


def stock_desired() -> Desired:
    loaded = config.load(STOCK / "desired_state.toml", STOCK / "hosts")
    assert loaded.desired is not None and not loaded.errors, loaded.findings
    return loaded.desired


def stock_hosts() -> list[str]:
    return [h.name for h in stock_desired().hosts]


def units_on(host: str) -> dict[str, bytes]:
    """unit name -> the stock file's bytes, for every unit file the stock fleet has on `host`."""
    out: dict[str, bytes] = {}
    for s in stock_desired().services_on(host):
        for spec, unit in ((s.unit_spec, s.unit), (s.wrapper.unit_spec if s.wrapper else None,
                                                   s.wrapper.unit if s.wrapper else "")):
            if spec is not None:
                out[unit] = (STOCK / spec.source).read_bytes()
    return out


def enabled_on(host: str) -> list[str]:
    """What an operator enables: each running unit (a template's instances) and the wrapper."""
    return [u for s in stock_desired().services_on(host) for u in s.all_units_on(host)]


def shape_stock(lab: Any) -> None:
    """Every host of the stock fleet reset, then installed by hand and running (the hosts side by
    side: each host's shaping is its own, as in helpers.reset_all)."""
    with ThreadPoolExecutor(max_workers=len(stock_hosts())) as pool:
        list(pool.map(lambda host: shape_host(lab, host), stock_hosts()))  # re-raises the first failure


def shape_host(lab: Any, host: str) -> None:
    reset_host(lab, host)
    for unit, text in units_on(host).items():
        lab.ssh(host, f"cat > /etc/systemd/system/{shlex.quote(unit)}", user="root", input=text.decode())
    runs = [s for s in stock_desired().services_on(host) if s.kind.value == "sidekiq"]
    if runs:
        lab.ssh(host, f"mkdir -p {LIVE}/config && cat > {LIVE}/config/sidekiq.yml && "
                      f"chown -R mastodon: {LIVE}/config", user="root", input=SIDEKIQ_YML)
    units = " ".join(shlex.quote(u) for u in enabled_on(host))
    lab.ssh(host, f"systemctl daemon-reload && systemctl enable --quiet {units} && systemctl start {units}",
            user="root")
    wait_active(lab, host, enabled_on(host))


def wait_active(lab: Any, host: str, units: list[str], timeout: float = 30) -> None:
    """Until systemd has every unit active (a start returns before a simple service's stand-in
    listens; the state, not a sleep, is what is waited for)."""
    deadline = time.monotonic() + timeout
    quoted = " ".join(shlex.quote(u) for u in units)
    while True:
        done = lab.ssh(host, f"systemctl is-active {quoted}", user="root", check=False)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{host}: not all of {units} became active: {done.stdout}")
        time.sleep(0.2)


def unshape_stock(lab: Any) -> None:
    def unshape(host: str) -> None:
        reset_host(lab, host)
        lab.ssh(host, f"rm -rf {LIVE}/config", user="root", check=False)

    with ThreadPoolExecutor(max_workers=len(stock_hosts())) as pool:
        list(pool.map(unshape, stock_hosts()))


def file_on(lab: Any, host: str, path: str) -> bytes:
    """The exact bytes of a file on a lab host (base64 over SSH: no newline handling in between)."""
    out = lab.ssh(host, f"base64 -w0 {shlex.quote(path)}", user="root").stdout
    return base64.b64decode(out)

