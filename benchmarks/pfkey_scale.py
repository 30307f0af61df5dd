"""PF_KEY at scale: add 100,000 SAs through the daemon's socket, dump them, count them.

Starts a private daemon (its own run directory, PF_KEY only: no TUN or routes in the host's
namespace; log level warning, as one INFO line per SA would dominate), then prints SAs/s for
SADB_ADD (a window of requests in flight, as a keying daemon installing many tunnels would) and
for SADB_DUMP, the number of SAs the dump returned (must equal the number added: a dump never
truncates), and the daemon's resident memory before and after.

    python benchmarks/pfkey_scale.py [--count 100000] [--window 64]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from userspace_ipsec.pfkey.client import PfkeyClient
from userspace_ipsec.pfkey.constants import ExtType, IpsecMode, MsgType, SaType
from userspace_ipsec.pfkey.messages import AddressExt, KeyExt, Message, SA2Ext, SAExt

AES_GCM_16 = 20
KEY = bytes(range(20))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def add_message(i: int) -> Message:
    src = ipaddress.IPv4Address(0x0A000000 + (i >> 8))  # 10.x.y.z: 256 SAs per peer pair
    dst = ipaddress.IPv4Address(0xC6120000 + (i & 0xFF))
    return Message(
        type=MsgType.ADD,
        satype=SaType.ESP,
        ext={
            ExtType.SA: SAExt(spi=0x1000 + i, replay=32, encrypt=AES_GCM_16),
            ExtType.ADDRESS_SRC: AddressExt(src),
            ExtType.ADDRESS_DST: AddressExt(dst),
            ExtType.KEY_ENCRYPT: KeyExt(KEY),
            ExtType.X_SA2: SA2Ext(mode=IpsecMode.TUNNEL, reqid=i + 1),
        },
    )


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"daemon did not start (exit {proc.poll()})")
        time.sleep(0.05)


def run(count: int, window: int) -> int:
    with tempfile.TemporaryDirectory(prefix="uipsec-bench-") as tmp:
        run_dir = Path(tmp)
        config = run_dir / "bench.toml"
        config.write_text('[daemon]\nlog_level = "warning"\n')
        proc = subprocess.Popen(
            [sys.executable, "-m", "userspace_ipsec.cli", "--run-dir", tmp, "daemon",
             "--no-datapath", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_socket(run_dir / "pfkey.sock", proc)
            rss_before = rss_kib(proc.pid)
            with PfkeyClient(run_dir / "pfkey.sock", timeout=60) as client:
                failures = 0
                in_flight = 0
                start = time.perf_counter()
                for i in range(count):
                    client.send(add_message(i))
                    in_flight += 1
                    if in_flight >= window:
                        failures += client.receive().errno != 0
                        in_flight -= 1
                while in_flight:
                    failures += client.receive().errno != 0
                    in_flight -= 1
                add_s = time.perf_counter() - start

                start = time.perf_counter()
                dumped = sum(1 for _ in client.dump(SaType.ESP))
                dump_s = time.perf_counter() - start
            rss_after = rss_kib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    print(f"SAs added:        {count - failures} of {count} ({failures} refused)")
    print(f"add rate:         {count / add_s:,.0f} SAs/s ({add_s:.2f} s, window {window})")
    print(f"dump rate:        {dumped / dump_s:,.0f} SAs/s ({dump_s:.2f} s)")
    print(f"dump returned:    {dumped} of {count}")
    print(f"daemon RSS:       {rss_before / 1024:.1f} MiB idle, {rss_after / 1024:.1f} MiB "
          f"with {count} SAs ({(rss_after - rss_before) * 1024 / max(count, 1):.0f} bytes/SA)")
    return 0 if dumped == count and failures == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    return run(args.count, args.window)


if __name__ == "__main__":
    sys.exit(main())
