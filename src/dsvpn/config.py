"""Config: everything one dsvpn instance needs, resolved; one type per mode. No "auto" survives
in here: None means "discover it" where a field allows it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import ClassVar, Literal

Mode = Literal["server", "client"]
# Linux: the tool that installs the packet filter rules (see platform/firewall.py).
FirewallName = Literal["iptables", "nft"]

# Constants of the wire protocol and of the reference's defaults.
DEFAULT_PORT = 443
DEFAULT_SERVER_TUN_IP = "192.168.192.254"
DEFAULT_CLIENT_TUN_IP = "192.168.192.1"
DEFAULT_MTU = 9000
NETBSD_MTU = 1500
ROUTING_TABLE = 42069  # also the SO_MARK of the tunnel's own TCP socket
ALL_IPV4 = "0.0.0.0/0"
ALL_IPV6 = "::/0"
NAT64_PREFIX = "64:ff9b::"  # IPv6 tunnel address = prefix + the IPv4 tunnel address
# A server of a peers file runs at most this many workers (dsvpn.workers).
MAX_WORKERS = 64

# The prefix lengths of a pool of clients (dsvpn.peers): a /16 holds 65534, a /30 two.
POOL_PREFIXES = range(16, 31)


def tun_ip6(ipv4: str) -> str:
    """The IPv6 tunnel address the reference derives from an IPv4 one (64:ff9b::a.b.c.d)."""
    return NAT64_PREFIX + ipv4


@dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """What both ends have."""

    mode: ClassVar[Mode]
    key_file: str
    port: int = DEFAULT_PORT
    tun_name: str | None = None  # None = let the OS pick (tun0, utun3, ...)
    local_tun_ip: str
    remote_tun_ip: str
    # This OS's tun MTU: Backend.prepare sets it, nothing else does.
    mtu: int = DEFAULT_MTU
    # Linux: the packet filter tool (server NAT, the anti-spoof rule of both ends);
    # None = iptables when installed, else nft.
    firewall: FirewallName | None = None

    @property
    def is_server(self) -> bool:
        return self.mode == "server"

    @property
    def local_tun_ip6(self) -> str:
        return tun_ip6(self.local_tun_ip)

    @property
    def remote_tun_ip6(self) -> str:
        return tun_ip6(self.remote_tun_ip)


@dataclass(frozen=True, kw_only=True)
class ServerConfig(BaseConfig):
    mode: ClassVar[Mode] = "server"
    local_tun_ip: str = DEFAULT_SERVER_TUN_IP
    remote_tun_ip: str = DEFAULT_CLIENT_TUN_IP
    listen_ip: str | None = None  # None = every IPv4 and IPv6 address
    # The address whose interface carries the clients' NATed traffic; None = the interface of
    # the default route.
    external_ip: str | None = None
    # Several clients (dsvpn.peers): key_file names a peers file, whose absolute path this is,
    # and pool is the clients' address range ("192.168.192.0/24"); remote_tun_ip is then the
    # pool's network address. None: one client at remote_tun_ip, as the reference.
    peers_file: str | None = None
    pool: str | None = None
    # Refuse the classic handshake: only clients with --pfs (docs/protocol.md, Extensions).
    require_pfs: bool = False
    # --workers: threads sharing the clients of a peers file (dsvpn.workers); None: one per CPU.
    workers: int | None = None


@dataclass(frozen=True)
class ClientNetwork:
    """The client's choices about what the tunnel carries and what happens around it.

    Prefixes are normalised CIDR strings. The defaults are the reference's behaviour:
    everything through the tunnel, the host's DNS untouched, no firewall of our own.
    """

    routes: tuple[str, ...] = ()  # --route: only these through the tunnel (empty: everything)
    excludes: tuple[str, ...] = ()  # --exclude: these bypass it
    no_routes: bool = False  # --no-routes: the tunnel routes nothing
    kill_switch: bool = False  # --kill-switch
    dns: tuple[str, ...] = ()  # --dns: resolvers used (through the tunnel) while it is up
    # Found on the host at start (like ClientConfig.server_ip), and again when it changes
    # networks; None in a plan made from the command line alone, which shows placeholders.
    local_nets: tuple[str, ...] | None = None  # the subnets of this host's interfaces
    dns_via: str = ""  # who manages DNS: resolved, resolvconf, openresolv, file, scutil
    dns_service: str = ""  # macOS: the primary network service whose DNS is replaced

    @property
    def full(self) -> bool:
        """Everything goes through the tunnel (no --route, no --no-routes)."""
        return not self.routes and not self.no_routes

    def carried(self) -> tuple[str, ...]:
        """The prefixes the tunnel carries: what fail-closed routes and the kill switch cover.
        With --route, the --dns resolvers are added so that their queries go through it."""
        if self.no_routes:
            return ()
        if self.full:
            return ALL_IPV4, ALL_IPV6
        nets = [ipaddress.ip_network(r) for r in self.routes]
        extra = []
        for server in self.dns:
            host = ipaddress.ip_address(server)
            if not any(host.version == n.version and host in n for n in nets):
                extra.append(str(ipaddress.ip_network(host)))
        return (*self.routes, *extra)


@dataclass(frozen=True, kw_only=True)
class ClientConfig(BaseConfig):
    mode: ClassVar[Mode] = "client"
    local_tun_ip: str = DEFAULT_CLIENT_TUN_IP
    remote_tun_ip: str = DEFAULT_SERVER_TUN_IP
    server: str  # the server's name or address, as given
    # The server's address: `server` resolved once at start, as the reference does.
    server_ip: str | None = None
    gateway_ip: str | None = None  # towards the server; None = the default route's gateway
    # The forward-secret handshake, never the classic one (docs/protocol.md, Extensions).
    pfs: bool = False
    # --route, --exclude, --no-routes, --kill-switch, --dns.
    network: ClientNetwork = field(default_factory=ClientNetwork)


Config = ServerConfig | ClientConfig
