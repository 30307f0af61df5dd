import struct

from ike.config import IkeConfig
from ike.constants import DhId, EncrId, ExchangeType, IdType, NotifyType
from ike.events import ChildSaFailed, InitialContact
from ike.message import Message, decode_message, encode_message
from ike.payloads import KePayload, NotifyPayload, SaPayload
from ike.proposals import parse_proposals
from ike.sa import ChildSaEstablished, IkeSa, IkeSaEstablished, IkeSaFailed, State
from tests.ike.harness import I_ADDR, R_ADDR, config, events, pair, pump, ts


def test_psk_handshake_establishes_ike_and_child_sa() -> None:
    i, r = pair()
    i.initiate(0.0)
    assert pump(i, r) == 4
    assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED
    ie, re_ = events(i), events(r)
    assert [type(e) for e in ie] == [IkeSaEstablished, ChildSaEstablished]
    assert [type(e) for e in re_] == [IkeSaEstablished, InitialContact, ChildSaEstablished]
    assert re_[1] == InitialContact((IdType.FQDN, b"alice"), re_[0].spi_i, re_[0].spi_r)
    re_.pop(1)
    assert ie[0].spi_i == re_[0].spi_i and ie[0].spi_r == re_[0].spi_r
    assert ie[0].remote_id == (IdType.FQDN, b"gw")
    assert re_[0].remote_id == (IdType.FQDN, b"alice")
    assert ie[0].transforms.encr == EncrId.AES_GCM_16 and ie[0].transforms.dh == DhId.CURVE25519
    ic, rc = ie[1], re_[1]
    assert (ic.inbound_spi, ic.outbound_spi) == (b"\xc0\x00\x00\x01", b"\xc0\x00\x00\x02")
    assert (rc.inbound_spi, rc.outbound_spi) == (b"\xc0\x00\x00\x02", b"\xc0\x00\x00\x01")
    # Each side's outbound keys are the other side's inbound keys; 16-byte key + 4 salt.
    assert ic.encr_out == rc.encr_in and ic.encr_in == rc.encr_out and len(ic.encr_out) == 20
    assert ic.encr_out != ic.encr_in
    assert ic.local_ts == [ts("10.1.0.0/16")] and rc.local_ts == [ts("10.2.0.0/16")]
    assert not ic.transport_mode
    assert ic.encr_out.hex() not in repr(ic)
    assert not ie[0].local_behind_nat and not ie[0].remote_behind_nat
    assert i.get_timer() is None and r.get_timer() is None


def test_cbc_suite_and_narrowing() -> None:
    i, r = pair(
        {"ike_proposals": parse_proposals("aes256-sha256-modp2048", "ike"),
         "esp_proposals": parse_proposals("aes256-sha256", "esp"),
         "local_ts": [ts("10.1.0.0/16")], "remote_ts": [ts("10.0.0.0/8")]},
        {"ike_proposals": parse_proposals("aes256-sha256-modp2048", "ike"),
         "esp_proposals": parse_proposals("aes256-sha256", "esp")})
    i.initiate(0.0)
    pump(i, r)
    ie = events(i)
    child = ie[1]
    assert isinstance(child, ChildSaEstablished)
    assert child.remote_ts == [ts("10.2.0.0/16")]  # narrowed by the responder
    assert len(child.encr_out) == 32 and len(child.integ_out) == 32


def test_invalid_ke_payload_retry() -> None:
    i, r = pair({"ike_proposals": parse_proposals("aes128gcm16-prfsha256-ecp256-x25519",
                                                  "ike")})
    i.initiate(0.0)
    first = i.datagrams_to_send(0.0)
    ke = decode_message(first[0][0]).find(KePayload)
    assert isinstance(ke, KePayload) and ke.group == DhId.ECP256
    r.receive_datagram(first[0][0], I_ADDR, 0.0)
    reply = r.datagrams_to_send(0.0)
    invalid_ke = decode_message(reply[0][0]).notify(NotifyType.INVALID_KE_PAYLOAD)
    assert invalid_ke is not None and invalid_ke.data == struct.pack("!H", DhId.CURVE25519)
    i.receive_datagram(reply[0][0], R_ADDR, 0.0)
    pump(i, r)
    assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED


def test_wrong_psk_fails_both_sides() -> None:
    i, r = pair(r_over={"psk": b"another secret"})
    i.initiate(0.0)
    pump(i, r)
    assert r.state is State.FAILED and i.state is State.FAILED
    assert events(r)[-1] == IkeSaFailed("peer AUTH does not verify",
                                        NotifyType.AUTHENTICATION_FAILED)
    assert events(i)[-1].notify == NotifyType.AUTHENTICATION_FAILED


def test_unexpected_peer_identity_rejected() -> None:
    i, r = pair(r_over={"remote_id": (IdType.FQDN, b"bob")})
    i.initiate(0.0)
    pump(i, r)
    assert r.state is State.FAILED and i.state is State.FAILED


def test_no_proposal_chosen() -> None:
    i, r = pair(r_over={"ike_proposals": parse_proposals("aes256-sha512-modp4096", "ike")})
    i.initiate(0.0)
    pump(i, r)
    assert i.state is State.FAILED
    assert events(i)[-1].notify == NotifyType.NO_PROPOSAL_CHOSEN


def test_child_proposal_mismatch_keeps_ike_sa() -> None:
    i, r = pair(r_over={"esp_proposals": parse_proposals("aes256-sha384", "esp")})
    i.initiate(0.0)
    pump(i, r)
    assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED
    ie = events(i)
    assert isinstance(ie[0], IkeSaEstablished)
    assert ie[1] == ChildSaFailed("Child SA not created", NotifyType.NO_PROPOSAL_CHOSEN)
    assert i.child_sas == [] and r.child_sas == []


def test_ts_unacceptable() -> None:
    i, r = pair(r_over={"remote_ts": [ts("172.16.0.0/12")]})
    i.initiate(0.0)
    pump(i, r)
    assert events(i)[-1].notify == NotifyType.TS_UNACCEPTABLE


def test_transport_mode_negotiated() -> None:
    i, r = pair({"transport_mode": True}, {"transport_mode": True})
    i.initiate(0.0)
    pump(i, r)
    assert events(i)[1].transport_mode and events(r)[2].transport_mode


def test_retransmission_uses_strongswan_backoff_and_gives_up() -> None:
    i, _ = pair()
    i.initiate(0.0)
    first = i.datagrams_to_send(0.0)
    assert i.get_timer() == 4.0
    i.handle_timer(3.9)
    assert i.datagrams_to_send(3.9) == []
    now = 0.0
    sent_at = []
    for _ in range(10):
        deadline = i.get_timer()
        if deadline is None:
            break
        now = deadline
        i.handle_timer(now)
        out = i.datagrams_to_send(now)
        assert [d for d, _ in out] in ([first[0][0]], [])
        if out:
            sent_at.append(round(now, 4))
    # timeout 4 s, base 1.8, 5 retransmissions, then one more wait: 165.06 s in all.
    assert sent_at == [4.0, 11.2, 24.16, 47.488, 89.4784]
    assert round(now, 3) == 165.061
    assert i.state is State.FAILED and i.get_timer() is None
    assert isinstance(events(i)[-1], IkeSaFailed)


def test_retransmission_is_configurable() -> None:
    i, _ = pair({"retransmit_timeout": 1.0, "retransmit_base": 2.0, "retransmit_tries": 2})
    i.initiate(0.0)
    i.datagrams_to_send(0.0)
    times = []
    while (t := i.get_timer()) is not None:
        i.handle_timer(t)
        times.append(t)
    assert times == [1.0, 3.0, 7.0] and i.state is State.FAILED


def test_lost_auth_response_is_resent_from_cache() -> None:
    i, r = pair()
    i.initiate(0.0)
    r.receive_datagram(i.datagrams_to_send(0.0)[0][0], I_ADDR, 0.0)
    i.receive_datagram(r.datagrams_to_send(0.0)[0][0], R_ADDR, 0.0)
    auth_req = i.datagrams_to_send(0.0)[0][0]
    r.receive_datagram(auth_req, I_ADDR, 0.0)
    lost = r.datagrams_to_send(0.0)
    assert r.state is State.ESTABLISHED
    i.handle_timer(4.0)
    again = i.datagrams_to_send(4.0)
    assert again[0][0] == auth_req
    r.receive_datagram(again[0][0], I_ADDR, 2.0)
    cached = r.datagrams_to_send(2.0)
    assert cached == lost
    i.receive_datagram(cached[0][0], R_ADDR, 2.0)
    assert i.state is State.ESTABLISHED
    assert len([e for e in events(r) if isinstance(e, IkeSaEstablished)]) == 1


def test_garbage_and_tampered_messages_are_dropped() -> None:
    i, r = pair()
    i.initiate(0.0)
    r.receive_datagram(i.datagrams_to_send(0.0)[0][0], I_ADDR, 0.0)
    resp = r.datagrams_to_send(0.0)[0][0]
    i.receive_datagram(resp, R_ADDR, 0.0)
    auth_req = bytearray(i.datagrams_to_send(0.0)[0][0])
    r.receive_datagram(b"\x00" * 10, I_ADDR, 0.0)
    auth_req[-1] ^= 1
    r.receive_datagram(bytes(auth_req), I_ADDR, 0.0)
    assert r.drops == 2 and r.state is State.INIT_DONE and r.datagrams_to_send(0.0) == []


def test_nat_detected_when_addresses_differ() -> None:
    i = IkeSa(config("i"), initiator=True, local_addr=("10.0.0.5", 500), remote_addr=R_ADDR,
              child_spi=b"\x00\x00\x00\x05")
    r = IkeSa(config("r"), initiator=False, local_addr=R_ADDR,
              remote_addr=("203.0.113.7", 4500), child_spi=b"\x00\x00\x00\x06")
    i.initiate(0.0)
    pump(i, r)
    ie, re_ = events(i), events(r)
    assert isinstance(ie[0], IkeSaEstablished) and isinstance(re_[0], IkeSaEstablished)
    assert ie[0].local_behind_nat and not ie[0].remote_behind_nat
    assert re_[0].remote_behind_nat and not re_[0].local_behind_nat


def test_responder_answers_missing_payloads_with_invalid_syntax() -> None:
    _, r = pair()
    bare = Message(ExchangeType.IKE_SA_INIT, 0, b"\x01" * 8, bytes(8), 0x08,
                   [NotifyPayload(NotifyType.INITIAL_CONTACT)])
    r.receive_datagram(encode_message(bare), I_ADDR, 0.0)
    out = r.datagrams_to_send(0.0)
    assert decode_message(out[0][0]).notify(NotifyType.INVALID_SYNTAX) is not None
    assert r.state is State.FAILED
    assert not any(isinstance(p, SaPayload) for p in decode_message(out[0][0]).payloads)


def test_responder_picks_the_peer_config_by_identity_before_checking_auth() -> None:
    """Two peers with their own PSKs behind one address-matched connection: the responder's
    hook chooses by IDi (and IDr when sent), and an unknown identity is refused."""
    peers = {
        (IdType.FQDN, b"alice"): config("r", psk=b"alice's secret",
                                        remote_id=(IdType.FQDN, b"alice")),
        (IdType.FQDN, b"bob"): config("r", psk=b"bob's secret", local_id=(IdType.FQDN, b"gw2"),
                                      remote_id=(IdType.FQDN, b"bob")),
    }
    asked: list[tuple[object, object]] = []

    def choose(idi: tuple[int, bytes], idr: tuple[int, bytes] | None) -> IkeConfig | None:
        asked.append((idi, idr))
        return peers.get(idi)

    for name, psk, peer_id in ((b"alice", b"alice's secret", b"gw"),
                               (b"bob", b"bob's secret", b"gw2"),
                               (b"carol", b"carol's secret", b"gw")):
        i = IkeSa(config("i", local_id=(IdType.FQDN, name), psk=psk), initiator=True,
                  local_addr=I_ADDR, remote_addr=R_ADDR, child_spi=b"\xc0\x00\x00\x01")
        r = IkeSa(config("r", psk=b"the address-matched default"), initiator=False,
                  local_addr=R_ADDR, remote_addr=I_ADDR, child_spi=b"\xc0\x00\x00\x02",
                  peer_config=choose)
        i.initiate(0.0)
        pump(i, r)
        if name == b"carol":
            assert r.state is State.FAILED and i.state is State.FAILED
            assert events(r)[-1].notify == NotifyType.AUTHENTICATION_FAILED
            continue
        assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED, name
        ie = [e for e in events(i) if isinstance(e, IkeSaEstablished)]
        assert ie[0].remote_id == (IdType.FQDN, peer_id)  # the chosen config's identity
    assert [a[0] for a in asked] == [(IdType.FQDN, n) for n in (b"alice", b"bob", b"carol")]


def test_initiator_takes_its_first_child_spi_when_the_ike_sa_init_answer_comes() -> None:
    taken: list[str] = []

    def allocate() -> bytes | None:
        taken.append(i.state.name)
        return b"\x0e\x0f\x10\x11"

    i = IkeSa(config("i"), initiator=True, local_addr=I_ADDR, remote_addr=R_ADDR,
              child_spi=b"", spi_allocator=allocate)
    r = IkeSa(config("r"), initiator=False, local_addr=R_ADDR, remote_addr=I_ADDR,
              child_spi=b"\xc0\x00\x00\x02")
    assert not i.awaiting_child_spi
    i.initiate(0.0)
    assert i.awaiting_child_spi and not taken  # IKE_SA_INIT needs no SPI
    pump(i, r)
    assert taken == ["INIT_SENT"] and not i.awaiting_child_spi
    (mine,) = [e for e in events(i) if isinstance(e, ChildSaEstablished)]
    (theirs,) = [e for e in events(r) if isinstance(e, ChildSaEstablished)]
    assert mine.inbound_spi == theirs.outbound_spi == b"\x0e\x0f\x10\x11"
    # An allocator with nothing to give: the IKE SA cannot offer its Child SA and fails.
    i = IkeSa(config("i"), initiator=True, local_addr=I_ADDR, remote_addr=R_ADDR,
              child_spi=b"", spi_allocator=lambda: None)
    r = IkeSa(config("r"), initiator=False, local_addr=R_ADDR, remote_addr=I_ADDR,
              child_spi=b"\xc0\x00\x00\x02")
    i.initiate(0.0)
    pump(i, r)
    assert i.state is State.FAILED


def test_responder_takes_its_first_child_spi_from_the_allocator_when_given_none() -> None:
    spis = [b"\x0a\x0b\x0c\x0d"]
    i = IkeSa(config("i"), initiator=True, local_addr=I_ADDR, remote_addr=R_ADDR,
              child_spi=b"\xc0\x00\x00\x01")
    r = IkeSa(config("r"), initiator=False, local_addr=R_ADDR, remote_addr=I_ADDR,
              child_spi=b"", spi_allocator=lambda: spis.pop() if spis else None)
    i.initiate(0.0)
    pump(i, r)
    (child,) = [e for e in events(r) if isinstance(e, ChildSaEstablished)]
    assert child.inbound_spi == b"\x0a\x0b\x0c\x0d"
    (mine,) = [e for e in events(i) if isinstance(e, ChildSaEstablished)]
    assert mine.outbound_spi == b"\x0a\x0b\x0c\x0d"
    # None from the allocator: the IKE SA comes up, its first Child SA does not.
    i = IkeSa(config("i"), initiator=True, local_addr=I_ADDR, remote_addr=R_ADDR,
              child_spi=b"\xc0\x00\x00\x01")
    r = IkeSa(config("r"), initiator=False, local_addr=R_ADDR, remote_addr=I_ADDR,
              child_spi=b"", spi_allocator=lambda: None)
    i.initiate(0.0)
    pump(i, r)
    assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED
    failed = [e for e in events(r) if isinstance(e, ChildSaFailed)]
    assert failed and failed[0].notify == NotifyType.TEMPORARY_FAILURE
    assert not [e for e in events(i) if isinstance(e, ChildSaEstablished)]
