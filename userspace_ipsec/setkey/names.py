"""Names setkey reads and prints: upper-layer protocols, modes, states, SA types.

setkey asks getprotobyname(3) for upper-layer protocols; a pure parser cannot read
/etc/protocols, so the usual Debian entries are built in (names as getprotobynumber(3) prints
them), plus setkey's own ``icmp6``, ``ip4`` and ``any``.
"""

from __future__ import annotations

from ..pfkey.constants import IPSEC_PROTO_ANY, IpsecMode, SaState, SaType

IPPROTO_ICMP = 1
IPPROTO_GRE = 47
IPPROTO_ICMPV6 = 58
IPPROTO_MH = 135

# Number -> the name getprotobynumber(3) gives on Debian (what setkey -DP prints).
PROTOCOL_NAMES: dict[int, str] = {
    0: "ip",
    1: "icmp",
    2: "igmp",
    4: "ipencap",
    6: "tcp",
    8: "egp",
    12: "pup",
    17: "udp",
    22: "idp",
    29: "iso-tp4",
    33: "dccp",
    41: "ipv6",
    43: "ipv6-route",
    44: "ipv6-frag",
    45: "idrp",
    46: "rsvp",
    47: "gre",
    50: "esp",
    51: "ah",
    57: "skip",
    58: "ipv6-icmp",
    59: "ipv6-nonxt",
    60: "ipv6-opts",
    73: "rspf",
    81: "vmtp",
    88: "eigrp",
    89: "ospf",
    93: "ax.25",
    94: "ipip",
    97: "etherip",
    98: "encap",
    103: "pim",
    108: "ipcomp",
    112: "vrrp",
    115: "l2tp",
    124: "isis",
    132: "sctp",
    133: "fc",
    135: "mobility-header",
    136: "udplite",
    137: "mpls-in-ip",
    139: "hip",
    140: "shim6",
    141: "wesp",
    142: "rohc",
    IPSEC_PROTO_ANY: "any",
}

# Name -> number for ``upperspec``: the table above, its usual aliases, and setkey's extras.
PROTOCOL_NUMBERS: dict[str, int] = {name: num for num, name in PROTOCOL_NAMES.items()}
PROTOCOL_NUMBERS.update(
    {
        "icmp6": IPPROTO_ICMPV6,
        "ipv6-icmp": IPPROTO_ICMPV6,
        "ip4": 4,
        "ipv4": 4,
        "mh": IPPROTO_MH,
        "ipv6-mh": IPPROTO_MH,
        "hopopt": 0,
    }
)

# Protocols whose "ports" are something else (ICMP type/code, GRE key): no [port] shown.
PORTLESS_PROTOCOLS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_MH, IPPROTO_GRE})

MODE_NAMES: dict[int, str] = {
    IpsecMode.ANY: "any",
    IpsecMode.TRANSPORT: "transport",
    IpsecMode.TUNNEL: "tunnel",
    IpsecMode.BEET: "beet",
}

STATE_NAMES: dict[int, str] = {
    SaState.LARVAL: "larval",
    SaState.MATURE: "mature",
    SaState.DYING: "dying",
    SaState.DEAD: "dead",
}

# sadb_msg_satype -> the name setkey -D prints (pfkey_dump.c's str_satype).
SATYPE_NAMES: dict[int, str] = {
    SaType.UNSPEC: "unspec",
    SaType.AH: "ah",
    SaType.ESP: "esp",
    SaType.RSVP: "rsvp",
    SaType.OSPFV2: "ospfv2",
    SaType.RIPV2: "ripv2",
    SaType.MIP: "mip",
    SaType.X_IPCOMP: "ipcomp",
}


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))
