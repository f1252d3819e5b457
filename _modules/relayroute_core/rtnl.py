"""
Reading the kernel's routing state over rtnetlink, synchronously, with
pyroute2's message classes and none of its socket machinery.

A relay's no-op re-apply reads rules, routes, addresses (and, when a proxy's
MAC is discovered, neighbours) and asks the kernel a few route lookups; it
writes nothing. pyroute2's ``IPRoute`` costs, on every ``salt-call``, about
50 ms of CPU to import (``pyroute2.iproute.linux`` pulls in its traffic-control,
link-plugin and mock modules) and an asyncio event loop per socket. This
reader needs only the message classes of what it reads (``fibmsg``,
``rtmsg``, ``ifaddrmsg``, ``ndmsg``: about 5 ms) and a plain
``AF_NETLINK``/``NETLINK_ROUTE`` socket: pyroute2 encodes each request and
decodes each answer (the attributes, their alignment, their types), this
module sends and receives. Writes (routes, rules) still go through
``IPRoute``, imported when there is work.

A dump that the kernel marks interrupted (``NLM_F_DUMP_INTR``: the table
changed while it was read, as ``ip`` warns "Dump was interrupted and may be
inconsistent") is read again, up to ``DUMP_ATTEMPTS`` times, then fails.

Interface names come from ``socket.if_nameindex()`` (the C library's own
link dump), not from decoding link messages, whose class imports every link
kind's plugin (15-20 ms).

    with Reader() as rtnl:
        rtnl.rules(socket.AF_UNSPEC)      # [fibmsg, ...], header fields and attributes
        rtnl.route_get(socket.AF_INET, "198.51.100.7", mark=0xFE)
"""

import os
import socket
import struct

from pyroute2.netlink import NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_GETADDR,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWADDR,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
)
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

NLMSG_ERROR = 2
NLMSG_DONE = 3
HEADER = struct.Struct("=LHHLL")  # struct nlmsghdr: length, type, flags, seq, pid
ERRNO = struct.Struct("=i")  # struct nlmsgerr's error, after the header
DUMP_ATTEMPTS = 3
# The answer's message class and type, per request type.
ANSWERS = {
    RTM_GETRULE: (fibmsg, RTM_NEWRULE),
    RTM_GETROUTE: (rtmsg, RTM_NEWROUTE),
    RTM_GETADDR: (ifaddrmsg, RTM_NEWADDR),
    RTM_GETNEIGH: (ndmsg, RTM_NEWNEIGH),
}
# rtm_flags of a route get: report the table the answer came from, not 254.
RTM_F_LOOKUP_TABLE = 0x1000
FULL_LENGTH = {socket.AF_INET: 32, socket.AF_INET6: 128}


class DumpInterrupted(NetlinkError):
    """The kernel marked every attempt at a dump interrupted (the table kept changing)."""


class Reader:
    """
    One ``NETLINK_ROUTE`` socket in this process's network namespace. Use it
    as a context manager; a request's failure raises pyroute2's
    ``NetlinkError`` with the kernel's errno (``code``) and its text.
    """

    def __init__(self):
        self._sock = None
        self._seq = 0
        self._buf = bytearray(1)

    def __enter__(self):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.bind((0, 0))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------
    # what relayroute reads

    @staticmethod
    def links():
        """``{index: interface name}`` of every link."""
        return dict(socket.if_nameindex())

    def rules(self, family=socket.AF_UNSPEC):
        """Every ip rule of ``family`` (AF_UNSPEC: all families), as ``fibmsg``."""
        return self.dump(RTM_GETRULE, family)

    def routes(self, family=socket.AF_UNSPEC):
        """Every route of every table of ``family``, as ``rtmsg``."""
        return self.dump(RTM_GETROUTE, family)

    def addresses(self, family=socket.AF_UNSPEC):
        """Every address of ``family``, as ``ifaddrmsg``."""
        return self.dump(RTM_GETADDR, family)

    def neighbours(self, family):
        """The neighbour table of ``family``, as ``ndmsg``."""
        return self.dump(RTM_GETNEIGH, family)

    def route_get(self, family, dst, mark=0, src=None):
        """
        The kernel's answer to ``ip route get DST [from SRC] mark MARK``, with
        the table it came from (``RTM_F_LOOKUP_TABLE``): one ``rtmsg``.
        """
        attrs = [["RTA_DST", dst]]
        fields = {"family": family, "dst_len": FULL_LENGTH[family], "flags": RTM_F_LOOKUP_TABLE}
        if src:
            attrs.append(["RTA_SRC", src])
            fields["src_len"] = FULL_LENGTH[family]
        if mark:
            attrs.append(["RTA_MARK", mark])
        return self.request(RTM_GETROUTE, fields, attrs)[0]

    # ------------------------------------------------------------------
    # the exchange

    def dump(self, kind, family):
        """All answers to a dump request of ``kind`` in ``family``, read again when interrupted."""
        for _attempt in range(DUMP_ATTEMPTS):
            answers, interrupted = self._exchange(kind, {"family": family}, (), NLM_F_DUMP)
            if not interrupted:
                return answers
        raise DumpInterrupted(
            -1, f"the kernel's dump was interrupted {DUMP_ATTEMPTS} times in a row"
        )

    def request(self, kind, fields, attrs):
        """The answers to one request (not a dump)."""
        return self._exchange(kind, fields, attrs, 0)[0]

    def _exchange(self, kind, fields, attrs, flags):
        cls, answer_type = ANSWERS[kind]
        msg = cls()
        for key, value in fields.items():
            msg[key] = value
        msg["attrs"] = [list(attr) for attr in attrs]
        self._seq += 1
        seq = self._seq
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST | flags
        msg["header"]["sequence_number"] = seq
        msg["header"]["pid"] = 0
        msg.encode()
        self._sock.send(msg.data)
        answers, interrupted = [], False
        while True:
            data = self._receive()
            offset = 0
            while offset + HEADER.size <= len(data):
                length, mtype, mflags, mseq, _pid = HEADER.unpack_from(data, offset)
                if length < HEADER.size:
                    raise NetlinkError(-1, f"a netlink message of {length} bytes")
                if mseq == seq:
                    interrupted = interrupted or bool(mflags & NLM_F_DUMP_INTR)
                    if mtype == NLMSG_DONE:
                        return answers, interrupted
                    if mtype == NLMSG_ERROR:
                        (error,) = ERRNO.unpack_from(data, offset + HEADER.size)
                        if error:
                            raise NetlinkError(-error, os.strerror(-error))
                        return answers, interrupted  # an acknowledgement
                    if mtype == answer_type:
                        answer = cls(data[offset : offset + length])
                        answer.decode()
                        answers.append(answer)
                        if not flags & NLM_F_DUMP:
                            return answers, interrupted
                offset += (length + 3) & ~3

    def _receive(self):
        # The datagram's size first (MSG_TRUNC reports it whole), then the datagram.
        size = self._sock.recv_into(self._buf, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
        return self._sock.recv(max(size, 1))
