"""What a slim install (``pip install secret-sidecar``, no extras) can and cannot do.

A backend's SDK is an extra; without it the env backend still works and a vault of that
backend is a config error that names the extra to install. The SDKs are made absent the
way Python sees a package that is not installed: a finder that raises
``ModuleNotFoundError`` for them, loaded by ``sitecustomize`` before the CLI starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_cli import cli

_SLIM = """
import importlib.abc, sys

SDKS = ("aiobotocore", "botocore", "hvac", "google.cloud", "grpc")

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == sdk or name.startswith(sdk + ".") for sdk in SDKS):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def _slim(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(_SLIM)
    return {"PYTHONPATH": f"{tmp_path}:{Path.cwd()}"}


async def test_without_backend_sdks_the_env_backend_works(tmp_path: Path) -> None:
    config = tmp_path / "env.yaml"
    config.write_text("prefetch: ['{vault://env/db-password}']\n")
    code, out, err = await cli("check", "-c", str(config), env=_slim(tmp_path))
    assert code == 0, err
    assert json.loads(out)["prefetch"] == {"{vault://env/db-password}": "ok"}


async def test_a_vault_whose_sdk_is_missing_names_the_extra(tmp_path: Path) -> None:
    for backend in ("aws", "hcv", "gcp"):
        config = tmp_path / f"{backend}.yaml"
        config.write_text(f"vaults: [{{prefix: my-{backend}, name: {backend}}}]\n")
        code, out, err = await cli("check", "-c", str(config), env=_slim(tmp_path))
        assert (code, out) == (2, ""), err
        assert f"pip install 'secret-sidecar[{backend}]'" in err
        assert "which is not installed" in err
        assert "Traceback" not in err
