"""Config: everything one dsvpn instance needs, resolved. No "auto" survives in here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["server", "client"]
# Linux: the tool that installs the packet filter rules (see platform/firewall.py).
FirewallName = Literal["iptables", "nft"]

# Constants of the wire protocol and of the reference's defaults (protocol.md section 8).
DEFAULT_PORT = 443
DEFAULT_SERVER_TUN_IP = "192.168.192.254"
DEFAULT_CLIENT_TUN_IP = "192.168.192.1"
DEFAULT_MTU = 9000
NETBSD_MTU = 1500
ROUTING_TABLE = 42069  # also the SO_MARK of the tunnel's own TCP socket
NAT64_PREFIX = "64:ff9b::"  # IPv6 tunnel address = prefix + the IPv4 tunnel address


def tun_ip6(ipv4: str) -> str:
    """The IPv6 tunnel address the reference derives from an IPv4 one (64:ff9b::a.b.c.d)."""
    return NAT64_PREFIX + ipv4


@dataclass(frozen=True)
class Config:
    mode: Mode
    key_file: str
    # server: address to listen on (None = every IPv4 and IPv6 address);
    # client: the server's name or address as given on the command line.
    server: str | None
    port: int
    tun_name: str | None  # None = let the OS pick (tun0, utun3, ...)
    local_tun_ip: str
    remote_tun_ip: str
    # server: the external IP whose interface carries NATed traffic;
    # client: the gateway towards the server. None = discover from the default route.
    ext_ip: str | None
    mtu: int = DEFAULT_MTU
    # client: the server's address after resolving ``server`` once at start (as the reference).
    server_ip: str | None = None
    # Linux: iptables or nft; None = iptables when installed, else nft.
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
