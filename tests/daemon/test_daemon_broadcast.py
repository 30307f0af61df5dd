"""What reaches the other sockets: broadcasts, registrations, EXPIREs and the private extension."""

from __future__ import annotations

import select
import time

from tests.core.helpers import CBC, SHA256, key_msg, sa_msg
from tests.daemon.daemon_proc import RunningDaemon
from tests.pfkey.cstructs import extensions
from userspace_ipsec.pfkey.client import PfkeyClient
from userspace_ipsec.pfkey.constants import ExtType, MsgType, SaState, SaType
from userspace_ipsec.pfkey.messages import LifetimeExt, Message, SupportedExt

X_UIPSEC = 0x7F


def _next(client: PfkeyClient, msg_type: MsgType) -> Message:
    """The next message of ``msg_type``; anything else first is a failure."""
    msg = client.receive()
    assert msg.type == msg_type, (msg.type, msg_type)
    return msg


def _silent(client: PfkeyClient, wait: float = 0.5) -> bool:
    ready, _, _ = select.select([client], [], [], wait)
    return not ready


def _fresh(msg: Message) -> Message:
    msg.seq = 0
    return msg


def test_sa_news_reach_every_socket_without_keys(daemon: RunningDaemon) -> None:
    actor, bystander = daemon.client(), daemon.client(uipsec_ext=False)
    add = actor.request(_fresh(sa_msg(MsgType.ADD, 0x3001, encrypt=CBC, enc_key=bytes(16),
                                      auth=SHA256, auth_key=bytes(32))))
    news = _next(bystander, MsgType.ADD)
    assert (news.seq, news.pid, news.errno) == (add.seq, actor.pid, 0)
    assert news.sa is not None and news.sa.spi == 0x3001
    assert ExtType.KEY_ENCRYPT not in news.ext and ExtType.KEY_AUTH not in news.ext

    actor.request(_fresh(key_msg(MsgType.DELETE, 0x3001)))
    news = _next(bystander, MsgType.DELETE)
    assert news.sa is not None and news.sa.spi == 0x3001 and news.pid == actor.pid

    actor.request(Message(MsgType.FLUSH, SaType.UNSPEC))
    news = _next(bystander, MsgType.FLUSH)
    assert news.pid == actor.pid and news.ext == {}

    actor.request(Message(MsgType.X_SPDFLUSH))
    assert _next(bystander, MsgType.X_SPDFLUSH).pid == actor.pid
    # A request's reply alone (GET) is not news.
    actor.request(_fresh(sa_msg(MsgType.ADD, 0x3002)))
    _next(bystander, MsgType.ADD)
    actor.request(_fresh(key_msg(MsgType.GET, 0x3002)))
    assert _silent(bystander)


def test_register_reply_lists_supported_algorithms(daemon: RunningDaemon) -> None:
    first, second, bystander = daemon.client(), daemon.client(), daemon.client()
    reply = first.register(SaType.ESP)
    auth, enc = reply.ext[ExtType.SUPPORTED_AUTH], reply.ext[ExtType.SUPPORTED_ENCRYPT]
    assert isinstance(auth, SupportedExt) and isinstance(enc, SupportedExt)
    enc_ids = {a.id for a in enc.algs}
    assert {12, 20, 28} <= enc_ids  # aes-cbc, aes-gcm-16, chacha20-poly1305
    assert 3 not in enc_ids  # 3des-cbc is weak: not offered by default
    gcm = next(a for a in enc.algs if a.id == 20)
    assert (gcm.ivlen, gcm.minbits, gcm.maxbits) == (8, 160, 288)
    sha256 = next(a for a in auth.algs if a.id == 5)
    assert (sha256.minbits, sha256.maxbits) == (256, 256)

    # A registration is news for the sockets already registered (as Linux), nobody else.
    second.register(SaType.ESP)
    echoed = _next(first, MsgType.REGISTER)
    assert echoed.pid == second.pid
    assert _silent(bystander)


def test_expire_soft_then_hard_only_to_registered(daemon: RunningDaemon) -> None:
    keyer, listener, bystander = daemon.client(), daemon.client(), daemon.client()
    keyer.register(SaType.ESP)
    listener.register(SaType.ESP)
    _next(keyer, MsgType.REGISTER)  # listener's registration
    start = time.monotonic()
    keyer.request(_fresh(sa_msg(MsgType.ADD, 0x4001, soft=LifetimeExt(addtime=1),
                                hard=LifetimeExt(addtime=2))))
    for client in (listener, bystander):
        _next(client, MsgType.ADD)

    for client in (keyer, listener):
        soft = _next(client, MsgType.EXPIRE)
        assert ExtType.LIFETIME_SOFT in soft.ext and ExtType.LIFETIME_HARD not in soft.ext
        assert soft.sa is not None and soft.sa.spi == 0x4001 and soft.sa.state == SaState.DYING
        hard = _next(client, MsgType.EXPIRE)
        assert ExtType.LIFETIME_HARD in hard.ext and ExtType.LIFETIME_SOFT not in hard.ext
        assert ExtType.KEY_ENCRYPT not in hard.ext
    assert 1.5 <= time.monotonic() - start < 10
    assert _silent(bystander)
    assert list(keyer.dump()) == []  # the hard expiry removed it


def _ext_types(raw: list[bytes]) -> set[int]:
    return {t for data in raw for t, _ in extensions(data)}


def test_private_extension_only_for_sockets_that_sent_one(daemon: RunningDaemon) -> None:
    plain_raw: list[bytes] = []
    plain = daemon.client(uipsec_ext=False, on_message=lambda m, raw: plain_raw.append(raw))
    ours = daemon.client()  # announces X_UIPSEC in every request
    plain.register(SaType.ESP)

    reply = ours.request(_fresh(sa_msg(MsgType.ADD, 0x5001, soft=LifetimeExt(addtime=1))))
    assert reply.uipsec is not None and reply.uipsec.replay_window == 32
    assert _next(plain, MsgType.ADD).uipsec is None
    got = ours.request(_fresh(key_msg(MsgType.GET, 0x5001)))
    assert got.uipsec is not None
    assert [m.uipsec is not None for m in ours.dump()] == [True]

    assert plain.request(_fresh(key_msg(MsgType.GET, 0x5001))).uipsec is None
    assert [m.uipsec for m in plain.dump()] == [None]
    assert _next(plain, MsgType.EXPIRE).uipsec is None  # soft expiry after 1 s
    ours.request(Message(MsgType.FLUSH))
    _next(plain, MsgType.FLUSH)
    assert len(plain_raw) == 9  # REGISTER, ADD, GET, DUMP, EXPIRE, FLUSH
    assert X_UIPSEC not in _ext_types(plain_raw)
    assert ExtType.LIFETIME_SOFT in _ext_types(plain_raw)  # the walk did see extensions
