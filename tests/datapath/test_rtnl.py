"""datapath.rtnl: request encoding (against pyroute2's encoder) and answer parsing (answers
sent to the client's socket from a second netlink socket, as the kernel would)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from datapath.rtnl import (
    ADD_FLAGS,
    DEL_FLAGS,
    NETLINK_ROUTE,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLMSG_ERROR,
    RTM_DELROUTE,
    RTM_NEWROUTE,
    Answer,
    RouteClient,
    encode_route,
    error_of,
    parse_prefix,
)


def pyroute2_route(kind: int, flags: int, seq: int, family: int, dst: str, plen: int, oif: int,
                   table: int, src: str | None, *, proto: int, scope: int, rtype: int) -> bytes:
    msg = rtmsg()
    msg["family"], msg["dst_len"], msg["table"] = family, plen, table if table < 256 else 0
    msg["proto"], msg["scope"], msg["type"] = proto, scope, rtype
    msg["attrs"] = [("RTA_TABLE", table), ("RTA_OIF", oif), ("RTA_DST", dst)]
    if src is not None:
        msg["attrs"].append(("RTA_PREFSRC", src))
    msg["header"]["type"], msg["header"]["flags"] = kind, flags
    msg["header"]["sequence_number"], msg["header"]["pid"] = seq, 0
    msg.encode()
    return bytes(msg.data)


@pytest.mark.parametrize(("dst", "table", "src"), [
    ("10.1.0.0/16", 220, "10.9.0.1"),
    ("10.1.2.3/32", 220, None),
    ("0.0.0.0/0", 1000, None),  # a table past 255 goes in RTA_TABLE only
    ("fd50::/48", 220, "fd09::1"),
    ("fd50:1:2:3::5/128", 70000, None),
])
def test_requests_encode_as_pyroute2_encodes_them(dst: str, table: int, src: str | None) -> None:
    family, net, plen = parse_prefix(dst)
    addr = socket.inet_ntop(family, net)
    add = pyroute2_route(RTM_NEWROUTE, ADD_FLAGS, 7, family, addr, plen, 5, table, src,
                         proto=4, scope=0, rtype=1)
    assert encode_route(7, dst, 5, table, src) == add
    delete = pyroute2_route(RTM_DELROUTE, DEL_FLAGS, 8, family, addr, plen, 5, table, None,
                            proto=0, scope=255, rtype=0)
    assert encode_route(8, dst, 5, table, src, delete=True) == delete  # src is no criterion


def test_a_known_request_byte_for_byte() -> None:
    # ip route replace 10.1.0.0/16 dev #5 table 220 src 10.9.0.1 proto static, seq 7
    assert encode_route(7, "10.1.0.0/16", 5, 220, "10.9.0.1").hex() == (
        "3c000000" "1800" "0505" "07000000" "00000000"  # nlmsghdr
        "02100000" "dc040001" "00000000"  # rtmsg: inet /16, table 220 static universe unicast
        "08000f00dc000000" "0800040005000000"  # RTA_TABLE 220, RTA_OIF 5
        "080001000a010000" "080007000a090001")  # RTA_DST 10.1.0.0, RTA_PREFSRC 10.9.0.1


def test_prefixes_are_parsed_strictly_and_host_bits_cleared() -> None:
    assert parse_prefix("10.1.2.3/16") == (socket.AF_INET, bytes([10, 1, 0, 0]), 16)
    assert parse_prefix("fd00::1") == (socket.AF_INET6, socket.inet_pton(socket.AF_INET6,
                                                                          "fd00::1"), 128)
    for bad in ("10.1.0.0/33", "fd00::/129", "10.1.0.0/x", "nowhere/8", "10.1.0.0/-1", ""):
        with pytest.raises(ValueError):
            parse_prefix(bad)
    with pytest.raises(ValueError, match="family"):
        encode_route(1, "10.1.0.0/16", 5, 220, "fd09::1")


def nlmsg_error(seq: int, pid: int, code: int, *, flags: int = 0, tlvs: bytes = b"",
                echoed: bytes = b"") -> bytes:
    original = echoed or struct.pack("=IHHII", 16, RTM_NEWROUTE, ADD_FLAGS, seq, pid)
    body = struct.pack("=i", code) + original + tlvs
    return struct.pack("=IHHII", 16 + len(body), NLMSG_ERROR, flags, seq, pid) + body


def tlv(kind: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


class Injector:
    """A second netlink socket that sends 'kernel answers' to the client (root may)."""

    def __init__(self, client: RouteClient) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.client_pid = client._pid

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (self.client_pid, 0))


def test_answers_are_matched_to_requests_and_junk_is_counted() -> None:
    with RouteClient(4_000_123) as client:  # a table nobody uses: the deletes touch nothing
        inject = Injector(client)
        pid = client._pid
        # pending requests without a kernel: ask for deleting routes through no device
        seqs = [client.delete(f"10.{i}.0.0/16", 0x7FFFFFF0) for i in range(4)]
        kernel_answers = client.drain(2.0)  # the real kernel answers them first
        assert {a.seq for a in kernel_answers} == set(seqs)
        assert all(a.error == errno.ESRCH for a in kernel_answers)
        client._pending.update(seqs)  # pretend still pending: the injected answers follow
        reason = tlv(1, b"Invalid prefsrc address\0")
        inject.send(nlmsg_error(seqs[0], pid, 0))
        inject.send(nlmsg_error(seqs[1], pid, -errno.EINVAL, flags=NLM_F_CAPPED | NLM_F_ACK_TLVS,
                                tlvs=reason))
        request = encode_route(seqs[2], "10.2.0.0/16", 5, 220)  # uncapped: request echoed
        inject.send(nlmsg_error(seqs[2], pid, -errno.EEXIST, flags=NLM_F_ACK_TLVS,
                                echoed=request, tlvs=reason))
        inject.send(nlmsg_error(999_999, pid, 0))  # no such request
        inject.send(nlmsg_error(seqs[3], pid + 1, 0))  # someone else's answer
        inject.send(nlmsg_error(seqs[3], pid, 0)[:18])  # cut short
        inject.send(struct.pack("=IHHII", 16, NLMSG_ERROR, 0, seqs[3], pid))  # no error code
        inject.send(nlmsg_error(seqs[3], pid, 0) + b"\1\2")  # trailing bytes
        answers = client.drain(2.0)
        inject.sock.close()
    assert answers[:3] == [Answer(seqs[0], 0), Answer(seqs[1], errno.EINVAL,
                                                      "Invalid prefsrc address"),
                           Answer(seqs[2], errno.EEXIST, "Invalid prefsrc address")]
    assert answers[3:] == [Answer(seqs[3], 0)]  # the good message before the trailing bytes
    stats = client.stats
    assert (stats.unexpected, stats.malformed) == (2, 3)
    error = error_of(answers[1])
    assert error is not None and error.errno == errno.EINVAL
    assert "Invalid prefsrc address" in str(error) and error_of(answers[0]) is None
