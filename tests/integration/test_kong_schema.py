"""The CLI refuses at start what Kong's vault schema refuses: exit 2, the key and the rule
on stderr, no credential, no socket (docs/kong.md)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.canary import assert_clean, credential

SECRET_ID = credential("approle-secret-id")


async def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KONG_VAULT_", "VAULT_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("command", ["check", "run"])
async def test_approle_without_role_id_exits_2_naming_the_field(
    tmp_path: Path, command: str
) -> None:
    """Kong's hcv schema requires approle_role_id for approle: check and run exit 2 before
    trying any vault or binding the socket, and never show the secret id."""
    config = tmp_path / "kong.yaml"
    config.write_text(
        f'_format_version: "3.0"\n'
        f"vaults:\n"
        f"  - prefix: vault-approle\n"
        f"    name: hcv\n"
        f"    config: {{auth_method: approle, approle_secret_id: {SECRET_ID}}}\n"
    )
    code, out, err = await cli(command, "-c", str(config), cwd=tmp_path)
    assert (code, out) == (2, "")
    assert "vault 'vault-approle' (hcv) config.auth_method" in err
    assert "approle auth needs approle_role_id" in err
    assert_clean(err, where="stderr")
    assert not (tmp_path / "sidecar.sock").exists()


async def test_entity_rule_exits_2_from_load_config(tmp_path: Path) -> None:
    """A gcp vault entity without project_id (Kong requires it) fails the config load."""
    config = tmp_path / "c.yaml"
    config.write_text("vaults: [{prefix: gsm, name: gcp, config: {location: europe-west1}}]\n")
    code, _, err = await cli("check", "-c", str(config), cwd=tmp_path)
    assert code == 2
    assert "c.yaml.vaults.0.config: Value error, project_id is required for a gcp vault" in err


async def test_a_valid_kong_deck_file_passes_check(tmp_path: Path) -> None:
    """A decK file Kong accepts loads and its vault is tried: exit 0."""
    config = tmp_path / "kong.yaml"
    config.write_text(
        '_format_version: "3.0"\n'
        "services: [{name: s, url: 'http://example.com'}]\n"
        "vaults:\n"
        "  - {id: 2747d1e5-8246-4f65-a939-b392f1ee17f8, prefix: my-env, name: env,\n"
        "     description: env vault, tags: [team-a], config: {prefix: MY_}}\n"
    )
    code, out, err = await cli("check", "-c", str(config), cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["vaults"] == {"my-env": "ok"}
