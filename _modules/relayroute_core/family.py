"""
The address families relayroute works in, as data: IPv4 and IPv6 are two
values of :class:`Family`, not two copies of the code that uses them.

Pure: no kernel, no Salt. Everything family-specific that the model, the
planner, netlink and the backends need is a field here.

CLI: none (used by the engine; ``salt-call relayroute.plan`` shows its effect).
"""

import ipaddress
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One address family and everything relayroute needs to know about it."""

    version: int  # 4 or 6: what ipaddress' ``.version`` says
    name: str  # "IPv4", "IPv6": in messages
    af: int  # socket.AF_INET / AF_INET6: netlink's family
    any: str  # the default destination: "0.0.0.0/0", "::/0"
    # An outside address the data-path lookups ask the kernel about, in a
    # documentation range (RFC 5737 / RFC 3849) no real network routes.
    lookup_dst: str
    link_local: str  # never a proxy's LAN address, never marked
    example_address: str  # in messages
    example_network: str
    ip_flag: str  # "-4" / "-6": ip(8)'s family switch
    nft: str  # nftables' payload keyword: "ip" / "ip6"
    address_type: type
    network_type: type
    interface_type: type

    def address(self, text):
        """``text`` as this family's address object (ValueError when it is not one)."""
        return self.address_type(text)

    def network(self, text, strict=True):
        return self.network_type(text, strict=strict)

    def interface(self, text):
        return self.interface_type(text)


IPV4 = Family(
    version=4,
    name="IPv4",
    af=socket.AF_INET,
    any="0.0.0.0/0",
    lookup_dst="203.0.113.254",
    link_local="169.254.0.0/16",
    example_address="192.0.2.2",
    example_network="192.0.2.0/24",
    ip_flag="-4",
    nft="ip",
    address_type=ipaddress.IPv4Address,
    network_type=ipaddress.IPv4Network,
    interface_type=ipaddress.IPv4Interface,
)
IPV6 = Family(
    version=6,
    name="IPv6",
    af=socket.AF_INET6,
    any="::/0",
    lookup_dst="2001:db8:ffff:ffff::fe",
    link_local="fe80::/10",
    example_address="2001:db8:2::2",
    example_network="2001:db8:2::/64",
    ip_flag="-6",
    nft="ip6",
    address_type=ipaddress.IPv6Address,
    network_type=ipaddress.IPv6Network,
    interface_type=ipaddress.IPv6Interface,
)
FAMILIES = (IPV4, IPV6)
BY_VERSION = {family.version: family for family in FAMILIES}
BY_AF = {family.af: family for family in FAMILIES}
DEFAULT_DSTS = {family.any for family in FAMILIES}


def of(text):
    """The family of an address or network given as text (ValueError when it is neither)."""
    text = str(text)
    if "/" in text:
        return BY_VERSION[ipaddress.ip_network(text, strict=False).version]
    return BY_VERSION[ipaddress.ip_address(text).version]


def parse_address(text):
    """An address of either family as its ipaddress object."""
    return ipaddress.ip_address(text)


def contains(network, address):
    """Whether ``address`` lies in ``network`` (False across families)."""
    net = ipaddress.ip_network(network, strict=False)
    ip = ipaddress.ip_address(address)
    return ip.version == net.version and ip in net
