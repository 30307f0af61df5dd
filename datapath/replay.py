"""Anti-replay window for inbound ESP SAs (RFC 4303 section 3.4.3, Appendix A for ESN).

Two steps, so that a forged packet can never move the window:

1. ``check(seq_low32)`` before integrity verification: returns the full sequence number
   (for ESN the high 32 bits are inferred from the low 32 bits on the wire, RFC 4303
   Appendix A2.2) or ``None`` when the packet is a replay or too old.
2. ``accept(full_seq)`` only after the ICV has been verified: records the packet and slides
   the window.

The window is a bitmap held in a Python int: bit ``i`` set means sequence number
``top - i`` was received, and every number above ``top`` up to ``highest`` was received
too. Packets that arrive in order therefore only raise ``highest``: accepting ``highest + 1``
is ``highest += 1``, which the ESP transform's per-packet path does itself, and the run is
folded into the bitmap (one shift and one mask, done in C, so a window of 4,096 or 65,536
bits costs the same as one of 64) only when a packet arrives out of order or after a gap.
A window size of 0 switches the replay check off; the highest sequence number is still
tracked (for ESN inference and for reporting).

Nothing here raises on bad input: ``check`` answers ``None`` and the caller counts the drop.
"""

from __future__ import annotations

_LOW = 0xFFFFFFFF
_MAX_ESN = (1 << 64) - 1


class ReplayWindow:
    """Sliding anti-replay window for one inbound SA."""

    __slots__ = ("size", "esn", "highest", "_top", "_bits", "_mask")

    def __init__(self, size: int = 64, *, esn: bool = False) -> None:
        if size < 0:
            raise ValueError("replay window size must be >= 0")
        self.size = size
        self.esn = esn
        self.highest = 0  # highest authenticated full sequence number (0: none yet)
        self._top = 0  # the bitmap's bit 0; (_top, highest] were all received
        self._bits = 0
        self._mask = (1 << size) - 1

    def check(self, seq_low: int) -> int | None:
        """Full sequence number for ``seq_low`` if it may be new, else ``None``."""
        top = self.highest
        size = self.size
        if self.esn:
            top_low = top & _LOW
            top_high = top >> 32
            # RFC 4303 A2.2: pick the 2^32 subspace that puts seq_low nearest the window.
            if top_low >= size - 1:  # window lies inside one subspace
                high = top_high if seq_low >= top_low - size + 1 else top_high + 1
            else:  # window straddles the subspace boundary below top
                high = top_high - 1 if seq_low >= ((top_low - size + 1) & _LOW) else top_high
            if high < 0:
                return None
            seq = (high << 32) | seq_low
            if seq > _MAX_ESN:
                return None
        else:
            seq = seq_low
        if seq > top:
            return seq
        if size == 0:
            return seq
        if seq == 0 or top - seq >= size or seq > self._top:  # too old, or in the run
            return None
        if (self._bits >> (self._top - seq)) & 1:
            return None
        return seq

    def accept(self, seq: int) -> None:
        """Record an authenticated packet with full sequence number ``seq``."""
        top = self.highest
        if seq == top + 1:  # in order: the run grows
            self.highest = seq
            return
        if not self.size:
            self.highest = max(top, seq)
            return
        self._fold()
        if seq > top:
            shift = seq - top
            self.highest = self._top = seq
            self._bits = 1 if shift >= self.size else ((self._bits << shift) | 1) & self._mask
        else:
            diff = top - seq
            if diff < self.size:
                self._bits |= 1 << diff

    def _fold(self) -> None:
        """Put the received run (_top, highest] into the bitmap: _top becomes highest."""
        run = self.highest - self._top
        if run:
            self._bits = ((self._bits << run) | ((1 << run) - 1)) & self._mask \
                if run < self.size else self._mask
            self._top = self.highest

    def seen(self, seq: int) -> bool:
        """Whether ``seq`` is recorded as received (inside the window)."""
        diff = self.highest - seq
        if not 0 <= diff < self.size:
            return False
        return seq > self._top or bool((self._bits >> (self._top - seq)) & 1)

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, esn={self.esn}, highest={self.highest})"
