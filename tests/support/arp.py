"""A gratuitous ARP, as keepalived or a booting host sends when it takes an address."""

import textwrap

from tests.support.netns import mac_of

# The request form (sender and target address the same), to the broadcast MAC.
GARP = textwrap.dedent(
    """
    import socket, struct, sys
    ifname, address, mac = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3].replace(":", ""))
    ip = socket.inet_aton(address)
    frame = b"\\xff" * 6 + mac + b"\\x08\\x06"
    frame += struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\\x00" * 6 + ip
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        sock.send(frame)
    """
)


def send_garp(ns, ifname, address):
    """From ``ns``: announce ``address`` at ``ifname``'s MAC. Neighbours ignore an
    update within their locktime (1 s) of the entry's last one."""
    ns.exec(["python3", "-c", GARP, ifname, address, mac_of(ns, ifname)])
