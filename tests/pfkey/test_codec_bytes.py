"""The codec against hand-laid bytes (RFC 2367, Linux pfkeyv2.h/ipsec.h) and the ctypes builder.

Each expected message is written field by field. ``u16``/``u32``/``u64`` are host byte order
(Linux sends lengths and counters so), ``be16``/``be32`` network order (SPIs, ports).
"""

from __future__ import annotations

import ctypes
import socket
import sys
from ipaddress import ip_address

import pytest

from tests.pfkey import cstructs as c
from userspace_ipsec.pfkey.codec import decode, encode
from userspace_ipsec.pfkey.constants import (
    ExtType,
    IdentType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    NatTType,
    PolicyDir,
    PolicyType,
    SaState,
    SaType,
)
from userspace_ipsec.pfkey.messages import (
    AddressExt,
    IdentityExt,
    IpsecRequest,
    KeyExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    PolicyExt,
    SA2Ext,
    SAExt,
    SpiRangeExt,
    SupportedAlg,
    SupportedExt,
    UipsecExt,
)


def u8(v: int) -> bytes:
    return bytes([v])


def u16(v: int) -> bytes:
    return v.to_bytes(2, sys.byteorder)


def u32(v: int) -> bytes:
    return v.to_bytes(4, sys.byteorder)


def u64(v: int) -> bytes:
    return v.to_bytes(8, sys.byteorder)


def be16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def be32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def sadb_msg(msg_type: int, satype: int, words: int, seq: int, pid: int, errno: int = 0) -> bytes:
    return (
        u8(2)  # sadb_msg_version = PF_KEY_V2
        + u8(msg_type)  # sadb_msg_type
        + u8(errno)  # sadb_msg_errno
        + u8(satype)  # sadb_msg_satype
        + u16(words)  # sadb_msg_len, 64-bit words, header included
        + u16(0)  # sadb_msg_reserved
        + u32(seq)  # sadb_msg_seq
        + u32(pid)  # sadb_msg_pid
    )


def sin(addr: str, port: int = 0) -> bytes:
    return (
        u16(socket.AF_INET)  # sin_family (2), host order
        + be16(port)  # sin_port
        + socket.inet_pton(socket.AF_INET, addr)  # sin_addr
        + bytes(8)  # sin_zero
    )


def sin6(addr: str, port: int = 0, scope: int = 0) -> bytes:
    return (
        u16(socket.AF_INET6)  # sin6_family (10), host order
        + be16(port)  # sin6_port
        + be32(0)  # sin6_flowinfo
        + socket.inet_pton(socket.AF_INET6, addr)  # sin6_addr
        + u32(scope)  # sin6_scope_id
    )


def sadb_address(exttype: int, sockaddr: bytes, prefixlen: int, proto: int = 0) -> bytes:
    body = (
        u16((8 + len(sockaddr) + 7) // 8)  # sadb_address_len: 3 for v4, 5 for v6
        + u16(exttype)  # sadb_address_exttype
        + u8(proto)  # sadb_address_proto
        + u8(prefixlen)  # sadb_address_prefixlen
        + u16(0)  # sadb_address_reserved
        + sockaddr
    )
    return body + bytes(-len(body) % 8)  # sockaddr_in6 (28) leaves 4 bytes of padding


PID = 4242
AUTH_KEY = bytes(range(32))
ENC_KEY = bytes(range(100, 116))

ADD_BYTES = (
    sadb_msg(3, 3, 28, 1, PID)  # SADB_ADD, SADB_SATYPE_ESP, 224 bytes
    # sadb_sa
    + u16(2) + u16(1)  # len 2, SADB_EXT_SA
    + be32(0xC001)  # sadb_sa_spi
    + u8(32)  # sadb_sa_replay (packets)
    + u8(1)  # sadb_sa_state = MATURE
    + u8(5)  # sadb_sa_auth = SADB_X_AALG_SHA2_256HMAC
    + u8(12)  # sadb_sa_encrypt = SADB_X_EALG_AESCBC
    + u32(0)  # sadb_sa_flags
    # sadb_lifetime (hard)
    + u16(4) + u16(3)  # len 4, SADB_EXT_LIFETIME_HARD
    + u32(0)  # sadb_lifetime_allocations
    + u64(1 << 30)  # sadb_lifetime_bytes
    + u64(3600)  # sadb_lifetime_addtime
    + u64(0)  # sadb_lifetime_usetime
    # sadb_lifetime (soft)
    + u16(4) + u16(4)  # len 4, SADB_EXT_LIFETIME_SOFT
    + u32(0) + u64(0) + u64(3000) + u64(0)
    + sadb_address(5, sin("192.0.2.1"), 32, 255)  # SRC, proto IPSEC_PROTO_ANY
    + sadb_address(6, sin("192.0.2.2"), 32, 255)  # DST
    # sadb_key (auth)
    + u16(5) + u16(8)  # len (8 + 32) / 8, SADB_EXT_KEY_AUTH
    + u16(256) + u16(0)  # sadb_key_bits, sadb_key_reserved
    + AUTH_KEY
    # sadb_key (encrypt)
    + u16(3) + u16(9)  # len (8 + 16) / 8, SADB_EXT_KEY_ENCRYPT
    + u16(128) + u16(0)
    + ENC_KEY
    # sadb_x_sa2
    + u16(2) + u16(19)  # len 2, SADB_X_EXT_SA2
    + u8(2)  # sadb_x_sa2_mode = IPSEC_MODE_TUNNEL
    + u8(0) + u16(0)  # reserved1, reserved2
    + u32(0)  # sadb_x_sa2_sequence
    + u32(7)  # sadb_x_sa2_reqid
)

ADD_MSG = Message(
    MsgType.ADD, SaType.ESP, seq=1, pid=PID,
    ext={
        ExtType.SA: SAExt(0xC001, 32, SaState.MATURE, 5, 12),
        ExtType.LIFETIME_HARD: LifetimeExt(0, 1 << 30, 3600, 0),
        ExtType.LIFETIME_SOFT: LifetimeExt(0, 0, 3000, 0),
        ExtType.ADDRESS_SRC: AddressExt(ip_address("192.0.2.1"), 32, 255),
        ExtType.ADDRESS_DST: AddressExt(ip_address("192.0.2.2"), 32, 255),
        ExtType.KEY_AUTH: KeyExt(AUTH_KEY, 256),
        ExtType.KEY_ENCRYPT: KeyExt(ENC_KEY, 128),
        ExtType.X_SA2: SA2Ext(IpsecMode.TUNNEL, 0, 7),
    },
)

ADD_CTYPES = (
    c.Builder(3, 3, 1, PID)
    .sa(0xC001, replay=32, state=1, auth=5, encrypt=12)
    .lifetime(3, nbytes=1 << 30, addtime=3600)
    .lifetime(4, addtime=3000)
    .address(5, "192.0.2.1", proto=255)
    .address(6, "192.0.2.2", proto=255)
    .key(8, AUTH_KEY)
    .key(9, ENC_KEY)
    .sa2(2, reqid=7)
)


def spdadd_bytes(v6: bool) -> bytes:
    if v6:
        sel_src = sadb_address(5, sin6("2001:db8:1::"), 48, 255)
        sel_dst = sadb_address(6, sin6("2001:db8:2::"), 48, 255)
        endpoints = sin6("2001:db8::1") + sin6("2001:db8::2")  # 28 + 28, unpadded between
    else:
        sel_src = sadb_address(5, sin("10.1.0.0"), 16, 255)
        sel_dst = sadb_address(6, sin("10.2.0.0"), 16, 255)
        endpoints = sin("192.0.2.1") + sin("192.0.2.2")
    request = (
        u16(16 + len(endpoints))  # sadb_x_ipsecrequest_len in BYTES: 48 (v4) or 72 (v6)
        + u16(50)  # sadb_x_ipsecrequest_proto = IPPROTO_ESP
        + u8(2)  # sadb_x_ipsecrequest_mode = IPSEC_MODE_TUNNEL
        + u8(3)  # sadb_x_ipsecrequest_level = IPSEC_LEVEL_UNIQUE
        + u16(0)  # reserved1
        + u32(42)  # sadb_x_ipsecrequest_reqid
        + u32(0)  # reserved2
        + endpoints
    )
    policy = (
        u16((16 + len(request)) // 8) + u16(18)  # len, SADB_X_EXT_POLICY
        + u16(2)  # sadb_x_policy_type = IPSEC_POLICY_IPSEC
        + u8(2)  # sadb_x_policy_dir = IPSEC_DIR_OUTBOUND
        + u8(0)  # reserved
        + u32(0)  # sadb_x_policy_id
        + u32(0x80000000)  # sadb_x_policy_priority
        + request
    )
    body = sel_src + sel_dst + policy
    return sadb_msg(14, 0, (16 + len(body)) // 8, 2, PID) + body  # SADB_X_SPDADD


def spdadd_msg(v6: bool) -> Message:
    if v6:
        sel = ("2001:db8:1::", "2001:db8:2::", 48)
        tun = ("2001:db8::1", "2001:db8::2")
    else:
        sel = ("10.1.0.0", "10.2.0.0", 16)
        tun = ("192.0.2.1", "192.0.2.2")
    request = IpsecRequest(
        50, IpsecMode.TUNNEL, IpsecLevel.UNIQUE, 42, ip_address(tun[0]), ip_address(tun[1])
    )
    return Message(
        MsgType.X_SPDADD, SaType.UNSPEC, seq=2, pid=PID,
        ext={
            ExtType.ADDRESS_SRC: AddressExt(ip_address(sel[0]), sel[2], 255),
            ExtType.ADDRESS_DST: AddressExt(ip_address(sel[1]), sel[2], 255),
            ExtType.X_POLICY: PolicyExt(
                PolicyType.IPSEC, PolicyDir.OUTBOUND, 0, 0x80000000, [request]
            ),
        },
    )


def spdadd_ctypes(v6: bool) -> c.Builder:
    sel = ("2001:db8:1::", "2001:db8:2::", 48) if v6 else ("10.1.0.0", "10.2.0.0", 16)
    tun = ("2001:db8::1", "2001:db8::2") if v6 else ("192.0.2.1", "192.0.2.2")
    return (
        c.Builder(14, 0, 2, PID)
        .address(5, sel[0], sel[2], proto=255)
        .address(6, sel[1], sel[2], proto=255)
        .policy(2, 2, [c.ipsecrequest(50, 2, 3, 42, *tun)], priority=0x80000000)
    )


GETSPI_BYTES = (
    sadb_msg(1, 3, 10, 3, PID)  # SADB_GETSPI, ESP, 80 bytes
    + sadb_address(5, sin("198.51.100.1"), 32)
    + sadb_address(6, sin("198.51.100.2"), 32)
    + u16(2) + u16(16)  # len 2, SADB_EXT_SPIRANGE
    + u32(0x100)  # sadb_spirange_min, host order (af_key.c reads it unswapped)
    + u32(0x0FFFFFFF)  # sadb_spirange_max
    + u32(0)  # reserved
)
GETSPI_MSG = Message(
    MsgType.GETSPI, SaType.ESP, seq=3, pid=PID,
    ext={
        ExtType.ADDRESS_SRC: AddressExt(ip_address("198.51.100.1"), 32),
        ExtType.ADDRESS_DST: AddressExt(ip_address("198.51.100.2"), 32),
        ExtType.SPIRANGE: SpiRangeExt(0x100, 0x0FFFFFFF),
    },
)
GETSPI_CTYPES = (
    c.Builder(1, 3, 3, PID)
    .address(5, "198.51.100.1")
    .address(6, "198.51.100.2")
    .spirange(0x100, 0x0FFFFFFF)
)


def sadb_alg(alg_id: int, ivlen: int, minbits: int, maxbits: int) -> bytes:
    return u8(alg_id) + u8(ivlen) + u16(minbits) + u16(maxbits) + u16(0)  # + reserved


REGISTER_BYTES = (
    sadb_msg(7, 3, 8, 4, PID)  # SADB_REGISTER reply, ESP, 64 bytes
    + u16(3) + u16(14) + u32(0)  # sadb_supported: len 3, SUPPORTED_AUTH, reserved
    + sadb_alg(5, 0, 256, 256)  # hmac-sha256
    + sadb_alg(3, 0, 160, 160)  # hmac-sha1
    + u16(3) + u16(15) + u32(0)  # SUPPORTED_ENCRYPT
    + sadb_alg(12, 16, 128, 256)  # aes-cbc
    + sadb_alg(20, 8, 160, 288)  # aes-gcm-16
)
REGISTER_MSG = Message(
    MsgType.REGISTER, SaType.ESP, seq=4, pid=PID,
    ext={
        ExtType.SUPPORTED_AUTH: SupportedExt(
            [SupportedAlg(5, 0, 256, 256), SupportedAlg(3, 0, 160, 160)]
        ),
        ExtType.SUPPORTED_ENCRYPT: SupportedExt(
            [SupportedAlg(12, 16, 128, 256), SupportedAlg(20, 8, 160, 288)]
        ),
    },
)
REGISTER_CTYPES = (
    c.Builder(7, 3, 4, PID)
    .supported(14, [(5, 0, 256, 256), (3, 0, 160, 160)])
    .supported(15, [(12, 16, 128, 256), (20, 8, 160, 288)])
)

GCM_KEY = bytes(range(36))  # AES-256 key + 4-byte salt: 288 bits, 40 bytes once padded
NATT_BYTES = (
    sadb_msg(3, 3, 19, 5, PID)  # SADB_ADD, ESP, 152 bytes
    + u16(2) + u16(1) + be32(0xDEADBEEF) + u8(64) + u8(1) + u8(0) + u8(20) + u32(0)  # sadb_sa
    + sadb_address(5, sin("203.0.113.5", 4500), 32, 17)  # SRC with port: proto UDP
    + sadb_address(6, sin("198.51.100.9", 4500), 32, 17)  # DST
    + u16(6) + u16(9) + u16(288) + u16(0) + GCM_KEY + bytes(4)  # KEY_ENCRYPT, 4 pad bytes
    + u16(1) + u16(20)  # sadb_x_nat_t_type: len 1, SADB_X_EXT_NAT_T_TYPE
    + u8(2) + bytes(3)  # UDP_ENCAP_ESPINUDP, reserved[3]
    + u16(1) + u16(21) + be16(4500) + u16(0)  # sadb_x_nat_t_port: SPORT
    + u16(1) + u16(22) + be16(4501) + u16(0)  # DPORT
)
NATT_MSG = Message(
    MsgType.ADD, SaType.ESP, seq=5, pid=PID,
    ext={
        ExtType.SA: SAExt(0xDEADBEEF, 64, SaState.MATURE, 0, 20),
        ExtType.ADDRESS_SRC: AddressExt(ip_address("203.0.113.5"), 32, 17, 4500),
        ExtType.ADDRESS_DST: AddressExt(ip_address("198.51.100.9"), 32, 17, 4500),
        ExtType.KEY_ENCRYPT: KeyExt(GCM_KEY, 288),
        ExtType.X_NAT_T_TYPE: NatTTypeExt(NatTType.ESPINUDP),
        ExtType.X_NAT_T_SPORT: NatTPortExt(4500),
        ExtType.X_NAT_T_DPORT: NatTPortExt(4501),
    },
)
NATT_CTYPES = (
    c.Builder(3, 3, 5, PID)
    .sa(0xDEADBEEF, replay=64, encrypt=20)
    .address(5, "203.0.113.5", proto=17, port=4500)
    .address(6, "198.51.100.9", proto=17, port=4500)
    .key(9, GCM_KEY)
    .nat_t_type(2)
    .nat_t_port(21, 4500)
    .nat_t_port(22, 4501)
)

ERROR_BYTES = sadb_msg(3, 3, 2, 9, PID, errno=17)  # SADB_ADD answered EEXIST, header only
ERROR_MSG = Message(MsgType.ADD, SaType.ESP, seq=9, pid=PID, errno=17)
ERROR_CTYPES = c.Builder(3, 3, 9, PID, errno=17)

CASES = {
    "add": (ADD_BYTES, ADD_MSG, ADD_CTYPES),
    "spdadd-v4": (spdadd_bytes(False), spdadd_msg(False), spdadd_ctypes(False)),
    "spdadd-v6": (spdadd_bytes(True), spdadd_msg(True), spdadd_ctypes(True)),
    "getspi": (GETSPI_BYTES, GETSPI_MSG, GETSPI_CTYPES),
    "register": (REGISTER_BYTES, REGISTER_MSG, REGISTER_CTYPES),
    "nat-t": (NATT_BYTES, NATT_MSG, NATT_CTYPES),
    "error": (ERROR_BYTES, ERROR_MSG, ERROR_CTYPES),
}


@pytest.mark.parametrize("name", CASES)
def test_encode_matches_hand_laid_bytes(name: str) -> None:
    wire, msg, _ = CASES[name]
    assert encode(msg) == wire


@pytest.mark.parametrize("name", CASES)
def test_decode_hand_laid_bytes(name: str) -> None:
    wire, msg, _ = CASES[name]
    assert decode(wire) == msg


@pytest.mark.parametrize("name", CASES)
def test_ctypes_builder_agrees(name: str) -> None:
    wire, msg, builder = CASES[name]
    built = builder.build()
    assert built == wire
    assert encode(msg) == built
    assert decode(built) == msg


def test_sadb_msg_len_counts_words() -> None:
    header = c.sadb_msg.from_buffer_copy(ADD_BYTES)
    assert header.sadb_msg_len * 8 == len(ADD_BYTES) == 224
    assert [t for t, _ in c.extensions(ADD_BYTES)] == [1, 3, 4, 5, 6, 8, 9, 19]


def test_ctypes_sizes_match_the_headers() -> None:
    for struct_type, size in c.SIZES.items():
        assert ctypes.sizeof(struct_type) == size, struct_type.__name__


def test_prefixlen_none_encodes_full_length_and_decodes_as_int() -> None:
    msg = Message(MsgType.X_SPDGET, ext={
        ExtType.ADDRESS_SRC: AddressExt(ip_address("10.0.0.1")),
        ExtType.ADDRESS_DST: AddressExt(ip_address("2001:db8::1")),
    })
    wire = encode(msg)
    assert wire[16 + 5] == 32 and wire[16 + 24 + 5] == 128  # sadb_address_prefixlen
    back = decode(wire)
    assert back.src == AddressExt(ip_address("10.0.0.1"), 32)
    assert back.dst == AddressExt(ip_address("2001:db8::1"), 128)


def test_key_bits_below_the_key_length_send_only_those_bytes() -> None:
    msg = Message(MsgType.ADD, SaType.ESP, ext={ExtType.KEY_AUTH: KeyExt(bytes(range(20)), 81)})
    wire = encode(msg)
    # 81 bits = 11 bytes of key, padded to 16: the extension is 3 words.
    assert wire[16:24] == u16(3) + u16(8) + u16(81) + u16(0)
    assert wire[24:] == bytes(range(11)) + bytes(5)
    assert decode(wire).ext[ExtType.KEY_AUTH] == KeyExt(bytes(range(11)), 81)


def test_identity_is_a_nul_terminated_padded_string() -> None:
    msg = Message(MsgType.ACQUIRE, SaType.ESP, ext={
        ExtType.IDENTITY_SRC: IdentityExt(IdentType.FQDN, 0, b"gw.example"),  # 10 chars
    })
    wire = encode(msg)
    assert wire[16:32] == u16(4) + u16(10) + u16(2) + u16(0) + u64(0)  # len 4 = 16 + 16
    assert wire[32:48] == b"gw.example" + bytes(6)
    # Exactly 8 characters still gets its terminator: a further word of NULs.
    eight = IdentityExt(IdentType.USERFQDN, 7, b"a@b.test")
    wire8 = encode(Message(MsgType.ACQUIRE, ext={ExtType.IDENTITY_DST: eight}))
    assert wire8[16:18] == u16(4) and wire8[32:48] == b"a@b.test" + bytes(8)
    assert decode(wire8).ext[ExtType.IDENTITY_DST] == eight


def test_ipv6_scope_id_travels_in_sin6_scope_id() -> None:
    msg = Message(MsgType.GET, SaType.ESP, ext={
        ExtType.ADDRESS_DST: AddressExt(ip_address("fe80::1%7"), 128),
    })
    wire = encode(msg)
    assert wire[16:56] == sadb_address(6, sin6("fe80::1", 0, 7), 128)
    assert decode(wire) == msg


def test_request_endpoint_ports_travel_in_the_sockaddrs() -> None:
    request = IpsecRequest(50, IpsecMode.TUNNEL, IpsecLevel.REQUIRE, 0,
                           ip_address("192.0.2.1"), ip_address("192.0.2.2"), 4500, 4501)
    msg = Message(MsgType.X_SPDADD, ext={
        ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, PolicyDir.INBOUND, requests=[request]),
    })
    wire = encode(msg)
    assert wire[32 + 16:] == sin("192.0.2.1", 4500) + sin("192.0.2.2", 4501)
    assert decode(wire) == msg


def test_transport_request_has_no_sockaddrs() -> None:
    request = IpsecRequest(51, IpsecMode.TRANSPORT, IpsecLevel.USE, 0)
    built = c.Builder(14).policy(2, 1, [c.ipsecrequest(51, 1, 1)]).build()
    msg = Message(MsgType.X_SPDADD, ext={
        ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, PolicyDir.INBOUND, requests=[request]),
    })
    assert encode(msg) == built
    assert built[32:34] == u16(16)  # sadb_x_ipsecrequest_len: the bare 16-byte header
    assert decode(built) == msg


def test_uipsec_extension_layout() -> None:
    ext = UipsecExt(flags=1, replay_window=4096, packets_in=2, packets_out=3, bytes_in=4,
                    bytes_out=5, replay_drops=6, auth_failures=7)
    wire = encode(Message(MsgType.GET, SaType.ESP, ext={ExtType.X_UIPSEC: ext}))
    assert wire[16:] == (
        u16(10) + u16(0x7F)  # 80 bytes, SADB_X_EXT_UIPSEC (private)
        + u8(1) + bytes(3)  # version 1, reserved
        + u32(1)  # flags: UIPSEC_FLAG_ESN
        + u32(4096)  # replay_window, packets
        + u64(2) + u64(3) + u64(4) + u64(5) + u64(6) + u64(7)  # counters
        + bytes(16)  # reserved for growth
    )
    assert decode(wire).uipsec == ext


def test_longer_uipsec_extension_from_a_newer_version_is_read() -> None:
    v2 = u16(12) + u16(0x7F) + u8(2) + bytes(3) + u32(0) + u32(64) + bytes(48 + 16) + bytes(16)
    wire = sadb_msg(5, 3, 2 + 12, 0, 0) + v2
    assert decode(wire).uipsec == UipsecExt(replay_window=64)
