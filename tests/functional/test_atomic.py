"""
Atomic failure: a failure partway through an apply leaves the relay exactly as
before, byte for byte, and the state fails with the cause. Test doubles inject
the failures at the engine's boundaries (the netlink socket, the packet-filter
backend); the kernel state they act on is real.
"""

import sys

import pytest
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.fibmsg import fibmsg

from tests.functional.test_relay import ARGS, PROXIES, SECOND
from tests.support.hosts import plant_foreign_state

pytestmark = pytest.mark.root


def loaded(loaders, suffix):
    """The engine's sub-module as Salt's loader loaded it."""
    loaders.modules.relayroute.show()
    return next(
        mod
        for name, mod in sys.modules.items()
        if name.endswith(f".relayroute_core.{suffix}") and mod is not None
    )


def test_netlink_failure_partway_rolls_back(loaders, relay_ns, monkeypatch):
    plant_foreign_state(relay_ns)
    both = {**ARGS, "proxies": {**PROXIES, **SECOND}}
    with relay_ns.entered():
        before = relay_ns.snapshot()
        calls = []
        real_rule = AsyncIPRoute.rule

        async def failing_second_add(self, command, *args, **kwargs):
            """Fails the second ``rule add`` with the kernel's own error type."""
            if command == "add":
                calls.append(kwargs)
                if len(calls) == 2:
                    raise NetlinkError(105, "No buffer space available (injected)")
            return await real_rule(self, command, *args, **kwargs)

        # Patched on pyroute2's async class (its sync IPRoute delegates to it):
        # Salt's loader may reload the engine's modules, never pyroute2.
        monkeypatch.setattr(AsyncIPRoute, "rule", failing_second_add)
        ret = loaders.states.relayroute.relay_present(name="r", **both)
        assert len(calls) == 2
        assert ret.result is False
        assert "rule add '1001: from all fwmark 0xfa/0xff lookup 1000250" in ret.comment
        assert "injected" in ret.comment
        assert "previous state was restored" in ret.comment
        assert relay_ns.snapshot() == before


def test_verification_mismatch_rolls_back(loaders, relay_ns, monkeypatch):
    """The backend 'succeeds' but the kernel does not hold the plan: detected, undone."""
    plant_foreign_state(relay_ns)
    with relay_ns.entered():
        before = relay_ns.snapshot()
        backend = loaded(loaders, "iptables")
        real_apply = backend.apply

        def lossy_apply(payload):
            real_apply(
                "\n".join(line for line in payload.splitlines() if "--save-mark" not in line)
            )

        monkeypatch.setattr(backend, "apply", lossy_apply)
        ret = loaders.states.relayroute.relay_present(name="r", **ARGS)
        assert ret.result is False
        assert "verification failed" in ret.comment
        assert "previous state was restored" in ret.comment
        assert relay_ns.snapshot() == before


def test_failed_change_keeps_the_previous_relayroute_state(loaders, relay_ns, monkeypatch):
    """Going from one proxy to two fails in the transaction: the one-proxy state stays."""
    with relay_ns.entered():
        assert loaders.states.relayroute.relay_present(name="r", **ARGS).result
        before = relay_ns.snapshot()
        backend = loaded(loaders, "iptables")

        def failing(payload):
            raise backend.BackendError("iptables-restore --noflush failed (4): injected")

        monkeypatch.setattr(backend, "apply", failing)
        ret = loaders.states.relayroute.relay_present(
            name="r", **{**ARGS, "proxies": {**PROXIES, **SECOND}}
        )
        assert ret.result is False
        assert relay_ns.snapshot() == before


def test_kernel_without_rule_protocols_keeps_ownership_in_memory(
    loaders, relay_ns, monkeypatch, tmp_path
):
    """
    Kernels before 4.17 (CentOS 7) keep no protocol on ip rules. A test double
    hides FRA_PROTOCOL from the rule dump, as such a kernel would: relayroute
    then knows its rules from the plan and from what it remembers on disk.
    """
    plant_foreign_state(relay_ns)
    before = relay_ns.snapshot()
    decode = fibmsg.decode

    def decode_without_protocol(self):
        # Every rule message relayroute reads is a fibmsg decoded here.
        decode(self)
        self["attrs"] = [attr for attr in self["attrs"] if attr[0] != "FRA_PROTOCOL"]

    monkeypatch.setattr(fibmsg, "decode", decode_without_protocol)
    persist = str(tmp_path / "relayroute")
    both = {**ARGS, "proxies": {**PROXIES, **SECOND}}
    with relay_ns.entered():
        first = loaders.modules.relayroute.relay_apply(persist_dir=persist, **both)
        assert "rules" in first["changes"]
        assert loaders.modules.relayroute.relay_apply(persist_dir=persist, **both) == {
            "changes": {}
        }
        # A proxy leaves the pillar: its rule goes, because relayroute remembers it.
        fewer = loaders.modules.relayroute.relay_apply(persist_dir=persist, **ARGS)
        assert fewer["changes"]["rules"]["old"] == [
            "1000: from all fwmark 0xfe/0xff lookup 1000254 proto 210",
            "1001: from all fwmark 0xfa/0xff lookup 1000250 proto 210",
        ]
        assert "1001:" not in relay_ns.exec("ip rule show").stdout
        loaders.modules.relayroute.relay_remove(persist_dir=persist)
    assert relay_ns.snapshot() == before
