"""A network-namespace testbed for dsvpn (end-to-end tests and the benchmark).

Used by ``dsvpn selftest``, the end-to-end tests and ``ci/bench.py``; it imports nothing beyond
the standard library (no pytest, no compiled extension). Run as root.

Topology built by :class:`Testbed` (``X`` is a per-run octet; every address and device exists
only inside the testbed's own namespaces, the root namespace is never touched)::

    client ns  eth0 10.X.1.2/24 ─┐
    client2 ns eth0 10.X.1.3/24 ─┼─ lan0 (bridge) 10.X.1.1/24  server ns  wan0 10.X.2.1/24 ──
    ...                          ─┘                                      10.X.2.2/24 eth0  inet ns

- Every client's default route goes via the server host (10.X.1.1).
- The server's default route goes towards the inet host (10.X.2.2).
- The inet host only knows 10.X.2.0/24, so it can answer a client only through the VPN and the
  server's NAT. IPv4 forwarding is off on the server until dsvpn turns it on.

The same links also carry IPv6, from a random ULA /48 ``U`` per run: ``U:1::/64`` on the LAN
(server ``U:1::1``, clients ``U:1::2``, ``U:1::3``...) and ``U:2::/64`` between the server
(``U:2::1``) and the inet host (``U:2::2``), with the same default routes (clients via
``U:1::1``, server via ``U:2::2``) and IPv6 forwarding off on the server. A client can thus
reach the server over IPv6 (``Netns.ip6``); the inet host knows only ``U:2::/64``, so it
answers a client over IPv6, as over IPv4, only through the VPN and the server's NAT (the
server's IPv6 route out is its default route via the inet host). Duplicate address detection
is off, and the testbed waits until no address is tentative, so every address is usable once
it returns.

``Testbed.close()`` (also via ``with``) stops the processes it started, by PID, and deletes its
namespaces, which removes their veths, tun devices, routes and netfilter rules.

It never touches a namespace it did not create. Every namespace is recorded, before it is
created, in a record file of this process (``/run/dsvpn-testbed/<pid>-<start>.json``, in a
root-only directory); :func:`remove_stale_namespaces` deletes only the namespaces that such a
record names once the process that wrote it is gone (same PID *and* start time), so a crashed
run is cleaned up later without guessing from names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

NS_PREFIX = "dsvt"
# Where each testbed process records the namespaces it creates (see remove_stale_namespaces).
RECORD_DIR = Path("/run/dsvpn-testbed")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts a named namespace
# `ip netns exec NS` bind-mounts every file of /etc/netns/NS over /etc: each namespace gets a
# resolv.conf of its own there before anything runs in it, so that nothing run inside (dsvpn
# --dns included) can ever read or write the host's resolver configuration.
NETNS_ETC = Path("/etc/netns")
NS_RESOLV_CONF = "# dsvpn testbed namespace {name}\nnameserver 192.0.2.53\n"

DEFAULT_PORT = 443
SERVER_TUN_IP = "192.168.192.254"
CLIENT_TUN_IP = "192.168.192.1"
# The IPv6 tunnel addresses dsvpn derives from the IPv4 ones (64:ff9b::<tun ip>, peer /96).
SERVER_TUN_IP6 = str(ipaddress.IPv6Address(f"64:ff9b::{SERVER_TUN_IP}"))
CLIENT_TUN_IP6 = str(ipaddress.IPv6Address(f"64:ff9b::{CLIENT_TUN_IP}"))

SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.ipv4.tcp_congestion_control",
)


class TestbedError(RuntimeError):
    """A testbed command failed or a condition was not met in time."""

    __test__ = False  # not a pytest test class


# --------------------------------------------------------------------------------------------
# Commands


# How ping and `ip route get` say that the kernel has no way out for an address.
UNREACHABLE = ("No route to host", "Network is unreachable")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv, capture text output; on failure raise with the command and its stderr."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise TestbedError(
            f"exit {proc.returncode}: {' '.join(argv)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def wait_until(
    pred: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.2,
    procs: Iterable[Proc] = (),
) -> Any:
    """Poll pred until it returns a truthy value; raise naming ``what`` after ``timeout`` s.

    If one of ``procs`` exits meanwhile, fail at once with its log instead of waiting.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        for proc in procs:
            if not proc.alive():
                raise TestbedError(
                    f"{proc.name} exited with {proc.returncode} while waiting for {what};"
                    f" log tail:\n{proc.log_tail()}"
                )
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # the condition may raise until it becomes true
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Namespaces and processes


class Netns:
    """One network namespace, addressed by name (``ip netns exec NAME ...``)."""

    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role
        self.ip: str | None = None  # the host's main address, set by the testbed
        # What /etc/resolv.conf is inside this namespace (see NETNS_ETC).
        self.resolv_conf = NETNS_ETC / name / "resolv.conf"
        self.ip6: str | None = None  # its IPv6 (ULA) address on the same link, canonical form

    def __repr__(self) -> str:
        return f"Netns({self.role}={self.name}, ip={self.ip}, ip6={self.ip6})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        # `ip netns exec` execs the command, so a Popen PID is the command's own PID.
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(self.argv(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.argv(argv), **kw)

    def sysctl(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    def set_sysctl(self, key: str, value: str) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def ping(
        self, dest: str, count: int = 1, wait: float = 1.0, interval: float = 0.2, size: int = 56
    ) -> dict[str, Any]:
        """ICMP (or, to an IPv6 address, ICMPv6) echo from this namespace (a python raw socket:
        no ping binary needed)."""
        proc = self.run(
            [sys.executable, "-c", PING, dest, str(count), str(interval), str(wait), str(size)],
            check=False,
            timeout=count * (interval + wait) + 20,
        )
        lines = proc.stdout.strip().splitlines()
        if not lines or not lines[-1].startswith("{"):
            raise TestbedError(f"ping {dest} from {self.name} failed: {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def ping_ok(self, dest: str, wait: float = 1.0) -> bool:
        return bool(self.ping(dest, 1, wait)["received"] == 1)

    def reaches(self, dest: str) -> bool:
        """One ping; False also when the kernel refuses to send it at all (no route to it, or
        a REJECT of a kill switch)."""
        try:
            return self.ping_ok(dest)
        except TestbedError as exc:
            if any(why in str(exc) for why in UNREACHABLE):
                return False
            raise

    def wait_ping(
        self, dest: str, timeout: float = 20, what: str | None = None, procs: Iterable[Proc] = ()
    ) -> None:
        wait_until(
            lambda: self.ping_ok(dest), timeout, what or f"ping {self.role} -> {dest}", procs=procs
        )

    def pids(self) -> list[int]:
        out = run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split()]

    def link_stats(self, dev: str) -> dict[str, int]:
        """The kernel's counters of one device (rx/tx packets, bytes, dropped, errors)."""
        out = self.run(["ip", "-s", "-j", "link", "show", "dev", dev]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {f"{d}_{k}": v for d in ("rx", "tx") for k, v in stats[d].items()}

    def links(self) -> list[str]:
        out = self.run(["ip", "-j", "link", "show"]).stdout
        return [link["ifname"] for link in json.loads(out)]

    def tun_links(self) -> list[str]:
        out = self.run(["ip", "-j", "-d", "link", "show"]).stdout
        return [
            link["ifname"]
            for link in json.loads(out)
            if link.get("linkinfo", {}).get("info_kind") == "tun"
        ]


class Proc:
    """A process started in a namespace with stdout+stderr captured to a log file."""

    def __init__(
        self,
        name: str,
        ns: Netns,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.ns = ns
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.popen = ns.popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"Proc({self.name}, pid={self.pid}, ns={self.ns.name})"

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TestbedError(
                f"{self.name} (pid {self.pid}) still running after {timeout}s;"
                f" log tail:\n{self.log_tail()}"
            ) from exc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send sig and wait; SIGKILL (and raise) if the process does not exit in time."""
        self.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TestbedError(
                f"{self.name} (pid {self.pid}) ignored signal {sig} for {timeout}s;"
                f" log tail:\n{self.log_tail()}"
            ) from None
        finally:
            self._log.close()

    def kill(self) -> int:
        self.send_signal(signal.SIGKILL)
        rc = self.popen.wait(10)
        self._log.close()
        return rc


# --------------------------------------------------------------------------------------------
# dsvpn implementations (ours or the C reference), so tests and benchmark share one code path


@dataclasses.dataclass(frozen=True)
class Impl:
    """How to start one dsvpn implementation: ``base`` argv then DSVPN's positional syntax."""

    name: str
    base: tuple[str, ...]
    reference: bool = False  # the C DSVPN: no -v/--dry-run/cleanup, logs on stdout too
    server_options: tuple[str, ...] = ()  # given to every server it starts (e.g. --workers 1)

    def server_argv(
        self,
        key: str | os.PathLike[str],
        *,
        port: int | str = "auto",
        tun: str = "auto",
        local: str = "auto",
        remote: str = "auto",
        ext: str = "auto",
        listen: str = "auto",
        extra: Sequence[str] = (),
    ) -> list[str]:
        return [
            *self.base,
            "server",
            str(key),
            listen,
            str(port),
            tun,
            local,
            remote,
            ext,
            *self._extra([*extra, *self.server_options]),
        ]

    def client_argv(
        self,
        key: str | os.PathLike[str],
        server: str,
        *,
        port: int | str = "auto",
        tun: str = "auto",
        local: str = "auto",
        remote: str = "auto",
        gateway: str = "auto",
        extra: Sequence[str] = (),
    ) -> list[str]:
        return [
            *self.base,
            "client",
            str(key),
            server,
            str(port),
            tun,
            local,
            remote,
            gateway,
            *self._extra(extra),
        ]

    def cleanup_argv(self) -> list[str]:
        if self.reference:
            raise TestbedError("the C reference has no cleanup command")
        return [*self.base, "cleanup"]

    def _extra(self, extra: Sequence[str]) -> list[str]:
        # The reference takes no options; ours logs every command with -v.
        return [] if self.reference else list(extra)


def ours() -> Impl:
    return Impl("dsvpn", (sys.executable, "-m", "dsvpn"))


def reference(path: str | os.PathLike[str]) -> Impl:
    path = str(Path(path).resolve())
    if not os.access(path, os.X_OK):
        raise TestbedError(f"reference binary not executable: {path}")
    # The C binary printf()s session events to stdout: line-buffer it so the log is live.
    base = ("stdbuf", "-oL", "-eL", path) if shutil.which("stdbuf") else (path,)
    return Impl("dsvpn-c", base, reference=True)


def python_env() -> dict[str, str]:
    """Environment for ``python -m dsvpn``: the dsvpn that this module belongs to.

    An installed dsvpn is found as it is; a checkout (``src/`` on sys.path, or an in-place
    build) gets that directory on PYTHONPATH, so the child runs this very code.
    """
    import site

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    package_parent = str(Path(__file__).resolve().parent.parent)
    site_dirs = {str(Path(p).resolve()) for p in site.getsitepackages()}
    with contextlib.suppress(AttributeError):
        site_dirs.add(str(Path(site.getusersitepackages()).resolve()))
    if package_parent not in site_dirs:
        paths = [package_parent, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# --------------------------------------------------------------------------------------------
# Snapshots of a namespace's network configuration


def _normalise_iptables(text: str) -> str:
    """iptables-save without comments, counters and empty default tables.

    An nft-backed table that dsvpn touched stays behind empty after its rules are deleted (the
    kernel/iptables does that, not dsvpn), so a table with only built-in ACCEPT chains and no
    rules counts as absent.
    """
    tables: list[tuple[str, list[str], list[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            tables.append((line, [], []))
        elif line.startswith(":"):
            tables[-1][1].append(re.sub(r"\s*\[\d+:\d+\]$", "", line))
        else:
            tables[-1][2].append(re.sub(r"^\[\d+:\d+\]\s*", "", line))
    out: list[str] = []
    builtin = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
    for name, chains, rules in tables:
        trivial = all(c.split()[0][1:] in builtin and c.split()[1] == "ACCEPT" for c in chains)
        if rules or not trivial:
            out += [name, *chains, *rules]
    return "\n".join(out)


def _links(ns: Netns) -> str:
    data = json.loads(ns.run(["ip", "-j", "-d", "link", "show"]).stdout)
    rows = []
    for link in data:
        kind = link.get("linkinfo", {}).get("info_kind", "")
        flags = ",".join(sorted(f for f in link.get("flags", []) if f != "LOWER_UP"))
        rows.append(f"{link['ifname']} {kind} mtu {link.get('mtu')} <{flags}>")
    return "\n".join(sorted(rows))


# The tables iptables-nft keeps in nftables; iptables-save shows them.
_XTABLES = {
    f"table {family} {name}"
    for family in ("ip", "ip6")
    for name in ("filter", "nat", "raw", "mangle", "security")
}


def nft_tables(ns: Netns) -> list[str]:
    """The nftables tables of ns that are not iptables-nft's ("table inet dsvpn-tun0")."""
    if shutil.which("nft") is None:
        return []
    out = ns.run(["nft", "list", "tables"]).stdout
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return sorted(line for line in lines if line not in _XTABLES)


def _nft(ns: Netns) -> str:
    return "\n".join(ns.run(["nft", "list", *t.split()]).stdout for t in nft_tables(ns))


def snapshot(ns: Netns) -> dict[str, str]:
    """Everything dsvpn may change in a namespace, normalised for comparison."""
    snap = {
        "iptables": _normalise_iptables(ns.run(["iptables-save"]).stdout),
        "ip6tables": _normalise_iptables(ns.run(["ip6tables-save"]).stdout),
        "nft": _nft(ns),
        "ip rule": ns.run(["ip", "rule"]).stdout.strip(),
        "ip -6 rule": ns.run(["ip", "-6", "rule"]).stdout.strip(),
        "ip route": ns.run(["ip", "route", "show", "table", "all"]).stdout.strip(),
        "ip -6 route": ns.run(["ip", "-6", "route", "show", "table", "all"]).stdout.strip(),
        "ip link": _links(ns),
        "resolv.conf": ns.resolv_conf.read_text(),
    }
    for key in SYSCTLS:
        snap[key] = ns.sysctl(key)
    return snap


def diff_snapshots(
    before: dict[str, str], after: dict[str, str], ignore: Iterable[str] = ()
) -> str:
    """A readable unified diff of two snapshots ('' when equal), skipping ``ignore`` keys."""
    parts = []
    for key in before:
        if key in ignore or before[key] == after.get(key):
            continue
        diff = difflib.unified_diff(
            before[key].splitlines(),
            after.get(key, "").splitlines(),
            f"{key} before",
            f"{key} after",
            lineterm="",
        )
        parts.append("\n".join(diff))
    return "\n".join(parts)


def count_rules(ns: Netns, pattern: str) -> int:
    """How many iptables-save rule lines match a regular expression."""
    text = _normalise_iptables(ns.run(["iptables-save"]).stdout)
    rules = [line for line in text.splitlines() if line.startswith("-A")]
    return sum(1 for line in rules if re.search(pattern, line))


# --------------------------------------------------------------------------------------------
# Small traffic helpers run inside the namespaces (plain python, no extra tools)

# ICMP echo over a raw socket (root). Prints "reply SEQ MONOTONIC RTT_MS" per answer, then JSON.
PING = r"""
import json, os, select, socket, struct, sys, time
dest, count, interval, wait, size = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:5]), \
    int(sys.argv[5])
family = socket.AF_INET6 if ":" in dest else socket.AF_INET
if family == socket.AF_INET6:
    # ICMPv6: the kernel fills in the checksum and delivers no IP header.
    s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    request, reply = 128, 129
else:
    s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    request, reply = 8, 0
want = socket.inet_pton(family, dest)
ident, payload, rtts = os.getpid() & 0xFFFF, bytes(size), []

def checksum(b):
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF

for seq in range(count):
    seq16 = seq & 0xFFFF
    body = struct.pack("!BBHHH", request, 0, 0, ident, seq16) + payload
    pkt = struct.pack("!BBHHH", request, 0, checksum(body), ident, seq16) + payload
    t0 = time.monotonic()
    s.sendto(pkt, (dest, 0))
    rtt = None
    while rtt is None:
        left = t0 + wait - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, src = s.recvfrom(65535)
        ihl = (data[0] & 15) * 4 if family == socket.AF_INET else 0
        if len(data) < ihl + 8:
            continue
        typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        from_dest = socket.inet_pton(family, src[0].split("%")[0]) == want
        if typ == reply and rid == ident and rseq == seq16 and from_dest:
            rtt = time.monotonic() - t0
    if rtt is not None:
        rtts.append(rtt * 1000)
        print(f"reply {seq} {time.monotonic():.6f} {rtt * 1000:.3f}", flush=True)
    spare = t0 + interval - time.monotonic()
    if spare > 0 and seq + 1 < count:
        time.sleep(spare)
print(json.dumps({"sent": count, "received": len(rtts), "rtts_ms": rtts}), flush=True)
"""

# Receiver: accept one TCP connection, read to EOF, print peer, byte count and sha256 as JSON.
# Listens on 0.0.0.0, or on the address given after the port ("::" for IPv6).
# Our "session up" log line (a log file's lines start with a timestamp).
SESSION_UP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )?session up"

RECEIVER = r"""
import hashlib, json, socket, sys
port = int(sys.argv[1])
addr = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port)); srv.listen(1)
print("listening", flush=True)
conn, peer = srv.accept()
h, n = hashlib.sha256(), 0
while True:
    b = conn.recv(1 << 20)
    if not b:
        break
    h.update(b); n += len(b)
conn.sendall(h.hexdigest().encode())
conn.close()
print(json.dumps({"peer": peer[0], "bytes": n, "sha256": h.hexdigest()}), flush=True)
"""

# Sender: send N random bytes, then read the receiver's digest; print what both sides saw.
SENDER = r"""
import hashlib, json, os, socket, sys, time
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=60)
h, sent, t0 = hashlib.sha256(), 0, time.monotonic()
while sent < total:
    b = os.urandom(min(1 << 18, total - sent))
    s.sendall(b); h.update(b); sent += len(b)
s.shutdown(socket.SHUT_WR)
echo = b""
while True:
    b = s.recv(64)
    if not b:
        break
    echo += b
print(json.dumps({"bytes": sent, "sha256": h.hexdigest(), "echo": echo.decode(),
                  "seconds": time.monotonic() - t0}), flush=True)
"""

# Request/response echo server and client for 1-byte round trips (TCP_NODELAY on both ends).
RR_SERVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1)
print("listening", flush=True)
c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := c.recv(1)):
    c.sendall(b)
"""

RR_CLIENT = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter(); s.sendall(b"x")
    if s.recv(1) != b"x":
        sys.exit("bad echo")
    rtts.append(time.perf_counter() - t0)
print(json.dumps(rtts))
"""

# Holds one TCP connection open, silent after sending the first N bytes (0: nothing at all, so
# TCP_DEFER_ACCEPT keeps it from the server; a few bytes: a stalled handshake the server accepted).
SILENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"\x00" * int(sys.argv[4]))
print("connected", flush=True)
time.sleep(float(sys.argv[3]))
"""


# --------------------------------------------------------------------------------------------
# The testbed


def _ipv6_not_ready(ns: Netns, dev: str | None = None) -> list[str]:
    """IPv6 addresses of ns (of dev) that cannot be used yet (tentative) or never will (DAD
    failed)."""
    bad = []
    for flag in ("tentative", "dadfailed"):
        argv = ["ip", "-j", "-6", "addr", "show", *(("dev", dev) if dev else ()), flag]
        out = ns.run(argv).stdout
        for link in json.loads(out or "[]"):
            info = link.get("addr_info", [])
            bad += [f"{a['local']} on {link['ifname']} {flag}" for a in info if "local" in a]
    return bad


# -- what this process created, so that only that is ever removed --------------------------------


def start_stamp(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat), None if there is none.

    With the PID it names one process: a PID reused by a later process has another stamp.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ")": split after its last ")".
    return text.rsplit(")", 1)[1].split()[19]


def _safe_dir(path: Path, create: bool) -> bool:
    """True if ``path`` is a directory only this user (root) can write; create it if asked.

    TestbedError if it exists but is anything else: records another user could write must
    never decide which namespaces get deleted.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise TestbedError(f"{path} is not a directory private to uid {os.geteuid()}; remove it")
    return True


class _Record:
    """This process's record of the namespaces it created, one JSON file in RECORD_DIR.

    A name is recorded before ``ip netns add`` runs (then with its inode once it exists), and
    dropped once the namespace is deleted; the file goes when nothing is left in it.
    """

    def __init__(self, directory: Path) -> None:
        self.pid = os.getpid()
        self.start = start_stamp(self.pid)
        self.directory = directory
        self.path = directory / f"{self.pid}-{self.start or 'unknown'}.json"
        self.namespaces: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def set(self, name: str, inode: int | None) -> None:
        with self._lock:
            self.namespaces[name] = inode
            self._save()

    def drop(self, name: str) -> None:
        with self._lock:
            self.namespaces.pop(name, None)
            self._save()

    def _save(self) -> None:
        if not self.namespaces:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        _safe_dir(self.directory, create=True)
        data = {"pid": self.pid, "start": self.start, "namespaces": self.namespaces}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)


_records: dict[int, _Record] = {}
_records_lock = threading.Lock()


def _record() -> _Record:
    """The record of this process (a forked child gets its own)."""
    with _records_lock:
        pid = os.getpid()
        if pid not in _records:
            _records[pid] = _Record(RECORD_DIR)
        return _records[pid]


def netns_inode(name: str) -> int | None:
    """The inode of a named namespace (the number in ``net:[...]``), None if there is none."""
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def _read_record(path: Path) -> dict[str, Any] | None:
    """A record file's content if it is a regular file of ours with the expected shape."""
    m = re.fullmatch(r"(\d+)-(\d+|unknown)\.json", path.name)
    if not m:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        try:
            data = json.load(f)
        except ValueError:
            return None
    if not isinstance(data, dict) or data.get("pid") != int(m.group(1)):
        return None
    if not isinstance(data.get("namespaces"), dict):
        return None
    return data


def remove_stale_namespaces(directory: Path | None = None) -> list[str]:
    """Delete the namespaces that testbed processes recorded and left behind when they died.

    A record is acted on only when its process is gone: no process has its PID with the start
    stamp it recorded. Then each namespace it names is deleted if it still exists and is the
    same namespace (same inode; a name recorded just before a crash, without an inode, must
    carry that process's PID). Namespaces that no record names are never touched.
    Returns the names deleted.
    """
    directory = directory or RECORD_DIR
    if not _safe_dir(directory, create=False):
        return []
    removed = []
    for path in sorted(directory.glob("*.json")):
        data = _read_record(path)
        if data is None:
            continue
        pid, start = int(data["pid"]), data.get("start")
        alive = start_stamp(pid) == start if start else Path(f"/proc/{pid}").exists()
        if pid == os.getpid() or alive:
            continue
        left = False
        for name, inode in data["namespaces"].items():
            if not re.fullmatch(rf"{NS_PREFIX}-{pid}-[0-9a-f]+-\w+", str(name)):
                continue
            now = netns_inode(name)
            if now is not None and inode is not None and now != inode:
                continue  # a namespace of the same name that is not the recorded one
            if now is not None:
                run(["ip", "netns", "del", name], check=False)
                if netns_inode(name) is not None:
                    left = True  # kept on record for the next sweep
                    continue
                removed.append(name)
            # Gone: so is the resolv.conf that `ip netns exec` bind-mounted into it.
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        if not left:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return removed


class NotifyListener:
    """Stands in for systemd's notification socket: the sd_notify datagrams a process sends
    to $NOTIFY_SOCKET (``env()``), each kept with the time it was read.

    A path, not an abstract name: abstract unix socket names belong to one network namespace.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def poll(self) -> list[dict[str, str]]:
        """Read what has arrived; return the new messages (KEY=value lines as a dict)."""
        new = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            lines = data.decode(errors="replace").split("\n")
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            self.messages.append((time.monotonic(), fields))
            new.append(fields)
        return new

    def last(self, key: str) -> str | None:
        """The latest value sent for ``key`` (e.g. STATUS), None if never sent."""
        self.poll()
        for _, fields in reversed(self.messages):
            if key in fields:
                return fields[key]
        return None

    def wait_for(
        self,
        key: str,
        value: str | Callable[[str], bool] | None = None,
        timeout: float = 15,
        procs: Iterable[Proc] = (),
    ) -> dict[str, str]:
        """The first message (new or already read) with ``key`` (equal to ``value``, or for
        which ``value(v)`` holds)."""
        checked = 0

        def found() -> dict[str, str] | None:
            nonlocal checked
            self.poll()
            for _, fields in self.messages[checked:]:
                checked += 1
                v = fields.get(key)
                if v is None:
                    continue
                if value is None or (v == value if isinstance(value, str) else value(v)):
                    return fields
            return None

        result: dict[str, str] = wait_until(
            found, timeout, f"{key}={value or '...'} on {self.path}", 0.05, procs
        )
        return result

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _dsvpn_records_name(netns: str, run_dir: Path = Path("/run/dsvpn")) -> bool:
    """Whether a dsvpn record in run_dir belongs to the network namespace ``netns``."""
    for path in run_dir.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads(path.read_text()).get("identity", {}).get("netns") == netns:
                return True
    return False


class Testbed:
    """Client host(s), server host, far ("inet") host, in namespaces of their own."""

    def __init__(
        self,
        clients: int = 1,
        workdir: str | os.PathLike[str] | None = None,
        octet: int | None = None,
    ) -> None:
        self.tag = f"{NS_PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
        self.octet = octet if octet is not None else 100 + secrets.randbelow(100)
        self.lan = f"10.{self.octet}.1"  # clients and the server's LAN side
        self.wan = f"10.{self.octet}.2"  # the server's external side and the inet host
        # A random ULA /48 (RFC 4193): U:1::/64 is the LAN, U:2::/64 the server-inet link.
        self.ula = ipaddress.IPv6Network(((0xFD << 120) | (secrets.randbits(40) << 80), 48))
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._record = _record()
        self._listeners: list[NotifyListener] = []
        self.namespaces: list[Netns] = []
        self.procs: list[Proc] = []
        self.clients: list[Netns] = []
        try:
            self.server = self._add_ns("srv")
            self.inet = self._add_ns("inet")
            self._build_core()
            for _ in range(clients):
                self.add_client()
            self.settle()
        except BaseException:
            self.close()
            raise

    def addr6(self, subnet: int, host: int) -> str:
        """``U:<subnet>::<host>`` of this run's ULA, canonical (as ``ip`` and ``ss`` print it)."""
        return str(self.ula.network_address + (subnet << 64) + host)

    # -- construction -------------------------------------------------------------------------

    def _add_ns(self, role: str) -> Netns:
        ns = Netns(f"{self.tag}-{role}", role)
        # Recorded first: if this process dies right after `ip netns add`, a later run still
        # knows the namespace was ours.
        self._record.set(ns.name, None)
        # Its resolv.conf before the namespace: `ip netns exec` must never find the host's
        # (see NETNS_ETC).
        etc = ns.resolv_conf.parent
        created = not etc.exists()
        try:
            etc.mkdir(parents=True, exist_ok=True)
            ns.resolv_conf.write_text(NS_RESOLV_CONF.format(name=ns.name))
            run(["ip", "netns", "add", ns.name])
        except BaseException:
            # Not created (or the name was taken): it was never ours to remove.
            self._record.drop(ns.name)
            if created:
                shutil.rmtree(etc, ignore_errors=True)
            raise
        self.namespaces.append(ns)
        self._record.set(ns.name, netns_inode(ns.name))
        # No IPv6 duplicate address detection: addresses are final at once, snapshots stable.
        for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
            ns.set_sysctl(key, "0")
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def _build_core(self) -> None:
        srv, inet = self.server, self.inet
        self._veth(srv, "wan0", inet, "eth0")
        srv.run(["ip", "addr", "add", f"{self.wan}.1/24", "dev", "wan0"])
        srv.run(["ip", "link", "set", "wan0", "up"])
        inet.run(["ip", "addr", "add", f"{self.wan}.2/24", "dev", "eth0"])
        inet.run(["ip", "link", "set", "eth0", "up"])
        # The LAN is a bridge so that several clients share one subnet with different IPs.
        srv.run(["ip", "link", "add", "lan0", "type", "bridge", "forward_delay", "0"])
        # A bridge without an address of its own takes the lowest of its ports' and changes it
        # as ports join: a client that resolved the old one would be cut off until its ARP
        # entry expires (half a minute), and its frames be dropped meanwhile.
        srv.run(["ip", "link", "set", "dev", "lan0", "address", "02:00:00:00:01:01"])
        srv.run(["ip", "addr", "add", f"{self.lan}.1/24", "dev", "lan0"])
        srv.run(["ip", "link", "set", "lan0", "up"])
        srv.run(["ip", "route", "add", "default", "via", f"{self.wan}.2"])
        srv.set_sysctl("net.ipv4.ip_forward", "0")
        srv.ip = f"{self.lan}.1"
        inet.ip = f"{self.wan}.2"
        # IPv6 on the same links (the bridge gets a carrier, and so its address and prefix
        # route, once the first client port joins it).
        srv.run(["ip", "-6", "addr", "add", f"{self.addr6(2, 1)}/64", "dev", "wan0"])
        inet.run(["ip", "-6", "addr", "add", f"{self.addr6(2, 2)}/64", "dev", "eth0"])
        srv.run(["ip", "-6", "addr", "add", f"{self.addr6(1, 1)}/64", "dev", "lan0"])
        srv.set_sysctl("net.ipv6.conf.all.forwarding", "0")
        self._wait_ipv6_ready(srv, "wan0")
        srv.run(["ip", "-6", "route", "add", "default", "via", self.addr6(2, 2)])
        srv.ip6 = self.addr6(1, 1)
        inet.ip6 = self.addr6(2, 2)

    @staticmethod
    def _veth(a: Netns, name_a: str, b: Netns, name_b: str) -> None:
        # Both ends are created directly inside their namespaces: no name in the root namespace.
        a.run(
            ["ip", "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", b.name]
        )

    def add_client(self) -> Netns:
        """Another client host on the server's LAN: 10.X.1.2, 10.X.1.3, ..."""
        n = len(self.clients) + 1
        ns = self._add_ns(f"cli{n}")
        port = f"c{n}"
        self._veth(self.server, port, ns, "eth0")
        self.server.run(["ip", "link", "set", port, "master", "lan0"])
        self.server.run(["ip", "link", "set", port, "up"])
        ns.ip = f"{self.lan}.{n + 1}"
        ns.run(["ip", "addr", "add", f"{ns.ip}/24", "dev", "eth0"])
        ns.run(["ip", "link", "set", "eth0", "up"])
        ns.run(["ip", "route", "add", "default", "via", f"{self.lan}.1"])
        ns.ip6 = self.addr6(1, n + 1)
        ns.run(["ip", "-6", "addr", "add", f"{ns.ip6}/64", "dev", "eth0"])
        self._wait_ipv6_ready(ns, "eth0")
        self._wait_ipv6_ready(self.server, "lan0")
        ns.run(["ip", "-6", "route", "add", "default", "via", self.addr6(1, 1)])
        self.clients.append(ns)
        wait_until(lambda: ns.ping_ok(self.server.ip or ""), 10, f"LAN link {ns.name} -> server")
        assert self.server.ip6
        wait_until(
            lambda: ns.ping_ok(self.server.ip6 or ""), 10, f"IPv6 LAN link {ns.name} -> server"
        )
        self.settle()
        return ns

    @staticmethod
    def _wait_ipv6_ready(ns: Netns, dev: str, timeout: float = 10) -> None:
        """Wait until no IPv6 address of dev in ns is tentative (or failed DAD) and its global
        addresses have their prefix routes: only then can a route use them as gateway."""

        def ready() -> bool:
            if _ipv6_not_ready(ns, dev):
                return False
            show = ["ip", "-j", "-6", "addr", "show", "dev", dev, "scope", "global"]
            addrs = json.loads(ns.run(show).stdout)
            routes = ns.run(["ip", "-6", "route", "show"]).stdout
            for link in addrs:
                for a in link.get("addr_info", []):
                    if "local" not in a:  # `ip -j` lists filtered-out addresses as {}
                        continue
                    net = ipaddress.IPv6Network(f"{a['local']}/{a['prefixlen']}", strict=False)
                    if f"{net} dev {link['ifname']}" not in routes:
                        return False
            return True

        wait_until(ready, timeout, f"usable IPv6 addresses on {dev} in {ns.name}")

    def settle(self, timeout: float = 10) -> None:
        """Wait until every link that is up has its IPv6 link-local address, and no IPv6
        address is tentative.

        The kernel adds those (and their routes) asynchronously; a snapshot taken before they
        appear would differ from a later one for reasons that have nothing to do with dsvpn.
        """

        def settled() -> bool:
            for ns in self.namespaces:
                if _ipv6_not_ready(ns):
                    return False
                links = json.loads(ns.run(["ip", "-j", "link", "show", "up"]).stdout)
                addrs = json.loads(
                    ns.run(["ip", "-j", "-6", "addr", "show", "scope", "link"]).stdout
                )
                with_ll = {
                    a["ifname"] for a in addrs if any("local" in i for i in a.get("addr_info", []))
                }
                if any(ln["ifname"] not in with_ll for ln in links if ln["ifname"] != "lo"):
                    return False
            return True

        wait_until(settled, timeout, "IPv6 link-local addresses on every link, none tentative")

    @property
    def client(self) -> Netns:
        return self.clients[0]

    @property
    def server_ext_ip(self) -> str:
        """The address the inet host sees when the server NATs a client."""
        return f"{self.wan}.1"

    @property
    def server_ext_ip6(self) -> str:
        """The server's IPv6 address on the link to the inet host."""
        return self.addr6(2, 1)

    def snapshots(self) -> dict[str, dict[str, str]]:
        """:func:`snapshot` of every namespace, by role."""
        return {ns.role: snapshot(ns) for ns in self.namespaces}

    def changes(self, before: dict[str, dict[str, str]], ignore: Iterable[str] = ()) -> str:
        """What differs from ``before`` (:meth:`snapshots`), per namespace; '' if nothing."""
        diffs = {
            ns.role: d
            for ns in self.namespaces
            if (d := diff_snapshots(before[ns.role], snapshot(ns), ignore))
        }
        return "\n".join(f"[{role}]\n{d}" for role, d in diffs.items())

    # -- files and processes ------------------------------------------------------------------

    def write_key(self, name: str = "key", data: bytes | None = None) -> Path:
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32) if data is None else data)
        return path

    def env(self, ns: Netns) -> dict[str, str]:
        """Environment of a process in ns (dsvpn's records carry their network namespace, so
        every namespace shares the one run directory, as separate hosts would not mind)."""
        return python_env()

    def start(
        self, ns: Netns, argv: Sequence[str], name: str, env: dict[str, str] | None = None
    ) -> Proc:
        """Start a process in ns (``env``: extra variables); its output goes to
        workdir/<name>.log."""
        log = self.workdir / f"{name}.log"
        shown = " ".join("<script>" if "\n" in a else a for a in argv)
        with open(log, "ab") as f:
            f.write(f"=== {time.strftime('%H:%M:%S')} [{ns.role}] {shown}\n".encode())
        proc = Proc(name, ns, argv, log, env={**self.env(ns), **(env or {})})
        self.procs.append(proc)
        return proc

    def notify_listener(self, name: str) -> NotifyListener:
        """A notification socket in the workdir, closed with the testbed."""
        listener = NotifyListener(self.workdir / f"{name}.notify")
        self._listeners.append(listener)
        return listener

    def run_in(self, ns: Netns, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a short command in ns with the testbed's environment."""
        kw.setdefault("env", self.env(ns))
        return ns.run(argv, **kw)

    def start_script(self, ns: Netns, script: str, args: Sequence[Any], name: str) -> Proc:
        return self.start(ns, [sys.executable, "-c", script, *map(str, args)], name)

    def start_server(
        self,
        impl: Impl,
        key: Path,
        *,
        name: str = "server",
        port: int = DEFAULT_PORT,
        wait: bool = True,
        env: dict[str, str] | None = None,
        **kw: Any,
    ) -> Proc:
        """Start a dsvpn server in the server namespace; wait until its port listens."""
        kw.setdefault("extra", ("-v",))
        proc = self.start(self.server, impl.server_argv(key, port=port, **kw), name, env)
        if wait:
            self.wait_listening(proc, port)
        return proc

    def start_client(
        self,
        impl: Impl,
        key: Path,
        *,
        ns: Netns | None = None,
        name: str = "client",
        port: int = DEFAULT_PORT,
        server_ip: str | None = None,
        env: dict[str, str] | None = None,
        **kw: Any,
    ) -> Proc:
        """Start a client connecting to ``server_ip`` (the server's LAN IPv4 address unless
        given; ``tb.server.ip6`` makes the tunnel's own connection IPv6)."""
        kw.setdefault("extra", ("-v",))
        server_ip = server_ip or self.server.ip
        assert server_ip
        ns = ns or self.client
        return self.start(ns, impl.client_argv(key, server_ip, port=port, **kw), name, env)

    def tunnel_up(
        self,
        impl: Impl,
        key: Path,
        *,
        client_impl: Impl | None = None,
        ns: Netns | None = None,
        port: int = DEFAULT_PORT,
        net: str | None = None,
        tun: str = "auto",
        suffix: str = "",
        timeout: float = 30,
        server_ip: str | None = None,
        listen: str = "auto",
        extra: Sequence[str] = ("-v",),
    ) -> tuple[Proc, Proc]:
        """Start a server and a client; return once the client pings the server's tun address.

        ``net`` ("192.168.193") selects the tunnel addresses net.254 (server) and net.1 (client);
        None leaves them to the implementation's defaults (192.168.192.254 and .1).
        ``server_ip`` is the address the client connects to (default: the server's LAN IPv4),
        ``listen`` the server's listen address (default: all, dual-stack), ``extra`` the
        options of both (``--firewall nft``, say).
        """
        ns = ns or self.client
        addrs: dict[str, Any] = {}
        if net:
            addrs = {"local": f"{net}.254", "remote": f"{net}.1"}
        server = self.start_server(
            impl,
            key,
            port=port,
            tun=tun,
            listen=listen,
            name=f"server{suffix}",
            extra=extra,
            **addrs,
        )
        if net:
            addrs = {"local": f"{net}.1", "remote": f"{net}.254"}
        client = self.start_client(
            client_impl or impl,
            key,
            ns=ns,
            port=port,
            tun=tun,
            name=f"client{suffix}",
            server_ip=server_ip,
            extra=extra,
            **addrs,
        )
        if not (client_impl or impl).reference:
            # The ping alone proves little: until the server's anti-spoofing rule is in, its
            # tun address answers over the LAN too. Ours says "session up" only once its
            # whole plan is applied and the tunnel carries traffic.
            self.wait_log(client, SESSION_UP, timeout)
        ns.wait_ping(
            f"{net or '192.168.192'}.254",
            timeout,
            procs=(server, client),
            what=f"ping {ns.role} -> server tun address through the tunnel",
        )
        return server, client

    def wait_listening(self, proc: Proc, port: int, timeout: float = 15) -> None:
        def listening() -> bool:
            if not proc.alive():
                raise TestbedError(f"{proc.name} exited ({proc.returncode}):\n{proc.log_tail()}")
            out = proc.ns.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
            return bool(out.strip())

        wait_until(listening, timeout, f"{proc.name} listening on port {port}")

    def wait_log(self, proc: Proc, pattern: str, timeout: float = 15) -> str:
        """Wait for a regular expression in a process's log; return the matching line."""
        rx = re.compile(pattern, re.IGNORECASE)

        def found() -> str | None:
            for line in proc.log().splitlines():
                if rx.search(line):
                    return line
            return None

        return str(wait_until(found, timeout, f"/{pattern}/ in {proc.name} log"))

    def transfer(
        self,
        src: Netns,
        dst: Netns,
        dst_ip: str,
        nbytes: int,
        port: int = 5201,
        timeout: float = 180,
    ) -> dict[str, Any]:
        """Send nbytes src -> dst_ip (IPv4 or IPv6) over TCP; return the receiver's and
        sender's reports."""
        bind = "::" if ":" in dst_ip else "0.0.0.0"
        rx = self.start_script(dst, RECEIVER, [port, bind], f"receiver-{port}")
        try:
            # The port, not the log: a log of an earlier transfer on this port says it too.
            self.wait_listening(rx, port, 10)
            tx = src.run(
                [sys.executable, "-c", SENDER, dst_ip, str(port), str(nbytes)], timeout=timeout
            )
            rx.wait(30)
            received = json.loads(rx.log().splitlines()[-1])
        finally:
            if rx.alive():
                rx.kill()
        return {"sent": json.loads(tx.stdout), "received": received}

    def check_transfer_through_vpn(self, src: Netns, nbytes: int, ipv6: bool = False) -> None:
        """src sends nbytes to the far host (its IPv6 address if ``ipv6``): the bytes and their
        sha256 match at both ends, the far host sees the server's external address (NAT), and
        the server's tun carried the bytes (the data really went through the tunnel).
        AssertionError otherwise."""
        dest = (self.inet.ip6 if ipv6 else self.inet.ip) or ""
        result = self.transfer(src, self.inet, dest, nbytes)
        sent, received = result["sent"], result["received"]
        assert received["bytes"] == sent["bytes"] == nbytes, result
        assert received["sha256"] == sent["sha256"] == sent["echo"], result
        nat = self.server_ext_ip6 if ipv6 else self.server_ext_ip
        assert ipaddress.ip_address(received["peer"]) == ipaddress.ip_address(nat), result
        tun = self.server.tun_links()
        assert len(tun) == 1, tun
        assert self.server.link_stats(tun[0])["rx_bytes"] >= nbytes

    def close(self) -> None:
        """Stop every started process (by PID) and delete the namespaces. Idempotent."""
        for proc in reversed(self.procs):
            if proc.alive():
                with contextlib.suppress(Exception):
                    proc.kill()
        self.procs.clear()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for ns in reversed(self.namespaces):
            # Anything still inside our own namespace was started by this testbed.
            for pid in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._drop_dsvpn_records(ns)
            run(["ip", "netns", "del", ns.name], check=False)
            if netns_inode(ns.name) is None:
                shutil.rmtree(ns.resolv_conf.parent, ignore_errors=True)
                self._record.drop(ns.name)  # kept otherwise, for a later sweep to retry
        self.namespaces.clear()
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if no other testbed (or the admin) uses it
        if self._own_workdir and not os.environ.get("DSVPN_KEEP_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _drop_dsvpn_records(self, ns: Netns) -> None:
        """Let dsvpn undo and forget instances killed in ns before ns goes away.

        Their records in the shared run directory name ns by its inode, which a later
        namespace may reuse; `dsvpn cleanup` inside ns removes them (and undoes rules that
        would vanish with ns anyway).
        """
        inode = netns_inode(ns.name)
        if inode is None or not _dsvpn_records_name(f"net:[{inode}]"):
            return
        argv = [sys.executable, "-m", "dsvpn", "cleanup"]
        with contextlib.suppress(TestbedError):
            ns.run(argv, check=False, timeout=60, env=python_env())

    def logs(self) -> str:
        """Every process log of this testbed, for a failure report."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-60:]
            parts.append(f"----- {path.name}\n" + "\n".join(text))
        for ns in (self.server, *self.clients):
            parts.append(f"----- sockets and TCP counters in {ns.name}\n" + _net_state(ns))
        return "\n".join(parts)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _net_state(ns: Netns) -> str:
    """What a failure report needs to tell a lost connection from a stuck process: the TCP
    sockets with their queues, and the kernel's TCP drop and failure counters."""
    lines = []
    for argv in (["ss", "-tanoi"], ["nstat", "-asz"]):
        try:
            out = ns.run(argv, check=False, timeout=10).stdout
        except (OSError, TestbedError) as exc:
            out = f"{argv[0]}: {exc}"
        if argv[0] == "nstat":
            keep = ("Drop", "Fail", "Overflow", "Retrans", "Reset", "Defer", "Listen")
            out = "\n".join(
                line for line in out.splitlines()
                if any(word in line for word in keep) and line.split()[1:2] != ["0"]
            )  # fmt: skip
        lines.append(out.rstrip())
    return "\n".join(lines)


def missing_prerequisites() -> str | None:
    """Why the testbed cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tun, iptables)"
    for tool in ("ip", "ss", "iptables", "iptables-save", "ip6tables-save", "sysctl"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None
