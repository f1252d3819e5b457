"""
The rtnetlink reader's exchange with the kernel, against a socket double that
answers with datagrams made by pyroute2's own encoder: requests encoded as
pyroute2 encodes them, several messages per datagram and several datagrams
per dump, the end of a dump, the kernel's errors, answers to another request
skipped, and dumps the kernel marks interrupted read again. No root.
"""

import errno
import socket
import struct

import pytest
from pyroute2.netlink import NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_MULTI, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETROUTE, RTM_GETRULE, RTM_NEWROUTE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from relayroute_core import rtnl

HEADER = struct.Struct("=LHHLL")


def encoded(cls, mtype, seq, fields, attrs, flags=NLM_F_MULTI):
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg["header"]["type"] = mtype
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def rule(seq, priority, flags=NLM_F_MULTI):
    return encoded(
        fibmsg,
        RTM_NEWRULE,
        seq,
        {"family": socket.AF_INET, "action": 1, "table": 252},
        [["FRA_PRIORITY", priority], ["FRA_TABLE", 1000254], ["FRA_FWMARK", 0xFE]],
        flags,
    )


def done(seq, flags=NLM_F_MULTI):
    return HEADER.pack(20, rtnl.NLMSG_DONE, flags, seq, 0) + bytes(4)


def error(seq, code):
    # struct nlmsgerr: the errno (negative), then the request's header.
    return HEADER.pack(36, rtnl.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + bytes(16)


class FakeSocket:
    """Answers each request with the datagrams ``script(seq, request)`` returns."""

    def __init__(self, script):
        self.script = script
        self.sent = []
        self.queue = []
        self.closed = False

    def send(self, data):
        (_length, _mtype, _flags, seq, _pid) = HEADER.unpack_from(data)
        self.sent.append(bytes(data))
        self.queue += self.script(seq, bytes(data))

    def recv_into(self, buf, nbytes, flags):
        assert flags == socket.MSG_PEEK | socket.MSG_TRUNC
        return len(self.queue[0])

    def recv(self, size):
        data = self.queue.pop(0)
        assert size == len(data)
        return data

    def close(self):
        self.closed = True


def reader(script):
    made = rtnl.Reader()
    made._sock = FakeSocket(script)
    return made


def test_a_dump_request_is_pyroute2s_encoding_of_a_dump_of_the_family():
    made = reader(lambda seq, _req: [done(seq)])
    assert made.rules(socket.AF_INET6) == []
    request = fibmsg(made._sock.sent[0])
    request.decode()
    assert request["header"]["type"] == RTM_GETRULE
    assert request["header"]["flags"] == NLM_F_REQUEST | NLM_F_DUMP
    assert request["family"] == socket.AF_INET6


def test_a_dump_collects_every_message_of_every_datagram_until_done():
    def script(seq, _request):
        return [rule(seq, 1000) + rule(seq, 1001), rule(seq, 1002) + done(seq)]

    made = reader(script)
    answers = made.rules()
    assert [msg.get("FRA_PRIORITY") for msg in answers] == [1000, 1001, 1002]
    assert {msg.get("FRA_TABLE") for msg in answers} == {1000254}
    assert made._sock.queue == []


def test_answers_to_another_request_are_skipped():
    # A late answer of an earlier request (another sequence number) is no answer to this one.
    made = reader(lambda seq, _req: [rule(seq - 1, 7) + rule(seq, 1000), done(seq)])
    assert [msg.get("FRA_PRIORITY") for msg in made.rules()] == [1000]


def test_the_kernels_error_raises_its_errno():
    made = reader(lambda seq, _req: [error(seq, errno.EOPNOTSUPP)])
    with pytest.raises(NetlinkError) as raised:
        made.rules()
    assert raised.value.code == errno.EOPNOTSUPP


def test_an_interrupted_dump_is_read_again():
    dumps = []

    def script(seq, _request):
        dumps.append(seq)
        flags = NLM_F_MULTI | (NLM_F_DUMP_INTR if len(dumps) == 1 else 0)
        return [rule(seq, 1000, flags) + done(seq, flags)]

    made = reader(script)
    assert [msg.get("FRA_PRIORITY") for msg in made.rules()] == [1000]
    assert len(dumps) == 2


def test_a_dump_interrupted_every_time_fails_naming_it():
    made = reader(lambda seq, _req: [done(seq, NLM_F_MULTI | NLM_F_DUMP_INTR)])
    with pytest.raises(rtnl.DumpInterrupted, match="interrupted 3 times"):
        made.routes()
    assert len(made._sock.sent) == rtnl.DUMP_ATTEMPTS


@pytest.mark.parametrize(
    ("family", "dst", "src", "bits"),
    [
        (socket.AF_INET, "198.51.100.7", "192.0.2.11", 32),
        (socket.AF_INET6, "2001:db8:7::7", "2001:db8:2::11", 128),
    ],
    ids=["ipv4", "ipv6"],
)
def test_a_route_get_asks_the_table_with_the_mark_and_source(family, dst, src, bits):
    def script(seq, _request):
        answer = encoded(
            rtmsg,
            RTM_NEWROUTE,
            seq,
            {"family": family, "table": 252},
            [["RTA_TABLE", 1000254], ["RTA_DST", dst]],
            0,
        )
        return [answer]

    made = reader(script)
    answer = made.route_get(family, dst, mark=0xFE, src=src)
    assert answer.get("RTA_TABLE") == 1000254
    request = rtmsg(made._sock.sent[0])
    request.decode()
    assert request["header"]["type"] == RTM_GETROUTE
    assert request["header"]["flags"] == NLM_F_REQUEST
    assert (request["dst_len"], request["src_len"]) == (bits, bits)
    assert request["flags"] == rtnl.RTM_F_LOOKUP_TABLE
    assert (request.get("RTA_DST"), request.get("RTA_SRC"), request.get("RTA_MARK")) == (
        dst,
        src,
        0xFE,
    )


def test_a_route_get_without_mark_or_source_sends_neither():
    made = reader(lambda seq, _req: [error(seq, errno.ENETUNREACH)])
    with pytest.raises(NetlinkError) as raised:
        made.route_get(socket.AF_INET, "198.51.100.7")
    assert raised.value.code == errno.ENETUNREACH
    request = rtmsg(made._sock.sent[0])
    request.decode()
    assert request.get("RTA_MARK") is None
    assert request.get("RTA_SRC") is None
    assert request["src_len"] == 0


def test_a_real_socket_reads_this_namespace_and_is_closed_on_leaving():
    # Reading rtnetlink needs no privilege: this process's own namespace.
    with rtnl.Reader() as made:
        assert made.rules(socket.AF_INET)
        assert "lo" in made.links().values()
    assert made._sock is None


def test_a_sockets_failure_is_named_as_the_reads(monkeypatch):
    from relayroute_core import netlink

    class Broken:
        def __enter__(self):
            raise OSError(errno.ENOBUFS, "No buffer space available")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(netlink, "Reader", Broken)
    with pytest.raises(
        netlink.NetlinkOpError, match="reading routing state over netlink: .*buffer"
    ):
        netlink.read()
