"""deploy/docker-compose.yml: Kong (DB-less) and the sidecar, as compose parsers read them.

Two real parsers, since no container runtime runs here: ``podman-compose --dry-run
config`` (the tool venv's; it resolves the file as ``up`` would: interpolation, relative
paths, named volumes that must be declared; ``--dry-run`` keeps it from asking for
podman) gives the normalised model the assertions below read, and ``compose-spec``
(the Rust compose_spec parser's Python binding, in the tool venv too) refuses any key
the Compose Specification does not define, which podman-compose lets through. Kong
itself cannot run here; its side is checked as far as files go: the declarative config,
the custom vault's Lua modules on the path Kong is given, and every reference in it
resolved by the sidecar with the compose file's own config and environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from sidecar.config import load_config
from sidecar.reference import is_reference, parse
from tests.deploy.tooling import ROOT, SOCKET, SOCKET_DIR, run_tool, tool

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
KONG_YML = DEPLOY / "compose" / "kong.yml"
SIDECAR_YAML = DEPLOY / "compose" / "sidecar.yaml"
CLI = Path(sys.executable).with_name("secret-sidecar")
# The adapter's schema (issue 12), read from deploy/kong/ when it is there.
ADAPTER_SCHEMA = DEPLOY / "kong" / "kong" / "vaults" / "sidecar" / "schema.lua"
ISSUE_12_FIELDS = {"socket_path", "timeout", "vault", "ttl", "neg_ttl", "resurrect_ttl"}
# Where kong.yml may hold a reference: fields Kong's schemas mark referenceable.
REFERENCEABLE = {("http-log", "headers")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as podman-compose resolves it (exit 0, or the test fails with its error)."""
    out = run_tool("podman-compose", "--dry-run", "-f", str(COMPOSE), "config")
    model = yaml.safe_load(out)
    assert isinstance(model, dict)
    return model


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a service's short-syntax volumes."""
    found = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def strings(item: Any, where: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every string value of a YAML document with the keys leading to it."""
    if isinstance(item, str):
        yield where, item
    elif isinstance(item, dict):
        for key, child in item.items():
            yield from strings(child, (*where, str(key)))
    elif isinstance(item, list):
        for child in item:
            yield from strings(child, where)


def kong_yml() -> dict[str, Any]:
    loaded = yaml.safe_load(KONG_YML.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def test_compose_spec_parser_accepts_every_key() -> None:
    """The strict parser knows every key (a misspelt ``healthcheck`` or ``group_add``
    would be ignored by podman-compose and Docker alike, silently dropping a safeguard)."""
    python = tool("python")
    if subprocess.run([python, "-c", "import compose_spec"], check=False).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("compose-spec must be in the tool venv under CI (requirements/tools.txt)")
        pytest.skip("compose-spec is not installed in the tool venv")
    script = (
        "import sys\n"
        "from compose_spec import PyCompose\n"
        "compose = PyCompose.from_yaml(open(sys.argv[1], encoding='utf-8').read())\n"
        "compose.validate()\n"
        "print(' '.join(sorted(compose.service_names())))\n"
    )
    assert run_tool("python", "-c", script, str(COMPOSE)).split() == ["kong", "sidecar"]


def test_the_socket_volume_is_shared_and_read_only_in_kong(compose: dict[str, Any]) -> None:
    """One named volume at the socket directory in both; Kong's mount is read-only
    (connecting to a socket needs no write access to the file system it is on)."""
    sidecar, kong = (mounts(compose["services"][name]) for name in ("sidecar", "kong"))
    volume, mode = sidecar[SOCKET_DIR]
    assert volume in compose["volumes"], "a named volume, declared at the top level"
    assert mode == "rw"
    assert kong[SOCKET_DIR] == (volume, "ro")


def test_the_sidecar_runs_hardened_and_reports_ready(compose: dict[str, Any]) -> None:
    """Non-root uid 10001, read-only root with a tmpfs, no capabilities, no privilege
    gain; healthy only when ``health --ready`` says the prefetch is resolved."""
    sidecar = compose["services"]["sidecar"]
    assert sidecar["image"] == "ghcr.io/secret-sidecar/secret-sidecar:0.1.0"
    assert Path(sidecar["build"]["context"]).resolve() == ROOT
    assert (ROOT / sidecar["build"]["dockerfile"]).is_file()
    assert sidecar["user"] == "10001:10001"
    assert sidecar["read_only"] is True
    assert any(entry.split(":")[0] == "/tmp" for entry in sidecar["tmpfs"])
    assert sidecar["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in sidecar["security_opt"]
    assert sidecar["healthcheck"]["test"] == [
        "CMD", "secret-sidecar", "health", "--ready", "--socket", SOCKET,
    ]  # fmt: skip
    config_source, mode = mounts(sidecar)["/etc/secret-sidecar/config.yaml"]
    assert (COMPOSE.parent / config_source).resolve() == SIDECAR_YAML
    assert mode == "ro"
    assert sidecar["command"] == ["run", "-c", "/etc/secret-sidecar/config.yaml"]
    assert load_config(SIDECAR_YAML).listen.socket == Path(SOCKET)


def test_kong_waits_for_a_healthy_sidecar_and_can_use_the_socket(
    compose: dict[str, Any],
) -> None:
    """Kong starts after the sidecar is ready, DB-less from the mounted kong.yml, and is
    in the socket's group (10001: the image's setgid socket directory)."""
    kong = compose["services"]["kong"]
    assert kong["depends_on"] == {"sidecar": {"condition": "service_healthy"}}
    assert "10001" in [str(group) for group in kong["group_add"]]
    env = kong["environment"]
    assert env["KONG_DATABASE"] == "off"
    source, mode = mounts(kong)[env["KONG_DECLARATIVE_CONFIG"]]
    assert ((COMPOSE.parent / source).resolve(), mode) == (KONG_YML, "ro")
    assert {"bundled", "sidecar"} <= set(env["KONG_VAULTS"].split(","))


def lua_module_on_host(compose: dict[str, Any], module: str) -> Path | None:
    """Where Kong's ``require(module)`` finds a file: the package path's templates, each
    mapped from the container back to the host through Kong's mounts."""
    kong = compose["services"]["kong"]
    mounted = mounts(kong)
    for template in kong["environment"]["KONG_LUA_PACKAGE_PATH"].split(";"):
        if not template:
            continue
        inside = PurePosixPath(template.replace("?", module.replace(".", "/")))
        for target, (source, _) in mounted.items():
            if inside.is_relative_to(target):
                candidate = COMPOSE.parent / source / inside.relative_to(target)
                if candidate.is_file():
                    return candidate.resolve()
    return None


@pytest.mark.parametrize(
    "module", ["kong.vaults.sidecar", "kong.vaults.sidecar.schema", "secret_sidecar"]
)
def test_kong_finds_the_sidecar_vault_on_its_lua_path(compose: dict[str, Any], module: str) -> None:
    """``KONG_VAULTS=...,sidecar`` makes Kong require the vault and its schema, and the
    vault requires the shared client: each resolves to the adapter in deploy/kong/
    (issue 12) through the read-only mount."""
    found = lua_module_on_host(compose, module)
    assert found is not None, f"{module} is not on KONG_LUA_PACKAGE_PATH via a mount"
    assert found.is_relative_to(DEPLOY / "kong")
    assert mounts(compose["services"]["kong"])["/opt/secret-sidecar/lua"][1] == "ro"


def adapter_fields() -> set[str]:
    """The adapter schema's config fields; issue 12's list until deploy/kong/ exists."""
    if not ADAPTER_SCHEMA.is_file():
        return ISSUE_12_FIELDS
    text = ADAPTER_SCHEMA.read_text(encoding="utf-8")
    return set(re.findall(r"\{\s*([a-z_]+)\s*=\s*(?:\{|typedefs\.)", text)) - {"config"}


def test_kong_yml_declares_the_sidecar_vault() -> None:
    """DB-less format, one vault entity of the custom vault ``sidecar`` whose config uses
    only the adapter's fields, at the socket the sidecar listens on, standing for a
    vault the sidecar has."""
    declared = kong_yml()
    assert declared["_format_version"] == "3.0"
    (vault,) = declared["vaults"]
    assert vault["name"] == "sidecar"
    assert set(vault["config"]) <= adapter_fields(), set(vault["config"]) - adapter_fields()
    assert vault["config"]["socket_path"] == SOCKET
    sidecar_vaults = {v.prefix for v in load_config(SIDECAR_YAML).vaults}
    assert vault["config"]["vault"] in sidecar_vaults


def plugins(declared: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Plugins at the top level and nested in services and routes."""
    yield from declared.get("plugins", [])
    for kind in ("services", "routes"):
        for entity in declared.get(kind, []):
            yield from entity.get("plugins", [])
            for route in entity.get("routes", []):
                yield from route.get("plugins", [])


def test_kong_yml_references_resolve_through_the_sidecar(compose: dict[str, Any]) -> None:
    """Each reference in kong.yml sits in a referenceable plugin field, names the sidecar
    vault entity, and, asked of the sidecar the way the adapter asks (issue 12: the whole
    secret, ``{vault://<vault>/<secret id>/}``), resolves with the compose file's sidecar
    config and environment to the demo value set there."""
    declared = kong_yml()
    entities = {v["prefix"]: v for v in declared["vaults"]}
    everywhere = [text for _, text in strings(declared) if is_reference(text)]
    in_plugins = [
        (plugin["name"], where[0], text)
        for plugin in plugins(declared)
        for where, text in strings(plugin.get("config", {}))
        if is_reference(text)
    ]
    assert in_plugins, "kong.yml reads a secret"
    assert len(in_plugins) == len(everywhere), "references only in plugin configs"
    environment = compose["services"]["sidecar"]["environment"]
    for plugin, field, text in in_plugins:
        assert (plugin, field) in REFERENCEABLE, f"{plugin}.config.{field} is not referenceable"
        ref = parse(text)
        assert ref.name in entities, text
        asked = "{vault://" + entities[ref.name]["config"]["vault"] + "/" + ref.resource + "/}"
        done = subprocess.run(
            [str(CLI), "resolve", asked, "-c", str(SIDECAR_YAML)],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **environment},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout in {value + "\n" for value in environment.values()}


def test_compose_files_pass_yamllint() -> None:
    run_tool(
        "yamllint", "--strict", "-c", str(ROOT / ".yamllint.yaml"),
        str(COMPOSE), str(KONG_YML), str(SIDECAR_YAML),
    )  # fmt: skip
