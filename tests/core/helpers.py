"""Message builders shared by the kernel tests."""

from __future__ import annotations

import random
from ipaddress import ip_address

from userspace_ipsec.kernel import Audience, Delivery, Kernel, KernelOptions
from userspace_ipsec.pfkey.constants import (
    IPPROTO_ESP,
    ExtType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    PolicyDir,
    PolicyType,
    SaType,
)
from userspace_ipsec.pfkey.messages import (
    AddressExt,
    Extension,
    IPAddress,
    IpsecRequest,
    KeyExt,
    LifetimeExt,
    Message,
    PolicyExt,
    SA2Ext,
    SAExt,
    SpiRangeExt,
)

NOW = 1_700_000_000.0
GCM = 20  # aes-gcm-16
GCM_KEY = bytes(range(20))
CBC = 12
SHA256 = 5


def A(text: str) -> IPAddress:
    return ip_address(text)


def kernel(**options: object) -> Kernel:
    return Kernel(KernelOptions(**options), rng=random.Random(7))  # type: ignore[arg-type]


def addrs(src: str, dst: str) -> dict[ExtType, Extension]:
    return {ExtType.ADDRESS_SRC: AddressExt(A(src)), ExtType.ADDRESS_DST: AddressExt(A(dst))}


def sa_msg(mtype: MsgType, spi: int, src: str = "10.0.0.1", dst: str = "10.0.0.2", *,
           seq: int = 1, satype: int = SaType.ESP, encrypt: int = GCM, auth: int = 0,
           enc_key: bytes | None = GCM_KEY, auth_key: bytes | None = None,
           hard: LifetimeExt | None = None, soft: LifetimeExt | None = None,
           sa2: SA2Ext | None = None, replay: int = 32) -> Message:
    ext = {ExtType.SA: SAExt(spi, replay, auth=auth, encrypt=encrypt), **addrs(src, dst)}
    if enc_key is not None:
        ext[ExtType.KEY_ENCRYPT] = KeyExt(enc_key)
    if auth_key is not None:
        ext[ExtType.KEY_AUTH] = KeyExt(auth_key)
    if hard is not None:
        ext[ExtType.LIFETIME_HARD] = hard
    if soft is not None:
        ext[ExtType.LIFETIME_SOFT] = soft
    if sa2 is not None:
        ext[ExtType.X_SA2] = sa2
    return Message(mtype, satype, seq, 4242, 0, ext)


def getspi_msg(src: str = "10.0.0.1", dst: str = "10.0.0.2", *, seq: int = 1,
               spirange: tuple[int, int] | None = None, satype: int = SaType.ESP) -> Message:
    ext = addrs(src, dst)
    if spirange is not None:
        ext[ExtType.SPIRANGE] = SpiRangeExt(*spirange)
    return Message(MsgType.GETSPI, satype, seq, 4242, 0, ext)


def key_msg(mtype: MsgType, spi: int, src: str = "10.0.0.1", dst: str = "10.0.0.2",
            satype: int = SaType.ESP) -> Message:
    """DELETE / GET: SA and addresses only."""
    return Message(mtype, satype, 5, 4242, 0, {ExtType.SA: SAExt(spi), **addrs(src, dst)})


def tunnel(src: str, dst: str, level: IpsecLevel = IpsecLevel.REQUIRE,
           reqid: int = 0) -> IpsecRequest:
    return IpsecRequest(IPPROTO_ESP, IpsecMode.TUNNEL, level, reqid, A(src), A(dst))


def spd_msg(mtype: MsgType, src: str, dst: str, direction: PolicyDir = PolicyDir.OUTBOUND,
            action: PolicyType = PolicyType.IPSEC, requests: list[IpsecRequest] | None = None,
            *, proto: int = 255, sport: int = 0, dport: int = 0, priority: int = 0,
            policy_id: int = 0, seq: int = 1) -> Message:
    s_addr, s_len = src.split("/") if "/" in src else (src, None)
    d_addr, d_len = dst.split("/") if "/" in dst else (dst, None)
    if requests is None:
        requests = [tunnel("192.0.2.1", "192.0.2.2")] if action == PolicyType.IPSEC else []
    ext: dict[ExtType, Extension] = {
        ExtType.ADDRESS_SRC: AddressExt(A(s_addr), None if s_len is None else int(s_len), proto,
                                        sport),
        ExtType.ADDRESS_DST: AddressExt(A(d_addr), None if d_len is None else int(d_len), proto,
                                        dport),
        ExtType.X_POLICY: PolicyExt(action, direction, policy_id, priority, requests),
    }
    return Message(mtype, SaType.UNSPEC, seq, 4242, 0, ext)


def policy_id_msg(mtype: MsgType, policy_id: int) -> Message:
    ext: dict[ExtType, Extension] = {
        ExtType.X_POLICY: PolicyExt(PolicyType.IPSEC, PolicyDir.OUTBOUND, policy_id)}
    return Message(mtype, SaType.UNSPEC, 1, 4242, 0, ext)


def only(deliveries: list[Delivery]) -> Delivery:
    assert len(deliveries) == 1, deliveries
    return deliveries[0]


def errno_of(deliveries: list[Delivery]) -> int:
    d = only(deliveries)
    assert d.audience is Audience.SENDER and d.message is not None
    return d.message.errno


def received(k: Kernel, deliveries: list[Delivery], sender: int | None) -> dict[int, list[Message]]:
    """What each socket gets, as the socket server would route it (streams drained)."""
    out: dict[int, list[Message]] = {}
    for d in deliveries:
        for sock in k.recipients(d, sender):
            if d.stream is not None:
                out.setdefault(sock, []).extend(d.stream)
            else:
                out.setdefault(sock, []).append(k.message_for(d, sock))
    return out
