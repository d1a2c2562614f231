"""Lab guest boot time: warm cache with KASLR (vmlinuz) vs the PVH boot of the extracted vmlinux.

    .venv/bin/python benchmarks/bench_lab_boot.py [--cold] [--runs N]

``--cold`` first provisions into an empty cache directory (downloads the kernel package, ~70 MB).
Prints host seconds to the guest's shell and the guest's own uptime at that moment; the
difference is firmware + kernel decompression (+ provisioning when cold).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _cli import parse_args


def boot(label: str, **config) -> float:
    from vmwatch.lab import LabConfig, LabGuest

    t0 = time.monotonic()
    guest = LabGuest.start(LabConfig(**config))
    try:
        t_shell = time.monotonic() - t0
        t1 = time.monotonic()
        guest.shell("true")
        roundtrip = time.monotonic() - t1
    finally:
        guest.stop()
    print(f"{label:<28} {t_shell:6.2f} s to shell   guest uptime {guest.guest_seconds_to_shell:5.2f} s"
          f"   shell round trip {roundtrip * 1000:5.1f} ms", flush=True)
    return t_shell


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold", action="store_true", help="also time a first boot with an empty cache")
    parser.add_argument("--runs", type=int, default=2)
    args = parse_args(parser)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (TCG is CPU-bound: expect noise)")
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="vmwatch-cold-") as cache:
            os.environ["VMWATCH_CACHE"] = cache
            boot("cold cache (download)")
            del os.environ["VMWATCH_CACHE"]
    kaslr = [boot("warm, vmlinuz (KASLR)") for _ in range(args.runs)]
    pvh = [boot("warm, vmlinux via PVH", kaslr=False) for _ in range(args.runs)]
    print(f"median warm: KASLR {statistics.median(kaslr):.2f} s, PVH {statistics.median(pvh):.2f} s, "
          f"ratio {statistics.median(kaslr) / statistics.median(pvh):.2f}x")


if __name__ == "__main__":
    main()
