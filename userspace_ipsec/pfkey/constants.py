"""PF_KEYv2 numbers: RFC 2367 plus the Linux/KAME extensions.

Values match Linux's ``include/uapi/linux/pfkeyv2.h`` and ``include/uapi/linux/ipsec.h`` so that a
C program built on those headers and this emulation agree byte for byte. Private additions of
userspace-ipsec are marked as such and documented in docs/pfkey.md.
"""

from __future__ import annotations

from enum import IntEnum

PF_KEY_V2 = 2
PFKEYV2_REVISION = 199806


class MsgType(IntEnum):
    RESERVED = 0
    GETSPI = 1
    UPDATE = 2
    ADD = 3
    DELETE = 4
    GET = 5
    ACQUIRE = 6
    REGISTER = 7
    EXPIRE = 8
    FLUSH = 9
    DUMP = 10
    X_PROMISC = 11
    X_PCHANGE = 12
    X_SPDUPDATE = 13
    X_SPDADD = 14
    X_SPDDELETE = 15
    X_SPDGET = 16
    X_SPDACQUIRE = 17
    X_SPDDUMP = 18
    X_SPDFLUSH = 19
    X_SPDSETIDX = 20
    X_SPDEXPIRE = 21
    X_SPDDELETE2 = 22
    X_NAT_T_NEW_MAPPING = 23
    X_MIGRATE = 24


class SaType(IntEnum):
    UNSPEC = 0
    AH = 2
    ESP = 3
    RSVP = 5
    OSPFV2 = 6
    RIPV2 = 7
    MIP = 8
    X_IPCOMP = 9


class ExtType(IntEnum):
    RESERVED = 0
    SA = 1
    LIFETIME_CURRENT = 2
    LIFETIME_HARD = 3
    LIFETIME_SOFT = 4
    ADDRESS_SRC = 5
    ADDRESS_DST = 6
    ADDRESS_PROXY = 7
    KEY_AUTH = 8
    KEY_ENCRYPT = 9
    IDENTITY_SRC = 10
    IDENTITY_DST = 11
    SENSITIVITY = 12
    PROPOSAL = 13
    SUPPORTED_AUTH = 14
    SUPPORTED_ENCRYPT = 15
    SPIRANGE = 16
    X_KMPRIVATE = 17
    X_POLICY = 18
    X_SA2 = 19
    X_NAT_T_TYPE = 20
    X_NAT_T_SPORT = 21
    X_NAT_T_DPORT = 22
    X_NAT_T_OA = 23
    X_SEC_CTX = 24
    X_KMADDRESS = 25
    X_FILTER = 26
    # Private to userspace-ipsec: what PF_KEY cannot say (32-bit replay window, ESN, datapath
    # counters). Sent only to sockets that have sent it first; see docs/pfkey.md.
    X_UIPSEC = 0x7F


SADB_EXT_MAX = 26  # the highest standard (Linux) extension type


class SaState(IntEnum):
    LARVAL = 0
    MATURE = 1
    DYING = 2
    DEAD = 3


# sadb_sa_flags
SADB_SAFLAGS_PFS = 1
SADB_SAFLAGS_NOPMTUDISC = 0x20000000
SADB_SAFLAGS_DECAP_DSCP = 0x40000000
SADB_SAFLAGS_NOECN = 0x80000000

# sadb_x_uipsec flags (private extension)
UIPSEC_FLAG_ESN = 0x1


class IdentType(IntEnum):
    RESERVED = 0
    PREFIX = 1
    FQDN = 2
    USERFQDN = 3
    X_ADDR = 4


class NatTType(IntEnum):
    """sadb_x_nat_t_type_type: the UDP_ENCAP_* values of linux/udp.h."""

    NONE = 0
    ESPINUDP_NON_IKE = 1
    ESPINUDP = 2


class PolicyType(IntEnum):
    """IPSEC_POLICY_* of linux/ipsec.h (sadb_x_policy_type)."""

    DISCARD = 0
    NONE = 1
    IPSEC = 2
    ENTRUST = 3
    BYPASS = 4


class PolicyDir(IntEnum):
    """IPSEC_DIR_* of linux/ipsec.h (sadb_x_policy_dir)."""

    ANY = 0
    INBOUND = 1
    OUTBOUND = 2
    FWD = 3  # Linux's own addition
    MAX = 4
    INVALID = 5


class IpsecMode(IntEnum):
    """IPSEC_MODE_* (sadb_x_sa2_mode, sadb_x_ipsecrequest_mode)."""

    ANY = 0
    TRANSPORT = 1
    TUNNEL = 2
    BEET = 3


class IpsecLevel(IntEnum):
    """IPSEC_LEVEL_* (sadb_x_ipsecrequest_level)."""

    DEFAULT = 0
    USE = 1
    REQUIRE = 2
    UNIQUE = 3


IPSEC_MANUAL_REQID_MAX = 0x3FFF  # reqids above are the kernel's to choose (KAME convention)
IPSEC_REPLAYWSIZE = 32

IPSEC_PROTO_ANY = 255  # sadb_address_proto / policy upper-layer "any"

# Address families (sockaddr sa_family on Linux).
AF_INET = 2
AF_INET6 = 10

# IP protocol numbers used in sadb_x_ipsecrequest_proto.
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_COMP = 108
