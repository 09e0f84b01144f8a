"""The command line's words: DSVPN's positional syntax, our options, and what they mean
(an Invocation). Parsing only: nothing here runs anything."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from dsvpn.config import (
    DEFAULT_CLIENT_TUN_IP,
    DEFAULT_PORT,
    DEFAULT_SERVER_TUN_IP,
    MAX_WORKERS,
    ClientConfig,
    ClientNetwork,
    Config,
    FirewallName,
    ServerConfig,
)
from dsvpn.errors import UsageError

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
  dsvpn cleanup [--all]        remove what crashed dsvpn instances left behind
                               (--all: their kill switch too)
  dsvpn status [--json]        every dsvpn running in this network namespace, its sessions
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
  --pfs                client: forward secrecy (an X25519 handshake); needs a dsvpn
                       server, never falls back to the classic handshake
  --require-pfs        server: refuse clients without --pfs (C DSVPN clients too)
  --workers N          server of a peers file, Linux: N threads share the clients (default:
                       one per CPU it may run on)

client options:
  --route CIDR         only this destination goes through the tunnel (repeatable)
  --exclude CIDR       this destination bypasses the tunnel, e.g. the LAN (repeatable)
  --no-routes          bring the tunnel up but route nothing through it
  --dns IP[,IP...]     use these resolvers, through the tunnel, while it is up
  --kill-switch        block what would leave outside the tunnel (Linux, macOS); it stays
                       after a crash until a deliberate stop or `dsvpn cleanup --all`

A server's <key file> may name a peers file (see dsvpn peer --help) instead: it then serves
several clients, each with a key and a tunnel address of its own; SIGHUP re-reads the file.
Trailing "auto" arguments may be left out. Defaults: listen on every address, port 443,
server tun IP 192.168.192.254, client tun IP 192.168.192.1, IPv6 64:ff9b::<tun ip>,
MTU 9000 (1500 on NetBSD). A tun name has at most 15 characters (macOS: utunN, BSD: tunN).

exit status:
  0 success, 1 other error, 2 usage error, 69 missing prerequisite (tool, tun device),
  75 conflict with a running dsvpn, 77 permission denied (not root),
  78 bad service arguments file, 130 interrupted

example:
  dsvpn keygen vpn.key                 (copy vpn.key to the other host, e.g. with scp)
  dsvpn server vpn.key                 (as root, on the server)
  dsvpn client vpn.key 203.0.113.7     (as root, on the client: all traffic goes through it)
"""

MAX_POSITIONALS = 7


@dataclass
class _Options:
    verbosity: int = 0
    dry_run: bool = False
    platform: str | None = None
    pfs: bool = False
    require_pfs: bool = False
    workers: int | None = None


@dataclass(frozen=True)
class Invocation:
    command: str  # server, client, keygen, cleanup, status, version, help
    config: Config | None = None
    path: str | None = None  # keygen's file
    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose
    dry_run: bool = False
    platform: str | None = None
    json: bool = False  # status --json
    cleanup_all: bool = False  # cleanup --all: kill switches too


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


def _split_options(args: Sequence[str]) -> tuple[list[str], _Options]:
    positionals: list[str] = []
    opts = _Options()
    it = iter(args)
    for arg in it:
        if arg in ("-v", "--verbose"):
            opts.verbosity = 1
        elif arg in ("-q", "--quiet"):
            opts.verbosity = -1
        elif arg == "--dry-run":
            opts.dry_run = True
        elif (got := _valued(arg, it, ("--platform", "--workers"))) is not None:
            name, value = got
            if name == "--workers":
                opts.workers = _workers(value or "")
            elif not value:
                raise UsageError("--platform needs a name")
            else:
                opts.platform = value
        elif arg == "--pfs":
            opts.pfs = True
        elif arg == "--require-pfs":
            opts.require_pfs = True
        elif arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            raise UsageError(f"unknown option {arg!r} (see dsvpn --help)")
        else:
            positionals.append(arg)
    return positionals, opts


def _valued(arg: str, it: Iterator[str], names: Collection[str]) -> tuple[str, str | None] | None:
    """(name, value) if arg is one of the options names, given as `--name VALUE` (the value
    then taken from it; None if none follows) or `--name=VALUE`; else None."""
    name, eq, value = arg.partition("=")
    if name not in names:
        return None
    return name, value if eq else next(it, None)


def _workers(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) <= MAX_WORKERS:
        raise UsageError(f"--workers needs a number from 1 to {MAX_WORKERS}")
    return int(value)


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
        got = _valued(arg, it, ("--firewall",))
        if got is None:
            rest.append(arg)
            continue
        value = got[1]
        if value is None:
            raise UsageError("--firewall needs iptables, nft or auto")
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
    if command not in ("server", "client", "keygen", "cleanup", "status"):
        raise UsageError(
            f"unknown mode {command!r}: expected server, client, keygen, peer, cleanup or status"
        )
    if "-h" in rest or "--help" in rest:
        return Invocation("help")
    if command == "status":
        if any(arg != "--json" for arg in rest):
            raise UsageError("usage: dsvpn status [--json]")
        return Invocation("status", json=bool(rest))
    rest, firewall = _take_firewall(rest)
    rest, network, client_options = _take_client_options(rest)
    rest, cleanup_all = _take_flag(rest, "--all") if command == "cleanup" else (rest, False)
    args, opts = _split_options(rest)
    verbosity, dry_run, platform = opts.verbosity, opts.dry_run, opts.platform
    if platform is not None and not dry_run:
        raise UsageError("--platform only goes with --dry-run")
    if firewall is not None and command not in ("server", "client"):
        raise UsageError("--firewall only goes with server or client")
    if opts.pfs and command != "client":
        hint = " (a server takes both handshakes; --require-pfs refuses the classic one)"
        raise UsageError("--pfs is a client option" + (hint if command == "server" else ""))
    if opts.require_pfs and command != "server":
        hint = " (a client asks for forward secrecy with --pfs)" if command == "client" else ""
        raise UsageError("--require-pfs is a server option" + hint)
    if opts.workers is not None and command != "server":
        raise UsageError("--workers is a server option")
    if client_options and command != "client":
        raise UsageError(f"{client_options[0]} is a client option")

    if command == "keygen":
        if len(args) != 1:
            raise UsageError("usage: dsvpn keygen <key file>")
        return Invocation("keygen", path=args[0], verbosity=verbosity)
    if command == "cleanup":
        if args:
            raise UsageError("usage: dsvpn cleanup [--all] (it takes no arguments)")
        return Invocation("cleanup", verbosity=verbosity, cleanup_all=cleanup_all)

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
            require_pfs=opts.require_pfs,
            workers=opts.workers,
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
            pfs=opts.pfs,
            network=network,
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
        if cfg.workers is not None:
            raise UsageError(
                f"--workers goes with a peers file; {cfg.key_file} is a key file (one client)"
            )
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


# -- the client's network options (--route, --exclude, --no-routes, --dns, --kill-switch) ------

_VALUED = ("--route", "--exclude", "--dns")
# Every option that takes a value (dsvpn.service finds the key file among the arguments).
VALUED_OPTIONS = ("--platform", "--firewall", "--workers", *_VALUED)
_FLAGS = ("--no-routes", "--kill-switch")


def _take_client_options(args: Sequence[str]) -> tuple[list[str], ClientNetwork, list[str]]:
    """Take the client's network options out of args: (the other args, the options, the names
    of those given, for a server's error message)."""
    rest: list[str] = []
    values: dict[str, list[str]] = {name: [] for name in _VALUED}
    flags: set[str] = set()
    given: list[str] = []
    it = iter(args)
    for arg in it:
        if (got := _valued(arg, it, _VALUED)) is not None:
            name, value = got
            if not value:
                raise UsageError(f"{name} needs a value")
            values[name].append(value)
            given.append(name)
        elif arg in _FLAGS:
            flags.add(arg)
            given.append(arg)
        else:
            rest.append(arg)
    routes = _prefixes(values["--route"], "--route")
    excludes = _prefixes(values["--exclude"], "--exclude")
    servers = [s for v in values["--dns"] for s in v.split(",")]
    dns = _unique([_ip(s.strip(), "--dns address") or "" for s in servers])
    network = ClientNetwork(
        routes=routes,
        excludes=excludes,
        no_routes="--no-routes" in flags,
        kill_switch="--kill-switch" in flags,
        dns=dns,
    )
    _check_network(network)
    return rest, network, given


def _take_flag(args: list[str], flag: str) -> tuple[list[str], bool]:
    return [a for a in args if a != flag], flag in args


def _prefixes(values: list[str], option: str) -> tuple[str, ...]:
    out = []
    for value in values:
        try:
            # Host bits are dropped (10.1.2.3/8 is 10.0.0.0/8); a bare address is one host.
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            raise UsageError(
                f"invalid {option} {value!r}: expected an address or a CIDR prefix "
                "(10.0.0.0/8, 2001:db8::/32)"
            ) from None
    return _unique(out)


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _check_network(net: ClientNetwork) -> None:
    if net.no_routes:
        if net.routes:
            raise UsageError("--route and --no-routes contradict each other")
        if net.excludes:
            raise UsageError("--exclude needs routes through the tunnel (drop --no-routes)")
        if net.dns:
            raise UsageError(
                "--dns needs routes through the tunnel: drop --no-routes "
                "(--route <resolver> routes just the resolvers)"
            )
        if net.kill_switch:
            raise UsageError("--kill-switch with --no-routes would protect nothing")
    for server in net.dns:
        host = ipaddress.ip_address(server)
        for prefix in net.excludes:
            if host in ipaddress.ip_network(prefix):
                raise UsageError(
                    f"--dns {server} is inside --exclude {prefix}: its queries would bypass "
                    "the tunnel"
                )
