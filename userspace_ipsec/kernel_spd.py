"""PF_KEY messages <-> Policy: X_SPD* checks and replies (Linux af_key.c semantics)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import replace

from .kernel_sa import Refused, address_pair, copy_lifetime, einval
from .pfkey.constants import (
    IPPROTO_AH,
    IPPROTO_COMP,
    IPPROTO_ESP,
    IPSEC_MANUAL_REQID_MAX,
    ExtType,
    IpsecLevel,
    IpsecMode,
    MsgType,
    PolicyDir,
    PolicyType,
    SaType,
)
from .pfkey.messages import (
    AddressExt,
    Extension,
    IpsecRequest,
    LifetimeExt,
    Message,
    PolicyExt,
)
from .sa import Policy, Selector

_DIRECTIONS = (PolicyDir.INBOUND, PolicyDir.OUTBOUND, PolicyDir.FWD)
_ACTIONS = (PolicyType.DISCARD, PolicyType.NONE, PolicyType.IPSEC)
PROTO_SATYPE = {IPPROTO_ESP: SaType.ESP, IPPROTO_AH: SaType.AH, IPPROTO_COMP: SaType.X_IPCOMP}


def policy_ext(msg: Message) -> PolicyExt:
    pol = msg.policy
    if pol is None:
        raise einval("the policy extension is required")
    if pol.dir not in _DIRECTIONS:
        raise einval(f"policy direction {int(pol.dir)} is not in, out or fwd")
    return pol


def selector_of(msg: Message) -> tuple[Selector, PolicyDir]:
    """The (selector, direction) that names a policy, as SPDADD/SPDDELETE give it."""
    src, dst = address_pair(msg)
    pol = policy_ext(msg)
    selector = Selector.build(src.address, src.full_prefixlen, dst.address, dst.full_prefixlen,
                              src.proto, src.port, dst.port)
    return selector, pol.dir


def _request(req: IpsecRequest, supported: frozenset[int],
             new_reqid: Callable[[], int]) -> IpsecRequest:
    satype = PROTO_SATYPE.get(req.proto)
    if satype is None:
        raise einval(f"ipsecrequest protocol {req.proto} is not ESP, AH or IPCOMP")
    if satype not in supported:
        raise Refused(errno.EPROTONOSUPPORT, f"{satype.name} transforms not supported")
    if req.mode not in (IpsecMode.TRANSPORT, IpsecMode.TUNNEL):
        raise einval(f"ipsecrequest mode {req.mode.name} not supported")
    if (req.src is None) != (req.dst is None):
        raise einval("tunnel endpoints: both or neither")
    if req.mode == IpsecMode.TUNNEL:
        if req.src is None or req.dst is None:
            raise einval("a tunnel-mode request needs its endpoints")
        if req.src.version != req.dst.version:
            raise einval("tunnel endpoints of different families")
    elif req.src is not None:
        raise einval("a transport-mode request has no endpoints")
    # Linux keeps a reqid only at level unique, and picks one above the manual range if the
    # request has none (or one in the kernel's own range).
    reqid = 0
    if req.level == IpsecLevel.UNIQUE:
        reqid = req.reqid if 0 < req.reqid <= IPSEC_MANUAL_REQID_MAX else new_reqid()
    return replace(req, reqid=reqid)


def policy_from_message(msg: Message, supported: frozenset[int], new_reqid: Callable[[], int],
                        now: float) -> Policy:
    selector, direction = selector_of(msg)
    pol = policy_ext(msg)
    if pol.type not in _ACTIONS:
        raise einval(f"policy type {pol.type.name} not supported")
    requests: list[IpsecRequest] = []
    if pol.type == PolicyType.IPSEC:
        if not pol.requests:
            raise einval("an ipsec policy needs at least one ipsecrequest")
        requests = [_request(r, supported, new_reqid) for r in pol.requests]
    hard, soft = msg.ext.get(ExtType.LIFETIME_HARD), msg.ext.get(ExtType.LIFETIME_SOFT)
    return Policy(
        selector, direction, pol.type, pol.priority, requests,
        hard=copy_lifetime(hard) if isinstance(hard, LifetimeExt) else LifetimeExt(),
        soft=copy_lifetime(soft) if isinstance(soft, LifetimeExt) else LifetimeExt(),
        add_time=now,
    )


def policy_id_of(msg: Message) -> int:
    pol = msg.policy
    if pol is None:
        raise einval("the policy extension is required")
    return pol.id


def policy_message(policy: Policy, msg_type: MsgType, *, seq: int = 0, pid: int = 0) -> Message:
    sel = policy.selector
    ext: dict[ExtType, Extension] = {
        ExtType.ADDRESS_SRC: AddressExt(sel.src.network_address, sel.src.prefixlen, sel.proto,
                                        sel.sport),
        ExtType.ADDRESS_DST: AddressExt(sel.dst.network_address, sel.dst.prefixlen, sel.proto,
                                        sel.dport),
        ExtType.X_POLICY: PolicyExt(policy.action, policy.direction, policy.id, policy.priority,
                                    [replace(r) for r in policy.requests]),
        ExtType.LIFETIME_CURRENT: LifetimeExt(0, 0, int(policy.add_time),
                                              int(policy.use_time)),
        ExtType.LIFETIME_HARD: copy_lifetime(policy.hard),
        ExtType.LIFETIME_SOFT: copy_lifetime(policy.soft),
    }
    return Message(msg_type, SaType.UNSPEC, seq, pid, 0, ext)
