"""Property: random valid and invalid requests keep the SAD and SPD equal to a simple model."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from ipaddress import ip_network

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.helpers import (
    NOW,
    A,
    getspi_msg,
    kernel,
    key_msg,
    only,
    policy_id_msg,
    sa_msg,
    spd_msg,
)
from userspace_ipsec.kernel import Kernel
from userspace_ipsec.pfkey.constants import IpsecMode, MsgType, PolicyDir, SaState, SaType
from userspace_ipsec.pfkey.messages import Message

DSTS = ("10.0.0.2", "10.0.0.3")
SPIS = tuple(range(0x100, 0x106))
NETS = ("10.1.0.0/16", "10.2.0.0/16", "10.1.2.0/24")
DIRS = (PolicyDir.INBOUND, PolicyDir.OUTBOUND, PolicyDir.FWD)


@dataclass
class Model:
    sas: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)  # state, owner
    policies: dict[tuple[str, PolicyDir], int] = field(default_factory=dict)  # -> id


def result(k: Kernel, sock: int, msg: Message) -> tuple[int, Message]:
    d = only(k.handle(sock, msg, NOW))
    assert d.message is not None
    return d.message.errno, d.message


def step(k: Kernel, socks: list[int], model: Model, op: tuple) -> None:  # type: ignore[type-arg]
    kind, who, dst_i, spi, valid = op
    sock, dst = socks[who], DSTS[dst_i]
    key = (dst, spi)
    bad = {} if valid else {"enc_key": b"bad"}
    if kind == "getspi":
        err, msg = result(k, sock, getspi_msg(dst=dst, spirange=(SPIS[0], spi)))
        free = [s for s in SPIS if s <= spi and (dst, s) not in model.sas]
        if not free:
            assert err == (errno.EEXIST if spi == SPIS[0] else errno.ENOENT)
        else:
            assert err == 0 and msg.sa is not None and msg.sa.spi in free
            model.sas[(dst, msg.sa.spi)] = ("larval", sock)
    elif kind == "add":
        err, _ = result(k, sock, sa_msg(MsgType.ADD, spi, dst=dst, **bad))  # type: ignore
        expect = errno.EINVAL if not valid else errno.EEXIST if key in model.sas else 0
        assert err == expect
        if not err:
            model.sas[key] = ("mature", 0)
    elif kind == "update":
        err, _ = result(k, sock, sa_msg(MsgType.UPDATE, spi, dst=dst, **bad))  # type: ignore
        state, owner = model.sas.get(key, ("", 0))
        if not valid:
            expect = errno.EINVAL
        elif not state:
            expect = errno.ESRCH
        elif state != "larval":
            expect = errno.EEXIST
        else:
            expect = 0 if owner == sock else errno.EPERM
        assert err == expect
        if not err:
            model.sas[key] = ("mature", 0)
    elif kind == "delete":
        err, _ = result(k, sock, key_msg(MsgType.DELETE, spi, dst=dst))
        assert err == (0 if key in model.sas else errno.ESRCH)
        model.sas.pop(key, None)
    elif kind == "flush":
        assert result(k, sock, Message(MsgType.FLUSH))[0] == 0
        model.sas.clear()
    elif kind == "close":
        k.close_socket(sock, NOW)
        model.sas = {kk: v for kk, v in model.sas.items() if v != ("larval", sock)}
        socks[who] = k.open_socket()
    else:
        spd_step(k, sock, model, kind, NETS[dst_i % len(NETS)], DIRS[spi % 3], valid)


def spd_step(k: Kernel, sock: int, model: Model, kind: str, net: str, direction: PolicyDir,
             valid: bool) -> None:
    pkey = (net, direction)
    dst_net = "10.9.0.0/16" if valid else "2001:db8::/32"  # invalid: families differ
    if kind in ("spdadd", "spdupdate"):
        mtype = MsgType.X_SPDADD if kind == "spdadd" else MsgType.X_SPDUPDATE
        err, msg = result(k, sock, spd_msg(mtype, net, dst_net, direction))
        if not valid:
            assert err == errno.EINVAL
        elif kind == "spdadd" and pkey in model.policies:
            assert err == errno.EEXIST
        else:
            assert err == 0 and msg.policy is not None
            if pkey in model.policies:
                assert msg.policy.id == model.policies[pkey]
            assert msg.policy.id not in set(model.policies.values()) - {model.policies.get(pkey)}
            model.policies.pop(pkey, None)  # a replaced policy goes last among its priority
            model.policies[pkey] = msg.policy.id
    elif kind == "spddelete":
        err, _ = result(k, sock, spd_msg(MsgType.X_SPDDELETE, net, "10.9.0.0/16", direction))
        assert err == (0 if pkey in model.policies else errno.ENOENT)
        model.policies.pop(pkey, None)
    elif kind == "spddelete2":
        ids = sorted(model.policies.values())
        target = ids[0] if ids and valid else 12345
        err, _ = result(k, sock, policy_id_msg(MsgType.X_SPDDELETE2, target))
        assert err == (0 if target in ids else errno.ENOENT)
        model.policies = {kk: v for kk, v in model.policies.items() if v != target}
    elif kind == "spdflush":
        assert result(k, sock, Message(MsgType.X_SPDFLUSH))[0] == 0
        model.policies.clear()


def check(k: Kernel, model: Model) -> None:
    actual = {(str(sa.dst), sa.spi): sa for sa in k.sad}
    assert set(actual) == set(model.sas)
    for key, (state, owner) in model.sas.items():
        sa = actual[key]
        assert sa.state == (SaState.LARVAL if state == "larval" else SaState.MATURE)
        if state == "larval":
            assert sa.owner == owner
    for dst in DSTS:
        best = k.sad.best_by_endpoints(A("10.0.0.1"), A(dst), SaType.ESP, IpsecMode.ANY)
        matures = [sa for (d, _), sa in actual.items() if d == dst and sa.state == SaState.MATURE]
        assert (best is None) == (not matures) and (best is None or best in matures)
    policies = {(str(p.selector.src), p.direction): p.id for p in k.spd}
    assert policies == model.policies
    # The cached lookup finds the first matching policy in insertion order (equal priorities).
    for direction in DIRS:
        got = k.spd.lookup(direction, A("10.1.2.3"), A("10.9.0.1"), 6, 1, 2)
        first = next((pid for (net, d), pid in model.policies.items()
                      if d == direction and A("10.1.2.3") in ip_network(net)), None)
        assert (got.id if got else None) == first


OPS = st.tuples(
    st.sampled_from(["getspi", "add", "update", "delete", "flush", "close", "spdadd",
                     "spdupdate", "spddelete", "spddelete2", "spdflush"]),
    st.integers(0, 1),
    st.integers(0, len(DSTS) - 1),
    st.sampled_from(SPIS),
    st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=40))
def test_random_requests_match_the_model(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    k = kernel()
    socks = [k.open_socket(), k.open_socket()]
    model = Model()
    for op in ops:
        step(k, socks, model, op)
        check(k, model)
