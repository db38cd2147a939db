"""``secret-sidecar`` and its commands. Exit 0 ok, 1 failure, 2 usage or config error.

This module parses arguments and answers ``health`` itself; every other command lives in
:mod:`sidecar.commands`, imported only when one runs. ``health`` is what exec probes start
every few seconds for a pod's whole life, so it must not pay for aiohttp, pydantic and the
config (about 0.5 s of CPU per probe): it imports the standard library alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sidecar.probe import probe

OK, FAILED, USAGE = 0, 1, 2
_REF_HELP = "a reference {vault://...} or Kong's short form <name>/<resource>[/<key>]"


class _Version(argparse.Action):
    """``--version``: the version is looked up only when asked for (``sidecar.__getattr__``
    says why), where argparse's own action wants it when the parser is built."""

    def __init__(self, option_strings: list[str], dest: str) -> None:
        super().__init__(
            option_strings,
            argparse.SUPPRESS,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show the version and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from sidecar import __version__  # noqa: PLC0415

        print(__version__)
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secret-sidecar",
        description="Resolve Kong vault references for a gateway over a Unix socket.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.",
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", type=Path, help="YAML config (default: embedded)")
    get = commands.add_parser("get", help="ask a running daemon for a reference")
    get.add_argument("ref", help=_REF_HELP)
    get.add_argument("--socket", type=Path, default=Path("sidecar.sock"))
    resolve = commands.add_parser("resolve", help="resolve once without a daemon")
    resolve.add_argument("ref", help=_REF_HELP)
    resolve.add_argument("-c", "--config", type=Path)
    for quiet in (get, resolve):
        quiet.add_argument(
            "-v", "--verbose", action="store_true", help="log (JSON lines) to stderr"
        )
    check = commands.add_parser("check", help="validate config, try each vault and prefetch")
    check.add_argument("-c", "--config", type=Path)
    migrate = commands.add_parser(
        "kong-migrate",
        help="split a decK file: vault credentials to a sidecar config, Kong to the adapter",
    )
    migrate.add_argument("kong_file", type=Path, metavar="KONG_YML")
    migrate.add_argument(
        "--sidecar-out", type=Path, help="sidecar config to write (default: <name>.sidecar.yaml)"
    )
    migrate.add_argument(
        "--kong-out", type=Path, help="Kong file to write (default: <name>.migrated.yaml)"
    )
    migrate.add_argument("--socket-path", help="the adapter's socket_path (default: its own)")
    migrate.add_argument("--force", action="store_true", help="replace existing output files")
    health = commands.add_parser(
        "health", help="exit 0 if a running daemon is healthy (--ready: ready), else 1"
    )
    health.add_argument("--socket", type=Path, default=Path("sidecar.sock"))
    health.add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if args.command == "health":
        return _health(args.socket, ready=args.ready, timeout=args.timeout)
    from sidecar import commands  # noqa: PLC0415 - see the module docstring

    return commands.dispatch(args)


def _health(socket_path: Path, *, ready: bool, timeout: float) -> int:
    passed, report = probe(socket_path, ready=ready, timeout=timeout)
    if not passed:
        print(f"secret-sidecar: {'not_ready' if ready else 'unhealthy'}: {report}", file=sys.stderr)
    return OK if passed else FAILED
