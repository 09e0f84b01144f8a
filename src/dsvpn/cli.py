"""Command line: DSVPN's positional syntax, our options, one-line errors and exit codes."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from dsvpn import PROTOCOL_VERSION, __version__
from dsvpn.config import (
    DEFAULT_CLIENT_TUN_IP,
    DEFAULT_PORT,
    DEFAULT_SERVER_TUN_IP,
    ClientConfig,
    Config,
    FirewallName,
    ServerConfig,
)
from dsvpn.errors import DsvpnError, UsageError

USAGE = """\
usage:
  dsvpn server <key file> [<listen ip>|auto] [<port>|auto] [<tun>|auto]
               [<local tun ip>|auto] [<remote tun ip>|auto] [<external ip>|auto]
  dsvpn client <key file> <server ip or name> [<port>|auto] [<tun>|auto]
               [<local tun ip>|auto] [<remote tun ip>|auto] [<gateway ip>|auto]
  dsvpn keygen <key file>      write a new random 32-byte key (mode 0600)
  dsvpn peer add <peers file> <name> [<tun ip>]
                               a client of its own for a server of several clients: a new
                               key beside the peers file, and the client's command line
  dsvpn peer remove <peers file> <name> | dsvpn peer list <peers file>
  dsvpn cleanup                remove what crashed dsvpn instances left behind
  dsvpn service install <name> [--print] -- server|client <arguments>
                               run dsvpn as a system service (see dsvpn service --help)
  dsvpn service remove <name>  stop that service and remove what install wrote
  dsvpn selftest               (as root) a tunnel between namespaces of its own, then a report
  dsvpn --version | --help

options (anywhere after the mode word):
  -v, --verbose        more detail (counters every few seconds)
  -q, --quiet          errors and warnings only
  --dry-run            print every command it would run to set up and to undo, change nothing
  --platform NAME      with --dry-run: the plan of another OS
                       (linux, macos, openbsd, freebsd, netbsd, dragonfly)
  --firewall NAME      Linux: set the packet filter rules with iptables or nft (one table
                       of its own); auto (the default): iptables when installed, else nft

A server's <key file> may name a peers file (see dsvpn peer --help) instead: it then serves
several clients, each with a key and a tunnel address of its own; SIGHUP re-reads the file.
Trailing "auto" arguments may be left out. Defaults: listen on every address, port 443,
server tun IP 192.168.192.254, client tun IP 192.168.192.1, IPv6 64:ff9b::<tun ip>,
MTU 9000 (1500 on NetBSD). A tun name has at most 15 characters (macOS: utunN, BSD: tunN).

exit status:
  0 success, 1 other error, 2 usage error, 69 missing prerequisite (tool, tun device),
  75 conflict with a running dsvpn, 77 permission denied (not root), 130 interrupted

example:
  dsvpn keygen vpn.key                 (copy vpn.key to the other host, e.g. with scp)
  dsvpn server vpn.key                 (as root, on the server)
  dsvpn client vpn.key 203.0.113.7     (as root, on the client: all traffic goes through it)
"""

MAX_POSITIONALS = 7


@dataclass(frozen=True)
class Invocation:
    command: str  # server, client, keygen, cleanup, version, help
    config: Config | None = None
    path: str | None = None  # keygen's file
    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose
    dry_run: bool = False
    platform: str | None = None


def _auto(value: str | None) -> str | None:
    return None if value is None or value == "auto" else value


def _port(value: str | None) -> int:
    value = _auto(value)
    if value is None:
        return DEFAULT_PORT
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise UsageError(f"invalid port {value!r}: expected a number from 1 to 65535")
    return int(value)


def _ipv4(value: str | None, default: str, what: str) -> str:
    value = _auto(value)
    if value is None:
        return default
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        # The IPv6 tunnel address is derived from the IPv4 one, so the tunnel needs IPv4 here.
        raise UsageError(f"invalid {what} {value!r}: expected an IPv4 address") from None


def _ip(value: str | None, what: str) -> str | None:
    value = _auto(value)
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise UsageError(f"invalid {what} {value!r}: expected an IP address") from None


def _tun(value: str | None) -> str | None:
    value = _auto(value)
    if value is None:
        return None
    # IFNAMSIZ is 16 including the NUL; '/' and spaces are never valid interface names.
    if not value or len(value) > 15 or any(c in value for c in "/ \t\n:") or value in {".", ".."}:
        raise UsageError(
            f"invalid tun name {value!r}: at most 15 characters, without '/', ':' or spaces"
        )
    return value


def _split_options(args: Sequence[str]) -> tuple[list[str], int, bool, str | None]:
    positionals: list[str] = []
    verbosity, dry_run, platform = 0, False, None
    it = iter(args)
    for arg in it:
        if arg in ("-v", "--verbose"):
            verbosity = 1
        elif arg in ("-q", "--quiet"):
            verbosity = -1
        elif arg == "--dry-run":
            dry_run = True
        elif arg == "--platform":
            platform = next(it, None)
            if platform is None:
                raise UsageError("--platform needs a name")
        elif arg.startswith("--platform="):
            platform = arg.split("=", 1)[1]
        elif arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            raise UsageError(f"unknown option {arg!r} (see dsvpn --help)")
        else:
            positionals.append(arg)
    return positionals, verbosity, dry_run, platform


def _is_number(arg: str) -> bool:
    return arg[1:].isdigit()


# -- --firewall (Linux), taken out of the arguments before the others are read ---------------

FIREWALL_CHOICES = ("iptables", "nft", "auto")


def _take_firewall(args: Sequence[str]) -> tuple[list[str], str | None]:
    """(the other arguments, the last --firewall value given or None)."""
    rest: list[str] = []
    given: str | None = None
    it = iter(args)
    for arg in it:
        if arg == "--firewall":
            value = next(it, None)
            if value is None:
                raise UsageError("--firewall needs iptables, nft or auto")
        elif arg.startswith("--firewall="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        if value not in FIREWALL_CHOICES:
            raise UsageError(f"invalid --firewall {value!r}: expected iptables, nft or auto")
        given = value
    return rest, given


def _firewall(given: str | None) -> FirewallName | None:
    if given == "iptables":
        return "iptables"
    if given == "nft":
        return "nft"
    return None  # auto


def parse_args(argv: Sequence[str]) -> Invocation:
    """argv (without the program name) -> Invocation. Raises UsageError; resolves no names."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        return Invocation("help")
    if argv[0] in ("-V", "--version", "version"):
        return Invocation("version")
    command, rest = argv[0], argv[1:]
    if command not in ("server", "client", "keygen", "cleanup"):
        raise UsageError(
            f"unknown mode {command!r}: expected server, client, keygen, peer or cleanup"
        )
    if "-h" in rest or "--help" in rest:
        return Invocation("help")
    rest, firewall = _take_firewall(rest)
    args, verbosity, dry_run, platform = _split_options(rest)
    if platform is not None and not dry_run:
        raise UsageError("--platform only goes with --dry-run")
    if firewall is not None and command not in ("server", "client"):
        raise UsageError("--firewall only goes with server or client")

    if command == "keygen":
        if len(args) != 1:
            raise UsageError("usage: dsvpn keygen <key file>")
        return Invocation("keygen", path=args[0], verbosity=verbosity)
    if command == "cleanup":
        if args:
            raise UsageError("usage: dsvpn cleanup (it takes no arguments)")
        return Invocation("cleanup", verbosity=verbosity)

    if not args:
        raise UsageError(f"usage: dsvpn {command} <key file> ... (see dsvpn --help)")
    if len(args) > MAX_POSITIONALS:
        raise UsageError(f"too many arguments for {command}: {' '.join(args[MAX_POSITIONALS:])}")
    key_file = args[0]
    given: list[str | None] = [*args[1:], *[None] * (MAX_POSITIONALS - len(args))]
    address, port, tun, local_ip, remote_ip, last_ip = given
    cfg: Config
    if command == "server":
        # Checked in the order of the command line: the first bad argument is reported.
        cfg = ServerConfig(
            key_file=key_file,
            listen_ip=_ip(address, "listen ip"),  # an address of this host, not a name
            port=_port(port),
            tun_name=_tun(tun),
            local_tun_ip=_ipv4(local_ip, DEFAULT_SERVER_TUN_IP, "local tun ip"),
            remote_tun_ip=_ipv4(remote_ip, DEFAULT_CLIENT_TUN_IP, "remote tun ip"),
            external_ip=_ip(last_ip, "external ip"),
            firewall=_firewall(firewall),
        )
    else:
        server = _auto(address)
        if server is None:
            raise UsageError("the client needs the server's address or name")
        cfg = ClientConfig(
            key_file=key_file,
            server=server,
            port=_port(port),
            tun_name=_tun(tun),
            local_tun_ip=_ipv4(local_ip, DEFAULT_CLIENT_TUN_IP, "local tun ip"),
            remote_tun_ip=_ipv4(remote_ip, DEFAULT_SERVER_TUN_IP, "remote tun ip"),
            gateway_ip=_ip(last_ip, "gateway ip"),
            firewall=_firewall(firewall),
        )
    if cfg.local_tun_ip == cfg.remote_tun_ip:
        raise UsageError(f"the local and remote tun addresses are both {cfg.local_tun_ip}")
    if isinstance(cfg, ServerConfig):
        given_local = cfg.local_tun_ip if _auto(local_ip) is not None else None
        cfg = _with_peers(cfg, given_local, _auto(remote_ip))
    return Invocation(command, cfg, None, verbosity, dry_run, platform)


def _with_peers(cfg: ServerConfig, local_ip: str | None, remote_ip: str | None) -> ServerConfig:
    """A server whose key file is a peers file (dsvpn.peers) serves its pool: the file gives
    the server's tunnel address and the clients'. A plain key file leaves cfg as it is."""
    from dsvpn import peers

    if not peers.looks_like_peers_file(cfg.key_file):
        return cfg
    loaded = peers.load(cfg.key_file)
    if local_ip is not None and local_ip != loaded.server:
        raise UsageError(
            f"the peers file {cfg.key_file} gives the server the tunnel address "
            f"{loaded.server}, not {local_ip}: leave <local tun ip> auto, or change its pool line"
        )
    if remote_ip is not None:
        raise UsageError(
            f"the clients' tunnel addresses come from the peers file {cfg.key_file}: "
            "leave <remote tun ip> auto"
        )
    return dataclasses.replace(
        cfg,
        local_tun_ip=loaded.server,
        remote_tun_ip=str(loaded.pool.network_address),
        peers_file=loaded.path,
        pool=str(loaded.pool),
    )


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("dsvpn")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _dispatch(inv: Invocation) -> int:
    # Imported here so that --help, --version and usage errors never pay for the compiled core.
    if inv.command == "help":
        sys.stdout.write(USAGE)
        return 0
    if inv.command == "version":
        print(f"dsvpn {__version__} (wire protocol of DSVPN {PROTOCOL_VERSION})")
        return 0
    _setup_logging(inv.verbosity)
    if inv.command == "keygen":
        from dsvpn.keys import generate_key_file

        assert inv.path is not None
        generate_key_file(inv.path)
        logging.getLogger("dsvpn").info("wrote a new key to %s (mode 0600)", inv.path)
        return 0
    from dsvpn import tunnel

    if inv.command == "cleanup":
        return tunnel.cleanup()
    assert inv.config is not None
    if inv.dry_run:
        return tunnel.dry_run(inv.config, inv.platform)
    return tunnel.run(inv.config)


def _operate(args: Sequence[str]) -> int:
    """`dsvpn service|selftest|peer ...`: each module parses its own arguments."""
    if args[0] == "service":
        from dsvpn import service

        return service.main(args[1:])
    if args[0] == "peer":
        from dsvpn import peer_command

        return peer_command.main(args[1:])
    from dsvpn import selftest

    return selftest.main(args[1:])


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] in ("service", "selftest", "peer"):
            return _operate(args)
        return _dispatch(parse_args(args))
    except DsvpnError as exc:
        print(f"dsvpn: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # Ctrl-C before the tunnel installed its own handlers: nothing was changed yet.
        print("dsvpn: interrupted", file=sys.stderr)
        return 130
