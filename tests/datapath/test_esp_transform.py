"""EspTransform behaviour beyond interoperability: drops, padding, sequence limits, buffers."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.esp import (
    AEAD_HEAD,
    AEAD_ICV,
    HEAD_IV,
    SEAL_HEAD,
    SEAL_TAIL,
    DropReason,
    EspConfigError,
    EspDrop,
    EspTransform,
    SealSlot,
    SequenceExhausted,
)

SPI = 0x12345678
GCM_KEY = bytes(range(20))
CBC_KEY = bytes(range(16))
HMAC_KEY = bytes(range(100, 132))

SUITES = {
    "gcm": ("aes-gcm-16", bytes(range(36)), "null", b""),
    "chacha": ("chacha20-poly1305", bytes(range(36)), "null", b""),
    "cbc": ("aes-cbc", CBC_KEY, "hmac-sha256", HMAC_KEY),
    "ctr": ("aes-ctr", bytes(range(20)), "hmac-sha384", bytes(48)),
    "null": ("null", b"", "hmac-sha512", bytes(range(64))),
}


def pair(name: str, **kw: object) -> tuple[EspTransform, EspTransform]:
    enc, ek, integ, ik = SUITES[name]
    return (EspTransform.build(SPI, enc, ek, integ, ik, **kw),  # type: ignore[arg-type]
            EspTransform.build(SPI, enc, ek, integ, ik, **kw))  # type: ignore[arg-type]


def reason(esp: EspTransform, packet: bytes) -> DropReason:
    with pytest.raises(EspDrop) as info:
        esp.open(packet)
    return info.value.reason


@pytest.mark.parametrize("name", SUITES)
def test_every_flipped_bit_is_refused(name: str) -> None:
    tx, rx = pair(name)
    packet = tx.seal(b"hello world" * 3, 17)
    for bit in range(len(packet) * 8):
        forged = bytearray(packet)
        forged[bit // 8] ^= 1 << (bit % 8)
        got = reason(rx, bytes(forged))
        if bit < 32:
            assert got is DropReason.SPI_MISMATCH
        elif bit < 64:  # sequence number: 1 can turn into 0, which is never valid
            assert got in (DropReason.AUTH, DropReason.REPLAY)
        else:
            assert got is DropReason.AUTH
    assert rx.replay.highest == 0
    assert rx.open(packet) == (17, b"hello world" * 3)


@pytest.mark.parametrize("name", SUITES)
def test_forged_packet_does_not_advance_window(name: str) -> None:
    tx, rx = pair(name)
    first = tx.seal(b"a", 6)
    tx2, _ = pair(name, next_seq=1_000_000)
    far = bytearray(tx2.seal(b"b", 6))
    far[-1] ^= 0x80
    assert reason(rx, bytes(far)) is DropReason.AUTH
    assert rx.replay.highest == 0
    assert rx.open(first) == (6, b"a")
    assert reason(rx, first) is DropReason.REPLAY


@pytest.mark.parametrize("name", SUITES)
def test_truncated_input_dropped(name: str) -> None:
    tx, rx = pair(name)
    packet = tx.seal(os.urandom(40), 4)
    short = rx.sealed_len(0)
    for cut in range(len(packet)):
        got = reason(rx, packet[:cut])
        if cut < short:
            assert got is DropReason.MALFORMED
        else:
            assert got in (DropReason.MALFORMED, DropReason.AUTH)
    assert rx.open(packet)[0] == 4


@pytest.mark.parametrize("name", SUITES)
def test_dummy_packet_is_distinct_and_counts_for_replay(name: str) -> None:
    tx, rx = pair(name)
    dummy = tx.seal(os.urandom(30), 59)
    assert reason(rx, dummy) is DropReason.DUMMY
    assert rx.replay.highest == 1
    assert reason(rx, dummy) is DropReason.REPLAY


@pytest.mark.parametrize("name", SUITES)
def test_unknown_next_header_delivered(name: str) -> None:
    tx, rx = pair(name)
    assert rx.open(tx.seal(b"xyz", 253)) == (253, b"xyz")


@pytest.mark.parametrize("name", SUITES)
def test_sequence_exhausted_without_esn(name: str) -> None:
    tx, rx = pair(name, next_seq=0xFFFFFFFF)
    rx.replay.accept(0xFFFFFFF0)
    assert tx.seq_remaining == 1
    last = tx.seal(b"last", 17)
    assert tx.seq_remaining == 0
    with pytest.raises(SequenceExhausted):
        tx.seal(b"one too many", 17)
    with pytest.raises(SequenceExhausted):
        tx.seal(b"still refused", 17)
    assert tx.next_seq == 1 << 32  # the refused seals used no sequence number
    assert rx.open(last) == (17, b"last")


@pytest.mark.parametrize("name", SUITES)
def test_esn_continues_past_32_bits(name: str) -> None:
    tx, rx = pair(name, next_seq=0xFFFFFFFF, esn=True)
    rx.replay.accept(0xFFFFFFF0)
    for i in range(3):
        assert rx.open(tx.seal(bytes([i]), 17)) == (17, bytes([i]))
    assert rx.replay.highest == (1 << 32) + 1
    assert tx.next_seq == (1 << 32) + 2


def test_gcm_iv_is_the_sequence_number() -> None:
    tx, _ = pair("gcm", next_seq=0x1_0000_0005, esn=True)
    packet = tx.seal(b"x", 17)
    assert struct.unpack("!IIQ", packet[:16]) == (SPI, 5, 0x1_0000_0005)


def test_cbc_ivs_are_fresh_and_padding_aligned() -> None:
    tx, rx = pair("cbc")
    ivs = set()
    for n in range(0, 300, 7):
        packet = tx.seal(bytes(n), 17)
        assert (len(packet) - 8 - 16 - 16) % 16 == 0
        ivs.add(packet[8:24])
        assert rx.open(packet) == (17, bytes(n))
    assert len(ivs) == len(range(0, 300, 7))


@pytest.mark.parametrize("size", range(0, 12))
def test_null_encryption_padding_is_monotonic(size: int) -> None:
    tx, _ = pair("null")
    packet = tx.seal(b"\xaa" * size, 41)
    clear = packet[8:-32]
    assert len(clear) % 4 == 0
    padlen = clear[-2]
    assert clear[-1] == 41
    assert padlen == (-(size + 2)) % 4
    assert clear[size:size + padlen] == bytes(range(1, padlen + 1))


def null_packet(clear: bytes, seq: int = 1) -> bytes:
    """A NULL-encryption ESP packet with a valid ICV around arbitrary cleartext."""
    head = struct.pack("!II", SPI, seq) + clear
    mac = crypto_hmac.HMAC(SUITES["null"][3], hashes.SHA512())
    mac.update(head)
    return head + mac.finalize()[:32]


def test_bad_padding_bytes_dropped() -> None:
    _, rx = pair("null")
    assert reason(rx, null_packet(b"data" + b"\x01\x03\x02\x11")) is DropReason.BAD_PADDING


def test_pad_length_beyond_data_dropped() -> None:
    _, rx = pair("null")
    assert reason(rx, null_packet(b"\x01\x02\x09\x11")) is DropReason.BAD_PADDING


def test_long_padding_accepted() -> None:
    _, rx = pair("null")
    clear = b"abcde" + bytes(range(1, 18)) + bytes((17, 6))  # 17 > 3 bytes needed
    assert rx.open(null_packet(clear)) == (6, b"abcde")


def test_unaligned_ciphertext_is_malformed() -> None:
    _, rx = pair("null")
    assert reason(rx, null_packet(b"abc" + b"\x00\x06")) is DropReason.MALFORMED


def test_gcm_bad_padding_dropped() -> None:
    enc, key, _, _ = SUITES["gcm"]
    _, rx = pair("gcm")
    clear = b"payload!" + b"\x02\x02\x02\x04"  # pad bytes must read 1, 2
    head = struct.pack("!IIQ", SPI, 1, 1)
    sealed = AESGCM(key[:32]).encrypt(key[32:] + head[8:], clear, head[:8])
    assert reason(rx, head + sealed) is DropReason.BAD_PADDING


def test_seal_into_and_open_into_respect_offsets() -> None:
    tx, rx = pair("gcm")
    out = bytearray(b"\xee" * 200)
    end = tx.seal_into(b"inner", 4, out, 20)
    assert out[:20] == b"\xee" * 20 and out[end:] == b"\xee" * (200 - end)
    assert end - 20 == tx.sealed_len(5)
    clear = bytearray(b"\x55" * 100)
    nh, stop = rx.open_into(bytes(out[20:end]), clear, 10)
    assert (nh, bytes(clear[10:stop])) == (4, b"inner")
    assert clear[:10] == b"\x55" * 10
    with pytest.raises(ValueError):
        tx.seal_into(b"x" * 100, 4, bytearray(50))


@pytest.mark.parametrize("name", SUITES)
@pytest.mark.parametrize("size", [0, 1, 2, 3, 17, 1400])
def test_seal_into_writes_the_packet_and_nothing_else(name: str, size: int) -> None:
    tx, rx = pair(name)
    twin, _ = pair(name)
    payload = os.urandom(size)
    out = memoryview(bytearray(b"\xdd" * (size + 100)))
    end = tx.seal_into(payload, 41, out, 8)
    assert out[:8] == b"\xdd" * 8 and out[end:] == b"\xdd" * (size + 100 - end)
    if name not in ("cbc",):  # (CBC's IV is random: the two seals differ)
        assert bytes(out[8:end]) == twin.seal(payload, 41)
    assert rx.open(bytes(out[8:end])) == (41, payload)


@pytest.mark.parametrize("name", SUITES)
def test_seal_into_a_short_buffer_is_refused_and_takes_no_number(name: str) -> None:
    tx, rx = pair(name)
    out = memoryview(bytearray(200))
    with pytest.raises(ValueError):
        tx.seal_into(b"x" * 40, 4, out[:50])
    assert tx.next_seq == 1
    end = tx.seal_into(b"y" * 40, 4, out)
    assert rx.open(bytes(out[:end])) == (4, b"y" * 40)
    assert HEAD_IV.unpack_from(out)[1] == 1


@pytest.mark.parametrize("name", SUITES)
def test_seal_slot_is_seal_and_an_aead_seals_in_place(name: str) -> None:
    """One slot, payload sizes that repeat and change (the slot's views are kept per size):
    every packet is what seal makes, and an AEAD's lies in the slot's own buffer."""
    tx, rx = pair(name)
    twin, _ = pair(name)
    slot = SealSlot(memoryview(bytearray(SEAL_HEAD + 1500 + SEAL_TAIL)))
    for size in (40, 40, 41, 1400, 1400, 0, 3, 40):
        payload = os.urandom(size)
        slot.body[:size] = payload
        packet = tx.seal_slot(slot, size, 4)
        if name != "cbc":  # (CBC's IV is random: the two seals differ)
            assert bytes(packet) == twin.seal(payload, 4)
        else:
            twin.seal(payload, 4)
        assert rx.open(bytes(packet)) == (4, payload)
        assert (packet.obj is slot.buf.obj) == (name in ("gcm", "chacha"))


@pytest.mark.parametrize("name", ["gcm", "chacha"])
def test_seal_slot_refuses_what_does_not_fit_and_keeps_the_sequence(name: str) -> None:
    tx, rx = pair(name)
    slot = SealSlot(memoryview(bytearray(SEAL_HEAD + 100 + SEAL_TAIL)))
    with pytest.raises(ValueError):
        tx.seal_slot(slot, 100 + SEAL_TAIL, 4)  # no room for its trailer and tag
    assert tx.next_seq == 1
    slot.body[:30] = b"z" * 30
    assert rx.open(bytes(tx.seal_slot(slot, 30, 4))) == (4, b"z" * 30)
    with pytest.raises(ValueError):
        SealSlot(memoryview(bytearray(SEAL_HEAD + SEAL_TAIL)))  # no room for a payload
    held = SealSlot.holding(b"abc")
    assert bytes(held.body[:3]) == b"abc" and len(held.buf) == SEAL_HEAD + 3 + SEAL_TAIL


def open_where_it_lies(rx: EspTransform, packet: bytes) -> tuple[int, bytes, bytearray]:
    """open_in_place as the receive path calls it: the packet in a buffer of its own."""
    buf = bytearray(packet)
    view = memoryview(buf)
    _, low, iv = HEAD_IV.unpack_from(buf)
    ctlen = len(buf) - AEAD_HEAD - AEAD_ICV
    nh, size = rx.open_in_place(low, iv, view[AEAD_HEAD:], view[AEAD_HEAD:AEAD_HEAD + ctlen],
                                ctlen)
    return nh, bytes(buf[AEAD_HEAD:AEAD_HEAD + size]), buf


@pytest.mark.parametrize("name", ["gcm", "chacha"])
@pytest.mark.parametrize("esn", [False, True])
def test_open_in_place_is_open(name: str, esn: bool) -> None:
    tx, rx = pair(name, esn=esn)
    assert rx.opens_in_place
    packets = [tx.seal(bytes([i]) * (20 + i), 4 if i % 2 else 41) for i in range(6)]
    for i in (0, 2, 1, 5, 4, 3):  # out of order, inside the window
        nh, payload, _ = open_where_it_lies(rx, packets[i])
        assert (nh, payload) == (4 if i % 2 else 41, bytes([i]) * (20 + i))
    with pytest.raises(EspDrop) as info:
        open_where_it_lies(rx, packets[3])
    assert info.value.reason is DropReason.REPLAY
    fresh = tx.seal(b"fresh", 4)
    forged = bytearray(fresh)
    forged[-1] ^= 1
    with pytest.raises(EspDrop) as info:
        open_where_it_lies(rx, bytes(forged))
    assert info.value.reason is DropReason.AUTH
    assert open_where_it_lies(rx, fresh)[:2] == (4, b"fresh")  # the forgery moved nothing
    dummy = tx.seal(b"", 59)
    with pytest.raises(EspDrop) as info:
        open_where_it_lies(rx, dummy)
    assert info.value.reason is DropReason.DUMMY


@pytest.mark.parametrize("name", ["gcm", "chacha"])
def test_open_in_place_refuses_malformed_lengths(name: str) -> None:
    tx, rx = pair(name)
    packet = tx.seal(b"payload!", 4)
    view = memoryview(bytearray(packet))
    for ctlen in (0, 1, 6, 7):  # too short, or not a multiple of 4
        with pytest.raises(EspDrop) as info:
            rx.open_in_place(1, bytes(8), view[AEAD_HEAD:AEAD_HEAD + ctlen + AEAD_ICV],
                             view[AEAD_HEAD:AEAD_HEAD + ctlen], ctlen)
        assert info.value.reason is DropReason.MALFORMED
    assert open_where_it_lies(rx, packet)[:2] == (4, b"payload!")  # nothing moved


@pytest.mark.parametrize("name", ["cbc", "ctr", "null"])
def test_only_an_aead_opens_in_place(name: str) -> None:
    _, rx = pair(name)
    assert not rx.opens_in_place
    view = memoryview(bytearray(64))
    with pytest.raises(NotImplementedError):
        rx.open_in_place(1, bytes(8), view[16:], view[16:48], 32)


def test_keys_not_in_repr() -> None:
    tx, _ = pair("cbc")
    text = repr(tx)
    assert "aes-cbc" in text and CBC_KEY.hex() not in text and HMAC_KEY.hex() not in text
    assert str(CBC_KEY) not in text


@pytest.mark.parametrize(
    ("args", "kw", "message"),
    [
        (("blowfish", b"", "null", b""), {}, "unknown encryption"),
        (("aes-cbc", CBC_KEY, "hmac-sha3", b""), {}, "unknown integrity"),
        (("aes-cbc", bytes(15), "hmac-sha256", HMAC_KEY), {}, "128, 192, 256 bits"),
        (("aes-gcm-16", bytes(16), "null", b""), {}, "bits"),
        (("aes-gcm-16", GCM_KEY, "hmac-sha256", HMAC_KEY), {}, "AEAD"),
        (("null", b"", "null", b""), {}, "needs an integrity"),
        (("aes-cbc", CBC_KEY, "null", b""), {}, "without integrity"),
        (("3des-cbc", bytes(24), "hmac-sha256", HMAC_KEY), {}, "weak"),
        (("aes-cbc", CBC_KEY, "hmac-md5", bytes(16)), {}, "weak"),
        (("aes-gcm-16", GCM_KEY, "null", b""), {"next_seq": 0}, "next_seq"),
        (("aes-gcm-16", GCM_KEY, "null", b""), {"replay_window": -1}, "replay"),
    ],
)
def test_bad_parameters_refused(args: tuple[str, bytes, str, bytes], kw: dict[str, int],
                                message: str) -> None:
    with pytest.raises(EspConfigError, match=message):
        EspTransform.build(SPI, *args, **kw)  # type: ignore[arg-type]


def test_reserved_spi_refused() -> None:
    with pytest.raises(EspConfigError, match="reserved"):
        EspTransform.build(255, "aes-gcm-16", GCM_KEY)


def test_weak_allowed_when_asked() -> None:
    tx = EspTransform.build(SPI, "des-cbc", bytes(8), "hmac-md5", bytes(16), allow_weak=True)
    rx = EspTransform.build(SPI, "des-cbc", bytes(8), "hmac-md5", bytes(16), allow_weak=True)
    assert rx.open(tx.seal(b"legacy", 17)) == (17, b"legacy")


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(SUITES)), data=st.binary(max_size=200),
       seq=st.integers(min_value=0, max_value=0xFFFFFFFF), keep_spi=st.booleans())
def test_random_bytes_only_ever_drop(name: str, data: bytes, seq: int, keep_spi: bool) -> None:
    _, rx = pair(name, esn=seq % 2 == 0)
    packet = (struct.pack("!II", SPI, seq) + data) if keep_spi else data
    with pytest.raises(EspDrop):
        rx.open(packet)
    assert rx.replay.highest == 0


def gcm_packet(clear: bytes, seq: int = 1) -> bytes:
    """An AES-GCM ESP packet with a valid tag around arbitrary cleartext."""
    _, key, _, _ = SUITES["gcm"]
    head = struct.pack("!IIQ", SPI, seq, seq)
    return head + AESGCM(key[:32]).encrypt(key[32:] + head[8:], clear, head[:8])


@pytest.mark.parametrize("padlen", [1, 2, 3, 4, 5, 9])
def test_gcm_padding_checked_byte_by_byte(padlen: int) -> None:
    payload = b"0123456789abcdef"[:(-(padlen + 2)) % 4 + 8]
    good = payload + bytes(range(1, padlen + 1)) + bytes((padlen, 6))
    _, rx = pair("gcm")
    assert rx.open(gcm_packet(good)) == (6, payload)
    for at in range(padlen):
        bad = bytearray(good)
        bad[len(payload) + at] ^= 0x40
        assert reason(rx, gcm_packet(bytes(bad), seq=2 + at)) is DropReason.BAD_PADDING
    # The payload byte just before the padding is not the padding's business.
    other = bytearray(good)
    other[len(payload) - 1] ^= 0x40
    assert rx.open(gcm_packet(bytes(other), seq=100)) == (6, bytes(other[:len(payload)]))


def test_gcm_short_cleartexts() -> None:
    _, rx = pair("gcm")
    assert rx.open(gcm_packet(b"ab\x00\x06")) == (6, b"ab")  # (shorter than the trailer read)
    assert rx.open(gcm_packet(b"\x01\x02\x02\x06", seq=2)) == (6, b"")
    assert reason(rx, gcm_packet(b"\x01\x02\x03\x06", seq=3)) is DropReason.BAD_PADDING
    assert reason(rx, gcm_packet(b"\x01\x02\x03\x04\x05\x06\x07\x06", seq=4)) is \
        DropReason.BAD_PADDING  # pad length beyond the data
    assert reason(rx, gcm_packet(b"\x01\x02\x09\x06", seq=5)) is DropReason.BAD_PADDING


def test_gcm_padding_never_reaches_before_the_output_offset() -> None:
    _, rx = pair("gcm")
    out = bytearray(b"\x01\x02" + bytes(100))  # what lies before the offset looks like padding
    with pytest.raises(EspDrop) as info:
        rx.open_into(gcm_packet(b"\x03\x04\x04\x06"), out, 2)
    assert info.value.reason is DropReason.BAD_PADDING


class Run:
    """Packets of one sealed length back to back in one buffer, with the views a GRO receive
    slot keeps for them (datapath.inbound._SlotViews), for open_run."""

    def __init__(self, packets: list[bytes]) -> None:
        seg = len(packets[0])
        assert all(len(p) == seg for p in packets)
        self.buf = bytearray(b"".join(packets))
        view = memoryview(self.buf)
        starts = range(0, len(self.buf), seg)
        self.seg, self.ctlen = seg, seg - AEAD_HEAD - AEAD_ICV
        self.ivs = [view[s + 8:s + AEAD_HEAD] for s in starts]
        self.aads = [view[s:s + 8] for s in starts]
        self.sealed = [view[s + AEAD_HEAD:s + seg] for s in starts]
        self.plain = [view[s + AEAD_HEAD:s + seg - AEAD_ICV] for s in starts]

    def open(self, rx: EspTransform) -> tuple[int, bool]:
        headers = struct.Struct(f"!II{self.seg - 8}x").iter_unpack(self.buf)
        return rx.open_run(headers, self.ivs, self.sealed, self.aads, self.plain, self.ctlen)

    def payload(self, i: int, size: int) -> bytes:
        return bytes(self.plain[i][:size])


@pytest.mark.parametrize("name", ["gcm", "chacha"])
def test_open_run_opens_a_stream_as_open_in_place_would(name: str) -> None:
    tx, rx = pair(name)
    payloads = [bytes([i]) * 101 for i in range(12)]  # 101 + 3 bytes of padding + 2
    sealed = [tx.seal(p, 4) for p in payloads]
    run = Run(sealed)
    assert run.open(rx) == (12, False)
    assert rx.replay.highest == 12
    assert rx.run_trailer(run.plain, run.ctlen, 12) == (4, 101)
    assert [run.payload(i, 101) for i in range(12)] == payloads
    assert rx.trailer(run.plain[5], run.ctlen) == (4, 101)
    # The same packets again: nothing after the window's highest, so nothing is taken.
    again = Run(sealed)
    assert again.open(rx) == (0, False) and again.buf == b"".join(sealed)
    fresh = tx.seal(b"fresh", 4)
    assert open_where_it_lies(rx, fresh)[:2] == (4, b"fresh")  # the window is right


@pytest.mark.parametrize("name", ["gcm", "chacha"])
def test_open_run_takes_only_the_leading_in_order_packets_of_its_sa(name: str) -> None:
    tx, rx = pair(name)
    packets = [tx.seal(bytes([i]) * 40, 4) for i in range(8)]  # numbers 1..8
    gap = Run(packets[:3] + packets[4:])  # 1, 2, 3, 5, ...
    originals = bytes(gap.buf)
    assert gap.open(rx) == (3, False) and rx.replay.highest == 3
    assert gap.buf[3 * gap.seg:] == originals[3 * gap.seg:]  # the rest untouched
    foreign = Run([packets[3], EspTransform.build(  # another SPI in second place
        SPI + 1, *SUITES[name]).seal(bytes(40), 4), packets[4]])  # type: ignore[arg-type]
    assert foreign.open(rx) == (1, False) and rx.replay.highest == 4


@pytest.mark.parametrize("name", ["gcm", "chacha"])
def test_open_run_with_esn_crosses_2_to_the_32(name: str) -> None:
    """With ESN the wire carries the low 32 bits (which wrap to 0 here) and the AAD the high
    ones: a run across the boundary opens; to a window 2^32 further on, the same low bits
    name other numbers, whose AAD fails."""
    start = (1 << 32) - 4
    tx, rx = pair(name, esn=True, next_seq=start)
    rx.replay.accept(start - 1)
    payloads = [bytes([i]) * 33 for i in range(8)]
    sealed = [tx.seal(p, 41) for p in payloads]
    assert [HEAD_IV.unpack_from(p)[1] for p in sealed[3:6]] == [(1 << 32) - 1, 0, 1]
    run = Run(sealed)
    assert run.open(rx) == (8, False) and rx.replay.highest == start + 7
    assert rx.run_trailer(run.plain, run.ctlen, 8) == (41, 33)
    assert [run.payload(i, 33) for i in range(8)] == payloads
    assert open_where_it_lies(rx, tx.seal(b"next", 4))[:2] == (4, b"next")
    _, other = pair(name, esn=True, next_seq=start)
    other.replay.accept(start - 1 + (1 << 32))
    assert Run(sealed[:2]).open(other) == (0, True)
    assert other.replay.highest == start - 1 + (1 << 32)


@pytest.mark.parametrize("name", ["gcm", "chacha"])
def test_open_run_stops_at_a_forgery_and_leaves_the_rest_untouched(name: str) -> None:
    tx, rx = pair(name)
    payloads = [bytes([i]) * 60 for i in range(8)]
    packets = [tx.seal(p, 4) for p in payloads]
    forged = bytearray(packets[4])
    forged[-3] ^= 0x10
    run = Run(packets[:4] + [bytes(forged)] + packets[5:])
    originals = bytes(run.buf)
    assert run.open(rx) == (4, True)
    assert rx.replay.highest == 4  # the forgery recorded nothing
    assert [run.payload(i, 60) for i in range(4)] == payloads[:4]
    assert run.buf[5 * run.seg:] == originals[5 * run.seg:]
    for i in (6, 5, 7, 4):  # the rest, and the genuine packet 5, still open one by one
        assert open_where_it_lies(rx, packets[i])[:2] == (4, payloads[i])


def test_run_trailer_answers_only_for_a_run_of_equal_valid_trailers() -> None:
    clear = bytes(16)

    def trailer_of(*packets: bytes) -> tuple[int, int] | None:
        _, rx = pair("gcm")
        run = Run(list(packets))
        assert run.open(rx)[0] == len(packets)
        return rx.run_trailer(run.plain, run.ctlen, len(packets))

    good = clear + b"\x01\x02\x02\x04"
    assert trailer_of(*[gcm_packet(good, seq) for seq in (1, 2, 3)]) == (4, 16)
    long_pad = clear[:8] + bytes(range(1, 7)) + b"\x06\x29"  # 6 bytes of padding, IPv6
    assert trailer_of(*[gcm_packet(long_pad, seq) for seq in (1, 2)]) == (41, 8)
    bad_pad = clear[:8] + bytes((1, 2, 3, 9, 5, 6)) + b"\x06\x29"  # its 4th byte is wrong
    assert trailer_of(gcm_packet(long_pad, 1), gcm_packet(bad_pad, 2)) is None
    other_pad = clear + b"\x05\x01\x00\x04"  # one byte of padding: 17 bytes of payload
    assert trailer_of(gcm_packet(good, 1), gcm_packet(other_pad, 2)) is None
    other_nh = clear + b"\x01\x02\x02\x29"
    assert trailer_of(gcm_packet(good, 1), gcm_packet(other_nh, 2)) is None
    dummy = clear + b"\x01\x02\x02\x3b"  # next header 59
    assert trailer_of(gcm_packet(dummy, 1), gcm_packet(dummy, 2)) is None
    too_long = clear + b"\x01\x02\x30\x04"  # pad length beyond the packet
    assert trailer_of(gcm_packet(too_long, 1), gcm_packet(too_long, 2)) is None


@pytest.mark.parametrize("name", ["cbc", "ctr", "null"])
def test_only_an_aead_opens_a_run(name: str) -> None:
    tx, rx = pair(name)
    packet = tx.seal(b"x" * 40, 4)
    view = memoryview(bytearray(packet))
    seg = len(packet)
    headers = struct.Struct(f"!II{seg - 8}x").iter_unpack(view)
    assert rx.open_run(headers, [view[8:16]], [view[16:]], [view[:8]], [view[16:seg - 16]],
                       seg - 32) == (0, False)
    assert bytes(view) == packet and rx.open(packet) == (4, b"x" * 40)  # nothing moved


@pytest.mark.parametrize("name", ["gcm", "chacha"])
@pytest.mark.parametrize("esn", [False, True])
def test_seal_run_is_seal_slot_for_each(name: str, esn: bool) -> None:
    """Slots whose views were made for other sizes, or for this one: every packet of the run
    is what seal makes, in its own slot, numbered in order (across 2^32 with ESN)."""
    start = (1 << 32) - 3 if esn else 1
    tx, rx = pair(name, esn=esn, next_seq=start)
    twin, _ = pair(name, esn=esn, next_seq=start)
    if start > 1:
        rx.replay.accept(start - 1)
    slots = [SealSlot(memoryview(bytearray(SEAL_HEAD + 200 + SEAL_TAIL))) for _ in range(7)]
    tx.seal_slot(slots[2], 50, 4)  # this slot's views are for another size ...
    twin.seal(bytes(50), 4)
    payloads = [os.urandom(101) for _ in slots]
    for slot, payload in zip(slots, payloads, strict=True):
        slot.body[:101] = payload
    packets = tx.seal_run(slots, 101, 4)
    assert packets is not None and len(packets) == 7
    for slot, packet, payload in zip(slots, packets, payloads, strict=True):
        assert packet.obj is slot.buf.obj
        assert bytes(packet) == twin.seal(payload, 4)
        assert rx.open(bytes(packet)) == (4, payload)
    assert tx.next_seq == twin.next_seq
    for slot, payload in zip(slots, payloads, strict=True):  # ... and again, with the views kept
        slot.body[:101] = payload
    assert [bytes(p) for p in tx.seal_run(slots, 101, 41) or []] == [
        twin.seal(p, 41) for p in payloads]


@pytest.mark.parametrize("name", ["gcm", "chacha"])
def test_seal_run_takes_no_number_when_too_few_are_left(name: str) -> None:
    tx, rx = pair(name, next_seq=0xFFFFFFFE)  # two numbers left
    slots = [SealSlot.holding(b"abc") for _ in range(3)]
    assert tx.seal_run(slots, 3, 4) is None and tx.next_seq == 0xFFFFFFFE
    packets = tx.seal_run(slots[:2], 3, 4)
    assert packets is not None and tx.seq_remaining == 0
    rx.replay.accept(0xFFFFFFF0)
    assert [rx.open(bytes(p)) for p in packets] == [(4, b"abc")] * 2


@pytest.mark.parametrize("name", ["cbc", "ctr", "null"])
def test_only_an_aead_seals_a_run(name: str) -> None:
    tx, _ = pair(name)
    assert tx.seal_run([SealSlot.holding(b"abc")] * 2, 3, 4) is None and tx.next_seq == 1
