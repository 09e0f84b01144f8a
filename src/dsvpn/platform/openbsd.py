"""OpenBSD: /dev/tunN with a 4-byte address-family header; NAT is left to pf."""

from __future__ import annotations

from dsvpn.config import Config, ServerConfig
from dsvpn.platform._common import NetInfo, TunFraming
from dsvpn.platform._ifconfig import IfconfigBackend


class OpenBSDBackend(IfconfigBackend):
    name = "openbsd"
    framing = TunFraming(header=True, af_inet=2, af_inet6=24)
    serves_pools = True

    def notes(self, cfg: Config, tun: str, net: NetInfo) -> list[str]:
        if not isinstance(cfg, ServerConfig):
            return []
        clients = cfg.pool or cfg.remote_tun_ip  # a peers file's pool, or the one client
        return [
            "NAT is not set up automatically on OpenBSD. Add this rule to /etc/pf.conf:",
            f"    pass out from {clients} nat-to egress",
            "and load it with: pfctl -f /etc/pf.conf",
        ]
