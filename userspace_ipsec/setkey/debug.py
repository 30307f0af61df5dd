"""``setkey -x``: every field of a PF_KEY message, one block per message (libipsec's kdebug_sadb).

Unlike ``setkey -D`` this shows keys: ``-x`` is an explicit debugging request. Lengths and
reserved fields belong to the wire codec and are not in ``Message``; pass the wire bytes as
``raw`` to get the total length and setkey ``-H``'s hex dump as well.
"""

from __future__ import annotations

from ..pfkey.constants import ExtType, MsgType, SaType
from ..pfkey.messages import (
    AddressExt,
    Extension,
    IdentityExt,
    IPAddress,
    KeyExt,
    KmPrivateExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    PolicyExt,
    ProposalExt,
    SA2Ext,
    SAExt,
    SecCtxExt,
    SensitivityExt,
    SpiRangeExt,
    SupportedExt,
    UipsecExt,
)
from .printer import hexdump

_SOCKADDR_LEN = {4: 16, 6: 28}
_FAMILY = {4: 2, 6: 10}  # AF_INET, AF_INET6 on Linux


def format_message_debug(msg: Message, raw: bytes | None = None) -> str:
    """A readable dump of the header and every extension; ends with a newline."""
    lines = [
        f"sadb_msg{{ version=2 type={int(msg.type)}({_name(MsgType, msg.type)}) "
        f"errno={msg.errno} satype={int(msg.satype)}({_name(SaType, msg.satype)})",
        (f"  len={len(raw) // 8} " if raw is not None else "  ")
        + f"seq={msg.seq} pid={msg.pid} }}",
    ]
    for ext_type, ext in msg.ext.items():
        lines.append(f"sadb_ext{{ type={int(ext_type)}({_name(ExtType, ext_type)}) }}")
        lines += _extension(ext_type, ext)
    if raw is not None:
        lines.append("hexdump{" + hexdump(raw) + " }")
    return "\n".join(lines) + "\n"


def _name(enum: type[MsgType] | type[SaType] | type[ExtType], value: int) -> str:
    try:
        return enum(value).name.lower()
    except ValueError:
        return "unknown"


def _extension(ext_type: ExtType, ext: Extension) -> list[str]:
    if isinstance(ext, SAExt):
        return [
            f"sadb_sa{{ spi={ext.spi}(0x{ext.spi:08x}) replay={ext.replay} "
            f"state={int(ext.state)}",
            f"  auth={ext.auth} encrypt={ext.encrypt} flags=0x{ext.flags:08x} }}",
        ]
    if isinstance(ext, LifetimeExt):
        return [
            f"sadb_lifetime{{ alloc={ext.allocations}, bytes={ext.bytes}",
            f"  addtime={ext.addtime}, usetime={ext.usetime} }}",
        ]
    if isinstance(ext, AddressExt):
        return [
            f"sadb_address{{ proto={ext.proto} prefixlen={ext.full_prefixlen} }}",
            *_sockaddr(ext.address, ext.port),
        ]
    if isinstance(ext, KeyExt):
        bits = len(ext.key) * 8 if ext.bits is None else ext.bits
        return [f"sadb_key{{ bits={bits}", f"  key={hexdump(ext.key)} }}"]
    if isinstance(ext, IdentityExt):
        side = "src" if ext_type == ExtType.IDENTITY_SRC else "dst"
        text = ext.data.split(b"\0", 1)[0].decode("ascii", errors="backslashreplace")
        return [f"sadb_ident_{side}{{ type={int(ext.type)} id={ext.id}", f'  str="{text}" }}']
    if isinstance(ext, SensitivityExt):
        return [f"sadb_sens{{ dpd={ext.dpd} level={ext.level} integ_level={ext.integ_level} }}"]
    if isinstance(ext, ProposalExt):
        lines = [f"sadb_prop{{ replay={ext.replay}"]
        for comb in ext.combs:
            lines += [
                f"sadb_comb{{ auth={comb.auth} encrypt={comb.encrypt} flags=0x{comb.flags:04x}",
                f"  auth_minbits={comb.auth_minbits} auth_maxbits={comb.auth_maxbits} "
                f"encrypt_minbits={comb.encrypt_minbits} encrypt_maxbits={comb.encrypt_maxbits}",
                f"  soft_alloc={comb.soft_allocations} hard_alloc={comb.hard_allocations} "
                f"soft_bytes={comb.soft_bytes} hard_bytes={comb.hard_bytes}",
                f"  soft_addtime={comb.soft_addtime} hard_addtime={comb.hard_addtime} "
                f"soft_usetime={comb.soft_usetime} hard_usetime={comb.hard_usetime} }}",
            ]
        return [*lines, "}"]
    if isinstance(ext, SupportedExt):
        algs = [
            f"  {{ id={a.id} ivlen={a.ivlen} min={a.minbits} max={a.maxbits} }}" for a in ext.algs
        ]
        return ["sadb_sup{", *algs, "}"]
    if isinstance(ext, SpiRangeExt):
        return [f"sadb_spirange{{ min=0x{ext.min:08x} max=0x{ext.max:08x} }}"]
    if isinstance(ext, KmPrivateExt):
        return [f"sadb_x_kmprivate{{ data={hexdump(ext.data)} }}"]
    if isinstance(ext, PolicyExt):
        lines = [
            f"sadb_x_policy{{ type={int(ext.type)} dir={int(ext.dir)} id={ext.id:x} "
            f"priority={ext.priority} }}"
        ]
        for r in ext.requests:
            lines.append(
                f" {{ proto={r.proto} mode={int(r.mode)} level={int(r.level)} reqid={r.reqid}"
            )
            if r.src is not None and r.dst is not None:
                lines += _sockaddr(r.src, r.src_port) + _sockaddr(r.dst, r.dst_port)
            lines.append(" }")
        return lines
    if isinstance(ext, SA2Ext):
        return [f"sadb_x_sa2{{ mode={int(ext.mode)} reqid={ext.reqid}",
                f"  sequence={ext.sequence} }}"]
    if isinstance(ext, NatTTypeExt):
        return [f"sadb_x_nat_t_type{{ type={int(ext.type)} }}"]
    if isinstance(ext, NatTPortExt):
        return [f"sadb_x_nat_t_port{{ port={ext.port} }}"]
    if isinstance(ext, SecCtxExt):
        text = ext.context.decode("ascii", errors="backslashreplace")
        return [f"sadb_x_sec_ctx{{ alg={ext.alg} doi={ext.doi} len={len(ext.context)}",
                f'  str="{text}" }}']
    if isinstance(ext, UipsecExt):
        return [
            f"sadb_x_uipsec{{ flags=0x{ext.flags:08x} replay_window={ext.replay_window}",
            f"  packets_in={ext.packets_in} packets_out={ext.packets_out} "
            f"bytes_in={ext.bytes_in} bytes_out={ext.bytes_out}",
            f"  replay_drops={ext.replay_drops} auth_failures={ext.auth_failures} }}",
        ]
    return [f"unknown extension {type(ext).__name__}"]


def _sockaddr(address: IPAddress, port: int) -> list[str]:
    return [
        f"sockaddr{{ len={_SOCKADDR_LEN[address.version]} family={_FAMILY[address.version]} "
        f"port={port}",
        f"  addr={address}{hexdump(address.packed)} }}",
    ]
