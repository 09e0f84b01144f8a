"""Benchmark dsvpn in network namespaces (run as root; everything it builds it removes).

    sudo python ci/bench.py [--runs 3] [--seconds 8] [--reference /path/to/c/dsvpn] [--soak 60]
                            [--only tcp,latency,udp,bidir,flows,idle,multi] [--variant NAME=SRC]
                            [--multi-workers N]

Testbed (dsvpn.testbed): client host -> server host (NAT) -> far host, veth links, MTU 1500.
Measured per implementation, on the same testbed, and over the plain underlay (forwarding and
NAT set by hand for that step) for comparison:

- tcp: iperf3 throughput client -> far host and the reverse (-R); the inner TCP's
  retransmissions (iperf3 sum_sent.retransmits) and the tun devices' dropped packets on both
  ends per run; CPU seconds per GB moved by these runs, per process;
- latency: ping RTT through the tunnel (p50, p99, max) while one iperf3 flow saturates it,
  upload then download, and that flow's throughput against the unloaded one; and the floor
  under those figures: ping through the idle path while two CPU-bound processes spin (on a
  machine of few cores, waking each process on the path waits for the scheduler);
- udp: iperf3 UDP offered at a fixed rate (1400-byte datagrams at 1.5 Gbit/s, 64-byte datagrams
  at 300 k/s), each way: what the far end delivers, against the bare underlay;
- bidir: iperf3 --bidir, the sum of both directions against one way alone;
- flows: four parallel flows (-P 4) against one flow, each way;
- idle: ping RTT and 1-byte TCP request/response round trips (TCP_NODELAY, p50, p99, max);
- multi: a server of a peers file with two peers, a client host each: one client alone, then
  both at once (same start, same duration), each way (pings through the tunnel while one
  saturates it alone); total / alone, Jain's fairness index,
  the server's cores used meanwhile, against issue 10's goals (bench_multi.py); and the
  handshake cost with 1, 100 and 10,000 peers (bench_handshake.py, the installed dsvpn). Ours
  only: the C reference has no peers file. The server runs one worker per CPU (dsvpn.workers);
  --multi-workers N adds a column of the same server with --workers N;
- peak RSS (VmHWM) of the server and client processes after the load;
- Charm throughput at 64/1500/9000 bytes if ci/bench_charm.py provides measure();
- with --soak S: S seconds of iperf3 at full speed, RSS sampled every few seconds.

Each run (--runs) measures the underlay and then every implementation in turn, with a fresh
tunnel each time, so that the implementations are interleaved (A/B/A/B...) on a shared, noisy
machine; the table shows medians over the runs, the JSON line every run's figures. --variant
adds another build of dsvpn (SRC: a directory holding an importable dsvpn package, such as a
checkout's src/ after `setup.py build_ext --inplace`) as one more implementation.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_charm, bench_multi, bench_handshake
try:
    import dsvpn  # noqa: F401
except ImportError:  # a checkout with an in-place build, not installed
    sys.path.insert(0, str(HERE.parent / "src"))

import bench_multi  # noqa: E402

from dsvpn import testbed  # noqa: E402
from dsvpn.testbed import Impl, Netns, Proc, Testbed  # noqa: E402

IPERF_PORT = 5201
RR_PORT = 5301
RR_COUNT = 300
PING_COUNT = 300  # 30 cannot resolve the 20-40 µs differences that matter here
PING_INTERVAL = 0.02
LOAD_WARMUP = 1.0  # seconds of the saturating flow before the pings start (slow start)
CPU_HOGS = 2  # spinning processes for the scheduling floor: as many as a transfer runs
TUN_SERVER_IP = testbed.SERVER_TUN_IP

MEASURES = ("tcp", "latency", "udp", "bidir", "flows", "idle", "multi")
CPU_WARMUP = 1.0  # seconds of load before the server's CPU is sampled (connections, slow start)
DIRECTIONS = (("fwd", False), ("rev", True))
# name -> iperf3's datagram size and offered rate (payload bits per second), what the table says
UDP_TESTS = {
    "udp1400": ("1400", "1500M", "UDP 1400 B at 1.5 Gbit/s"),
    "udp64": ("64", str(64 * 8 * 300_000), "UDP 64 B at 300 k/s"),
}


# --------------------------------------------------------------------------------------------
# Measurements


class Measure:
    """One implementation's (or the underlay's) figures of one run, and how to take them."""

    def __init__(self, tb: Testbed, seconds: int, label: str) -> None:
        self.tb = tb
        self.seconds = seconds
        self.label = label
        self.far = tb.inet.ip or ""

    def iperf(
        self,
        args: Sequence[str],
        seconds: int | None = None,
        ns: Netns | None = None,
        port: int = IPERF_PORT,
        attempts: int = 2,  # one retry: a run can fail to start on a loaded machine
    ) -> dict[str, Any]:
        """One iperf3 client run from a client host (default: the first) to the iperf3
        server at port on the far host; its JSON "end"."""
        seconds = seconds or self.seconds
        argv = ["iperf3", "-c", self.far, "-p", str(port), "-t", str(seconds), "-J", *args]
        error = ""
        for attempt in range(attempts):
            out = (ns or self.tb.client).run(argv, timeout=seconds + 60, check=False)
            try:
                end: dict[str, Any] = json.loads(out.stdout)["end"]
                if "sum_received" in end:
                    return end
                raise KeyError("sum_received")
            except (ValueError, KeyError):
                error = iperf_error(out.stdout, out.stderr)
                print(
                    f"{self.label}: iperf3 {' '.join(argv[1:])}: attempt {attempt + 1} failed:"
                    f" {error}",
                    file=sys.stderr,
                )
                time.sleep(1)
        raise testbed.TestbedError(f"iperf3 failed {attempts} time(s): {error}")

    def at_once(self, args: Sequence[str], server_pid: int) -> tuple[list[float], float]:
        """iperf3 from the first two client hosts at once, each to its own server port: each
        one's received Gbit/s, and the server process's cores used while both ran."""
        clients = self.tb.clients[:2]
        error = ""
        for attempt in range(2):  # both again, so that the two runs stay simultaneous
            with ThreadPoolExecutor(len(clients)) as pool:
                runs = [
                    pool.submit(self.iperf, args, ns=ns, port=IPERF_PORT + i, attempts=1)
                    for i, ns in enumerate(clients)
                ]
                # CPU sampled inside the transfers: after their start, before their end.
                time.sleep(CPU_WARMUP)
                wall0, cpu0 = time.monotonic(), cpu_seconds(server_pid)
                time.sleep(max(0.5, self.seconds - CPU_WARMUP - 0.5))
                wall1, cpu1 = time.monotonic(), cpu_seconds(server_pid)
                try:
                    rates = [r.result()["sum_received"]["bits_per_second"] / 1e9 for r in runs]
                except testbed.TestbedError as exc:
                    error = str(exc)
                    print(
                        f"{self.label}: both at once: attempt {attempt + 1} failed", file=sys.stderr
                    )
                    continue
            return rates, bench_multi.cores_used(cpu1 - cpu0, wall1 - wall0)
        raise testbed.TestbedError(f"two iperf3 at once failed twice: {error}")

    def tcp(self, reverse: bool) -> dict[str, float]:
        end = self.iperf(["-R"] if reverse else [])
        return {
            "gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "bytes": end["sum_received"]["bytes"],
            "retransmits": end["sum_sent"].get("retransmits", 0),
        }

    def loaded_ping(self, reverse: bool) -> dict[str, Any]:
        """Ping the far host through the path while one iperf3 flow saturates it (upload, or
        download with reverse); the ping RTTs and that flow's throughput."""
        argv = ["iperf3", "-c", self.far, "-p", str(IPERF_PORT), "-t", str(self.seconds), "-J"]
        if reverse:
            argv.append("-R")
        error = ""
        for attempt in range(2):  # one retry, as in iperf()
            load = self.tb.start(self.tb.client, argv, f"load-{self.label}-{time.monotonic_ns()}")
            try:
                time.sleep(LOAD_WARMUP)
                count = max(10, int((self.seconds - LOAD_WARMUP - 1) / PING_INTERVAL))
                stats = self.tb.client.ping(self.far, count=count, interval=PING_INTERVAL)
                load.wait(self.seconds + 30)
            finally:
                if load.alive():
                    load.kill()
            text = load.log().split("\n", 1)[-1]
            try:
                end = json.loads(text)["end"]
                return rtt_stats(stats) | {
                    "gbps": end["sum_received"]["bits_per_second"] / 1e9,
                    "retransmits": end["sum_sent"].get("retransmits", 0),
                }
            except (ValueError, KeyError):
                error = iperf_error(text, "")
                print(
                    f"{self.label}: loaded iperf3: attempt {attempt + 1} failed: {error}",
                    file=sys.stderr,
                )
                time.sleep(1)
        raise testbed.TestbedError(f"loaded iperf3 failed twice: {error}")

    def busy_ping(self) -> dict[str, float]:
        """Ping the far host through the idle path while CPU_HOGS processes spin: what waking
        each process on the path costs on a busy machine. A transfer's iperf3 processes are
        such spinners, so this is the floor under the latency measured during one."""
        hogs = [
            self.tb.start(self.tb.inet, ["sh", "-c", "while :; do :; done"], f"hog{i}-{self.label}")
            for i in range(CPU_HOGS)
        ]
        try:
            time.sleep(LOAD_WARMUP)
            stats = self.tb.client.ping(self.far, count=PING_COUNT, interval=PING_INTERVAL)
            return rtt_stats(stats)
        finally:
            for hog in hogs:
                hog.kill()

    def udp(self, size: str, rate: str, reverse: bool) -> dict[str, float]:
        """UDP offered at rate (-b) in datagrams of size bytes: what the far end received."""
        args = ["-u", "-l", size, "-b", rate, *(["-R"] if reverse else [])]
        rx = self.iperf(args)["sum_received"]
        received = rx["packets"] - rx["lost_packets"]
        return {
            "gbps": rx["bits_per_second"] / 1e9,
            "kpps": received / rx["seconds"] / 1e3,
            "lost_percent": rx["lost_percent"],
        }

    def bidir(self) -> dict[str, float]:
        end = self.iperf(["--bidir"])
        fwd = end["sum_received"]["bits_per_second"] / 1e9
        rev = end["sum_received_bidir_reverse"]["bits_per_second"] / 1e9
        return {"fwd_gbps": fwd, "rev_gbps": rev, "sum_gbps": fwd + rev}

    def flows(self, reverse: bool) -> dict[str, float]:
        end = self.iperf(["-P", "4", *(["-R"] if reverse else [])])
        return {
            "gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits", 0),
        }

    def request_response(self) -> dict[str, float]:
        """1-byte TCP round trips client host -> far host, both ends TCP_NODELAY."""
        tb = self.tb
        name = f"rr-server-{time.monotonic_ns()}"
        server = tb.start_script(tb.inet, testbed.RR_SERVER, [RR_PORT], name)
        try:
            tb.wait_log(server, "listening", 10)
            out = tb.client.run(
                [sys.executable, "-c", testbed.RR_CLIENT, self.far, str(RR_PORT), str(RR_COUNT)],
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

    def run(self, only: Sequence[str], procs: tuple[Proc, Proc] | None) -> dict[str, Any]:
        """Every selected measure once; with procs (a tunnel), tun drops and CPU too."""
        tb = self.tb
        res: dict[str, Any] = {}
        if "tcp" in only:
            moved = 0
            cpu0 = [cpu_seconds(p.pid) for p in procs] if procs else []
            for direction, reverse in DIRECTIONS:
                d0 = tun_drops(tb.client) + tun_drops(tb.server)
                sample = self.tcp(reverse)
                if procs:
                    sample["tun_drops"] = tun_drops(tb.client) + tun_drops(tb.server) - d0
                moved += sample["bytes"]
                res[direction] = sample
            if procs:
                gb = moved / 1e9
                res["cpu_s_per_gb"] = {
                    who: (cpu_seconds(p.pid) - c0) / gb
                    for who, p, c0 in zip(("server", "client"), procs, cpu0, strict=True)
                }
        if "latency" in only:
            for direction, reverse in DIRECTIONS:
                res[f"loaded_{direction}"] = self.loaded_ping(reverse)
            res["busy_ping"] = self.busy_ping()
        if "udp" in only:
            for name, (size, rate, _) in UDP_TESTS.items():
                for direction, reverse in DIRECTIONS:
                    res[f"{name}_{direction}"] = self.udp(size, rate, reverse)
        if "bidir" in only:
            res["bidir"] = self.bidir()
        if "flows" in only:
            for direction, reverse in DIRECTIONS:
                res[f"flows4_{direction}"] = self.flows(reverse)
        if "idle" in only:
            res["ping"] = rtt_stats(tb.client.ping(self.far, count=PING_COUNT, interval=0.02))
            if procs:
                res["ping_server_tun"] = rtt_stats(
                    tb.client.ping(TUN_SERVER_IP, count=PING_COUNT, interval=0.02)
                )
            res["rr"] = self.request_response()
        return res


def iperf_error(stdout: str, stderr: str) -> str:
    try:
        return str(json.loads(stdout)["error"])
    except (ValueError, KeyError, TypeError):
        return f"{stdout[-300:]} {stderr[-300:]}".strip()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def rtt_stats(stats: dict[str, Any]) -> dict[str, float]:
    rtts = stats["rtts_ms"] or [float("nan")]
    return {
        "p50_ms": statistics.median(rtts),
        "p99_ms": percentile(rtts, 99),
        "max_ms": max(rtts),
        "lost": stats["sent"] - stats["received"],
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


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


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


def bench_underlay(tb: Testbed, seconds: int, only: Sequence[str]) -> dict[str, Any]:
    with underlay(tb):
        tb.client.wait_ping(tb.inet.ip or "", 10)
        return Measure(tb, seconds, "underlay").run(only, None)


def bench_tunnel(
    tb: Testbed, impl: Impl, key: Path, seconds: int, only: Sequence[str], soak: int
) -> dict[str, Any]:
    server, client = tb.tunnel_up(impl, key, suffix=f"-{impl.name}-{time.monotonic_ns()}")
    try:
        tb.client.wait_ping(tb.inet.ip or "", 15, procs=(server, client))
        res = Measure(tb, seconds, impl.name).run(only, (server, client))
        res["rss_peak_kib"] = {
            "server": proc_status(server.pid, "VmHWM"),
            "client": proc_status(client.pid, "VmHWM"),
        }
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


def bench_two_clients(tb: Testbed, impl: Impl, seconds: int) -> dict[str, Any]:
    """--only multi: a server of a peers file with two peers (``dsvpn peer add``), a client on
    each of the first two client hosts; one client alone, then both at once, each way."""
    tag = f"{impl.name}-{time.monotonic_ns()}"
    peers = tb.workdir / f"multi-{tag}" / "peers"
    peers.parent.mkdir()
    names = ("one", "two")
    addresses = []
    for name in names:
        argv = [*impl.base, "peer", "add", str(peers), name]
        # It prints the client's command, whose last two words are the client's tunnel
        # address and the server's.
        addresses.append(tb.run_in(tb.server, argv, timeout=60).stdout.split()[-2:])
    server = tb.start_server(impl, peers, name=f"server-multi-{tag}")
    procs = [server]
    res: dict[str, Any] = {}
    try:
        for i, (local, remote) in enumerate(addresses):
            procs.append(
                tb.start_client(
                    impl,
                    peers.parent / f"{names[i]}.key",
                    ns=tb.clients[i],
                    name=f"client{i + 1}-multi-{tag}",
                    local=local,
                    remote=remote,
                )
            )
        for ns, client in zip(tb.clients, procs[1:], strict=False):
            tb.wait_log(client, testbed.SESSION_UP, 30)
            ns.wait_ping(tb.inet.ip or "", 15, procs=(server, client))
        m = Measure(tb, seconds, f"{impl.name} multi")
        for direction, reverse in DIRECTIONS:
            args = ["-R"] if reverse else []
            # One client alone: its rate, and pings through the tunnel meanwhile.
            loaded = m.loaded_ping(reverse)
            rates, cores = m.at_once(args, server.pid)
            res[direction] = bench_multi.figures(loaded["gbps"], rates, cores, ping=loaded)
        for proc in reversed(procs):
            rc = proc.stop(signal.SIGTERM)
            if rc != 0:
                res.setdefault("errors", []).append(f"{proc.name} exited {rc}")
    finally:
        for proc in procs:
            if proc.alive():
                proc.kill()
    return res


def soak_test(tb: Testbed, procs: tuple[Proc, Proc], seconds: int) -> dict[str, Any]:
    """iperf3 at full speed for ``seconds``; VmRSS of both processes every few seconds."""
    argv = ["iperf3", "-c", tb.inet.ip or "", "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    load = tb.start(tb.client, argv, f"soak-{time.monotonic_ns()}")
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


def variant(spec: str) -> Impl:
    """--variant NAME=SRC: our dsvpn imported from SRC instead of the installed package."""
    name, sep, src = spec.partition("=")
    path = Path(src).resolve()
    if not sep or not name or not (path / "dsvpn" / "__init__.py").is_file():
        raise testbed.TestbedError(f"--variant {spec!r}: want NAME=DIR, DIR holding dsvpn/")
    return Impl(name, ("env", f"PYTHONPATH={path}", sys.executable, "-m", "dsvpn"))


def with_workers(n: str) -> Impl:
    """--multi-workers N: ours, its servers of a peers file run with --workers N."""
    if not n.isdigit() or int(n) < 1:
        raise testbed.TestbedError(f"--multi-workers {n!r}: want a number of workers")
    ours = testbed.ours()
    return Impl(f"{ours.name} --workers {n}", ours.base, server_options=("--workers", n))


# --------------------------------------------------------------------------------------------
# Summary


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of every number in the runs' nested dicts (maxima stay medians of
    per-run maxima; the per-run figures are in the JSON line)."""

    def merge(values: list[Any]) -> Any:
        present = [v for v in values if v is not None]
        if not present:
            return None
        if all(isinstance(v, dict) for v in present):
            keys = {k for v in present for k in v}
            return {k: merge([v.get(k) for v in present]) for k in sorted(keys)}
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            return statistics.median(present)
        return present[-1]

    return merge(runs) or {}


def _ratio(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _f(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "n/a"
    return fmt.format(value)


def _pct(value: float | None) -> str:
    return "" if value is None else f" ({100 * value:.0f}%)"


def table(results: dict[str, Any]) -> str:
    # No underlay column when nothing was measured over it (--only multi).
    data: dict[str, dict[str, Any]] = (
        {"underlay": results["underlay"]} if results["underlay"] else {}
    )
    data |= results["tunnel"]
    cols = list(data)
    base = results["underlay"]
    width = max(20, *(len(c) + 2 for c in cols))

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> str:
        cells = []
        for col in cols:
            try:
                cells.append(get(data[col]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        if all(c == "-" for c in cells):
            return ""  # not measured in this run (--only)
        return f"{label:<44}" + "".join(f"{c:>{width}}" for c in cells)

    def ms3(r: dict[str, Any]) -> str:
        return f"{r['p50_ms']:.3f}/{r['p99_ms']:.2f}/{r['max_ms']:.2f}"

    lines = [f"{'':<44}" + "".join(f"{c:>{width}}" for c in cols)]
    names = {"fwd": "client -> far", "rev": "far -> client"}
    for d, name in names.items():
        lines.append(
            row(
                f"Gbit/s {name} (share of the underlay)",
                lambda r, d=d: (
                    _f(r[d]["gbps"])
                    + ("" if r is base else _pct(_ratio(r[d]["gbps"], base[d]["gbps"])))
                ),
            )
        )
        lines.append(
            row("  inner TCP retransmits / run", lambda r, d=d: _f(r[d]["retransmits"], "{:.0f}"))
        )
        lines.append(
            row("  tun drops (both ends) / run", lambda r, d=d: _f(r[d]["tun_drops"], "{:.0f}"))
        )
    for d, name in (("fwd", "upload"), ("rev", "download")):
        lines.append(
            row(
                f"ping ms p50/p99/max during a saturating {name}",
                lambda r, d=d: ms3(r[f"loaded_{d}"]),
            )
        )
        lines.append(
            row(
                f"  that {name}, Gbit/s (share of unloaded)",
                lambda r, d=d: (
                    _f(r[f"loaded_{d}"]["gbps"])
                    + _pct(_ratio(r[f"loaded_{d}"]["gbps"], r[d]["gbps"]))
                ),
            )
        )
    lines.append(
        row(
            f"ping ms p50/p99/max, idle, {CPU_HOGS} CPU-bound processes",
            lambda r: ms3(r["busy_ping"]),
        )
    )
    for test, unit, key, fmt in (
        ("udp1400", "Gbit/s", "gbps", "{:.3f}"),
        ("udp64", "k/s", "kpps", "{:.0f}"),
    ):
        what = UDP_TESTS[test][2]
        for d, name in names.items():
            lines.append(
                row(
                    f"{what} {name}, {unit}",
                    lambda r, d=d, k=f"{test}_{d}", key=key, fmt=fmt: (
                        _f(r[k][key], fmt)
                        + ("" if r is base else _pct(_ratio(r[k][key], base[k][key])))
                    ),
                )
            )
    lines.append(
        row(
            "bidir Gbit/s fwd+rev (share of one way)",
            lambda r: (
                f"{r['bidir']['fwd_gbps']:.2f}+{r['bidir']['rev_gbps']:.2f}"
                + _pct(_ratio(r["bidir"]["sum_gbps"], (r["fwd"]["gbps"] + r["rev"]["gbps"]) / 2))
            ),
        )
    )
    for d, name in names.items():
        lines.append(
            row(
                f"4 flows Gbit/s {name} (share of 1 flow)",
                lambda r, d=d: (
                    _f(r[f"flows4_{d}"]["gbps"])
                    + _pct(_ratio(r[f"flows4_{d}"]["gbps"], r[d]["gbps"]))
                ),
            )
        )
    lines.append(row("idle ping to far host ms p50/p99/max", lambda r: ms3(r["ping"])))
    lines.append(row("1-byte RR ms p50/p99/max", lambda r: ms3(r["rr"])))
    lines.append(
        row(
            "peak RSS MiB (server/client)",
            lambda r: (
                f"{r['rss_peak_kib']['server'] / 1024:.1f}/{r['rss_peak_kib']['client'] / 1024:.1f}"
            ),
        )
    )
    lines.append(
        row(
            "CPU s per GB (server/client)",
            lambda r: f"{r['cpu_s_per_gb']['server']:.2f}/{r['cpu_s_per_gb']['client']:.2f}",
        )
    )
    if "multi" in results["only"]:
        lines += [row(label, get) for label, get in bench_multi.rows()]
        absent = [name for name, r in results["tunnel"].items() if "multi" not in r]
        if absent:
            lines.append(f"2 clients: not measured for {', '.join(absent)} (no peers file in C)")
    if any("soak" in r for r in results["tunnel"].values()):
        for who in ("server", "client"):
            lines.append(
                row(
                    f"soak RSS MiB {who} (first/last/peak)",
                    lambda r, w=who: "{:.1f}/{:.1f}/{:.1f}".format(
                        *(r["soak"][w][k] / 1024 for k in ("first_kib", "last_kib", "peak_kib"))
                    ),
                )
            )
        lines.append(row("soak Gbit/s", lambda r: _f(r["soak"]["gbps"])))
    lines.append(
        f"runs: {results['runs']} x {results['seconds']} s; load average before / after:"
        f" {results['load_before']} / {results['load_after']}"
    )
    if results.get("handshakes") is not None:
        lines += bench_multi.handshake_lines(results["handshakes"])
    charm = results.get("charm")
    if charm is not None:
        lines.append(f"Charm: {json.dumps(charm)}")
    return "\n".join(line for line in lines if line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of every measure (median)")
    ap.add_argument("--seconds", type=int, default=8, help="seconds per iperf3 run")
    ap.add_argument("--reference", help="path of a C DSVPN binary: adds a column")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="another build of dsvpn (SRC holds its dsvpn package): adds a column",
    )
    ap.add_argument(
        "--only",
        default=",".join(MEASURES),
        help=f"comma-separated measures (default: all of {','.join(MEASURES)})",
    )
    ap.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="S",
        help="also run iperf3 for S seconds and sample RSS",
    )
    ap.add_argument(
        "--multi-workers",
        action="append",
        default=[],
        metavar="N",
        help="--only multi: also a column of the server with --workers N",
    )
    ap.add_argument("--no-ours", action="store_true", help="leave out the installed dsvpn")
    ap.add_argument("--no-charm", action="store_true")
    args = ap.parse_args(argv)

    only = [m for m in args.only.split(",") if m]
    unknown = sorted(set(only) - set(MEASURES))
    if unknown or args.runs < 1 or args.seconds < 3:
        what = f"unknown measure {', '.join(unknown)}" if unknown else "--runs >= 1, --seconds >= 3"
        print(f"bench: {what}", file=sys.stderr)
        return 2
    missing = testbed.missing_prerequisites() or (
        None if shutil.which("iperf3") else "needs iperf3"
    )
    if missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 2
    try:
        impls: list[Impl] = [] if args.no_ours else [testbed.ours()]
        impls += [variant(spec) for spec in args.variant]
        impls += [with_workers(n) for n in args.multi_workers]
        if args.reference:
            impls.append(testbed.reference(args.reference))
    except testbed.TestbedError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    results: dict[str, Any] = {
        "runs": args.runs,
        "seconds": args.seconds,
        "only": only,
        "load_before": load_average(),
    }
    per_run: dict[str, list[dict[str, Any]]] = {"underlay": [], **{i.name: [] for i in impls}}
    t0 = time.monotonic()
    one_client = [m for m in only if m != "multi"]  # the measures of the one-client testbed
    multi = "multi" in only
    with Testbed(clients=2 if multi else 1) as tb:
        for port in range(IPERF_PORT, IPERF_PORT + (2 if multi else 1)):
            iperf_server = tb.start(tb.inet, ["iperf3", "-s", "-p", str(port)], f"iperf3-{port}")
            tb.wait_listening(iperf_server, port)
        key = tb.write_key()
        try:
            for n in range(args.runs):
                per_run["underlay"].append(
                    bench_underlay(tb, args.seconds, one_client) if one_client else {}
                )
                for impl in impls:
                    soak = args.soak if n == 0 else 0  # memory over time: once is enough
                    res = (
                        bench_tunnel(tb, impl, key, args.seconds, one_client, soak)
                        if one_client and not impl.server_options  # (a peers file's options)
                        else {}
                    )
                    if multi and not impl.reference:
                        res["multi"] = bench_two_clients(tb, impl, args.seconds)
                    per_run[impl.name].append(res)
        except (testbed.TestbedError, subprocess.SubprocessError):
            print(tb.logs(), file=sys.stderr)
            raise
    if multi and not args.no_ours:
        results["handshakes"] = bench_multi.handshakes()
    results["underlay"] = summarise(per_run["underlay"])
    results["tunnel"] = {i.name: summarise(per_run[i.name]) for i in impls}
    for impl in impls:
        two = [r["multi"] for r in per_run[impl.name] if "multi" in r]
        if two:  # medians per figure, and the goals judged on them
            results["tunnel"][impl.name]["multi"] = bench_multi.summary(two)
    if multi:
        results["multi_goals"] = bench_multi.GOALS
    results["per_run"] = per_run
    if not args.no_charm:
        results["charm"] = bench_charm()
    results["load_after"] = load_average()
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    print(table(results))
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
