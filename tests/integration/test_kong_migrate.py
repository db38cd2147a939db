"""``secret-sidecar kong-migrate``: a decK file split into a sidecar config that holds the
vault credentials and a Kong file that holds none, with every reference unchanged."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import load_config
from tests.integration.test_cli import cli

DECK = Path(__file__).parent / "deck" / "kong.yaml"
# Every credential the file carries; none may survive in the Kong file or any output line.
CREDENTIALS = (
    "0b4e3f0e-role-id-not-real-5a1d",
    "77c9d2a1-secret-id-not-real-e04b",
    "hvs.CAESIfake-legacy-token-not-real",
)
TIMING = ("ttl", "neg_ttl", "resurrect_ttl")


def _without_vaults(text: str) -> list[str]:
    """The file's lines outside its top-level ``vaults:`` block."""
    kept, inside = [], False
    for line in text.splitlines():
        if line and not line[0].isspace() and line[0] != "-":
            inside = line.startswith("vaults:")
        if not inside:
            kept.append(line)
    return kept


async def _migrate(tmp_path: Path, source: Path, *extra: str) -> tuple[int, str, str]:
    return await cli(
        "kong-migrate", str(source),
        "--sidecar-out", str(tmp_path / "sidecar.yaml"),
        "--kong-out", str(tmp_path / "kong.yaml"),
        *extra,
    )  # fmt: skip


async def test_a_deck_file_with_all_four_backends_round_trips(tmp_path: Path) -> None:
    code, out, err = await _migrate(tmp_path, DECK)
    assert (code, err) == (0, ""), err
    original = yaml.safe_load(DECK.read_text())
    sidecar_text = (tmp_path / "sidecar.yaml").read_text()
    kong_text = (tmp_path / "kong.yaml").read_text()

    # (b) Kong's file: no credential anywhere, each vault now the adapter, named the same.
    for credential in CREDENTIALS:
        assert credential not in kong_text
        assert credential not in out
    kong = yaml.safe_load(kong_text)
    assert [v["prefix"] for v in kong["vaults"]] == [v["prefix"] for v in original["vaults"]]
    for before, after in zip(original["vaults"], kong["vaults"], strict=True):
        timing = {
            k: v for k, v in before["config"].items() if k in ("ttl", "neg_ttl", "resurrect_ttl")
        }
        assert after["name"] == "sidecar"
        assert after["config"] == {"vault": before["prefix"], **timing}
        assert {k: v for k, v in after.items() if k not in ("name", "config")} == {
            k: v for k, v in before.items() if k not in ("name", "config")
        }  # id, description, tags kept
    # Everything else byte for byte: references, comments, quoting.
    assert _without_vaults(kong_text) == _without_vaults(DECK.read_text())
    assert {k: v for k, v in kong.items() if k != "vaults"} == {
        k: v for k, v in original.items() if k != "vaults"
    }

    # (a) the sidecar's config: the entities as written, loadable, private to its owner.
    assert stat.S_IMODE(os.stat(tmp_path / "sidecar.yaml").st_mode) == 0o600
    assert yaml.safe_load(sidecar_text) == {"vaults": original["vaults"]}
    config = load_config(tmp_path / "sidecar.yaml")
    assert [v.prefix for v in config.vaults] == [v["prefix"] for v in original["vaults"]]

    # The one reference Kong still resolves with its own credentials is named.
    assert "warning: {vault://hcv/shared/redis/password} names a bundled backend" in out


async def test_running_it_again_on_its_output_moves_nothing(tmp_path: Path) -> None:
    assert (await _migrate(tmp_path, DECK))[0] == 0
    again = tmp_path / "again"
    again.mkdir()
    code, out, err = await _migrate(again, tmp_path / "kong.yaml")
    assert (code, out) == (2, "")
    assert "no vault entity of Kong's bundled backends to migrate" in err


def _deck(vaults: list[dict[str, Any]], **entities: Any) -> dict[str, Any]:
    return {"_format_version": "3.0", "vaults": vaults, **entities}


def _hcv(**config: str) -> list[dict[str, Any]]:
    return [{"name": "hcv", "prefix": "vault-v", "config": config}]


async def test_input_it_cannot_map_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    aws = [{"name": "aws", "prefix": "aws-a", "config": {"region": "eu-west-1"}}]
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "custom vault": (
            _deck([{"name": "my-vault", "prefix": "mine", "config": {}}]),
            "vault 'mine' uses 'my-vault', which kong-migrate cannot map",
        ),
        "templated credential": (
            _deck(_hcv(token='${{ env "DECK_HCV_TOKEN" }}')),
            "field 'token' is a reference or a decK template",
        ),
        "query the adapter cannot take": (
            _deck(aws, plugins=[{"name": "p", "config": {"x": "{vault://aws-a/s?region=x}"}}]),
            "{vault://aws-a/s?region=x} sets region in its query",
        ),
        "entity the sidecar refuses": (
            _deck(_hcv(auth_method="kubernetes", token="hvs.not-real-but-secret")),
            "token must not be set when auth_method is kubernetes",
        ),
        "not decK": ({"vaults": aws}, "is not a decK file"),
    }
    for name, (document, message) in cases.items():
        source = tmp_path / "in.yaml"
        source.write_text(yaml.safe_dump(document))
        code, out, err = await _migrate(tmp_path, source)
        assert (code, out) == (2, ""), name
        assert message in err, (name, err)
        assert "hvs.not-real-but-secret" not in err
        assert "Traceback" not in err
        assert os.listdir(tmp_path) == ["in.yaml"], name


async def test_existing_outputs_are_kept_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "kong.yaml").write_text("mine\n")
    code, _, err = await _migrate(tmp_path, DECK)
    assert code == 2
    assert "exists; pass --force" in err
    assert (tmp_path / "kong.yaml").read_text() == "mine\n"
    assert not (tmp_path / "sidecar.yaml").exists()
    code, _, _ = await _migrate(tmp_path, DECK, "--force", "--socket-path", "/run/s/s.sock")
    assert code == 0
    kong = yaml.safe_load((tmp_path / "kong.yaml").read_text())
    assert {v["config"]["socket_path"] for v in kong["vaults"]} == {"/run/s/s.sock"}
