"""ctypes mirrors of Linux's PF_KEYv2 structures, and a message builder: an independent encoder.

Every class copies its C struct from include/uapi/linux/pfkeyv2.h (all ``__attribute__((packed))``)
or netinet/in.h field by field, in host byte order; fields the header types ``__be16``/``__be32``
(SPI, ports) hold network-order values, so the builder stores ``htonl``/``htons`` of them just as
C code does. Nothing here imports the project's codec or constants: tests compare the two.

Use from any test or tool that needs to speak PF_KEY bytes without the codec, e.g. to drive the
daemon's socket like a C client would::

    msg = (Builder(type=3, satype=3, seq=1, pid=os.getpid())   # SADB_ADD, SADB_SATYPE_ESP
           .sa(spi=0x1000, replay=32, encrypt=20)
           .address(5, "10.0.0.1").address(6, "10.0.0.2")      # ADDRESS_SRC, ADDRESS_DST
           .key(9, bytes(20))                                   # KEY_ENCRYPT
           .build())
    header = sadb_msg.from_buffer_copy(reply)
    for exttype, ext_bytes in extensions(reply): ...
"""

from __future__ import annotations

import ctypes
import socket
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64
from typing import Any

_ADDR_FAMILIES = {4: socket.AF_INET, 16: socket.AF_INET6}


class _Packed(ctypes.Structure):
    _pack_ = 1


class sadb_msg(_Packed):  # noqa: N801 - C names, on purpose
    _fields_ = [
        ("sadb_msg_version", c_uint8),
        ("sadb_msg_type", c_uint8),
        ("sadb_msg_errno", c_uint8),
        ("sadb_msg_satype", c_uint8),
        ("sadb_msg_len", c_uint16),
        ("sadb_msg_reserved", c_uint16),
        ("sadb_msg_seq", c_uint32),
        ("sadb_msg_pid", c_uint32),
    ]


class sadb_ext(_Packed):  # noqa: N801
    _fields_ = [("sadb_ext_len", c_uint16), ("sadb_ext_type", c_uint16)]


class sadb_sa(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_sa_len", c_uint16),
        ("sadb_sa_exttype", c_uint16),
        ("sadb_sa_spi", c_uint32),  # __be32
        ("sadb_sa_replay", c_uint8),
        ("sadb_sa_state", c_uint8),
        ("sadb_sa_auth", c_uint8),
        ("sadb_sa_encrypt", c_uint8),
        ("sadb_sa_flags", c_uint32),
    ]


class sadb_lifetime(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_lifetime_len", c_uint16),
        ("sadb_lifetime_exttype", c_uint16),
        ("sadb_lifetime_allocations", c_uint32),
        ("sadb_lifetime_bytes", c_uint64),
        ("sadb_lifetime_addtime", c_uint64),
        ("sadb_lifetime_usetime", c_uint64),
    ]


class sadb_address(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_address_len", c_uint16),
        ("sadb_address_exttype", c_uint16),
        ("sadb_address_proto", c_uint8),
        ("sadb_address_prefixlen", c_uint8),
        ("sadb_address_reserved", c_uint16),
    ]


class sadb_key(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_key_len", c_uint16),
        ("sadb_key_exttype", c_uint16),
        ("sadb_key_bits", c_uint16),
        ("sadb_key_reserved", c_uint16),
    ]


class sadb_ident(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_ident_len", c_uint16),
        ("sadb_ident_exttype", c_uint16),
        ("sadb_ident_type", c_uint16),
        ("sadb_ident_reserved", c_uint16),
        ("sadb_ident_id", c_uint64),
    ]


class sadb_prop(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_prop_len", c_uint16),
        ("sadb_prop_exttype", c_uint16),
        ("sadb_prop_replay", c_uint8),
        ("sadb_prop_reserved", c_uint8 * 3),
    ]


class sadb_comb(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_comb_auth", c_uint8),
        ("sadb_comb_encrypt", c_uint8),
        ("sadb_comb_flags", c_uint16),
        ("sadb_comb_auth_minbits", c_uint16),
        ("sadb_comb_auth_maxbits", c_uint16),
        ("sadb_comb_encrypt_minbits", c_uint16),
        ("sadb_comb_encrypt_maxbits", c_uint16),
        ("sadb_comb_reserved", c_uint32),
        ("sadb_comb_soft_allocations", c_uint32),
        ("sadb_comb_hard_allocations", c_uint32),
        ("sadb_comb_soft_bytes", c_uint64),
        ("sadb_comb_hard_bytes", c_uint64),
        ("sadb_comb_soft_addtime", c_uint64),
        ("sadb_comb_hard_addtime", c_uint64),
        ("sadb_comb_soft_usetime", c_uint64),
        ("sadb_comb_hard_usetime", c_uint64),
    ]


class sadb_supported(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_supported_len", c_uint16),
        ("sadb_supported_exttype", c_uint16),
        ("sadb_supported_reserved", c_uint32),
    ]


class sadb_alg(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_alg_id", c_uint8),
        ("sadb_alg_ivlen", c_uint8),
        ("sadb_alg_minbits", c_uint16),
        ("sadb_alg_maxbits", c_uint16),
        ("sadb_alg_reserved", c_uint16),
    ]


class sadb_spirange(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_spirange_len", c_uint16),
        ("sadb_spirange_exttype", c_uint16),
        ("sadb_spirange_min", c_uint32),
        ("sadb_spirange_max", c_uint32),
        ("sadb_spirange_reserved", c_uint32),
    ]


class sadb_x_kmprivate(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_x_kmprivate_len", c_uint16),
        ("sadb_x_kmprivate_exttype", c_uint16),
        ("sadb_x_kmprivate_reserved", c_uint32),
    ]


class sadb_x_sa2(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_x_sa2_len", c_uint16),
        ("sadb_x_sa2_exttype", c_uint16),
        ("sadb_x_sa2_mode", c_uint8),
        ("sadb_x_sa2_reserved1", c_uint8),
        ("sadb_x_sa2_reserved2", c_uint16),
        ("sadb_x_sa2_sequence", c_uint32),
        ("sadb_x_sa2_reqid", c_uint32),
    ]


class sadb_x_policy(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_x_policy_len", c_uint16),
        ("sadb_x_policy_exttype", c_uint16),
        ("sadb_x_policy_type", c_uint16),
        ("sadb_x_policy_dir", c_uint8),
        ("sadb_x_policy_reserved", c_uint8),
        ("sadb_x_policy_id", c_uint32),
        ("sadb_x_policy_priority", c_uint32),
    ]


class sadb_x_ipsecrequest(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_x_ipsecrequest_len", c_uint16),  # in BYTES, unlike every other length
        ("sadb_x_ipsecrequest_proto", c_uint16),
        ("sadb_x_ipsecrequest_mode", c_uint8),
        ("sadb_x_ipsecrequest_level", c_uint8),
        ("sadb_x_ipsecrequest_reserved1", c_uint16),
        ("sadb_x_ipsecrequest_reqid", c_uint32),
        ("sadb_x_ipsecrequest_reserved2", c_uint32),
    ]


class sadb_x_nat_t_type(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_x_nat_t_type_len", c_uint16),
        ("sadb_x_nat_t_type_exttype", c_uint16),
        ("sadb_x_nat_t_type_type", c_uint8),
        ("sadb_x_nat_t_type_reserved", c_uint8 * 3),
    ]


class sadb_x_nat_t_port(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_x_nat_t_port_len", c_uint16),
        ("sadb_x_nat_t_port_exttype", c_uint16),
        ("sadb_x_nat_t_port_port", c_uint16),  # __be16
        ("sadb_x_nat_t_port_reserved", c_uint16),
    ]


class sadb_x_sec_ctx(_Packed):  # noqa: N801
    _fields_ = [
        ("sadb_x_sec_len", c_uint16),
        ("sadb_x_sec_exttype", c_uint16),
        ("sadb_x_ctx_alg", c_uint8),
        ("sadb_x_ctx_doi", c_uint8),
        ("sadb_x_ctx_len", c_uint16),
    ]


class sockaddr_in(_Packed):  # noqa: N801
    _fields_ = [
        ("sin_family", c_uint16),
        ("sin_port", c_uint16),  # __be16
        ("sin_addr", c_uint8 * 4),
        ("sin_zero", c_uint8 * 8),
    ]


class sockaddr_in6(_Packed):  # noqa: N801
    _fields_ = [
        ("sin6_family", c_uint16),
        ("sin6_port", c_uint16),  # __be16
        ("sin6_flowinfo", c_uint32),  # __be32
        ("sin6_addr", c_uint8 * 16),
        ("sin6_scope_id", c_uint32),
    ]


SIZES = {  # the sizes the C headers promise (pfkeyv2.h comments, netinet/in.h)
    sadb_msg: 16, sadb_ext: 4, sadb_sa: 16, sadb_lifetime: 32, sadb_address: 8, sadb_key: 8,
    sadb_ident: 16, sadb_prop: 8, sadb_comb: 72, sadb_supported: 8, sadb_alg: 8,
    sadb_spirange: 16, sadb_x_kmprivate: 8, sadb_x_sa2: 16, sadb_x_policy: 16,
    sadb_x_ipsecrequest: 16, sadb_x_nat_t_type: 8, sadb_x_nat_t_port: 8, sadb_x_sec_ctx: 8,
    sockaddr_in: 16, sockaddr_in6: 28,
}


def sockaddr(address: str, port: int = 0, scope_id: int = 0) -> sockaddr_in | sockaddr_in6:
    """sockaddr_in or sockaddr_in6 for a textual address (port in host order here)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    raw = socket.inet_pton(family, address)
    if family == socket.AF_INET:
        sin = sockaddr_in(sin_family=family, sin_port=socket.htons(port))
        sin.sin_addr[:] = list(raw)
        return sin
    sin6 = sockaddr_in6(sin6_family=family, sin6_port=socket.htons(port), sin6_scope_id=scope_id)
    sin6.sin6_addr[:] = list(raw)
    return sin6


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def _extension(head: ctypes.Structure, trailer: bytes = b"") -> bytes:
    """Fill the length (first u16, in 64-bit words) of ``head`` and pad ``head + trailer``."""
    body = _pad8(bytes(head) + trailer)
    c_uint16.from_buffer(head).value = len(body) // 8
    return bytes(head) + body[ctypes.sizeof(head):]


def ipsecrequest(proto: int, mode: int, level: int, reqid: int = 0,
                 src: str | None = None, dst: str | None = None,
                 src_port: int = 0, dst_port: int = 0) -> bytes:
    """One sadb_x_ipsecrequest, its length in bytes, with tunnel sockaddrs when given."""
    addrs = b""
    if src is not None and dst is not None:
        addrs = bytes(sockaddr(src, src_port)) + bytes(sockaddr(dst, dst_port))
    rq = sadb_x_ipsecrequest(
        sadb_x_ipsecrequest_proto=proto, sadb_x_ipsecrequest_mode=mode,
        sadb_x_ipsecrequest_level=level, sadb_x_ipsecrequest_reqid=reqid,
    )
    body = _pad8(bytes(rq) + addrs)
    rq.sadb_x_ipsecrequest_len = len(body)
    return bytes(rq) + body[ctypes.sizeof(rq):]


class Builder:
    """Assembles a PF_KEY message from the ctypes structures, extension by extension."""

    def __init__(self, type: int, satype: int = 0, seq: int = 0, pid: int = 0,
                 errno: int = 0, version: int = 2) -> None:
        self.header = sadb_msg(
            sadb_msg_version=version, sadb_msg_type=type, sadb_msg_errno=errno,
            sadb_msg_satype=satype, sadb_msg_seq=seq, sadb_msg_pid=pid,
        )
        self.parts: list[bytes] = []

    def raw(self, data: bytes) -> Builder:
        self.parts.append(data)
        return self

    def ext(self, struct_type: type[ctypes.Structure], trailer: bytes = b"",
            **fields: Any) -> Builder:
        """Any extension: its C struct with ``fields``, then ``trailer``; length filled in."""
        return self.raw(_extension(struct_type(**fields), trailer))

    def sa(self, spi: int, replay: int = 0, state: int = 1, auth: int = 0, encrypt: int = 0,
           flags: int = 0) -> Builder:
        return self.ext(
            sadb_sa, sadb_sa_exttype=1, sadb_sa_spi=socket.htonl(spi), sadb_sa_replay=replay,
            sadb_sa_state=state, sadb_sa_auth=auth, sadb_sa_encrypt=encrypt,
            sadb_sa_flags=flags,
        )

    def lifetime(self, exttype: int, allocations: int = 0, nbytes: int = 0, addtime: int = 0,
                 usetime: int = 0) -> Builder:
        return self.ext(
            sadb_lifetime, sadb_lifetime_exttype=exttype,
            sadb_lifetime_allocations=allocations, sadb_lifetime_bytes=nbytes,
            sadb_lifetime_addtime=addtime, sadb_lifetime_usetime=usetime,
        )

    def address(self, exttype: int, address: str, prefixlen: int | None = None,
                proto: int = 0, port: int = 0) -> Builder:
        sa = sockaddr(address, port)
        if prefixlen is None:
            prefixlen = 32 if isinstance(sa, sockaddr_in) else 128
        return self.ext(
            sadb_address, bytes(sa), sadb_address_exttype=exttype,
            sadb_address_proto=proto, sadb_address_prefixlen=prefixlen,
        )

    def key(self, exttype: int, key: bytes, bits: int | None = None) -> Builder:
        bits = len(key) * 8 if bits is None else bits
        return self.ext(sadb_key, key, sadb_key_exttype=exttype, sadb_key_bits=bits)

    def spirange(self, lo: int, hi: int) -> Builder:
        return self.ext(sadb_spirange, sadb_spirange_exttype=16, sadb_spirange_min=lo,
                        sadb_spirange_max=hi)

    def supported(self, exttype: int, algs: list[tuple[int, int, int, int]]) -> Builder:
        """``algs``: (id, ivlen, minbits, maxbits) per sadb_alg."""
        body = b"".join(
            bytes(sadb_alg(sadb_alg_id=i, sadb_alg_ivlen=iv, sadb_alg_minbits=lo,
                           sadb_alg_maxbits=hi))
            for i, iv, lo, hi in algs
        )
        return self.ext(sadb_supported, body, sadb_supported_exttype=exttype)

    def policy(self, ptype: int, direction: int, requests: list[bytes], id: int = 0,
               priority: int = 0) -> Builder:
        return self.ext(
            sadb_x_policy, b"".join(requests), sadb_x_policy_exttype=18,
            sadb_x_policy_type=ptype, sadb_x_policy_dir=direction, sadb_x_policy_id=id,
            sadb_x_policy_priority=priority,
        )

    def sa2(self, mode: int, sequence: int = 0, reqid: int = 0) -> Builder:
        return self.ext(sadb_x_sa2, sadb_x_sa2_exttype=19, sadb_x_sa2_mode=mode,
                        sadb_x_sa2_sequence=sequence, sadb_x_sa2_reqid=reqid)

    def nat_t_type(self, encap_type: int) -> Builder:
        return self.ext(sadb_x_nat_t_type, sadb_x_nat_t_type_exttype=20,
                        sadb_x_nat_t_type_type=encap_type)

    def nat_t_port(self, exttype: int, port: int) -> Builder:
        return self.ext(sadb_x_nat_t_port, sadb_x_nat_t_port_exttype=exttype,
                        sadb_x_nat_t_port_port=socket.htons(port))

    def build(self) -> bytes:
        body = b"".join(self.parts)
        self.header.sadb_msg_len = (ctypes.sizeof(self.header) + len(body)) // 8
        return bytes(self.header) + body


def extensions(data: bytes) -> list[tuple[int, bytes]]:
    """Split a well-formed message into (exttype, extension bytes); for tests and tools only."""
    out = []
    off = ctypes.sizeof(sadb_msg)
    while off + ctypes.sizeof(sadb_ext) <= len(data):
        ext = sadb_ext.from_buffer_copy(data, off)
        if ext.sadb_ext_len == 0:
            raise ValueError(f"zero-length extension at offset {off}")
        end = off + ext.sadb_ext_len * 8
        out.append((ext.sadb_ext_type, data[off:end]))
        off = end
    return out
