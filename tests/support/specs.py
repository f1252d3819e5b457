"""
The seed's relay topology as a validated :class:`~relayroute_core.model.RelaySpec`,
for tests that plan without Salt: master-relay at 192.0.2.2 (mark 254, table
1000254), with ``second`` master-relay-2 at 192.0.2.3 (mark 250, table 1000250),
the relays' LAN 192.0.2.0/24.
"""

from relayroute_core import model

MAC = "02:00:c0:00:02:02"
MAC2 = "02:00:c0:00:02:03"


def seed_spec(second=False, mask=0xFF, mark=254, mac=MAC):
    """The seed's relay spec; ``mac``: master-relay's (a namespace's real one, in a kernel test)."""
    proxies = {
        "master-relay": {
            "address": "192.0.2.2",
            "mac": mac,
            "mark": mark,
            "table": 1000254,
            "priority": 1000,
        }
    }
    if second:
        proxies["master-relay-2"] = {
            "address": "192.0.2.3",
            "mac": MAC2,
            "mark": 250,
            "table": 1000250,
            "priority": 1001,
        }
    return model.relay_spec(["192.0.2.0/24"], mask, proxies)
