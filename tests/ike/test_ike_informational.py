"""INFORMATIONAL exchanges: deletes, liveness checks, notifies, silent drops, message IDs."""

from __future__ import annotations

from ike.constants import ExchangeType, IdType, NotifyType, ProtocolId
from ike.core import ChildState, State
from ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    InitialContact,
    LivenessFailed,
    PeerNotify,
)
from ike.message import decode_message, encode_message
from ike.payloads import DeletePayload, NotifyPayload, Payload, UnknownPayload
from ike.proposals import parse_proposals
from tests.ike.harness import Net, pair, seal_raw
from tests.ike.test_ike_child import inner_of

PFS_I = {"esp_proposals": parse_proposals("aes128gcm16-x25519", "esp")}


def send(net: Net, name: str, inner: list[Payload]) -> tuple[bytes, bytes]:
    """Side `name` sends an INFORMATIONAL request; returns (request, response) datagrams."""
    sa = (net.i if name == "i" else net.r).sa
    sa._request(ExchangeType.INFORMATIONAL, inner, net.now, "test", lambda m, p, t: None)
    (req,) = net.outgoing(name)
    net.deliver(name, req)
    (resp,) = net.outgoing("r" if name == "i" else "i")
    net.deliver("r" if name == "i" else "i", resp)
    return req, resp


def test_delete_child_both_sides_report_the_spis() -> None:
    net = Net.established()
    (ic,), (rc,) = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    net.i.sa.delete_child(ic.inbound_spi, net.now)
    (req,) = net.outgoing("i")
    d = inner_of(net, "i", req).find(DeletePayload)
    assert isinstance(d, DeletePayload) and d.spis == [ic.inbound_spi]
    assert d.protocol == ProtocolId.ESP
    net.deliver("i", req)
    (resp,) = net.outgoing("r")
    rd = inner_of(net, "r", resp).find(DeletePayload)
    assert isinstance(rd, DeletePayload) and rd.spis == [rc.inbound_spi]
    assert net.r.take(ChildSaDeleted) == [ChildSaDeleted(rc.inbound_spi, rc.outbound_spi,
                                                         "deleted by peer")]
    assert net.i.take(ChildSaDeleted) == []  # only once the peer has answered
    net.deliver("r", resp)
    assert net.i.take(ChildSaDeleted) == [ChildSaDeleted(ic.inbound_spi, ic.outbound_spi,
                                                         "deleted by us")]
    assert net.i.sa.state is State.ESTABLISHED and net.i.sa.child_sas == []


def test_simultaneous_child_deletes_answer_without_delete_payload() -> None:
    net = Net.established()
    (ic,), (rc,) = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    net.i.sa.delete_child(ic.inbound_spi, net.now)
    net.r.sa.delete_child(rc.inbound_spi, net.now)
    (ireq,), (rreq,) = net.outgoing("i"), net.outgoing("r")
    net.deliver("i", ireq)
    net.deliver("r", rreq)
    for name in ("i", "r"):
        (resp,) = net.outgoing(name)
        assert inner_of(net, name, resp).payloads == []
        net.deliver(name, resp)
    assert len(net.i.take(ChildSaDeleted)) == 1 and len(net.r.take(ChildSaDeleted)) == 1


def test_delete_ike_sa_removes_every_child() -> None:
    net = Net.established()
    net.i.sa.create_child(net.now)
    net.pump()
    assert len(net.r.sa.child_sas) == 2
    net.r.sa.delete(net.now)
    net.pump()
    assert net.i.sa.state is State.DELETED and net.r.sa.state is State.DELETED
    assert len(net.i.take(ChildSaDeleted)) == 2 and len(net.r.take(ChildSaDeleted)) == 2
    (ie,), (re_,) = net.i.take(IkeSaDeleted), net.r.take(IkeSaDeleted)
    assert not ie.rekeyed and ie.reason == "deleted by peer" and re_.reason == "deleted by us"
    assert net.i.sa.get_timer() is None and net.r.sa.get_timer() is None


def test_liveness_check_answered() -> None:
    net = Net.established()
    net.i.sa.check_liveness(net.now)
    (req,) = net.outgoing("i")
    assert inner_of(net, "i", req).payloads == []
    net.deliver("i", req)
    net.pump()
    assert net.i.sa.get_timer() is None and not net.i.sa.busy
    net.i.sa.create_child(net.now)
    net.i.sa.check_liveness(net.now)  # something in flight already: no extra request
    assert len(net.outgoing("i")) == 1


def test_liveness_failure_after_retransmissions() -> None:
    net = Net.established()
    net.i.take(ChildSaEstablished)
    net.i.take(IkeSaEstablished)
    net.i.sa.check_liveness(10.0)
    net.now = 10.0
    net.timers(500.0, lose=True)
    kinds = [type(e) for e in net.i.take(object)]
    assert kinds == [ChildSaDeleted, LivenessFailed, IkeSaFailed]
    sent = [d for name, d in net.wire if name == "i"]
    assert len(set(sent[-6:])) == 1 and len(sent) >= 6  # one request, 5 retransmissions
    assert net.i.sa.state is State.FAILED


def test_unknown_status_notify_ignored_and_error_notify_reported() -> None:
    net = Net.established()
    _, resp = send(net, "i", [NotifyPayload(40000, b"x"), NotifyPayload(
        NotifyType.INVALID_SPI, b"\x01\x02\x03\x04", ProtocolId.ESP)])
    assert inner_of(net, "r", resp).payloads == []
    (notice,) = net.r.take(PeerNotify)
    assert notice.notify_type == NotifyType.INVALID_SPI and notice.data == b"\x01\x02\x03\x04"
    assert net.r.sa.state is State.ESTABLISHED


def test_authentication_failed_notify_ends_the_sa() -> None:
    net = Net.established()
    send(net, "i", [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)])
    assert net.r.sa.state is State.FAILED
    assert net.r.take(IkeSaFailed)[0].notify == NotifyType.AUTHENTICATION_FAILED


def test_unsupported_critical_payload_answered_inside_sk() -> None:
    net = Net.established()
    _, resp = send(net, "i", [UnknownPayload(200, b"zz", critical=True)])
    n = inner_of(net, "r", resp).notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD)
    assert n is not None and n.data == bytes([200])
    assert decode_message(resp).payloads[0].__class__.__name__ == "EncryptedPayload"
    assert net.r.sa.state is State.ESTABLISHED
    net.i.sa.check_liveness(net.now)
    assert net.pump() == 2  # message IDs still in step


def test_tampered_informational_dropped_silently_and_counted() -> None:
    net = Net.established()
    (rc,) = net.r.take(ChildSaEstablished)
    net.i.sa.delete_child(net.i.sa.child_sas[0].inbound_spi, net.now)
    (req,) = net.outgoing("i")
    before = (net.r.sa.drops, net.r.sa.auth_drops, net.r.sa._peer_next_id)
    for pos in (len(req) - 1, len(req) - 20, 40):
        bad = bytearray(req)
        bad[pos] ^= 0x40
        net.deliver("i", bytes(bad))
    assert net.outgoing("r") == [] and net.r.take(ChildSaDeleted) == []
    assert net.r.sa.drops == before[0] + 3 and net.r.sa.auth_drops == before[1] + 3
    assert net.r.sa._peer_next_id == before[2]
    net.deliver("i", req)
    assert net.r.take(ChildSaDeleted)[0].inbound_spi == rc.inbound_spi


def test_retransmitted_request_answered_from_cache_for_every_exchange() -> None:
    net = Net.established()
    net.i.take(ChildSaEstablished)
    net.r.take(ChildSaEstablished)
    net.i.sa.create_child(net.now)
    (req,) = net.outgoing("i")
    net.deliver("i", req)
    (resp,) = net.outgoing("r")
    net.deliver("i", req)  # the response was lost: same bytes again
    (again,) = net.outgoing("r")
    assert again == resp and len(net.r.take(ChildSaEstablished)) == 1
    net.deliver("r", resp)
    net.deliver("r", resp)  # a duplicate response is dropped
    assert len(net.i.take(ChildSaEstablished)) == 1
    # Same message ID, different bytes: not a retransmission.
    bad = bytearray(req)
    bad[-1] ^= 1
    drops = net.r.sa.drops
    net.deliver("i", bytes(bad))
    assert net.outgoing("r") == [] and net.r.sa.drops == drops + 1


def test_message_id_outside_window_dropped() -> None:
    net = Net.established()
    sa = net.i.sa
    sa._next_id += 1  # skip an ID: the responder must not answer
    sa.check_liveness(net.now)
    (req,) = net.outgoing("i")
    assert decode_message(req).message_id == 3
    drops = net.r.sa.drops
    net.deliver("i", req)
    assert net.outgoing("r") == [] and net.r.sa.drops == drops + 1


def test_unsupported_critical_payload_in_sa_init_answered() -> None:
    i, r = pair()
    i.initiate(0.0)
    (data, _), = i.datagrams_to_send(0.0)
    msg = decode_message(data)
    msg.payloads.append(UnknownPayload(201, b"", critical=True))
    r.receive_datagram(encode_message(msg), ("192.0.2.1", 500), 0.0)
    (reply, _), = r.datagrams_to_send(0.0)
    n = decode_message(reply).notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD)
    assert n is not None and n.data == bytes([201]) and r.state is State.IDLE


def test_initiator_reports_failed_responder_authentication() -> None:
    i, r = pair()
    net = Net(i, r)
    i.initiate(0.0)
    (init,) = net.outgoing("i")
    net.deliver("i", init)
    (init_resp,) = net.outgoing("r")
    net.deliver("r", init_resp)
    (auth,) = net.outgoing("i")
    r.config.psk = b"changed after IKE_SA_INIT"  # r now signs with another key
    i.config.psk = b"correct horse battery staple"
    r.config.remote_id = None
    r._verify_peer_auth = lambda *a: None  # type: ignore[method-assign]
    net.deliver("i", auth)
    net.pump()
    assert i.state is State.FAILED and r.state is State.FAILED
    assert net.r.take(IkeSaFailed)[0].notify == NotifyType.AUTHENTICATION_FAILED


def test_initial_contact_is_configurable() -> None:
    net = Net.established(i_over={"initial_contact": False})
    assert net.r.take(InitialContact) == []
    net = Net.established()
    (ic,) = net.r.take(InitialContact)
    assert ic.remote_id == (IdType.FQDN, b"alice")


def test_critical_payload_in_ike_auth_answered_inside_sk_and_fails() -> None:
    i, r = pair()
    net = Net(i, r)
    i.initiate(0.0)
    net.deliver("i", net.outgoing("i")[0])
    net.deliver("r", net.outgoing("r")[0])
    i.datagrams_to_send(0.0)
    i._pending = None
    i._next_id = 1
    i._request(ExchangeType.IKE_AUTH, [UnknownPayload(222, b"", critical=True)], 0.0,
               "IKE_AUTH", i._on_auth_response)
    (auth,) = net.outgoing("i")
    net.deliver("i", auth)
    (resp,) = net.outgoing("r")
    assert decode_message(resp).find(NotifyPayload) is None  # nothing in clear
    n = inner_of(net, "r", resp).notify(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD)
    assert n is not None and n.data == bytes([222])
    assert r.state is State.FAILED
    net.deliver("r", resp)
    assert i.state is State.FAILED


def test_replaced_child_deleted_by_us_when_peer_never_does() -> None:
    net = Net.established()
    (ic,), (rc,) = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    net.i.sa.rekey_child(ic.inbound_spi, net.now)
    net.deliver("i", net.outgoing("i")[0])
    net.deliver("r", net.outgoing("r")[0])
    net.outgoing("i")  # i's delete of the old pair is lost, and i forgets it
    net.i.sa._pending = None
    net.i.sa._children[ic.inbound_spi].state = ChildState.INSTALLED
    deadline = net.r.sa.get_timer()
    assert deadline is not None and round(deadline - net.now, 2) == 165.06
    net.timers(deadline)
    assert [e.inbound_spi for e in net.r.take(ChildSaDeleted)] == [rc.inbound_spi]
    assert [e.inbound_spi for e in net.i.take(ChildSaDeleted)] == [ic.inbound_spi]
    assert len(net.r.sa.child_sas) == 1 and len(net.i.sa.child_sas) == 1


def test_no_key_material_in_reprs() -> None:
    net = Net.established(PFS_I, PFS_I)
    net.i.sa.rekey_ike(net.now)
    net.pump()
    for side in (net.i, net.r):
        side.collect()
        for sa in side.sas:
            assert sa._keys is not None
            secrets = [k.hex() for k in (sa._keys.sk_d, sa._keys.sk_ei, sa._keys.sk_er,
                                         sa._keys.sk_pi, sa._keys.sk_pr)]
            text = repr(sa) + repr(side.events) + repr(sa.child_sas) + repr(sa.config) + \
                repr(sa._pending) + repr(sa._cached)
            assert not any(s in text for s in secrets)
            assert sa.config.psk.hex() not in text and "correct horse" not in text
        for e in side.events:
            if isinstance(e, ChildSaEstablished):
                assert e.encr_in.hex() not in repr(e) and e.encr_out.hex() not in repr(e)


def test_invalid_spi_reported_to_the_peer() -> None:
    net = Net.established()
    net.r.sa.report_invalid_spi(b"\x0b\xad\x5b\x1d", net.now)
    net.pump()
    (notice,) = net.i.take(PeerNotify)
    assert notice.notify_type == NotifyType.INVALID_SPI and notice.data == b"\x0b\xad\x5b\x1d"
    assert net.i.sa.state is State.ESTABLISHED and not net.r.sa.busy


def test_authentic_malformed_request_gets_invalid_syntax() -> None:
    net = Net.established()
    data = seal_raw(net.i.sa, ExchangeType.INFORMATIONAL, 41, b"\x00\x00\x00\x02")
    net.deliver("i", data)
    (resp,) = net.outgoing("r")
    assert inner_of(net, "r", resp).notify(NotifyType.INVALID_SYNTAX) is not None
    assert net.r.sa.state is State.ESTABLISHED
    net.i.sa.check_liveness(net.now)
    assert net.pump() == 2
