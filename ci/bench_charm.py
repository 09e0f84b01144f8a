"""Charm throughput through the C-level API (charm_encrypt / charm_decrypt), in MB/s.

For the kernel selected on this CPU and for the portable one, at 64, 1500 and 9000 bytes: the
median of several runs, each timed inside the compiled module without the GIL. Not a test.

    PYTHONPATH=src python ci/bench_charm.py [--json] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from dsvpn import charm

SIZES = (64, 1500, 9000)
OPS = ("encrypt", "decrypt")
BYTES_PER_RUN = 4_000_000  # ~10-40 ms per run: short on a shared machine, long enough to time


def measure(runs: int = 5) -> dict[str, Any]:
    """{"selected": kernel, "mb_per_s": {kernel: {op: {size: median MB/s}}}}."""
    kernels = dict.fromkeys((charm.KERNEL, "portable"))  # ordered, no duplicate
    table: dict[str, dict[str, dict[str, float]]] = {}
    for kernel in kernels:
        table[kernel] = {}
        for op in OPS:
            table[kernel][op] = {}
            for size in SIZES:
                iterations = max(1, BYTES_PER_RUN // size)
                rates = [
                    size * iterations / charm._bench(kernel, op, size, iterations) / 1e6
                    for _ in range(runs)
                ]
                table[kernel][op][str(size)] = round(statistics.median(rates), 1)
    return {
        "selected": charm.KERNEL,
        "available": list(charm._available_kernels()),
        "mb_per_s": table,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    args = ap.parse_args(argv)
    result = measure(args.runs)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"kernel selected: {result['selected']} (available: {', '.join(result['available'])})")
    print(f"{'kernel':10} {'op':8} " + " ".join(f"{s:>8}B" for s in SIZES) + "   MB/s, median")
    for kernel, ops in result["mb_per_s"].items():
        for op, by_size in ops.items():
            print(f"{kernel:10} {op:8} " + " ".join(f"{by_size[str(s)]:9.1f}" for s in SIZES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
