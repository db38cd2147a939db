"""``secret-sidecar kong-migrate``: move a decK file's vault credentials to the sidecar.

Kong's bundled vaults keep backend credentials in Kong's own config, and so in every
copy of it (a Git repository, Konnect). This splits a decK file in two: the sidecar
config gets each vault entity as written, credentials included, and the Kong file gets
the same entities (prefix, id, tags kept) pointing at the sidecar adapter
(``name: sidecar``, ``config.vault`` = the prefix) with nothing else but Kong's own
cache timing. References elsewhere keep working unchanged because a prefix keeps
naming the same secrets.

The Kong file is edited in place (ruamel's round-trip mode), not rebuilt: every other
entity, comment and quoting stays as the operator wrote it, so a review of the change
shows the vault entities and nothing else.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from sidecar.backends import BACKEND_NAMES, load_kind
from sidecar.config import LimitsConfig, parse_config
from sidecar.errors import CannotMigrate, SidecarError
from sidecar.reference import is_reference, parse
from sidecar.vaults import Vault

ADAPTER = "sidecar"
# What a migrated entity keeps in Kong: its cache of what the adapter returns (the ttl the
# adapter answers with wins over ``ttl``; ``resurrect_ttl`` still covers a sidecar outage).
KONG_SIDE = ("ttl", "neg_ttl", "resurrect_ttl")
_TEMPLATE = "${{"  # decK's env templating: decK fills it in, the sidecar would not


@dataclass
class Migration:
    """The two files' text and what the operator should know about the split."""

    sidecar_config: str
    kong_file: str
    moved: list[str] = field(default_factory=list)
    # References that name a credentialed backend directly ({vault://hcv/...}): Kong still
    # resolves them itself, with credentials from its environment.
    direct: list[str] = field(default_factory=list)


def migrate(text: str, source: str, socket_path: str | None = None) -> Migration:
    """Split decK text; :class:`CannotMigrate` (or ``ConfigError``) before anything is kept."""
    yaml = _yaml()
    try:
        document = yaml.load(text)
    except YAMLError as exc:  # its message quotes the line, which may hold a credential
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CannotMigrate(f"{source} is not valid YAML{where}") from None
    if not isinstance(document, dict) or "_format_version" not in document:
        raise CannotMigrate(f"{source} is not a decK file (no _format_version)")
    entities = document.get("vaults") or []
    if not isinstance(entities, list):
        raise CannotMigrate(f"{source}: vaults must be a list")
    to_move = [entity for entity in entities if _wants_moving(entity, source)]
    if not to_move:
        raise CannotMigrate(f"{source}: no vault entity of Kong's bundled backends to migrate")
    sidecar_vaults = [_plain(entity) for entity in to_move]
    _check_sidecar_side(sidecar_vaults, source)
    moved = [str(entity["prefix"]) for entity in to_move]
    _check_references(document, set(moved), source)
    for entity in to_move:
        entity["config"] = _kong_side(entity, socket_path)
        entity["name"] = ADAPTER
    return Migration(
        sidecar_config=_header(source) + _dump(yaml, {"vaults": sidecar_vaults}),
        kong_file=_dump(yaml, document),
        moved=moved,
        direct=sorted({ref for ref in _references(document) if _names_backend(ref)}),
    )


def write(migration: Migration, sidecar_out: Path, kong_out: Path, *, force: bool) -> None:
    """Write both files or neither; the sidecar config (credentials) is 0600 from the start."""
    for path in (sidecar_out, kong_out):
        if path.exists() and not force:
            raise CannotMigrate(f"{path} exists; pass --force to replace it")
    staged: list[tuple[Path, Path]] = []
    try:
        staged.append((_stage(sidecar_out, migration.sidecar_config, 0o600), sidecar_out))
        staged.append((_stage(kong_out, migration.kong_file, 0o644), kong_out))
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, path in staged:
        temporary.replace(path)


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: comments, key order and quoting survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long string, such as a certificate
    return yaml


def _wants_moving(entity: Any, source: str) -> bool:
    if not isinstance(entity, dict) or not isinstance(entity.get("name"), str):
        raise CannotMigrate(f"{source}: a vault entity has no name")
    name = entity["name"]
    if name == ADAPTER:
        return False  # migrated already: running twice changes nothing more
    if name not in BACKEND_NAMES:
        known = ", ".join(sorted(BACKEND_NAMES))
        raise CannotMigrate(
            f"{source}: vault {entity.get('prefix')!r} uses {name!r}, which kong-migrate"
            f" cannot map (it knows {known} and {ADAPTER})"
        )
    for key, value in (entity.get("config") or {}).items():
        if isinstance(value, str) and (is_reference(value) or _TEMPLATE in value):
            raise CannotMigrate(
                f"{source}: vault {entity.get('prefix')!r} field {key!r} is a reference or a"
                " decK template, which the sidecar does not expand; give the sidecar the value"
                " (a file field such as token_file, or its KONG_VAULT_* variable) and retry"
            )
    return True


def _plain(node: Any) -> Any:
    """A ruamel node as plain dicts and lists, for validation and a clean sidecar file."""
    if isinstance(node, dict):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(item) for item in node]
    if isinstance(node, str):
        return str(node)  # drop ruamel's quoting wrapper
    return node


def _check_sidecar_side(vaults: list[dict[str, Any]], source: str) -> None:
    """Refuse, before writing, a split the sidecar would refuse to start on."""
    config = parse_config({"vaults": vaults}, f"{source} (as sidecar config)")
    for entity in config.vaults:
        kind = load_kind(entity.name)
        Vault.build(entity.prefix, kind, entity, os.environ, LimitsConfig())


def _check_references(document: Any, moved: set[str], source: str) -> None:
    """A query field other than cache timing would reach the adapter, which has no such
    field: Kong would refuse the reference after the split, so refuse the split."""
    for ref in _references(document):
        try:
            parsed = parse(ref)
        except SidecarError:
            continue  # Kong refuses it today already; not ours to judge
        extra = sorted(set(parsed.config or {}) - set(KONG_SIDE))
        if parsed.name in moved and extra:
            raise CannotMigrate(
                f"{source}: {ref} sets {', '.join(extra)} in its query, which the sidecar"
                " adapter cannot take; move the setting into the vault entity's config"
            )


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "vaults":
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)
    elif isinstance(node, str) and is_reference(node):
        yield str(node)


def _names_backend(ref: str) -> bool:
    try:
        return parse(ref).name in BACKEND_NAMES - {"env"}  # env holds no credential
    except SidecarError:
        return False


def _kong_side(entity: dict[str, Any], socket_path: str | None) -> CommentedMap:
    config = entity.get("config") or {}
    kept = CommentedMap(vault=entity["prefix"])
    for key in KONG_SIDE:
        if key in config:
            kept[key] = config[key]
    if socket_path is not None:
        kept["socket_path"] = socket_path
    return kept


def _header(source: str) -> str:
    return (
        f"# secret-sidecar config written by `secret-sidecar kong-migrate` from {source}.\n"
        "# It holds backend credentials: keep it out of version control and Kong's config.\n"
    )


def _dump(yaml: YAML, document: Any) -> str:
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def _stage(path: Path, text: str, mode: int) -> Path:
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(text)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)
