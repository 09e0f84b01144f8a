"""FreeBSD, NetBSD and DragonFly: /dev/tunN without a header. The server forwards but does
not set up NAT (the reference has no rules for these systems either)."""

from __future__ import annotations

from dsvpn.config import NETBSD_MTU, Config, ServerConfig
from dsvpn.platform._common import NetInfo, TunFraming
from dsvpn.platform._ifconfig import IfconfigBackend


class _BSDBackend(IfconfigBackend):
    pretty: str
    firewall: str

    def notes(self, cfg: Config, tun: str, net: NetInfo) -> list[str]:
        if not isinstance(cfg, ServerConfig):
            return []
        return [
            f"NAT is not configured on {self.pretty}: clients reach this host only. "
            f"To let them out, NAT {cfg.remote_tun_ip} on {net.ext_if} with {self.firewall}."
        ]


class FreeBSDBackend(_BSDBackend):
    name = "freebsd"
    pretty = "FreeBSD"
    firewall = "pf or ipfw"
    framing = TunFraming(header=False, af_inet=2, af_inet6=28)


class NetBSDBackend(_BSDBackend):
    name = "netbsd"
    pretty = "NetBSD"
    firewall = "npf"
    framing = TunFraming(header=False, af_inet=2, af_inet6=24)
    default_mtu = NETBSD_MTU


class DragonFlyBackend(_BSDBackend):
    name = "dragonfly"
    pretty = "DragonFly"
    firewall = "pf or ipfw"
    framing = TunFraming(header=False, af_inet=2, af_inet6=28)
