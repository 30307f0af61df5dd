"""Property: any structurally valid Message (what the codec can hand over) gets deliveries,
never an exception, and a refused one leaves the SAD and SPD as they were."""

from __future__ import annotations

from ipaddress import ip_address

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.helpers import NOW, kernel, sa_msg, spd_msg
from userspace_ipsec.kernel import Audience
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
    UipsecExt,
)

u8, u16, u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
small = st.sampled_from([0, 1, 2, 3, 5, 7, 11, 12, 13, 20, 28, 251, 255, 256, 0x1000])
addr = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6),
                 st.sampled_from(["10.0.0.1", "10.0.0.2"]).map(ip_address))
address = st.builds(AddressExt, addr, st.one_of(st.none(), st.integers(0, 128)), u8, u16)
request = st.builds(IpsecRequest, st.sampled_from([50, 51, 108, 0, 99]),
                    st.sampled_from(list(IpsecMode)), st.sampled_from(list(IpsecLevel)), u32,
                    st.one_of(st.none(), addr), st.one_of(st.none(), addr))
EXTS = {
    ExtType.SA: st.builds(SAExt, st.one_of(small, u32), u8, st.sampled_from(list(SaState)),
                          small, small, u32),
    ExtType.ADDRESS_SRC: address,
    ExtType.ADDRESS_DST: address,
    ExtType.KEY_ENCRYPT: st.builds(KeyExt, st.binary(max_size=40),
                                   st.one_of(st.none(), st.integers(0, 400))),
    ExtType.KEY_AUTH: st.builds(KeyExt, st.binary(max_size=70)),
    ExtType.LIFETIME_HARD: st.builds(LifetimeExt, u32, u32, u32, u32),
    ExtType.LIFETIME_SOFT: st.builds(LifetimeExt, u32, u32, u32, u32),
    ExtType.SPIRANGE: st.builds(SpiRangeExt, u32, u32),
    ExtType.X_SA2: st.builds(SA2Ext, st.sampled_from(list(IpsecMode)), u32, u32),
    ExtType.X_POLICY: st.builds(PolicyExt, st.sampled_from(list(PolicyType)),
                                st.sampled_from(list(PolicyDir)[:4]), u32, u32,
                                st.lists(request, max_size=2)),
    ExtType.X_NAT_T_TYPE: st.builds(NatTTypeExt, st.sampled_from(list(NatTType))),
    ExtType.X_NAT_T_SPORT: st.builds(NatTPortExt, u16),
    ExtType.X_NAT_T_OA: address,
    ExtType.IDENTITY_SRC: st.builds(IdentityExt, st.sampled_from(list(IdentType))),
    ExtType.X_UIPSEC: st.builds(UipsecExt, u32, st.integers(0, 1 << 32)),
}
messages = st.builds(
    Message,
    st.sampled_from(list(MsgType)),
    st.sampled_from([0, 1, 2, 3, 9, 200]),
    u32,
    u32,
    st.just(0),
    st.fixed_dictionaries({}, optional=EXTS),  # type: ignore[arg-type]
)


def state(k: object) -> tuple[object, ...]:
    sad, spd = k.sad, k.spd  # type: ignore[attr-defined]
    return (sorted((str(sa.dst), sa.spi, sa.state) for sa in sad),
            sorted((p.id, str(p.selector), p.action) for p in spd))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=6))
def test_arbitrary_messages_never_raise(msgs: list[Message]) -> None:
    k = kernel(allow_weak=True)
    s, other = k.open_socket(), k.open_socket()
    k.handle(other, sa_msg(MsgType.ADD, 0x1000), NOW)
    k.handle(other, spd_msg(MsgType.X_SPDADD, "10.0.0.0/8", "10.0.0.0/8"), NOW)
    for msg in msgs:
        before = state(k)
        out = k.handle(s, msg, NOW)
        assert out or msg.type == MsgType.ACQUIRE  # a KM's ACQUIRE gets no answer
        for d in out:
            for sock in k.recipients(d, s):
                if d.stream is not None:
                    assert list(d.stream)
                else:
                    k.message_for(d, sock)
        if any(d.audience is Audience.SENDER and d.message is not None and d.message.errno
               for d in out):
            assert state(k) == before
    k.tick(NOW + 1e6)
    k.close_socket(s, NOW)
