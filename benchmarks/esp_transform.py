"""ESP transform throughput: seal and open packets/s and Mbit/s for 1400-byte payloads.

Run: python benchmarks/esp_transform.py [--seconds 1.0] [--size 1400]

Each measurement is a bounded loop (at most --seconds of wall time and 10 million packets).
Rates are per second of this process's CPU time (``time.process_time``), so that other load
on a shared machine does not show up as a slower transform; wall-clock rates are printed too.
For AES-GCM-128 it also times a bare ``AESGCM.encrypt`` / ``decrypt`` of the same data in the
same run and prints the ESP transform's speed as a fraction of that baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from datapath.esp import EspTransform  # noqa: E402

SUITES = [
    ("aes-gcm-128", "aes-gcm-16", 20, "null", 0),
    ("aes-gcm-256", "aes-gcm-16", 36, "null", 0),
    ("chacha20-poly1305", "chacha20-poly1305", 36, "null", 0),
    ("aes-cbc-128/hmac-sha256", "aes-cbc", 16, "hmac-sha256", 32),
    ("aes-cbc-256/hmac-sha512", "aes-cbc", 32, "hmac-sha512", 64),
    ("aes-ctr-128/hmac-sha256", "aes-ctr", 20, "hmac-sha256", 32),
    ("null/hmac-sha256", "null", 0, "hmac-sha256", 32),
]
MAX_PACKETS = 10_000_000
BATCH = 256


def rate(step: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Calls of ``step`` per CPU second and per wall second, over a bounded loop."""
    done = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    deadline = start + seconds
    while done < MAX_PACKETS:
        for _ in range(BATCH):
            step()
        done += BATCH
        if time.perf_counter() >= deadline:
            break
    cpu = time.process_time() - cpu_start
    wall = time.perf_counter() - start
    return done / max(cpu, 1e-9), done / wall


def line(name: str, what: str, pps: tuple[float, float], size: int) -> None:
    cpu, wall = pps
    print(f"{name:26} {what:5} {cpu:>11,.0f} pkt/s {cpu * size * 8 / 1e6:>9,.0f} Mbit/s"
          f"   (wall: {wall:>9,.0f} pkt/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=1400)
    args = parser.parse_args()
    payload = os.urandom(args.size)
    print(f"payload {args.size} bytes, {args.seconds:g} s per figure")
    results: dict[str, tuple[float, float]] = {}  # suite -> (seal, open) per CPU second
    for name, enc, enc_len, integ, integ_len in SUITES:
        enc_key, integ_key = os.urandom(enc_len), os.urandom(integ_len)
        tx = EspTransform.build(0x1001, enc, enc_key, integ, integ_key, replay_window=0)
        rx = EspTransform.build(0x1001, enc, enc_key, integ, integ_key, replay_window=0)
        # seal_into/open_into with the caller's buffer, as the datapath loop uses them.
        out = bytearray(args.size + tx.max_overhead)
        clear = bytearray(len(out))
        packet = tx.seal(payload, 4)
        seal_pps = rate(lambda: tx.seal_into(payload, 4, out), args.seconds)  # noqa: B023
        open_pps = rate(lambda: rx.open_into(packet, clear), args.seconds)  # noqa: B023
        line(name, "seal", seal_pps, args.size)
        line(name, "open", open_pps, args.size)
        results[name] = seal_pps[0], open_pps[0]
    line("(last) seal() -> bytes", "seal", rate(lambda: tx.seal(payload, 4), args.seconds),
         args.size)

    key = os.urandom(16)
    aead = AESGCM(key)
    nonce, aad = os.urandom(12), os.urandom(8)
    sealed = aead.encrypt(nonce, payload, aad)
    base_enc = rate(lambda: aead.encrypt(nonce, payload, aad), args.seconds)
    base_dec = rate(lambda: aead.decrypt(nonce, sealed, aad), args.seconds)
    line("bare AESGCM-128", "enc", base_enc, args.size)
    line("bare AESGCM-128", "dec", base_dec, args.size)
    gcm_seal, gcm_open = results["aes-gcm-128"]
    print(f"aes-gcm-128 seal/bare encrypt = {gcm_seal / base_enc[0]:.2f}, "
          f"open/bare decrypt = {gcm_open / base_dec[0]:.2f}")


if __name__ == "__main__":
    main()
