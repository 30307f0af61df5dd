"""Malformed PF_KEY messages: decode refuses each with the errno Linux's af_key.c answers."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable
from ipaddress import ip_address

import pytest

from tests.pfkey import cstructs as c
from userspace_ipsec.pfkey.codec import (
    MAX_MESSAGE_SIZE,
    PfkeyError,
    check_sa_keys,
    decode,
    encode,
)
from userspace_ipsec.pfkey.constants import (
    ExtType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    PolicyDir,
    PolicyType,
    SaType,
)
from userspace_ipsec.pfkey.messages import (
    AddressExt,
    Extension,
    IpsecRequest,
    KeyExt,
    KmPrivateExt,
    LifetimeExt,
    Message,
    PolicyExt,
    SAExt,
)

GOOD = c.Builder(3, 3, 1, 99).sa(0x1234).address(5, "10.0.0.1").address(6, "10.0.0.2").build()


def u16(v: int) -> bytes:
    return v.to_bytes(2, sys.byteorder)


def with_body(body: bytes, msg_type: int = 3) -> bytes:
    return c.Builder(msg_type, 3).raw(body).build()


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def bad_address(family: int) -> bytes:
    sa = c.sockaddr("10.0.0.1")
    sa.sin_family = family
    return c.Builder(3, 3).ext(c.sadb_address, bytes(sa), sadb_address_exttype=5).build()


def tunnel_policy(src: str, dst: str, length: int | None = None) -> bytes:
    rq = c.ipsecrequest(50, 2, 2, 0, src, dst)
    if length is not None:  # overwrite sadb_x_ipsecrequest_len
        rq = u16(length) + rq[2:]
    return c.Builder(14).policy(2, 2, [rq]).build()


def policy(*requests: bytes, ptype: int = 2, direction: int = 1) -> bytes:
    return c.Builder(14).policy(ptype, direction, list(requests)).build()


MALFORMED: dict[str, tuple[bytes, int]] = {
    "empty": (b"", errno.EMSGSIZE),
    "shorter than sadb_msg": (GOOD[:15], errno.EMSGSIZE),
    "len says more than sent": (GOOD[:-8], errno.EMSGSIZE),
    "len says less than sent": (GOOD + bytes(8), errno.EMSGSIZE),
    "trailing partial word": (GOOD + b"\0", errno.EMSGSIZE),
    "version 1": (c.Builder(3, version=1).build(), errno.EINVAL),
    "reserved set": (patched(GOOD, 6, b"\1"), errno.EINVAL),
    "type 0 without errno": (c.Builder(0).build(), errno.EINVAL),
    "type 25": (c.Builder(25).build(), errno.EINVAL),
    "type 255": (c.Builder(255).build(), errno.EINVAL),
    "extension length 0": (with_body(u16(0) + u16(1) + bytes(4)), errno.EINVAL),
    "extension past the end": (with_body(u16(3) + u16(1) + bytes(12)), errno.EINVAL),
    "extension type 0": (with_body(u16(1) + u16(0) + bytes(4)), errno.EINVAL),
    "unknown extension type": (with_body(u16(1) + u16(100) + bytes(4)), errno.EINVAL),
    "unsupported KMADDRESS": (with_body(u16(1) + u16(25) + bytes(4)), errno.EINVAL),
    "duplicate SA": (c.Builder(3, 3).sa(1).sa(2).build(), errno.EINVAL),
    "SA too short": (with_body(u16(1) + u16(1) + bytes(4)), errno.EINVAL),
    "unknown SA state": (c.Builder(3, 3).sa(1, state=9).build(), errno.EINVAL),
    "address family 0": (bad_address(0), errno.EINVAL),
    "address family AF_UNIX": (bad_address(socket.AF_UNIX), errno.EINVAL),
    "v4 prefixlen 33": (c.Builder(3).address(5, "10.0.0.1", 33).build(), errno.EINVAL),
    "v6 prefixlen 129": (c.Builder(3).address(5, "::1", 129).build(), errno.EINVAL),
    "address too short for sockaddr_in6": (
        c.Builder(3).ext(c.sadb_address, bytes(c.sockaddr("::1"))[:24], sadb_address_exttype=5)
        .build(),
        errno.EINVAL,
    ),
    "v4 address with a spare word": (
        c.Builder(3).ext(c.sadb_address, bytes(c.sockaddr("10.0.0.1")) + bytes(8),
                         sadb_address_exttype=6).build(),
        errno.EINVAL,
    ),
    "key_bits beyond payload": (c.Builder(3).key(9, bytes(16), bits=129).build(), errno.EINVAL),
    "key_bits far beyond payload": (c.Builder(3).key(8, b"", bits=0xFFFF).build(), errno.EINVAL),
    "request of v4 and v6 sockaddrs": (tunnel_policy("10.0.0.1", "::1"), errno.EINVAL),
    "request families differ": (
        policy(patched(c.ipsecrequest(50, 2, 2, 0, "::1", "::2"), 44, u16(socket.AF_INET))),
        errno.EINVAL,
    ),
    "request length short of its sockaddrs": (
        tunnel_policy("10.0.0.1", "10.0.0.2", 40), errno.EINVAL,
    ),
    "request length below its header": (tunnel_policy("10.0.0.1", "10.0.0.2", 8), errno.EINVAL),
    "request length past the policy": (tunnel_policy("10.0.0.1", "10.0.0.2", 56), errno.EINVAL),
    "request sockaddr of family 0": (
        policy(u16(48) + c.ipsecrequest(50, 2, 2)[2:] + bytes(32)), errno.EINVAL,
    ),
    "policy with a stray word": (policy(c.ipsecrequest(50, 1, 2) + bytes(8)), errno.EINVAL),
    "policy direction MAX": (policy(direction=4), errno.EINVAL),
    "policy type 9": (policy(ptype=9), errno.EINVAL),
    "request mode 7": (policy(c.ipsecrequest(50, 7, 2)), errno.EINVAL),
    "request level 4": (policy(c.ipsecrequest(50, 1, 4)), errno.EINVAL),
    "sa2 mode 4": (c.Builder(3).sa2(4).build(), errno.EINVAL),
    "nat-t type 3": (c.Builder(3).nat_t_type(3).build(), errno.EINVAL),
    "sec_ctx length mismatch": (
        c.Builder(3).ext(c.sadb_x_sec_ctx, bytes(16), sadb_x_sec_exttype=24, sadb_x_ctx_len=3)
        .build(),
        errno.EINVAL,
    ),
    "proposal not whole combs": (
        c.Builder(6).ext(c.sadb_prop, bytes(64), sadb_prop_exttype=13).build(), errno.EINVAL,
    ),
    "sensitivity bitmap past the extension": (
        with_body(u16(2) + u16(12) + bytes(5) + b"\x01" + bytes(6)), errno.EINVAL,
    ),
    "uipsec too short": (with_body(u16(9) + u16(0x7F) + b"\x01" + bytes(67)), errno.EINVAL),
    "uipsec version 0": (with_body(u16(10) + u16(0x7F) + bytes(76)), errno.EINVAL),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_is_refused_with_linux_errno(name: str) -> None:
    data, expected = MALFORMED[name]
    with pytest.raises(PfkeyError) as info:
        decode(data)
    assert info.value.errno == expected, info.value.reason


def test_request_sockaddr_of_unknown_family_names_it() -> None:
    rq = bytearray(c.ipsecrequest(50, 2, 2, 0, "10.0.0.1", "10.0.0.2"))
    rq[16:18] = u16(socket.AF_UNIX)
    with pytest.raises(PfkeyError, match="family 1"):
        decode(policy(bytes(rq)))


def test_good_message_decodes_from_any_buffer_type() -> None:
    for buf in (GOOD, bytearray(GOOD), memoryview(GOOD)):
        assert decode(buf).sa == SAExt(0x1234)


def test_error_reply_may_carry_type_reserved() -> None:
    wire = c.Builder(0, errno=errno.EINVAL).build()
    msg = decode(wire)
    assert msg.type == MsgType.RESERVED and msg.errno == errno.EINVAL
    assert encode(msg) == wire


def test_error_message_names_the_errno() -> None:
    with pytest.raises(PfkeyError) as info:
        decode(GOOD[:-8])
    assert str(info.value).startswith("EMSGSIZE: ")
    assert info.value.args == (errno.EMSGSIZE, info.value.reason)


def add_with(ext_type: ExtType, ext: Extension) -> Callable[[], Message]:
    return lambda: Message(MsgType.ADD, SaType.ESP, ext={ext_type: ext})


def tunnel(src: str, dst: str | None) -> PolicyExt:
    request = IpsecRequest(50, IpsecMode.TUNNEL, IpsecLevel.REQUIRE, 0, ip_address(src),
                           None if dst is None else ip_address(dst))
    return PolicyExt(PolicyType.IPSEC, PolicyDir.OUTBOUND, requests=[request])


V4 = ip_address("10.0.0.1")
E = ExtType
UNENCODABLE: dict[str, tuple[Callable[[], Message], int]] = {
    "spi over 32 bits": (add_with(E.SA, SAExt(1 << 32)), errno.EINVAL),
    "replay over 8 bits": (add_with(E.SA, SAExt(1, replay=256)), errno.EINVAL),
    "negative lifetime": (add_with(E.LIFETIME_HARD, LifetimeExt(-1)), errno.EINVAL),
    "prefixlen 33": (add_with(E.ADDRESS_SRC, AddressExt(V4, 33)), errno.EINVAL),
    "port over 16 bits": (add_with(E.ADDRESS_SRC, AddressExt(V4, port=65536)), errno.EINVAL),
    "named IPv6 scope": (
        add_with(E.ADDRESS_DST, AddressExt(ip_address("fe80::1%eth0"))), errno.EINVAL,
    ),
    "wrong class for the type": (add_with(E.KEY_AUTH, SAExt(1)), errno.EINVAL),
    "unsupported type": (add_with(E.X_KMADDRESS, KmPrivateExt()), errno.EINVAL),
    "key_bits beyond the key": (add_with(E.KEY_AUTH, KeyExt(bytes(4), 33)), errno.EINVAL),
    "half a tunnel": (add_with(E.X_POLICY, tunnel("::1", None)), errno.EINVAL),
    "tunnel of two families": (add_with(E.X_POLICY, tunnel("::1", "10.0.0.1")), errno.EINVAL),
    "extension too long": (
        add_with(E.X_KMPRIVATE, KmPrivateExt(bytes(MAX_MESSAGE_SIZE))), errno.EMSGSIZE,
    ),
    "message too long": (
        add_with(E.X_KMPRIVATE, KmPrivateExt(bytes(MAX_MESSAGE_SIZE - 16))), errno.EMSGSIZE,
    ),
    "type 0 without errno": (lambda: Message(MsgType.RESERVED), errno.EINVAL),
}
del E


@pytest.mark.parametrize("name", UNENCODABLE)
def test_unencodable_message_raises_pfkey_error(name: str) -> None:
    make, expected = UNENCODABLE[name]
    with pytest.raises(PfkeyError) as info:
        encode(make())
    assert info.value.errno == expected, info.value.reason


def test_largest_message_encodes_and_decodes() -> None:
    msg = add_with(ExtType.X_KMPRIVATE, KmPrivateExt(bytes(MAX_MESSAGE_SIZE - 24)))()
    wire = encode(msg)
    assert len(wire) == MAX_MESSAGE_SIZE
    assert decode(wire) == msg


def sa_with_keys(encrypt: int, auth: int, **keys: KeyExt) -> Message:
    msg = Message(MsgType.ADD, SaType.ESP, ext={ExtType.SA: SAExt(1, auth=auth, encrypt=encrypt)})
    for name, key in keys.items():
        msg.ext[ExtType[name]] = key
    return msg


def test_check_sa_keys_accepts_matching_keys() -> None:
    assert check_sa_keys(sa_with_keys(20, 0, KEY_ENCRYPT=KeyExt(bytes(36)))) is None
    cbc_sha256 = sa_with_keys(12, 5, KEY_ENCRYPT=KeyExt(bytes(16)), KEY_AUTH=KeyExt(bytes(32)))
    assert check_sa_keys(cbc_sha256) is None
    assert check_sa_keys(Message(MsgType.ADD)) is None  # no SA: nothing to check


@pytest.mark.parametrize(("msg", "words"), [
    (sa_with_keys(28, 0, KEY_ENCRYPT=KeyExt(bytes(32))), "288"),
    (sa_with_keys(99, 0, KEY_ENCRYPT=KeyExt(bytes(16))), "unknown encryption"),
    (sa_with_keys(12, 5, KEY_ENCRYPT=KeyExt(bytes(16))), "hmac-sha256"),
    (sa_with_keys(20, 0, KEY_ENCRYPT=KeyExt(bytes(36)), KEY_AUTH=KeyExt(bytes(32))),
     "without an integrity algorithm"),
    (sa_with_keys(20, 0, KEY_ENCRYPT=KeyExt(bytes(36), 287)), "key_bits"),
])
def test_check_sa_keys_names_the_problem(msg: Message, words: str) -> None:
    assert words in (check_sa_keys(msg) or "")
