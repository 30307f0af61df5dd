"""Every message the kernel delivers survives the wire codec: it encodes, and decoding gives
the same message back (compared by re-encoding: the codec writes an omitted prefix length as
the full one)."""

from __future__ import annotations

from tests.core.helpers import (
    NOW,
    A,
    getspi_msg,
    kernel,
    key_msg,
    policy_id_msg,
    received,
    sa_msg,
    spd_msg,
)
from userspace_ipsec.kernel import Flow
from userspace_ipsec.pfkey.codec import decode, encode
from userspace_ipsec.pfkey.constants import (
    ExtType,
    IpsecMode,
    MsgType,
    NatTType,
    PolicyDir,
    SaType,
)
from userspace_ipsec.pfkey.messages import (
    AddressExt,
    LifetimeExt,
    Message,
    NatTPortExt,
    NatTTypeExt,
    SA2Ext,
    UipsecExt,
)


def same_on_wire(msg: Message) -> bool:
    data = encode(msg)
    back = decode(data)
    return encode(back) == data and back.type == msg.type and back.ext.keys() == msg.ext.keys()


def test_all_deliveries_encode_and_decode() -> None:
    k = kernel()
    s, bystander = k.open_socket(), k.open_socket()
    requests = [
        Message(MsgType.REGISTER, SaType.ESP, 1, 10),
        Message(MsgType.REGISTER, SaType.AH, 2, 10),
        Message(MsgType.X_PROMISC, 1, 3, 10),
        getspi_msg(dst="2001:db8::2", src="2001:db8::1", spirange=(0x5000, 0x5000)),
        sa_msg(MsgType.UPDATE, 0x5000, src="2001:db8::1", dst="2001:db8::2",
               sa2=SA2Ext(IpsecMode.TUNNEL, 0, 9), soft=LifetimeExt(bytes=1000),
               hard=LifetimeExt(bytes=2000)),
        sa_msg(MsgType.ADD, 0x1000, encrypt=12, enc_key=bytes(32), auth=7, auth_key=bytes(64)),
        key_msg(MsgType.GET, 0x1000),
        Message(MsgType.DUMP, SaType.ESP, 4, 10, 0, {ExtType.X_UIPSEC: UipsecExt()}),
        key_msg(MsgType.DELETE, 0x1000),
        spd_msg(MsgType.X_SPDADD, "10.1.0.0/16", "10.2.0.0/16", proto=6, dport=443),
        spd_msg(MsgType.X_SPDUPDATE, "2001:db8:1::/48", "2001:db8:2::/48", PolicyDir.FWD),
        policy_id_msg(MsgType.X_SPDGET, 12345),
        Message(MsgType.X_SPDDUMP, SaType.UNSPEC, 5, 10),
        Message(MsgType.EXPIRE, SaType.ESP, 6, 10),
    ]
    natt = sa_msg(MsgType.ADD, 0x2000)
    natt.ext[ExtType.X_NAT_T_TYPE] = NatTTypeExt(NatTType.ESPINUDP)
    natt.ext[ExtType.X_NAT_T_SPORT] = NatTPortExt(4500)
    natt.ext[ExtType.X_NAT_T_DPORT] = NatTPortExt(4501)
    natt.ext[ExtType.X_NAT_T_OA] = AddressExt(A("192.168.1.1"))
    requests.append(natt)
    seen: list[Message] = []
    for req in requests:
        assert same_on_wire(req)  # the tests speak valid wire messages
        for msgs in received(k, k.handle(s, req, NOW), s).values():
            seen.extend(msgs)
    sa = k.sad.get(A("2001:db8::2"), SaType.ESP, 0x5000)
    assert sa is not None
    sa.packets_out, sa.bytes_out = 20, 1500
    for deliveries in (k.note_traffic(sa, NOW), k.tick(NOW + 1)):
        for msgs in received(k, deliveries, None).values():
            seen.extend(msgs)
    policy = k.spd.lookup(PolicyDir.OUTBOUND, A("10.1.0.1"), A("10.2.0.1"), 6, 1000, 443)
    assert policy is not None
    acquire = k.acquire(policy, Flow(A("10.1.0.1"), A("10.2.0.1"), 6, 1000, 443), NOW)
    for msgs in received(k, acquire, None).values():
        seen.extend(msgs)
    assert k.recipients(k.handle(bystander, Message(MsgType.FLUSH), NOW)[-1]) == [s, bystander]
    types = {m.type for m in seen}
    assert types >= {MsgType.REGISTER, MsgType.GETSPI, MsgType.UPDATE, MsgType.ADD,
                     MsgType.GET, MsgType.DUMP, MsgType.DELETE, MsgType.X_SPDADD,
                     MsgType.X_SPDUPDATE, MsgType.X_SPDGET, MsgType.X_SPDDUMP,
                     MsgType.EXPIRE, MsgType.ACQUIRE, MsgType.X_PROMISC}
    assert any(m.errno for m in seen) and any(m.uipsec for m in seen)
    for msg in seen:
        assert same_on_wire(msg), msg
