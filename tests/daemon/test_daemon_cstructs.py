"""A C client's view: messages built only from the ctypes mirrors of the Linux headers, replies
read field by field with ``from_buffer_copy``. The project's codec is not used at all."""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator

import pytest

from tests.daemon.daemon_proc import RunningDaemon
from tests.pfkey.cstructs import (
    Builder,
    extensions,
    ipsecrequest,
    sadb_address,
    sadb_key,
    sadb_lifetime,
    sadb_msg,
    sadb_sa,
    sadb_x_ipsecrequest,
    sadb_x_policy,
    sadb_x_sa2,
    sockaddr_in,
)

# Numbers from pfkeyv2.h / ipsec.h, spelled out here on purpose.
SADB_ADD, SADB_DUMP, SADB_X_SPDADD, SADB_X_SPDDUMP = 3, 10, 14, 18
SATYPE_ESP, SATYPE_UNSPEC = 3, 0
EXT_SA, EXT_CURRENT, EXT_HARD, EXT_SOFT, EXT_SRC, EXT_DST = 1, 2, 3, 4, 5, 6
EXT_KEY_AUTH, EXT_KEY_ENCRYPT, EXT_POLICY, EXT_SA2 = 8, 9, 18, 19
AALG_SHA256, EALG_AESCBC = 5, 12
MODE_TUNNEL, LEVEL_REQUIRE, POLICY_IPSEC, DIR_OUTBOUND = 2, 2, 2, 2
IPPROTO_ESP = 50
SPI = 0xC0DE0001
ENC_KEY = bytes(range(32))
AUTH_KEY = bytes(range(100, 132))
PID = os.getpid()


@pytest.fixture
def sock(daemon: RunningDaemon) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(str(daemon.socket_path))
    yield s
    s.close()


def _header(data: bytes, msg_type: int, seq: int) -> sadb_msg:
    h = sadb_msg.from_buffer_copy(data)
    assert (h.sadb_msg_version, h.sadb_msg_type, h.sadb_msg_errno) == (2, msg_type, 0)
    assert h.sadb_msg_len * 8 == len(data) and h.sadb_msg_reserved == 0
    assert (h.sadb_msg_seq, h.sadb_msg_pid) == (seq, PID)
    return h


def _ext_map(data: bytes) -> dict[int, bytes]:
    exts = extensions(data)
    by_type = dict(exts)
    assert len(by_type) == len(exts), "duplicate extension"
    for exttype, raw in exts:
        assert len(raw) % 8 == 0 and raw[2:4] == exttype.to_bytes(2, "little")
    return by_type


def _address(raw: bytes, text: str, prefixlen: int, proto: int) -> None:
    head = sadb_address.from_buffer_copy(raw)
    assert head.sadb_address_len == 3  # 8 + sockaddr_in (16)
    assert (head.sadb_address_proto, head.sadb_address_prefixlen) == (proto, prefixlen)
    sin = sockaddr_in.from_buffer_copy(raw, ctypes.sizeof(sadb_address))
    assert sin.sin_family == socket.AF_INET and sin.sin_port == 0
    assert bytes(sin.sin_addr) == socket.inet_aton(text) and bytes(sin.sin_zero) == bytes(8)


def _key(raw: bytes, key: bytes) -> None:
    head = sadb_key.from_buffer_copy(raw)
    assert head.sadb_key_bits == len(key) * 8 and head.sadb_key_reserved == 0
    assert raw[ctypes.sizeof(sadb_key):] == key  # 32 bytes: no padding


def _check_sa(data: bytes, *, keys: bool) -> None:
    ext = _ext_map(data)
    expected = {EXT_SA, EXT_CURRENT, EXT_HARD, EXT_SOFT, EXT_SRC, EXT_DST, EXT_SA2}
    assert set(ext) == expected | ({EXT_KEY_AUTH, EXT_KEY_ENCRYPT} if keys else set())
    sa = sadb_sa.from_buffer_copy(ext[EXT_SA])
    assert sa.sadb_sa_len == 2 and socket.ntohl(sa.sadb_sa_spi) == SPI
    assert (sa.sadb_sa_replay, sa.sadb_sa_state, sa.sadb_sa_auth, sa.sadb_sa_encrypt,
            sa.sadb_sa_flags) == (64, 1, AALG_SHA256, EALG_AESCBC, 0)
    hard = sadb_lifetime.from_buffer_copy(ext[EXT_HARD])
    assert (hard.sadb_lifetime_len, hard.sadb_lifetime_addtime,
            hard.sadb_lifetime_bytes) == (4, 7200, 1 << 30)
    soft = sadb_lifetime.from_buffer_copy(ext[EXT_SOFT])
    assert soft.sadb_lifetime_addtime == 3600 and soft.sadb_lifetime_allocations == 0
    current = sadb_lifetime.from_buffer_copy(ext[EXT_CURRENT])
    assert current.sadb_lifetime_addtime > 1_600_000_000 and current.sadb_lifetime_bytes == 0
    _address(ext[EXT_SRC], "192.0.2.1", 32, 0)
    _address(ext[EXT_DST], "192.0.2.2", 32, 0)
    sa2 = sadb_x_sa2.from_buffer_copy(ext[EXT_SA2])
    assert (sa2.sadb_x_sa2_len, sa2.sadb_x_sa2_mode, sa2.sadb_x_sa2_reqid) == (2, MODE_TUNNEL, 42)
    if keys:
        _key(ext[EXT_KEY_ENCRYPT], ENC_KEY)
        _key(ext[EXT_KEY_AUTH], AUTH_KEY)


def _check_policy(data: bytes) -> None:
    ext = _ext_map(data)
    assert set(ext) == {EXT_SRC, EXT_DST, EXT_POLICY, EXT_CURRENT, EXT_HARD, EXT_SOFT}
    _address(ext[EXT_SRC], "10.1.0.0", 16, 6)
    _address(ext[EXT_DST], "10.2.0.0", 24, 6)
    raw = ext[EXT_POLICY]
    pol = sadb_x_policy.from_buffer_copy(raw)
    assert pol.sadb_x_policy_len * 8 == len(raw) == 16 + 48
    assert (pol.sadb_x_policy_type, pol.sadb_x_policy_dir, pol.sadb_x_policy_priority) == (
        POLICY_IPSEC, DIR_OUTBOUND, 1000)
    assert pol.sadb_x_policy_id > 0
    req = sadb_x_ipsecrequest.from_buffer_copy(raw, 16)
    assert (req.sadb_x_ipsecrequest_len, req.sadb_x_ipsecrequest_proto,
            req.sadb_x_ipsecrequest_mode, req.sadb_x_ipsecrequest_level,
            req.sadb_x_ipsecrequest_reqid) == (48, IPPROTO_ESP, MODE_TUNNEL, LEVEL_REQUIRE, 0)
    tsrc = sockaddr_in.from_buffer_copy(raw, 32)
    tdst = sockaddr_in.from_buffer_copy(raw, 48)
    assert bytes(tsrc.sin_addr) == socket.inet_aton("192.0.2.1")
    assert bytes(tdst.sin_addr) == socket.inet_aton("192.0.2.2")
    assert tsrc.sin_family == tdst.sin_family == socket.AF_INET


def _dump(sock: socket.socket, msg_type: int, satype: int, seq: int) -> list[bytes]:
    sock.send(Builder(type=msg_type, satype=satype, seq=seq, pid=PID).build())
    out = []
    while True:
        data = sock.recv(1 << 16)
        h = sadb_msg.from_buffer_copy(data)
        assert h.sadb_msg_type == msg_type and h.sadb_msg_errno == 0
        out.append(data)
        if h.sadb_msg_seq == 0:
            return out


def test_c_client_adds_and_dumps_an_sa_and_a_policy(sock: socket.socket) -> None:
    add = (Builder(type=SADB_ADD, satype=SATYPE_ESP, seq=1, pid=PID)
           .sa(spi=SPI, replay=64, auth=AALG_SHA256, encrypt=EALG_AESCBC)
           .lifetime(EXT_HARD, nbytes=1 << 30, addtime=7200)
           .lifetime(EXT_SOFT, addtime=3600)
           .address(EXT_SRC, "192.0.2.1").address(EXT_DST, "192.0.2.2")
           .key(EXT_KEY_AUTH, AUTH_KEY).key(EXT_KEY_ENCRYPT, ENC_KEY)
           .sa2(MODE_TUNNEL, reqid=42)
           .build())
    sock.send(add)
    reply = sock.recv(1 << 16)
    _header(reply, SADB_ADD, 1)
    assert sadb_msg.from_buffer_copy(reply).sadb_msg_satype == SATYPE_ESP
    _check_sa(reply, keys=False)

    spdadd = (Builder(type=SADB_X_SPDADD, satype=SATYPE_UNSPEC, seq=2, pid=PID)
              .address(EXT_SRC, "10.1.0.0", prefixlen=16, proto=6)
              .address(EXT_DST, "10.2.0.0", prefixlen=24, proto=6)
              .policy(POLICY_IPSEC, DIR_OUTBOUND, [ipsecrequest(
                  IPPROTO_ESP, MODE_TUNNEL, LEVEL_REQUIRE, src="192.0.2.1", dst="192.0.2.2")],
                  priority=1000)
              .build())
    sock.send(spdadd)
    reply = sock.recv(1 << 16)
    _header(reply, SADB_X_SPDADD, 2)
    _check_policy(reply)

    [sa_dump] = _dump(sock, SADB_DUMP, SATYPE_ESP, 3)
    assert sadb_msg.from_buffer_copy(sa_dump).sadb_msg_pid == PID
    _check_sa(sa_dump, keys=True)
    [spd_dump] = _dump(sock, SADB_X_SPDDUMP, SATYPE_UNSPEC, 4)
    _check_policy(spd_dump)
