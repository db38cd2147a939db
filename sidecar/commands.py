"""The commands that need the config, the backends or aiohttp: run, get, resolve, check,
kong-migrate.

``get`` and ``resolve`` are for scripts, like ``kong vault get``: the value alone on
stdout, an error alone on stderr, and no log line unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar import access
from sidecar import logging as sidecar_logging
from sidecar.cli import FAILED, OK, USAGE
from sidecar.errors import ConfigError, InvalidReference, SidecarError, StartupError
from sidecar.reference import is_reference, parse

if TYPE_CHECKING:
    from sidecar.config import Config
    from sidecar.resolver import Resolver

# Codes that say the argument is wrong, not the backend or the daemon: usage errors.
_USAGE_CODES = frozenset({"invalid_reference", "invalid_request", "cannot_migrate"})


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; a config or argument error is a message and exit 2, never a
    traceback."""
    if args.command == "run":
        gc.disable()  # while the daemon loads: see _loaded
    one_shot = args.command in ("get", "resolve")
    if (one_shot and not args.verbose) or args.command == "kong-migrate":
        sidecar_logging.silence()  # before anything that could log
    try:
        if args.command == "kong-migrate":
            return _kong_migrate(args)
        if one_shot:
            ref = expand(args.ref)
            parse(ref)  # a bad argument fails here, before any daemon or backend work
        if args.command == "get":
            if args.verbose:
                sidecar_logging.configure("info", "json")
            return asyncio.run(_get(ref, args.socket))
        from sidecar.config import load_config  # noqa: PLC0415 - pydantic: `get` needs none

        config = load_config(args.config)
        if args.command == "resolve":
            if args.verbose:
                sidecar_logging.configure(_verbose_level(config.log.level), config.log.format)
            return asyncio.run(_resolve(config, ref))
        access.check_rules_enforceable(config.clients)
        sidecar_logging.configure(config.log.level, config.log.format)
        if args.command == "run":
            return _run(config, args.config)
        return asyncio.run(_check(config))
    except SidecarError as exc:  # a config error, or an argument that is no reference
        return _fail(exc.code, exc.message)
    except KeyboardInterrupt:
        return FAILED
    finally:
        if args.command == "run":
            gc.enable()  # a start that failed before it loaded: `main` may run in-process


def expand(text: str) -> str:
    """A reference as is; anything else is Kong's short form, wrapped as ``kong vault get``
    does (``env/name`` -> ``{vault://env/name}``).

    Unlike Kong, text that starts with ``{`` or ``vault://`` is a reference mistyped, not a
    short form: wrapping it would name a vault like ``{vault`` or ``vault``.
    """
    if is_reference(text):
        return text
    if text.startswith(("{", "vault://")):
        raise InvalidReference(f"not a reference [{text}]")
    return "{vault://" + text + "}"


def _verbose_level(configured: str) -> str:
    """``--verbose`` shows at least the info lines (``backend.call``), whatever ``log.level``."""
    return "debug" if configured == "debug" else "info"


def _fail(code: str, message: str) -> int:
    sidecar_logging.flush()  # log lines queued before this message come out before it
    print(f"secret-sidecar: {code}: {message}", file=sys.stderr)
    return USAGE if code in _USAGE_CODES or code == ConfigError.code else FAILED


def _run(config: Config, path: Path | None) -> int:
    from sidecar.config import load_config  # noqa: PLC0415 - loaded already; see dispatch
    from sidecar.lifecycle import run  # noqa: PLC0415 - keeps `get` light

    _loaded()
    try:
        run(config, reload=lambda: load_config(path))
    except StartupError as exc:
        return _fail(exc.code, exc.message)
    return OK


def _loaded() -> None:
    """The daemon's modules are loaded: collect their garbage once, then keep the rest out
    of the cycle collector's sight.

    Loading makes some 55 000 objects that live as long as the process, and the collector
    walked them some 130 times while they were made: a tenth of the import time. With it
    off until here, one collection frees the 2 000 objects of garbage, and ``freeze``
    moves the survivors where no later collection walks them again (exec -> ready on an
    env-only config: 0.86 -> 0.79 s on a 2-core test machine; RSS +0.2 MiB).
    """
    gc.collect()
    gc.freeze()
    gc.enable()


async def _get(ref: str, socket_path: Path) -> int:
    import aiohttp  # noqa: PLC0415 - its client alone: about 0.25 s that `resolve` and `check` skip

    log = sidecar_logging.get_logger("sidecar.cli")
    started = time.perf_counter()
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(socket_path)),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as session,
            session.get("http://sidecar/v1/secrets", params={"ref": ref}) as response,
        ):
            status = response.status
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("get.failed", socket=str(socket_path), error=str(exc))
        return _fail("daemon_unreachable", f"cannot ask the daemon at {socket_path}: {exc}")
    elapsed = round((time.perf_counter() - started) * 1000, 3)
    log.info("get", socket=str(socket_path), ref=ref, status=status, duration_ms=elapsed)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return _fail(str(error.get("code")), str(error.get("message")))
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("value"), str):
        return _fail("daemon_unreachable", f"unexpected answer from {socket_path} ({status})")
    print(body["value"])
    return OK


def _one_shot_resolver(config: Config) -> Resolver:
    from sidecar.assembly import build_resolver  # noqa: PLC0415 - keeps `get` light
    from sidecar.metrics import Metrics  # noqa: PLC0415
    from sidecar.schedule import Schedule  # noqa: PLC0415

    return build_resolver(config, Metrics(), schedule=Schedule(refresh=False))


async def _resolve(config: Config, ref: str) -> int:
    resolver = _one_shot_resolver(config)
    try:
        answer = await resolver.resolve(ref)
    except SidecarError as exc:
        return _fail(exc.code, exc.message)
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


def _kong_migrate(args: argparse.Namespace) -> int:
    from sidecar import kong_migrate  # noqa: PLC0415 - ruamel is for this command alone

    source: Path = args.kong_file
    sidecar_out = args.sidecar_out or source.with_name(f"{source.stem}.sidecar.yaml")
    kong_out = args.kong_out or source.with_name(f"{source.stem}.migrated.yaml")
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        return _fail("cannot_migrate", f"cannot read {source}: {exc.strerror}")
    migration = kong_migrate.migrate(text, str(source), args.socket_path)
    try:
        kong_migrate.write(migration, sidecar_out, kong_out, force=args.force)
    except OSError as exc:
        return _fail("cannot_write", f"cannot write the migrated files: {exc}")
    print(f"moved {len(migration.moved)} vault(s) to the sidecar: {', '.join(migration.moved)}")
    print(f"wrote {sidecar_out}: sidecar config with the credentials (mode 0600)")
    print(f"wrote {kong_out}: Kong file whose vaults use the sidecar adapter")
    for ref in migration.direct:
        print(f"warning: {ref} names a bundled backend: Kong still needs its credentials")
    print(f"next: secret-sidecar check -c {sidecar_out}")
    return OK
