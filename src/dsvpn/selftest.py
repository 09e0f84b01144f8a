"""`dsvpn selftest`: this installation of dsvpn, tried end to end without touching the host.

As root, it builds three network namespaces of its own (a client, a server and a far host
that only the server can reach), starts a real server and client with this installation
(``python -m dsvpn``), and checks that the far host answers ping through the tunnel only, that
data arrives intact and NATed, how fast it goes, and that after both stop every rule, route,
address and sysctl is as before. Then it deletes the namespaces. Exit 0 when everything held.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from dsvpn import __version__, testbed
from dsvpn.errors import PermissionDenied, PrerequisiteError, UsageError
from dsvpn.testbed import Impl, Proc, Testbed, TestbedError

USAGE = """\
usage: dsvpn selftest [-v]

As root: builds a client, a server and a far host in network namespaces of its own, brings a
real tunnel up between them with this installation, shows ping, throughput and that every rule
was removed again, then deletes the namespaces. Nothing outside those namespaces changes.
Exit status 0 when every check held, 1 otherwise.

  -v, --verbose   also print the server's and the client's log
"""

PING_COUNT = 10
TRANSFER_BYTES = 16 << 20  # the checksummed transfer
THROUGHPUT_SECONDS = 3
PYTHON_THROUGHPUT_BYTES = 128 << 20  # without iperf3: a larger checksummed transfer, timed
IPERF_PORT = 5201


class Report:
    """One line per check, printed as it completes; remembers whether any failed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = 0

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def ok(self, text: str) -> None:
        self.line(f"  ok    {text}")

    def fail(self, text: str, detail: str = "") -> None:
        self.failed += 1
        self.line(f"  FAIL  {text}")
        for row in detail.rstrip().splitlines():
            self.line(f"          {row}")

    def check(self, held: bool, text: str, detail: str = "") -> bool:
        if held:
            self.ok(text)
        else:
            self.fail(text, detail)
        return held


def _rate(bits_per_second: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:.2f} {unit}"
    return f"{bits_per_second:.0f} bit/s"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    """`dsvpn selftest [-v]`."""
    verbose = False
    for arg in argv:
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if arg in ("-v", "--verbose"):
            verbose = True
        else:
            raise UsageError(f"unknown argument {arg!r} for selftest (see dsvpn selftest --help)")
    missing = testbed.missing_prerequisites()
    if missing:
        error = PermissionDenied if missing.startswith("needs root") else PrerequisiteError
        raise error(f"selftest {missing}")
    return run(out or sys.stdout, verbose)


def run(out: TextIO, verbose: bool = False) -> int:
    """The self-test itself (root, prerequisites checked): 0 if every check held, else 1."""
    impl = testbed.ours()
    report = Report(out)
    report.line(f"dsvpn selftest: dsvpn {__version__}, run as `{' '.join(impl.base)}`")
    stale = testbed.remove_stale_namespaces()
    if stale:
        report.line(f"  (deleted {len(stale)} namespaces an earlier self-test left behind)")
    tb: Testbed | None = None
    names: list[str] = []
    try:
        try:
            tb = Testbed(clients=1)
        except TestbedError as exc:
            report.fail("building the namespaces", str(exc))
            return 1
        names = [ns.name for ns in tb.namespaces]
        _check_tunnel(tb, impl, report, verbose)
    except KeyboardInterrupt:
        report.line("interrupted: removing the namespaces")
        raise
    finally:
        if tb is not None:
            tb.close()
            left = [n for n in names if testbed.netns_inode(n) is not None]
            report.check(
                not left,
                f"removed the namespaces {', '.join(names)}",
                f"still there: {', '.join(left)}",
            )
    if report.failed:
        report.line(f"selftest FAILED: {report.failed} check(s) did not hold")
        return 1
    report.line("selftest passed: dsvpn works on this host")
    return 0


def _check_tunnel(tb: Testbed, impl: Impl, report: Report, verbose: bool) -> None:
    client, server, far = tb.client, tb.server, tb.inet
    assert client.ip and server.ip and far.ip
    report.ok(
        f"namespaces: client {client.name} ({client.ip}), server {server.name} ({server.ip}),"
        f" far host {far.name} ({far.ip})"
    )
    before = tb.snapshots()
    report.check(
        not client.ping_ok(far.ip),
        f"the far host {far.ip} is out of the client's reach without the tunnel",
        "it answered: the check below would prove nothing",
    )
    key = tb.write_key()
    procs: list[Proc] = []
    try:
        started = time.monotonic()
        try:
            server_proc, client_proc = tb.tunnel_up(impl, key, timeout=30)
        except TestbedError as exc:
            procs = list(tb.procs)
            report.fail("the tunnel did not come up", str(exc))
            return
        procs = [client_proc, server_proc]
        report.ok(
            f"tunnel up in {time.monotonic() - started:.1f} s: client {testbed.CLIENT_TUN_IP}"
            f" <-> server {testbed.SERVER_TUN_IP}"
        )
        _guard(report, "ping", lambda: _ping(tb, report))
        _guard(report, "transfer", lambda: _transfer(tb, report))
        _guard(report, "throughput", lambda: _throughput(tb, report))
        _stop(report, procs)
    finally:
        for proc in procs:
            if proc.alive():
                proc.kill()
        if verbose or report.failed:
            for proc in procs:
                report.line(f"---- {proc.name} log ({proc.ns.role} namespace)")
                for row in proc.log().splitlines()[-(1000 if verbose else 30) :]:
                    report.line(f"     {row}")
    _rules(tb, before, report)


def _guard(report: Report, what: str, check: Callable[[], object]) -> None:
    try:
        check()
    except (TestbedError, OSError, ValueError, KeyError) as exc:
        report.fail(f"{what}: {exc}")


def _ping(tb: Testbed, report: Report) -> None:
    assert tb.inet.ip
    # The first packet may wait for the far side's neighbour lookup: warm up, then count.
    tb.client.wait_ping(tb.inet.ip, 10, what="a first ping of the far host through the tunnel")
    result = tb.client.ping(tb.inet.ip, PING_COUNT, wait=2.0, interval=0.1)
    rtts = result["rtts_ms"]
    got = f"{result['received']}/{result['sent']} replies"
    if rtts:
        got += f", rtt min/avg/max {min(rtts):.2f}/{sum(rtts) / len(rtts):.2f}/{max(rtts):.2f} ms"
    report.check(
        result["received"] == result["sent"],
        f"ping the far host {tb.inet.ip} through the tunnel: {got}",
    )


def _transfer(tb: Testbed, report: Report, nbytes: int = TRANSFER_BYTES) -> float:
    """A checksummed transfer client -> far host; returns the sender's seconds."""
    assert tb.inet.ip
    tun = tb.server.tun_links()
    rx_before = tb.server.link_stats(tun[0])["rx_bytes"] if len(tun) == 1 else 0
    result = tb.transfer(tb.client, tb.inet, tb.inet.ip, nbytes)
    sent, received = result["sent"], result["received"]
    problems = []
    if not received["bytes"] == sent["bytes"] == nbytes:
        problems.append(f"sent {sent['bytes']} bytes, {received['bytes']} arrived")
    if not received["sha256"] == sent["sha256"] == sent["echo"]:
        problems.append("the sha256 of the data differs at the two ends")
    if received["peer"] != tb.server_ext_ip:
        problems.append(f"the far host saw {received['peer']}, not the server {tb.server_ext_ip}")
    if len(tun) != 1:
        problems.append(f"the server has {len(tun)} tun devices, expected 1")
    elif tb.server.link_stats(tun[0])["rx_bytes"] - rx_before < nbytes:
        problems.append("the server's tun device did not carry the data")
    report.check(
        not problems,
        f"transfer {_mib(nbytes)} to the far host through the tunnel: sha256 matches, NATed"
        f" to the server's address {tb.server_ext_ip}",
        "\n".join(problems),
    )
    return float(sent["seconds"])


def _throughput(tb: Testbed, report: Report) -> None:
    assert tb.inet.ip
    if shutil.which("iperf3") is None:
        seconds = _transfer(tb, report, PYTHON_THROUGHPUT_BYTES)
        rate = PYTHON_THROUGHPUT_BYTES * 8 / seconds
        report.ok(f"throughput {_rate(rate)} client -> far host (timed transfer; no iperf3)")
        return
    server = tb.start(
        tb.inet, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], f"iperf3-server-{time.time()}"
    )
    try:
        tb.wait_listening(server, IPERF_PORT)
        argv = ["iperf3", "-c", tb.inet.ip, "-p", str(IPERF_PORT), "-J"]
        done = tb.client.run(
            [*argv, "-t", str(THROUGHPUT_SECONDS)], check=False, timeout=THROUGHPUT_SECONDS + 30
        )
        try:
            bits = float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"])
        except (ValueError, KeyError, TypeError):
            report.fail("throughput: iperf3 gave no result", done.stdout[-500:] + done.stderr)
            return
    finally:
        if server.alive():
            server.kill()
    report.ok(f"throughput {_rate(bits)} client -> far host (iperf3, {THROUGHPUT_SECONDS} s)")


def _stop(report: Report, procs: Sequence[Proc]) -> None:
    """SIGTERM the client, then the server: each must undo its changes and exit 0."""
    started = time.monotonic()
    codes: dict[str, int | None] = {}
    for proc in procs:
        try:
            codes[proc.name] = proc.stop()
        except TestbedError as exc:
            codes[proc.name] = None
            report.fail(f"{proc.name} did not stop", str(exc))
    shown = ", ".join(f"{name} {code}" for name, code in codes.items())
    report.check(
        all(code == 0 for code in codes.values()),
        f"stopped with SIGTERM in {time.monotonic() - started:.1f} s: exit status {shown}",
    )


def _rules(tb: Testbed, before: dict[str, dict[str, str]], report: Report) -> None:
    with contextlib.suppress(TestbedError):
        tb.settle()
    try:
        changes = tb.changes(before)
    except TestbedError as exc:
        report.fail(f"comparing the namespaces with before: {exc}")
        return
    report.check(
        not changes,
        "every rule removed: iptables, ip rules, routes, links and sysctls as before,"
        " in all three namespaces",
        changes,
    )
