"""``secret-sidecar``: run | get | resolve | check. Exit 0 ok, 1 runtime failure, 2 usage/config."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from sidecar import __version__
from sidecar import logging as sidecar_logging
from sidecar.config import Config, load_config
from sidecar.errors import ConfigError, SidecarError, StartupError

if TYPE_CHECKING:
    from sidecar.resolver import Resolver

OK, FAILED, USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secret-sidecar",
        description="Resolve Kong vault references for a gateway over a Unix socket.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", type=Path, help="YAML config (default: embedded)")
    get = commands.add_parser("get", help="ask a running daemon for a reference")
    get.add_argument("ref")
    get.add_argument("--socket", type=Path, default=Path("sidecar.sock"))
    resolve = commands.add_parser("resolve", help="resolve once without a daemon")
    resolve.add_argument("ref")
    resolve.add_argument("-c", "--config", type=Path)
    check = commands.add_parser("check", help="validate config, try each vault and prefetch")
    check.add_argument("-c", "--config", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        if args.command == "get":
            return asyncio.run(_get(args.ref, args.socket))
        config = load_config(args.config)
        sidecar_logging.configure(config.log.level, config.log.format)
        if args.command == "run":
            return _run(config, args.config)
        if args.command == "resolve":
            return asyncio.run(_resolve(config, args.ref))
        return asyncio.run(_check(config))
    except ConfigError as exc:
        print(f"secret-sidecar: {exc.message}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return FAILED


def _run(config: Config, path: Path | None) -> int:
    from sidecar.lifecycle import run  # noqa: PLC0415 - keeps `get` light

    try:
        run(config, reload=lambda: load_config(path))
    except StartupError as exc:
        print(f"secret-sidecar: {exc.message}", file=sys.stderr)
        return FAILED
    return OK


async def _get(ref: str, socket_path: Path) -> int:
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(socket_path)),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as session,
            session.get("http://sidecar/v1/secrets", params={"ref": ref}) as response,
        ):
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"secret-sidecar: cannot ask the daemon at {socket_path}: {exc}", file=sys.stderr)
        return FAILED
    if "error" in body:
        error = body["error"]
        print(f"secret-sidecar: {error['code']}: {error['message']}", file=sys.stderr)
        return FAILED
    print(body["value"])
    return OK


def _one_shot_resolver(config: Config) -> Resolver:
    from sidecar.cache import Cache  # noqa: PLC0415
    from sidecar.metrics import Metrics  # noqa: PLC0415
    from sidecar.resolver import Resolver  # noqa: PLC0415
    from sidecar.vaults import VaultRegistry  # noqa: PLC0415

    cache = Cache(max_entries=config.cache.max_entries)
    vaults = VaultRegistry(config.vaults, limits=config.limits)
    return Resolver(vaults, cache, config.cache, Metrics())


async def _resolve(config: Config, ref: str) -> int:
    resolver = _one_shot_resolver(config)
    try:
        answer = await resolver.resolve(ref)
    except SidecarError as exc:
        print(f"secret-sidecar: {exc.code}: {exc.message}", file=sys.stderr)
        return FAILED
    finally:
        await resolver.vaults.close()
    print(answer.value)
    return OK


async def _check(config: Config) -> int:
    """Report the socket, each vault and each prefetch reference, without printing any value."""
    from sidecar import unix_socket  # noqa: PLC0415

    socket_problems = unix_socket.problems(config.listen)
    resolver = _one_shot_resolver(config)
    vaults: dict[str, str] = {}
    prefetch: dict[str, str] = {}
    try:
        for vault in resolver.vaults:
            try:
                await vault.ensure_started()
                vaults[vault.prefix] = "ok"
            except SidecarError as exc:
                vaults[vault.prefix] = f"{exc.code}: {exc.message}"
        failures = await resolver.prefetch(config.prefetch)
        for ref in config.prefetch:
            failure = failures.get(ref)
            prefetch[ref] = "ok" if failure is None else f"{failure.code}: {failure.message}"
    finally:
        await resolver.vaults.close()
    report = {"socket": socket_problems or "ok", "vaults": vaults, "prefetch": prefetch}
    print(json.dumps(report, indent=2))
    ok = not socket_problems and all(v == "ok" for v in (*vaults.values(), *prefetch.values()))
    return OK if ok else FAILED
