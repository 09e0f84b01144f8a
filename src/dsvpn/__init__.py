"""dsvpn: Dead Simple VPN, wire-compatible with C DSVPN 0.1.5."""

__version__ = "0.2.0"
PROTOCOL_VERSION = "0.1.5"  # the C DSVPN release whose wire format we speak
