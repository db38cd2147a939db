"""Configuration: defaults, validation messages, decK files, env base config, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.backends.env import EnvSettings
from sidecar.config import Config, load_config, parse_config
from sidecar.errors import ConfigError, InvalidReference, UnknownVault
from sidecar.vaults import VaultRegistry, env_base_config


def test_no_file_gives_embedded_default() -> None:
    """No config runs the env backend on ./sidecar.sock with metrics on 127.0.0.1:9464."""
    config = load_config(None)
    assert config.listen.socket == Path("sidecar.sock")
    assert config.listen.mode == 0o660
    assert config.metrics.host_port == ("127.0.0.1", 9464)
    assert config.vaults == ()


def test_empty_file_gives_default(tmp_path: Path) -> None:
    """An empty YAML file is the same as no file."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_full_example_from_design_loads(tmp_path: Path) -> None:
    """The example of design.md section 3 validates into typed objects."""
    path = tmp_path / "c.yaml"
    path.write_text(
        """
listen: {socket: /tmp/s.sock, mode: "0660", group: 0}
metrics: {address: "127.0.0.1:9464"}
log: {level: info, format: json}
cache: {ttl: 300, neg_ttl: 30, resurrect_ttl: 3600, max_entries: 100000}
vaults:
  - {prefix: aws-prod, name: aws, config: {region: us-east-1, ttl: 600}}
prefetch: ["{vault://aws-prod/db/password}"]
clients:
  - {uid: 1000, allow: ["aws-prod/db/*", "env/*"]}
  - {gid: 1001, allow: ["*"]}
"""
    )
    config = load_config(path)
    assert config.vaults[0].prefix == "aws-prod"
    assert config.vaults[0].config == {"region": "us-east-1", "ttl": 600}
    assert config.clients[1].gid == 1001
    assert config.cache.ttl == 300.0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"listen": {"sockett": "x"}}, "config.listen.sockett: unknown key (allowed: socket, mode"),
        ({"listen": {"socket": "/" + "s" * 107}}, "is 108 bytes; a Unix socket path has at most"),
        ({"listen": {"mode": "0666"}}, "must not be world-writable"),
        ({"listen": {"mode": "rw"}}, "must be an octal mode such as '0660' (got 'rw')"),
        ({"cache": {"ttl": -1}}, "config.cache.ttl: Input should be greater than or equal to 0"),
        (
            {"cache": {"max_entries": 1}, "prefetch": ["{vault://env/a}", "{vault://env/b}"]},
            "prefetch has 2 references but cache.max_entries is 1",
        ),
        ({"metrics": {"address": "nohost"}}, "must be host:port"),
        ({"log": {"format": "xml"}}, "config.log.format: Input should be 'json' or 'console'"),
        ({"vaults": [{"prefix": "env", "name": "env"}]}, "must not be a backend name"),
        ({"vaults": [{"prefix": "Bad_", "name": "env"}]}, "config.vaults.0.prefix: String should"),
        ({"vaults": [{"prefix": "ok", "name": "nope"}]}, "config.vaults.0.name: Input should be"),
        (
            {"vaults": [{"prefix": "a1", "name": "env"}, {"prefix": "a1", "name": "env"}]},
            "prefix 'a1' is used by more than one vault",
        ),
        ({"prefetch": ["{vault://env}"]}, "reference url is missing path [{vault://env}]"),
        ({"clients": [{"allow": ["*"]}]}, "a client rule needs uid or gid"),
        ({"clients": [{"uid": 1}]}, "a client rule needs allow globs or admin: true"),
    ],
)
def test_invalid_config_names_key_value_and_rule(raw: dict[str, object], message: str) -> None:
    """Each invalid setting is refused with a message naming the key and what is allowed."""
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert message in caught.value.message


def test_yaml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    """Broken YAML is reported with the file name, not as a traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text("listen: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is a clear error."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_deck_file_loads_as_is(tmp_path: Path) -> None:
    """A decK dump with services, routes and plugins loads; only vaults are taken."""
    path = tmp_path / "kong.yaml"
    path.write_text(
        """
_format_version: "3.0"
_transform: true
services:
  - name: example
    url: http://example.com
    routes: [{name: r, paths: [/]}]
plugins: [{name: rate-limiting, config: {minute: 5}}]
vaults:
  - id: 2747d1e5-8246-4f65-a939-b392f1ee17f8
    prefix: my-env
    name: env
    description: env vault
    config: {prefix: MY_}
    tags: [team-a]
"""
    )
    config = load_config(path)
    assert [v.prefix for v in config.vaults] == ["my-env"]
    assert config.vaults[0].tags == ("team-a",)


def test_env_base_config_is_read_as_kong_reads_it() -> None:
    """KONG_VAULT_ENV_PREFIX sets the env vault's prefix field."""
    environ = {"KONG_VAULT_ENV_PREFIX": "APP_", "KONG_VAULT_ENV_TTL": "5", "OTHER": "x"}
    assert env_base_config("env", EnvSettings, environ) == {"prefix": "APP_", "ttl": "5"}


def test_settings_precedence_query_over_entity_over_env() -> None:
    """Reference query > vault entity config > KONG_VAULT_* env > defaults."""
    config = parse_config(
        {"vaults": [{"prefix": "app", "name": "env", "config": {"prefix": "ENTITY_"}}]}
    )
    environ = {"KONG_VAULT_ENV_PREFIX": "ENV_", "KONG_VAULT_ENV_TTL": "7"}
    registry = VaultRegistry(config.vaults, environ=environ)
    entity = registry.get("app")
    assert entity.settings == EnvSettings(prefix="ENTITY_", ttl=7)
    assert entity.settings_for({"ttl": "9"}) == EnvSettings(prefix="ENTITY_", ttl=9)
    implicit = registry.get("env")
    assert implicit.settings == EnvSettings(prefix="ENV_", ttl=7)
    assert VaultRegistry((), environ={}).get("env").settings == EnvSettings()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"ttl": "soon"}, "ttl: Input should be a valid number"),
        ({"bogus": "1"}, "query field 'bogus' may not be set by a reference to vault 'env'"),
        ({"ttl": ["1", "2"]}, "ttl: Input should be a valid number"),
        ({"base64_decode": "maybe"}, "base64_decode: Input should be a valid boolean"),
    ],
)
def test_invalid_query_values_are_rejected(query: dict[str, object], message: str) -> None:
    """Unlike Kong, a bad query value is an invalid_reference error, not silently dropped."""
    vault = VaultRegistry((), environ={}).get("env")
    with pytest.raises(InvalidReference) as caught:
        vault.settings_for(query)
    assert message in caught.value.message
    assert caught.value.code == "invalid_reference"


def test_unknown_vault_name_is_refused() -> None:
    """A name that is neither a prefix nor a backend is unknown_vault."""
    with pytest.raises(UnknownVault, match="no vault with prefix or backend name 'nope'"):
        VaultRegistry((), environ={}).get("nope")


def test_invalid_entity_config_names_vault_and_field() -> None:
    """A vault entity with an unknown config field fails at start, naming vault and field."""
    config = parse_config({"vaults": [{"prefix": "app", "name": "env", "config": {"x": 1}}]})
    with pytest.raises(ConfigError, match=r"vault 'app' \(env\) config.x: unknown key"):
        VaultRegistry(config.vaults, environ={})
