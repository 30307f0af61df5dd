"""CREATE_CHILD_SA between two IkeSa objects: new Child SAs, rekeys, collisions, errors."""

from __future__ import annotations

import struct

import pytest

from ike.constants import DhId, ExchangeType, NotifyType, ProtocolId
from ike.core import ChildState
from ike.events import ChildSaDeleted, ChildSaEstablished, ChildSaFailed
from ike.message import Message, decode_message
from ike.payloads import KePayload, NotifyPayload, SaPayload
from ike.proposals import parse_proposals
from tests.ike.harness import Net, scripted, ts

PFS = {"esp_proposals": parse_proposals("aes128gcm16-x25519", "esp")}


def inner_of(net: Net, name: str, data: bytes) -> Message:
    """Decrypt a datagram sent by side `name` with the receiving side's keys (test only)."""
    dst = net.r if name == "i" else net.i
    sa = dst.route(data)
    assert sa is not None
    msg = decode_message(data)
    opened = sa._open(msg)
    assert isinstance(opened, list)
    return Message(msg.exchange, msg.message_id, msg.spi_i, msg.spi_r, msg.flags, opened)


def first_established(net: Net) -> tuple[ChildSaEstablished, ChildSaEstablished]:
    (ic,), (rc,) = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    return ic, rc


def assert_pair(a: ChildSaEstablished, b: ChildSaEstablished) -> None:
    assert (a.inbound_spi, a.outbound_spi) == (b.outbound_spi, b.inbound_spi)
    assert a.encr_out == b.encr_in and a.encr_in == b.encr_out
    assert a.integ_out == b.integ_in and a.encr_out != a.encr_in


def test_create_child_without_pfs() -> None:
    net = Net.established()
    first_established(net)
    net.i.sa.create_child(net.now, local_ts=[ts("10.1.1.0/24")])
    (req,) = net.outgoing("i")
    msg = inner_of(net, "i", req)
    assert msg.exchange == ExchangeType.CREATE_CHILD_SA and msg.message_id == 2
    assert msg.find(KePayload) is None
    net.deliver("i", req)
    net.pump()
    (ic,), (rc,) = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    assert_pair(ic, rc)
    assert ic.rekey_of is None and ic.local_ts == [ts("10.1.1.0/24")]
    assert rc.remote_ts == [ts("10.1.1.0/24")]
    assert len(net.i.sa.child_sas) == 2 and len(net.r.sa.child_sas) == 2


def test_create_child_with_pfs_uses_new_dh() -> None:
    net = Net.established(PFS, PFS)
    first_established(net)
    net.i.sa.create_child(net.now)
    (req,) = net.outgoing("i")
    ke = inner_of(net, "i", req).find(KePayload)
    assert isinstance(ke, KePayload) and ke.group == DhId.CURVE25519
    net.deliver("i", req)
    (resp,) = net.outgoing("r")
    assert isinstance(inner_of(net, "r", resp).find(KePayload), KePayload)
    net.deliver("r", resp)
    (ic,), (rc,) = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    assert_pair(ic, rc)
    assert ic.transforms.dh == DhId.CURVE25519


def test_invalid_ke_in_create_child_is_retried_with_the_requested_group() -> None:
    net = Net.established({"esp_proposals": parse_proposals("aes128gcm16-ecp256-x25519",
                                                            "esp")},
                          {"esp_proposals": parse_proposals("aes128gcm16-x25519", "esp")})
    first_established(net)
    net.i.sa.create_child(net.now)
    (req,) = net.outgoing("i")
    ke = inner_of(net, "i", req).find(KePayload)
    assert isinstance(ke, KePayload) and ke.group == DhId.ECP256
    net.deliver("i", req)
    (resp,) = net.outgoing("r")
    refusal = inner_of(net, "r", resp).notify(NotifyType.INVALID_KE_PAYLOAD)
    assert refusal is not None and refusal.data == struct.pack("!H", DhId.CURVE25519)
    net.deliver("r", resp)
    (retry,) = net.outgoing("i")
    msg = inner_of(net, "i", retry)
    assert msg.message_id == 3 and msg.find(KePayload).group == DhId.CURVE25519  # type: ignore
    net.deliver("i", retry)
    net.pump()
    (ic,), (rc,) = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    assert_pair(ic, rc)


def test_no_proposal_chosen_and_ts_unacceptable() -> None:
    net = Net.established(r_over={"esp_proposals": parse_proposals("aes128gcm16,aes256-sha384",
                                                                   "esp")})
    first_established(net)
    net.i.sa.config.esp_proposals = parse_proposals("aes256-sha256", "esp")
    net.i.sa.create_child(net.now)
    net.pump()
    (failed,) = net.i.take(ChildSaFailed)
    assert failed.notify == NotifyType.NO_PROPOSAL_CHOSEN
    net.i.sa.config.esp_proposals = parse_proposals("aes128gcm16", "esp")
    net.i.sa.create_child(net.now, local_ts=[ts("172.16.0.0/12")])
    net.pump()
    (failed,) = net.i.take(ChildSaFailed)
    assert failed.notify == NotifyType.TS_UNACCEPTABLE
    assert len(net.i.sa.child_sas) == 1 and len(net.r.sa.child_sas) == 1
    assert net.r.take(ChildSaEstablished) == []


def test_child_rekey_is_make_before_break() -> None:
    net = Net.established(PFS, PFS)
    ic, rc = first_established(net)
    net.i.sa.rekey_child(ic.inbound_spi, net.now)
    (req,) = net.outgoing("i")
    rekey = inner_of(net, "i", req).notify(NotifyType.REKEY_SA)
    assert rekey is not None and rekey.spi == ic.inbound_spi
    assert rekey.protocol == ProtocolId.ESP
    net.deliver("i", req)
    # The responder announces the new pair and keeps the old one until the delete.
    (rnew,) = net.r.take(ChildSaEstablished)
    assert rnew.rekey_of == rc.inbound_spi and net.r.take(ChildSaDeleted) == []
    (resp,) = net.outgoing("r")
    net.deliver("r", resp)
    (inew,) = net.i.take(ChildSaEstablished)
    assert inew.rekey_of == ic.inbound_spi and net.i.take(ChildSaDeleted) == []
    assert_pair(inew, rnew)
    assert inew.encr_out != ic.encr_out
    # Then the initiator deletes the old pair with an INFORMATIONAL.
    (delete,) = net.outgoing("i")
    assert inner_of(net, "i", delete).exchange == ExchangeType.INFORMATIONAL
    net.deliver("i", delete)
    (rdel,) = net.r.take(ChildSaDeleted)
    assert (rdel.inbound_spi, rdel.outbound_spi) == (rc.inbound_spi, rc.outbound_spi)
    net.pump()
    (idel,) = net.i.take(ChildSaDeleted)
    assert (idel.inbound_spi, idel.outbound_spi) == (ic.inbound_spi, ic.outbound_spi)
    assert [c.inbound_spi for c in net.i.sa.child_sas] == [inew.inbound_spi]
    assert [c.inbound_spi for c in net.r.sa.child_sas] == [rnew.inbound_spi]


def test_responder_rekeys_too() -> None:
    net = Net.established()
    ic, rc = first_established(net)
    net.r.sa.rekey_child(rc.inbound_spi, net.now)
    net.pump()
    (inew,), (rnew,) = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    assert_pair(inew, rnew)
    assert rnew.rekey_of == rc.inbound_spi and inew.rekey_of == ic.inbound_spi
    assert len(net.i.take(ChildSaDeleted)) == 1 and len(net.r.take(ChildSaDeleted)) == 1


def _collide(i_nonces: list[bytes], r_nonces: list[bytes]) -> tuple[Net, bytes, bytes]:
    net = Net.established(i_random=scripted(i_nonces), r_random=scripted(r_nonces))
    ic, rc = first_established(net)
    net.i.sa.rekey_child(ic.inbound_spi, net.now)
    net.r.sa.rekey_child(rc.inbound_spi, net.now)
    (ireq,), (rreq,) = net.outgoing("i"), net.outgoing("r")
    net.deliver("i", ireq)
    net.deliver("r", rreq)
    net.pump()
    return net, ic.inbound_spi, rc.inbound_spi


def _survivors(net: Net) -> tuple[list[bytes], list[bytes]]:
    return ([c.inbound_spi for c in net.i.sa.child_sas],
            [c.inbound_spi for c in net.r.sa.child_sas])


def test_simultaneous_child_rekey_initiator_nonce_lowest() -> None:
    # IKE_SA_INIT and the first rekey nonce come from the script: 2 per side before.
    n = [bytes([b]) * 32 for b in range(256)]
    net, i_old, r_old = _collide([n[0x90], n[0x05], n[0x50]], [n[0x91], n[0x30], n[0x40]])
    # i's exchange {05, 40} holds the lowest nonce: its pair is redundant and i deletes it;
    # r's pair survives and r deletes the old one.
    i_new, r_new = net.i.take(ChildSaEstablished), net.r.take(ChildSaEstablished)
    assert len(i_new) == 2 and len(r_new) == 2
    i_spis, r_spis = _survivors(net)
    assert len(i_spis) == 1 and len(r_spis) == 1
    survivor = net.i.sa.child_sas[0]
    assert survivor.outbound_spi == r_spis[0]
    # the survivor is r's exchange: its responder side (i) answered with the later nonce
    r_initiated = next(e for e in r_new if e.inbound_spi == r_spis[0])
    assert r_initiated.rekey_of == r_old
    deleted_i = {e.inbound_spi for e in net.i.take(ChildSaDeleted)}
    assert i_old in deleted_i and len(deleted_i) == 2
    assert all(c.state is ChildState.INSTALLED for c in net.i.sa.child_sas + net.r.sa.child_sas)


def test_simultaneous_child_rekey_responder_nonce_lowest() -> None:
    n = [bytes([b]) * 32 for b in range(256)]
    net, i_old, r_old = _collide([n[0x90], n[0x50], n[0x60]], [n[0x91], n[0x05], n[0x40]])
    i_spis, r_spis = _survivors(net)
    assert len(i_spis) == 1 and len(r_spis) == 1
    # r's exchange {05, 60} is redundant: the surviving pair is the one i initiated.
    i_initiated = [e for e in net.i.take(ChildSaEstablished) if e.inbound_spi == i_spis[0]]
    assert i_initiated and i_initiated[0].rekey_of == i_old
    assert len(net.r.take(ChildSaDeleted)) == 2 and len(net.i.take(ChildSaDeleted)) == 2


def test_peer_deletes_child_while_we_rekey_it() -> None:
    net = Net.established()
    ic, rc = first_established(net)
    net.i.sa.rekey_child(ic.inbound_spi, net.now)
    net.r.sa.delete_child(rc.inbound_spi, net.now)
    (ireq,), (rdel,) = net.outgoing("i"), net.outgoing("r")
    net.deliver("r", rdel)  # i answers the delete as usual
    net.deliver("i", ireq)  # r is deleting that pair: TEMPORARY_FAILURE
    net.pump()
    assert net.i.sa.child_sas == [] and net.r.sa.child_sas == []
    assert len(net.i.take(ChildSaDeleted)) == 1 and len(net.r.take(ChildSaDeleted)) == 1
    assert net.i.take(ChildSaEstablished) == [] and net.r.take(ChildSaEstablished) == []
    net.timers(net.now + 60)
    assert net.i.sa.get_timer() is None  # no retry of a rekey for a pair that is gone


def test_rekey_refused_with_temporary_failure_is_retried() -> None:
    net = Net.established(r_over={"temporary_failure_retry": 5.0},
                          i_over={"temporary_failure_retry": 5.0})
    ic, rc = first_established(net)
    net.r.sa.rekey_ike(net.now)  # r's IKE rekey in flight: i's Child SA rekey must wait
    (rreq,) = net.outgoing("r")
    net.i.sa.rekey_child(ic.inbound_spi, net.now)
    (ireq,) = net.outgoing("i")
    net.deliver("i", ireq)
    (resp,) = net.outgoing("r")
    assert inner_of(net, "r", resp).notify(NotifyType.TEMPORARY_FAILURE) is not None
    net.deliver("r", resp)
    assert net.i.sa._retries and net.i.take(ChildSaFailed) == []
    net.deliver("r", rreq)
    net.pump()
    net.timers(net.now + 10)
    (inew,) = net.i.take(ChildSaEstablished)
    assert inew.rekey_of == ic.inbound_spi  # retried on the new IKE SA where the pair moved
    assert len(net.i.sa.child_sas) == 1 and len(net.r.sa.child_sas) == 1


def test_child_sa_not_found_removes_the_pair() -> None:
    net = Net.established()
    ic, rc = first_established(net)
    net.r.sa._children.clear()  # the responder lost it (e.g. restarted its child config)
    net.i.sa.rekey_child(ic.inbound_spi, net.now)
    (req,) = net.outgoing("i")
    net.deliver("i", req)
    (resp,) = net.outgoing("r")
    nf = inner_of(net, "r", resp).notify(NotifyType.CHILD_SA_NOT_FOUND)
    assert nf is not None and nf.spi == ic.inbound_spi
    net.deliver("r", resp)
    (gone,) = net.i.take(ChildSaDeleted)
    assert gone.inbound_spi == ic.inbound_spi and net.i.sa.child_sas == []


def test_responder_checks_missing_payloads() -> None:
    net = Net.established()
    first_established(net)
    sa = net.i.sa
    sa._request(ExchangeType.CREATE_CHILD_SA, [NotifyPayload(NotifyType.REKEY_SA)],
                net.now, "create-child", lambda m, p, t: None)
    (req,) = net.outgoing("i")
    net.deliver("i", req)
    (resp,) = net.outgoing("r")
    assert inner_of(net, "r", resp).notify(NotifyType.INVALID_SYNTAX) is not None
    assert not inner_of(net, "r", resp).find(SaPayload)


def test_requests_name_a_pair_by_either_spi() -> None:
    net = Net.established()
    ic, _ = first_established(net)
    net.i.sa.rekey_child(ic.outbound_spi, net.now)  # as a PF_KEY EXPIRE of the outbound SA
    net.pump()
    (new,) = net.i.take(ChildSaEstablished)
    assert new.rekey_of == ic.inbound_spi
    with pytest.raises(ValueError, match="deadbeef"):
        net.i.sa.delete_child(b"\xde\xad\xbe\xef", net.now)
    net.i.sa.delete_child(new.outbound_spi, net.now)
    net.pump()
    assert net.i.sa.child_sas == [] and net.r.sa.child_sas == []


def test_too_many_narrowed_selectors_refused_not_crashing() -> None:
    net = Net.established(r_over={"remote_ts": [ts("10.1.0.0/16"), ts("10.1.0.0/17")]})
    first_established(net)
    many = [ts(f"10.1.{n}.0/24") for n in range(200)]
    net.i.sa.create_child(net.now, local_ts=many)  # 400 intersections: more than fit
    net.pump()
    (failed,) = net.i.take(ChildSaFailed)
    assert failed.notify == NotifyType.TS_UNACCEPTABLE and net.r.sa.state.value == "established"


def test_spi_allocator_running_dry() -> None:
    net = Net.established()
    ic, _ = first_established(net)
    net.r.sa._allocate_spi = lambda: None
    net.i.sa.create_child(net.now)
    net.pump()
    (failed,) = net.i.take(ChildSaFailed)
    assert failed.notify == NotifyType.TEMPORARY_FAILURE
    net.i.sa._allocate_spi = lambda: b"\x01"  # junk counts as none
    net.i.sa.rekey_child(ic.inbound_spi, net.now)
    (failed,) = net.i.take(ChildSaFailed)
    assert failed.reason == "no inbound SPI available" and failed.rekey_of == ic.inbound_spi
    assert net.i.sa.child_sas[0].state is ChildState.INSTALLED and not net.i.sa.busy
