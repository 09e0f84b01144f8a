"""Command line: dispatch to what each command does, one-line errors and exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dsvpn import PROTOCOL_VERSION, __version__
from dsvpn.arguments import USAGE, Invocation, parse_args
from dsvpn.errors import DsvpnError

__all__ = ["USAGE", "Invocation", "main", "parse_args"]


def _dispatch(inv: Invocation) -> int:
    # Imported here so that --help, --version and usage errors never pay for the compiled core.
    if inv.command == "help":
        sys.stdout.write(USAGE)
        return 0
    if inv.command == "version":
        print(f"dsvpn {__version__} (wire protocol of DSVPN {PROTOCOL_VERSION})")
        return 0
    from dsvpn import logs

    logs.setup(inv.verbosity)
    if inv.command == "keygen":
        from dsvpn.keys import generate_key_file

        assert inv.path is not None
        generate_key_file(inv.path)
        logging.getLogger("dsvpn").info("wrote a new key to %s (mode 0600)", inv.path)
        return 0
    if inv.command == "status":
        from dsvpn import status

        return status.command(inv.json)
    from dsvpn import tunnel

    if inv.command == "cleanup":
        return tunnel.cleanup(everything=inv.cleanup_all)
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
