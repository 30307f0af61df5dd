"""Property tests: every valid Message round-trips; no input makes decode raise but PfkeyError.

Round trips compare against ``normalised(msg)``, the documented normal form (docs/pfkey.md):
prefixlen None -> the host length, key bits None -> len(key) * 8 and the key cut to its bits,
kmprivate data and sensitivity bitmaps NUL-padded to 8 bytes, identity strings cut at the first
NUL. Everything else comes back as it went in, extension order included.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from ipaddress import IPv4Address, IPv6Address

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userspace_ipsec.pfkey.codec import SUPPORTED_EXTENSIONS, PfkeyError, decode, encode
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
    Comb,
    Extension,
    IdentityExt,
    IPAddress,
    IpsecRequest,
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
    SupportedAlg,
    SupportedExt,
    UipsecExt,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
small_bytes = st.binary(max_size=40)

scoped_v6 = st.builds(
    lambda a, scope: IPv6Address(f"{a}%{scope}"), st.ip_addresses(v=6), st.integers(1, 0xFFFFFFFF)
)
addresses_v4 = st.ip_addresses(v=4)
addresses_v6 = st.one_of(st.ip_addresses(v=6), scoped_v6)


@st.composite
def address_exts(draw: st.DrawFn) -> AddressExt:
    address: IPAddress = draw(st.one_of(addresses_v4, addresses_v6))
    prefixlen = draw(st.none() | st.integers(0, address.max_prefixlen))
    return AddressExt(address, prefixlen, draw(u8), draw(u16))


@st.composite
def key_exts(draw: st.DrawFn) -> KeyExt:
    key = draw(st.binary(max_size=72))
    return KeyExt(key, draw(st.none() | st.integers(0, len(key) * 8)))


@st.composite
def tunnel_requests(draw: st.DrawFn) -> IpsecRequest:
    family = draw(st.sampled_from([addresses_v4, addresses_v6]))
    return IpsecRequest(
        draw(u16), draw(st.sampled_from(IpsecMode)), draw(st.sampled_from(IpsecLevel)),
        draw(u32), draw(family), draw(family), draw(u16), draw(u16),
    )


bare_requests = st.builds(
    IpsecRequest, u16, st.sampled_from(IpsecMode), st.sampled_from(IpsecLevel), u32
)
wire_dirs = [d for d in PolicyDir if d <= PolicyDir.FWD]

EXTENSIONS: dict[type, st.SearchStrategy[Extension]] = {
    SAExt: st.builds(SAExt, u32, u8, st.sampled_from(SaState), u8, u8, u32),
    LifetimeExt: st.builds(LifetimeExt, u32, u64, u64, u64),
    AddressExt: address_exts(),
    KeyExt: key_exts(),
    IdentityExt: st.builds(
        IdentityExt, st.sampled_from(IdentType), u64,
        small_bytes.map(lambda b: b.replace(b"\0", b"@")),
    ),
    SensitivityExt: st.builds(SensitivityExt, u32, u8, u8, small_bytes, small_bytes),
    ProposalExt: st.builds(ProposalExt, u8, st.lists(st.builds(
        Comb, u8, u8, u16, u16, u16, u16, u16, u32, u32, u64, u64, u64, u64, u64, u64,
    ), max_size=3)),
    SupportedExt: st.builds(
        SupportedExt, st.lists(st.builds(SupportedAlg, u8, u8, u16, u16), max_size=6)
    ),
    SpiRangeExt: st.builds(SpiRangeExt, u32, u32),
    KmPrivateExt: st.builds(KmPrivateExt, small_bytes),
    PolicyExt: st.builds(
        PolicyExt, st.sampled_from(PolicyType), st.sampled_from(wire_dirs), u32, u32,
        st.lists(bare_requests | tunnel_requests(), max_size=4),
    ),
    SA2Ext: st.builds(SA2Ext, st.sampled_from(IpsecMode), u32, u32),
    NatTTypeExt: st.builds(NatTTypeExt, st.sampled_from(NatTType)),
    NatTPortExt: st.builds(NatTPortExt, u16),
    SecCtxExt: st.builds(SecCtxExt, u8, u8, small_bytes),
    UipsecExt: st.builds(UipsecExt, u32, u32, u64, u64, u64, u64, u64, u64),
}

# Which class each extension type carries, taken from a sample encoding (not from the codec).
EXT_CLASS: dict[ExtType, type] = {
    ExtType.SA: SAExt,
    ExtType.LIFETIME_CURRENT: LifetimeExt, ExtType.LIFETIME_HARD: LifetimeExt,
    ExtType.LIFETIME_SOFT: LifetimeExt,
    ExtType.ADDRESS_SRC: AddressExt, ExtType.ADDRESS_DST: AddressExt,
    ExtType.ADDRESS_PROXY: AddressExt, ExtType.X_NAT_T_OA: AddressExt,
    ExtType.KEY_AUTH: KeyExt, ExtType.KEY_ENCRYPT: KeyExt,
    ExtType.IDENTITY_SRC: IdentityExt, ExtType.IDENTITY_DST: IdentityExt,
    ExtType.SENSITIVITY: SensitivityExt,
    ExtType.PROPOSAL: ProposalExt,
    ExtType.SUPPORTED_AUTH: SupportedExt, ExtType.SUPPORTED_ENCRYPT: SupportedExt,
    ExtType.SPIRANGE: SpiRangeExt,
    ExtType.X_KMPRIVATE: KmPrivateExt,
    ExtType.X_POLICY: PolicyExt,
    ExtType.X_SA2: SA2Ext,
    ExtType.X_NAT_T_TYPE: NatTTypeExt,
    ExtType.X_NAT_T_SPORT: NatTPortExt, ExtType.X_NAT_T_DPORT: NatTPortExt,
    ExtType.X_SEC_CTX: SecCtxExt,
    ExtType.X_UIPSEC: UipsecExt,
}


def test_every_supported_extension_type_is_generated() -> None:
    assert set(EXT_CLASS) == SUPPORTED_EXTENSIONS
    assert set(EXT_CLASS.values()) == set(EXTENSIONS)


@st.composite
def messages(draw: st.DrawFn, max_exts: int = len(EXT_CLASS)) -> Message:
    errno = draw(st.just(0) | u8)
    types = [t for t in MsgType if errno or t != MsgType.RESERVED]
    msg = Message(
        draw(st.sampled_from(types)), draw(st.sampled_from(SaType) | u8), draw(u32), draw(u32),
        errno,
    )
    for ext_type in draw(st.lists(st.sampled_from(list(EXT_CLASS)), unique=True,
                                  max_size=max_exts)):
        msg.ext[ext_type] = draw(EXTENSIONS[EXT_CLASS[ext_type]])
    return msg


def pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def normalised(msg: Message) -> Message:
    """What decode gives back for ``msg``. The extensions it changes are replaced, not edited
    in a deep copy: CPython before 3.11.4 (Debian 12 has 3.11.2) copies an IPv6Address
    without its scope id."""
    ext: dict[ExtType, Extension] = {}
    for kind, e in msg.ext.items():
        if isinstance(e, AddressExt):
            e = dataclasses.replace(e, prefixlen=e.full_prefixlen)
        elif isinstance(e, KeyExt):
            bits = len(e.key) * 8 if e.bits is None else e.bits
            e = dataclasses.replace(e, key=e.key[: (bits + 7) // 8], bits=bits)
        elif isinstance(e, KmPrivateExt):
            e = dataclasses.replace(e, data=pad8(e.data))
        elif isinstance(e, SensitivityExt):
            e = dataclasses.replace(e, sens_bitmap=pad8(e.sens_bitmap),
                                    integ_bitmap=pad8(e.integ_bitmap))
        elif isinstance(e, IdentityExt):
            e = dataclasses.replace(e, data=e.data.split(b"\0", 1)[0])
        ext[kind] = e
    return dataclasses.replace(msg, ext=ext)


@settings(max_examples=300, deadline=None)
@given(messages())
def test_round_trip(msg: Message) -> None:
    wire = encode(msg)
    assert len(wire) % 8 == 0
    back = decode(wire)
    assert back == normalised(msg)
    assert list(back.ext) == list(msg.ext)  # extension order is kept
    assert encode(back) == wire


def test_round_trip_covers_scoped_ipv6_and_tunnels() -> None:
    msg = Message(MsgType.X_SPDADD, ext={
        ExtType.ADDRESS_SRC: AddressExt(IPv6Address("fe80::1%4294967295"), None, 255, 0),
        ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, PolicyDir.FWD, 1, 2, [
            IpsecRequest(50, IpsecMode.TUNNEL, IpsecLevel.UNIQUE, 9,
                         IPv4Address("1.2.3.4"), IPv4Address("5.6.7.8"), 1, 2),
        ]),
    })
    assert decode(encode(msg)) == normalised(msg)


def decode_or_pfkey_error(data: bytes) -> Message | None:
    """decode, which may refuse with PfkeyError only; anything it accepts must re-encode."""
    try:
        msg = decode(data)
    except PfkeyError as exc:
        assert isinstance(exc.errno, int) and exc.errno > 0 and exc.reason
        return None
    again = decode(encode(msg))
    assert again == msg
    return msg


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    decode_or_pfkey_error(data)


def header(msg_type: int, words: int, errno: int = 0) -> bytes:
    return bytes([2, msg_type, errno, 3]) + words.to_bytes(2, sys.byteorder) + bytes(10)


raw_extensions = st.lists(
    st.tuples(
        st.sampled_from([int(t) for t in ExtType] + [0, 28, 200]),
        st.integers(0, 12).flatmap(lambda words: st.binary(min_size=words * 8 + 4,
                                                            max_size=words * 8 + 4)),
    ),
    max_size=6,
)


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.integers(0, 26), raw_extensions, st.booleans())
def test_random_extensions_behind_a_valid_header(
    msg_type: int, exts: list[tuple[int, bytes]], lie_about_length: bool
) -> None:
    # Extension headers with sane lengths and random bodies: reaches every decoder.
    body = b""
    for ext_type, payload in exts:
        words = (len(payload) + 4) // 8
        if lie_about_length:
            words = payload[0] % 16 if payload else 0
        body += words.to_bytes(2, sys.byteorder) + ext_type.to_bytes(2, sys.byteorder) + payload
    decode_or_pfkey_error(header(msg_type, (16 + len(body)) // 8) + body)


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    keep_header = rng.random() < 0.8  # random_bytes already hammers the header
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "set", "cut", "insert"))
        i = rng.randrange(16 if keep_header else 0, max(len(buf), 16) + 1)
        if op == "flip" and i < len(buf):
            buf[i] ^= 1 << rng.randrange(8)
        elif op == "set" and i < len(buf):
            buf[i] = rng.choice((0, 1, 0xFF, rng.randrange(256)))
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            size = rng.choice((rng.randint(1, 16), 8 * rng.randint(1, 4)))
            buf[i:i] = bytes(rng.randrange(256) for _ in range(size))
    if rng.random() < 0.8:  # most mutants get past the length check
        buf += bytes(-len(buf) % 8)
        if len(buf) >= 16:
            buf[4:6] = (len(buf) // 8).to_bytes(2, sys.byteorder)
    return bytes(buf)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(max_exts=8), u32)
def test_mutated_valid_encodings(msg: Message, seed: int) -> None:
    wire = encode(msg)
    rng = random.Random(seed)  # plain PRNG: hypothesis' randoms() is slow per call
    for _ in range(100):  # many mutants per drawn message: drawing is the slow part
        decode_or_pfkey_error(mutate(wire, rng))
