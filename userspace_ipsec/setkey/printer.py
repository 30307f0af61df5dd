"""What ``setkey -D`` and ``setkey -DP`` print, from PF_KEY dump replies (libipsec's pfkey_dump.c).

Pure: the current time and the time zone come in as arguments. Each function returns the block
setkey prints for one message, trailing newline included, so blocks concatenate into a listing.
Keys are printed only when ``show_keys`` is true.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

from ..algorithms import encryption_by_id, integrity_by_id
from ..pfkey.constants import (
    IPPROTO_AH,
    IPPROTO_COMP,
    IPPROTO_ESP,
    IPSEC_MANUAL_REQID_MAX,
    ExtType,
    IpsecLevel,
    PolicyDir,
    PolicyType,
    SaType,
)
from ..pfkey.messages import (
    AddressExt,
    IpsecRequest,
    KeyExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    PolicyExt,
    SecCtxExt,
)
from .names import (
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_MH,
    MODE_NAMES,
    PORTLESS_PROTOCOLS,
    SATYPE_NAMES,
    STATE_NAMES,
    protocol_name,
)
from .policy import PRIORITY_DEFAULT, PRIORITY_HIGH, PRIORITY_LOW

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DIR_NAMES = {PolicyDir.ANY: "any", PolicyDir.INBOUND: "in", PolicyDir.OUTBOUND: "out",
              PolicyDir.FWD: "fwd"}
_POLICY_NAMES = {PolicyType.DISCARD: "discard", PolicyType.NONE: "none",
                 PolicyType.IPSEC: "ipsec", PolicyType.ENTRUST: "entrust",
                 PolicyType.BYPASS: "bypass"}
_REQUEST_PROTOS = {IPPROTO_ESP: "esp", IPPROTO_AH: "ah", IPPROTO_COMP: "ipcomp"}
_LEVEL_NAMES = {IpsecLevel.DEFAULT: "default", IpsecLevel.USE: "use",
                IpsecLevel.REQUIRE: "require", IpsecLevel.UNIQUE: "unique"}


def format_sa(
    msg: Message,
    *,
    now: float,
    show_keys: bool = True,
    show_ports: bool = False,
    tz: tzinfo | None = None,
    refcnt: int = 0,
) -> str:
    """One SA as ``setkey -D`` prints it (``show_ports``: ``-Dp``).

    ``tz`` is the zone for dates (None: the local zone, as setkey's ctime(3)); ``refcnt`` is the
    sadb_msg_reserved value Linux fills in dumps, which ``Message`` does not carry.
    """
    src, dst, sa, sa2 = msg.src, msg.dst, msg.sa, msg.sa2
    if src is None:
        return "no ADDRESS_SRC extension.\n"
    natt_type = msg.ext.get(ExtType.X_NAT_T_TYPE)
    use_natt = isinstance(natt_type, NatTTypeExt) and natt_type.type != 0
    head = _sa_address(src, show_ports, msg.ext.get(ExtType.X_NAT_T_SPORT), use_natt) + " "
    if dst is None:
        return head + " no ADDRESS_DST extension.\n"
    head += _sa_address(dst, show_ports, msg.ext.get(ExtType.X_NAT_T_DPORT), use_natt) + " "
    if sa is None:
        return head + "no SA extension.\n"
    if sa2 is None:
        return head + "no SA2 extension.\n"
    satype = int(msg.satype)
    if use_natt:
        kind = "esp-udp" if satype == SaType.ESP else "natt+" + _satype_name(satype)
    else:
        kind = _satype_name(satype)
    lines = [
        head,
        f"\t{kind} mode={MODE_NAMES.get(sa2.mode, str(int(sa2.mode)))} "
        f"spi={sa.spi}(0x{sa.spi:08x}) reqid={sa2.reqid}(0x{sa2.reqid:08x})",
    ]
    natt_oa = msg.ext.get(ExtType.X_NAT_T_OA)
    if use_natt and isinstance(natt_oa, AddressExt):
        lines.append(f"\tNAT OA={natt_oa.address}")
    enc_key = msg.ext.get(ExtType.KEY_ENCRYPT)
    auth_key = msg.ext.get(ExtType.KEY_AUTH)
    if satype == SaType.ESP and (isinstance(enc_key, KeyExt) or sa.encrypt):
        alg = encryption_by_id(sa.encrypt)
        name = alg.name if alg else str(sa.encrypt)
        lines.append(f"\tE: {name} {_key_text(enc_key, show_keys)}")
    if isinstance(auth_key, KeyExt) or sa.auth:
        alg = integrity_by_id(sa.auth)
        name = alg.name if alg else str(sa.auth)
        lines.append(f"\tA: {name} {_key_text(auth_key, show_keys)}")
    uipsec = msg.uipsec
    replay = uipsec.replay_window if uipsec and uipsec.replay_window else sa.replay
    lines.append(
        f"\tseq=0x{sa2.sequence:08x} replay={replay} flags=0x{sa.flags:08x} "
        f"state={STATE_NAMES.get(sa.state, str(int(sa.state)))} "
    )
    current = _lifetime(msg, ExtType.LIFETIME_CURRENT)
    if current is not None:
        hard = _lifetime(msg, ExtType.LIFETIME_HARD) or LifetimeExt()
        soft = _lifetime(msg, ExtType.LIFETIME_SOFT) or LifetimeExt()
        diff = 0 if current.addtime == 0 else max(0, int(now) - current.addtime)
        lines += [
            f"\tcreated: {_time(current.addtime, tz)}\tcurrent: {_time(int(now), tz)}",
            f"\tdiff: {diff}(s)\thard: {hard.addtime}(s)\tsoft: {soft.addtime}(s)",
            f"\tlast: {_time(current.usetime, tz)}\thard: {hard.usetime}(s)"
            f"\tsoft: {soft.usetime}(s)",
            f"\tcurrent: {current.bytes}(bytes)\thard: {hard.bytes}(bytes)"
            f"\tsoft: {soft.bytes}(bytes)",
            f"\tallocated: {current.allocations}\thard: {hard.allocations}"
            f"\tsoft: {soft.allocations}",
        ]
    lines += _sec_ctx_lines(msg)
    lines.append(f"\tsadb_seq={msg.seq} pid={msg.pid} refcnt={refcnt}")
    return "\n".join(lines) + "\n"


def format_policy(
    msg: Message,
    now: float,
    *,
    show_ports: bool = False,
    tz: tzinfo | None = None,
    refcnt: int = 0,
) -> str:
    """One policy as ``setkey -DP`` prints it (``show_ports``: ``-DPp``, ports of tunnel ends).

    ``now`` is unused by setkey's policy layout (it prints absolute times) but kept so both
    printers are called alike.
    """
    del now
    src, dst, policy = msg.src, msg.dst, msg.policy
    if src is not None and dst is not None:
        if src.proto != dst.proto:
            head = f"{_selector(src, src.proto)} {_selector(dst, src.proto)} "
            return head + "upper layer protocol mismatched.\n"
        head = (
            f"{_selector(src, src.proto)} {_selector(dst, src.proto)} "
            + _upperspec(src.proto, src.port, dst.port)
        )
    else:
        head = "(no selector, probably per-socket policy) "
    if policy is None:
        return head + "no X_POLICY extension.\n"
    lines = [head, "\t" + "\n\t".join(_policy_lines(policy, show_ports))]
    current = _lifetime(msg, ExtType.LIFETIME_CURRENT)
    if current is not None:
        lines.append(
            f"\tcreated: {_time(current.addtime, tz)}  lastused: {_time(current.usetime, tz)}"
        )
    hard = _lifetime(msg, ExtType.LIFETIME_HARD)
    if hard is not None:
        lines.append(f"\tlifetime: {hard.addtime}(s) validtime: {hard.usetime}(s)")
    lines += _sec_ctx_lines(msg)
    lines.append(f"\tspid={policy.id} seq={msg.seq} pid={msg.pid}")
    lines.append(f"\trefcnt={refcnt}")
    return "\n".join(lines) + "\n"


def format_policy_spec(policy: PolicyExt, *, show_ports: bool = False) -> str:
    """The policy in setkey's one-line input syntax (``out prio def ipsec esp/...``)."""
    return " ".join(_policy_lines(policy, show_ports))


def _satype_name(satype: int) -> str:
    return SATYPE_NAMES.get(satype, str(satype))


def _sa_address(
    addr: AddressExt, show_ports: bool, natt_port: object, use_natt: bool
) -> str:
    text = f"{addr.address}[{addr.port}]" if show_ports else str(addr.address)
    if use_natt and isinstance(natt_port, NatTPortExt):
        text += f"[{natt_port.port}]"
    return text


def _key_text(key: object, show_keys: bool) -> str:
    if not isinstance(key, KeyExt):
        return ""
    bits = len(key.key) * 8 if key.bits is None else key.bits
    data = key.key[: bits // 8]
    if not show_keys:
        return f"<{bits} bits hidden>"
    return hexdump(data)


def hexdump(data: bytes) -> str:
    """libipsec's ipsec_hexdump: a space before every 4 bytes, a newline every 32."""
    out: list[str] = []
    for i, byte in enumerate(data):
        if i and i % 32 == 0:
            out.append("\n")
        if i % 4 == 0:
            out.append(" ")
        out.append(f"{byte:02x}")
    return "".join(out)


def _lifetime(msg: Message, ext_type: ExtType) -> LifetimeExt | None:
    value = msg.ext.get(ext_type)
    return value if isinstance(value, LifetimeExt) else None


def _time(seconds: int, tz: tzinfo | None) -> str:
    """ctime(3) without the weekday: 20 characters, blank for 0 (never)."""
    if seconds == 0:
        return " " * 20
    try:
        when = datetime.fromtimestamp(seconds, tz or UTC)
        if tz is None:
            when = when.astimezone()
    except (OverflowError, OSError, ValueError):
        return "?" * 20
    return (
        f"{_MONTHS[when.month - 1]} {when.day:2d} {when.hour:02d}:{when.minute:02d}:"
        f"{when.second:02d} {when.year}"
    )


def _sec_ctx_lines(msg: Message) -> list[str]:
    ctx = msg.ext.get(ExtType.X_SEC_CTX)
    if not isinstance(ctx, SecCtxExt):
        return []
    name = ctx.context.split(b"\0", 1)[0].decode(errors="replace")
    return [
        f"\tsecurity context doi: {ctx.doi}",
        f"\tsecurity context algorithm: {ctx.alg}",
        f"\tsecurity context length: {len(ctx.context) + 1}",  # the C string's NUL included
        f"\tsecurity context: {name}",
    ]


def _selector(addr: AddressExt, ulp: int) -> str:
    prefix = "" if addr.full_prefixlen == addr.address.max_prefixlen \
        else f"/{addr.full_prefixlen}"
    port = "[any]" if addr.port == 0 else f"[{addr.port}]"
    if ulp in PORTLESS_PROTOCOLS:
        port = ""
    return f"{addr.address}{prefix}{port}"


def _upperspec(ulp: int, sport: int, dport: int) -> str:
    text = protocol_name(ulp)
    if sport == 0 and dport == 0:
        return text
    if ulp in (IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MH):
        return f"{text} {sport},{dport}"
    if ulp == IPPROTO_GRE:
        return f"{text} {(sport << 16) + dport}"
    return text


def _priority_text(priority: int) -> str:
    """ipsec_dump_policy's "prio BASE [+|- N]": the nearest base, offset with input's sign."""
    if priority == 0:
        return ""
    if priority < PRIORITY_DEFAULT // 4 * 3:
        name, base = "high", PRIORITY_HIGH
    elif priority < PRIORITY_DEFAULT // 4 * 5:
        name, base = "def", PRIORITY_DEFAULT
    else:
        name, base = "low", PRIORITY_LOW
    offset = base - priority  # a smaller value is a higher priority: "+" means below base
    if offset == 0:
        return f"prio {name}"
    return f"prio {name} {'+' if offset > 0 else '-'} {abs(offset)}"


def _policy_lines(policy: PolicyExt, show_ports: bool) -> list[str]:
    direction = _DIR_NAMES.get(policy.dir, str(int(policy.dir)))
    action = _POLICY_NAMES.get(policy.type, str(int(policy.type)))
    priority = _priority_text(policy.priority)
    first = f"{direction} {priority} {action}" if priority else f"{direction} {action}"
    if policy.type != PolicyType.IPSEC:
        return [first]
    return [first, *(_request_text(r, show_ports) for r in policy.requests)]


def _request_text(request: IpsecRequest, show_ports: bool) -> str:
    proto = _REQUEST_PROTOS.get(request.proto, str(request.proto))
    mode = MODE_NAMES.get(request.mode, str(int(request.mode)))
    ends = ""
    if request.src is not None and request.dst is not None:
        if show_ports:
            ends = f"{request.src}[{request.src_port}]-{request.dst}[{request.dst_port}]"
        else:
            ends = f"{request.src}-{request.dst}"
    level = _LEVEL_NAMES.get(request.level, str(int(request.level)))
    text = f"{proto}/{mode}/{ends}/{level}"
    if request.reqid:
        text += f"{'#' if request.reqid > IPSEC_MANUAL_REQID_MAX else ':'}{request.reqid}"
    return text
