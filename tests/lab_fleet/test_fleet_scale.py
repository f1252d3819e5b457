"""
The fleet benchmark's lab, end to end on a small fleet (4 relays, 2 proxies,
one round): every relay applied with every state succeeding, an apply after
relayroute's clean changed something on each relay, a no-op highstate changed
nothing (relays and proxies), and ``salt-run relayroute.probe`` passed on
every path (direct and via each proxy's VIP, both ports). Figures are printed,
never asserted: timings on a shared machine prove nothing. Runs only with
``pytest --fleet`` (``bash scripts/bench-fleet`` is the measurement).
"""

import pytest

from tests.bench import fleet
from tests.support.seedlab import report

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.fleet]

RELAYS = 4


def test_small_fleet_applies_idles_and_probes():
    # Its own short temporary directory: Salt's sockets live under it, and a
    # Unix socket's path is at most 107 bytes (pytest's tmp_path is too deep).
    result = fleet.bench(relays=RELAYS, runs=1, log=print)
    assert result["ok"], result["violations"]
    kinds = result["kinds"]
    for kind in ("one_apply", "one_noop", "fleet_apply", "fleet_noop", "proxies_noop", "probe"):
        assert kinds[kind]["runs"] == 1, kind
    assert kinds["fleet_apply"]["targets"] == RELAYS
    assert kinds["proxies_apply"]["targets"] == 2
    # Direct and via each of the two proxies, on ports 25 and 587.
    assert result["probe_rows"] == RELAYS * 2 * 3
    report(
        f"fleet of {RELAYS} relays (figures, not asserted)",
        [f"{kind}: {e['wall_s']} s wall, {e['cpu_s']} s CPU" for kind, e in sorted(kinds.items())],
    )
