"""Benchmark dsvpn in network namespaces (run as root; everything it builds it removes).

    sudo python ci/bench.py [--runs 3] [--seconds 8] [--reference /path/to/c/dsvpn] [--soak 60]

Testbed (dsvpn.testbed): client host -> server host (NAT) -> far host, veth links, MTU 1500.
Measured per implementation, on the same testbed:

- iperf3 throughput client -> far host and the reverse (-R), through the tunnel and over the
  plain underlay (forwarding and NAT set by hand for that step); the ratio tunnel/underlay;
- the inner TCP's retransmissions (iperf3 sum_sent.retransmits) and the tun devices' dropped
  packets on both ends, per run;
- ping RTT through the tunnel and over the underlay; 1-byte TCP request/response round trips
  (TCP_NODELAY, 300 exchanges: p50, p99, max);
- peak RSS (VmHWM) of the server and client processes after the load, CPU seconds per GB moved;
- Charm throughput at 64/1500/9000 bytes if ci/bench_charm.py provides measure();
- with --soak S: S seconds of iperf3 at full speed, RSS sampled every few seconds.

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_charm
try:
    import dsvpn  # noqa: F401
except ImportError:  # a checkout with an in-place build, not installed
    sys.path.insert(0, str(HERE.parent / "src"))

from dsvpn import testbed  # noqa: E402
from dsvpn.testbed import Impl, Netns, Proc, Testbed  # noqa: E402

IPERF_PORT = 5201
RR_PORT = 5301
RR_COUNT = 300
PING_COUNT = 300  # 30 cannot resolve the 20-40 µs differences that matter here
TUN_SERVER_IP = testbed.SERVER_TUN_IP


# --------------------------------------------------------------------------------------------
# Measurements


def iperf(tb: Testbed, seconds: int, reverse: bool, label: str) -> dict[str, float]:
    """One iperf3 run client host -> far host (or back with reverse); Gbit/s and retransmits."""
    argv = ["iperf3", "-c", tb.inet.ip or "", "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if reverse:
        argv.append("-R")
    for attempt in range(2):  # one retry: a run can fail to start on a loaded machine
        out = tb.client.run(argv, timeout=seconds + 60, check=False)
        try:
            data = json.loads(out.stdout)
            end = data["end"]
            return {
                "gbps": end["sum_received"]["bits_per_second"] / 1e9,
                "bytes": end["sum_received"]["bytes"],
                "retransmits": end["sum_sent"].get("retransmits", 0),
            }
        except (ValueError, KeyError):
            try:
                error = json.loads(out.stdout)["error"]
            except (ValueError, KeyError):
                error = f"{out.stdout[-300:]} {out.stderr[-300:]}".strip()
            print(
                f"{label}: iperf3 {' '.join(argv[1:])}: attempt {attempt + 1} failed: {error}",
                file=sys.stderr,
            )
            time.sleep(1)
    raise testbed.TestbedError(f"iperf3 failed twice: {error}")


def ping_rtt(ns: Netns, dest: str) -> dict[str, float]:
    stats = ns.ping(dest, count=PING_COUNT, interval=0.02, wait=1.0)
    rtts = stats["rtts_ms"] or [float("nan")]
    return {
        "median_ms": statistics.median(rtts),
        "max_ms": max(rtts),
        "lost": stats["sent"] - stats["received"],
    }


def request_response(tb: Testbed, dest: str) -> dict[str, float]:
    """1-byte TCP round trips client host -> far host, both ends TCP_NODELAY."""
    server = tb.start_script(tb.inet, testbed.RR_SERVER, [RR_PORT], f"rr-server-{time.time()}")
    try:
        tb.wait_log(server, "listening", 10)
        out = tb.client.run(
            [sys.executable, "-c", testbed.RR_CLIENT, dest, str(RR_PORT), str(RR_COUNT)],
            timeout=120,
        )
    finally:
        server.kill()
    rtts = sorted(r * 1000 for r in json.loads(out.stdout))
    return {
        "p50_ms": rtts[len(rtts) // 2],
        "p99_ms": rtts[int(len(rtts) * 0.99) - 1],
        "max_ms": rtts[-1],
    }


def proc_status(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (VmHWM, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise testbed.TestbedError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tun_drops(ns: Netns) -> int:
    return sum(
        s["rx_dropped"] + s["tx_dropped"] for s in (ns.link_stats(t) for t in ns.tun_links())
    )


def throughput_runs(
    tb: Testbed, runs: int, seconds: int, procs: tuple[Proc, Proc] | None, label: str
) -> dict[str, Any]:
    """Forward and reverse iperf3 runs; with procs, also tun drops and CPU per GB."""
    result: dict[str, Any] = {}
    moved = 0
    cpu0 = [cpu_seconds(p.pid) for p in procs] if procs else []
    for direction, reverse in (("fwd", False), ("rev", True)):
        samples, drops = [], []
        for _ in range(runs):
            d0 = (tun_drops(tb.client), tun_drops(tb.server)) if procs else (0, 0)
            sample = iperf(tb, seconds, reverse, label)
            if procs:
                drops.append(tun_drops(tb.client) - d0[0] + tun_drops(tb.server) - d0[1])
            samples.append(sample)
            moved += sample["bytes"]
        result[direction] = {
            "gbps": statistics.median(s["gbps"] for s in samples),
            "retransmits": statistics.median(s["retransmits"] for s in samples),
            "tun_drops": statistics.median(drops) if drops else None,
            "runs_gbps": [round(s["gbps"], 3) for s in samples],
        }
    if procs:
        gb = moved / 1e9
        server, client = procs
        result["cpu_s_per_gb"] = {
            "server": (cpu_seconds(server.pid) - cpu0[0]) / gb,
            "client": (cpu_seconds(client.pid) - cpu0[1]) / gb,
        }
    return result


# --------------------------------------------------------------------------------------------
# Steps


@contextlib.contextmanager
def underlay(tb: Testbed):
    """Plain routing with NAT on the server host, set by hand and removed afterwards."""
    rule = ["POSTROUTING", "-s", f"{tb.lan}.0/24", "-o", "wan0", "-j", "MASQUERADE"]
    tb.server.set_sysctl("net.ipv4.ip_forward", "1")
    tb.server.run(["iptables", "-t", "nat", "-A", *rule])
    try:
        yield
    finally:
        tb.server.run(["iptables", "-t", "nat", "-D", *rule], check=False)
        tb.server.set_sysctl("net.ipv4.ip_forward", "0")


def bench_underlay(tb: Testbed, runs: int, seconds: int) -> dict[str, Any]:
    with underlay(tb):
        tb.client.wait_ping(tb.inet.ip or "", 10)
        res = throughput_runs(tb, runs, seconds, None, "underlay")
        res["ping"] = ping_rtt(tb.client, tb.inet.ip or "")
        res["rr"] = request_response(tb, tb.inet.ip or "")
    return res


def bench_tunnel(
    tb: Testbed, impl: Impl, key: Path, runs: int, seconds: int, soak: int
) -> dict[str, Any]:
    server, client = tb.tunnel_up(impl, key, suffix=f"-{impl.name}")
    try:
        tb.client.wait_ping(tb.inet.ip or "", 15, procs=(server, client))
        res = throughput_runs(tb, runs, seconds, (server, client), impl.name)
        res["rss_peak_kib"] = {
            "server": proc_status(server.pid, "VmHWM"),
            "client": proc_status(client.pid, "VmHWM"),
        }
        res["ping"] = ping_rtt(tb.client, tb.inet.ip or "")
        res["ping_server_tun"] = ping_rtt(tb.client, TUN_SERVER_IP)
        res["rr"] = request_response(tb, tb.inet.ip or "")
        if soak:
            res["soak"] = soak_test(tb, (server, client), soak)
        for proc in (client, server):
            rc = proc.stop(signal.SIGTERM)
            if rc != 0:
                res.setdefault("errors", []).append(f"{proc.name} exited {rc}")
    finally:
        for proc in (client, server):
            if proc.alive():
                proc.kill()
    return res


def soak_test(tb: Testbed, procs: tuple[Proc, Proc], seconds: int) -> dict[str, Any]:
    """iperf3 at full speed for ``seconds``; VmRSS of both processes every few seconds."""
    argv = ["iperf3", "-c", tb.inet.ip or "", "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    load = tb.start(tb.client, argv, f"soak-{time.time()}")
    samples: dict[str, list[int]] = {"server": [], "client": []}
    step = max(1.0, seconds / 20)
    while load.alive():
        for name, proc in zip(("server", "client"), procs, strict=True):
            samples[name].append(proc_status(proc.pid, "VmRSS"))
        time.sleep(step)
    load.wait(30)
    gbps = None
    with contextlib.suppress(ValueError, KeyError, IndexError):
        text = load.log().split("\n", 1)[1]
        gbps = json.loads(text)["end"]["sum_received"]["bits_per_second"] / 1e9
    return {
        name: {"first_kib": s[0], "last_kib": s[-1], "peak_kib": max(s), "samples": len(s)}
        for name, s in samples.items()
        if s
    } | {"seconds": seconds, "gbps": gbps}


def bench_charm() -> dict[str, Any] | None:
    try:
        import bench_charm  # type: ignore[import-not-found]
    except ImportError:
        return None
    measure = getattr(bench_charm, "measure", None)
    if measure is None:
        return None
    try:
        return {"result": measure()}
    except Exception as exc:  # another engineer's script: report, don't fail the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------------------------
# Report


def _f(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "n/a"
    return fmt.format(value)


def table(results: dict[str, Any]) -> str:
    cols = ["underlay", *results["tunnel"]]
    data = {"underlay": results["underlay"], **results["tunnel"]}
    base = results["underlay"]

    def row(label: str, get: Any) -> str:
        cells = []
        for col in cols:
            try:
                cells.append(get(data[col], col))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        return f"{label:<38}" + "".join(f"{c:>20}" for c in cells)

    lines = [f"{'':<38}" + "".join(f"{c:>20}" for c in cols)]
    for d, name in (("fwd", "client -> far"), ("rev", "far -> client")):
        lines.append(row(f"Gbit/s {name}", lambda r, c, d=d: _f(r[d]["gbps"])))
        lines.append(
            row(
                "  share of the underlay",
                lambda r, c, d=d: _f(100 * r[d]["gbps"] / base[d]["gbps"], "{:.1f}%"),
            )
        )
        lines.append(
            row(
                "  inner TCP retransmits / run", lambda r, c, d=d: _f(r[d]["retransmits"], "{:.0f}")
            )
        )
        lines.append(
            row("  tun drops (both ends) / run", lambda r, c, d=d: _f(r[d]["tun_drops"], "{:.0f}"))
        )
    lines.append(
        row(
            "ping to far host ms (median/max)",
            lambda r, c: f"{r['ping']['median_ms']:.3f}/{r['ping']['max_ms']:.3f}",
        )
    )
    lines.append(
        row(
            "1-byte RR ms (p50/p99/max)",
            lambda r, c: f"{r['rr']['p50_ms']:.3f}/{r['rr']['p99_ms']:.3f}/{r['rr']['max_ms']:.2f}",
        )
    )
    lines.append(
        row(
            "peak RSS MiB (server/client)",
            lambda r, c: (
                f"{r['rss_peak_kib']['server'] / 1024:.1f}/{r['rss_peak_kib']['client'] / 1024:.1f}"
            ),
        )
    )
    lines.append(
        row(
            "CPU s per GB (server/client)",
            lambda r, c: f"{r['cpu_s_per_gb']['server']:.2f}/{r['cpu_s_per_gb']['client']:.2f}",
        )
    )
    if any("soak" in r for r in results["tunnel"].values()):
        for who in ("server", "client"):
            lines.append(
                row(
                    f"soak RSS MiB {who} (first/last/peak)",
                    lambda r, c, w=who: "{:.1f}/{:.1f}/{:.1f}".format(
                        *(r["soak"][w][k] / 1024 for k in ("first_kib", "last_kib", "peak_kib"))
                    ),
                )
            )
        lines.append(row("soak Gbit/s", lambda r, c: _f(r["soak"]["gbps"])))
    charm = results.get("charm")
    if charm is not None:
        lines.append(f"Charm: {json.dumps(charm)}")
    else:
        lines.append("Charm: skipped (ci/bench_charm.py with measure() not found)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="iperf3 runs per direction (median)")
    ap.add_argument("--seconds", type=int, default=8, help="seconds per iperf3 run")
    ap.add_argument("--reference", help="path of a C DSVPN binary: adds a column")
    ap.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="S",
        help="also run iperf3 for S seconds and sample RSS",
    )
    ap.add_argument("--no-ours", action="store_true", help="only the reference (with --reference)")
    ap.add_argument("--no-charm", action="store_true")
    args = ap.parse_args(argv)

    missing = testbed.missing_prerequisites() or (
        None if shutil.which("iperf3") else "needs iperf3"
    )
    if missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 2

    impls: list[Impl] = [] if args.no_ours else [testbed.ours()]
    if args.reference:
        impls.append(testbed.reference(args.reference))
    results: dict[str, Any] = {"runs": args.runs, "seconds": args.seconds, "tunnel": {}}
    t0 = time.monotonic()
    with Testbed() as tb:
        iperf_server = tb.start(tb.inet, ["iperf3", "-s", "-p", str(IPERF_PORT)], "iperf3-server")
        tb.wait_listening(iperf_server, IPERF_PORT)
        key = tb.write_key()
        try:
            results["underlay"] = bench_underlay(tb, args.runs, args.seconds)
            for impl in impls:
                results["tunnel"][impl.name] = bench_tunnel(
                    tb, impl, key, args.runs, args.seconds, args.soak
                )
        except (testbed.TestbedError, subprocess.SubprocessError):
            print(tb.logs(), file=sys.stderr)
            raise
    if not args.no_charm:
        results["charm"] = bench_charm()
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    print(table(results))
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
