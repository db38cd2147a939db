"""Kong's vault entity schema, enforced when the config loads (docs/kong.md).

What Kong refuses when a vault entity is created is refused here before anything
listens: ``load_config`` for the entity rules, the vault registry (built right after,
by ``run``, ``check`` and a reload) for each backend's fields on the env-overlaid
config. Every message names the key and what is allowed, never a credential. What
Kong accepts still loads, a decK file included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.backends.aws import known_regions
from sidecar.backends.hcv import HcvSettings
from sidecar.config import Config, load_config, parse_config
from sidecar.errors import ConfigError
from sidecar.vaults import VaultRegistry
from tests.canary import assert_exception_clean, credential

TOKEN = credential("hvs.token")
ROLE_ID = credential("role-id")
SECRET_ID = credential("secret-id")
# The region list of Kong's aws vault schema (kong/vaults/aws/schema.lua).
KONG_AWS_REGIONS = (
    "us-east-2", "us-east-1", "us-west-1", "us-west-2", "af-south-1", "ap-east-1",
    "ap-southeast-3", "ap-south-1", "ap-northeast-3", "ap-northeast-2", "ap-southeast-1",
    "ap-southeast-2", "ap-northeast-1", "ca-central-1", "eu-central-1", "eu-west-1",
    "eu-west-2", "eu-south-1", "eu-west-3", "eu-north-1", "me-south-1", "sa-east-1",
    "us-gov-east-1", "us-gov-west-1",
)  # fmt: skip


def load(raw: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    """What ``run``/``check`` do before anything else: parse, then build the vaults."""
    config = parse_config(raw)
    VaultRegistry(config.vaults, environ=environ or {}, limits=config.limits)
    return config


def refusal(raw: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(raw, environ)
    assert_exception_clean(caught.value)
    assert TOKEN not in caught.value.message
    return caught.value.message


def vault(name: str, config: dict[str, Any] | None = None, **entity: Any) -> dict[str, Any]:
    return {"prefix": "kv-1", "name": name, "config": config or {}, **entity}


HCV = {"token": TOKEN}  # a valid token-auth base

# (vault entity, what the message must name: the key, then what is allowed)
REFUSED: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "prefix pattern": (
        vault("env", prefix="Bad_Prefix"),
        ("config.vaults.0.prefix", "'^[a-z][a-z0-9-]*[a-z0-9]$'"),
    ),
    "prefix of one character": (vault("env", prefix="a"), ("vaults.0.prefix", "[a-z0-9]$'")),
    "prefix ending in a dash": (vault("env", prefix="ab-"), ("vaults.0.prefix", "[a-z0-9]$'")),
    "prefix is our backend name": (
        vault("env", prefix="hcv"),
        ("vaults.0.prefix", "must not be a backend name", "aws, azure, conjur, env, gcp, hcv"),
    ),
    "prefix is another Kong vault": (
        vault("env", prefix="azure"),
        ("vaults.0.prefix", "aws, azure, conjur, env, gcp, hcv"),
    ),
    "name not installed": (
        vault("azure"),
        ("vaults.0.name", "'env', 'aws', 'gcp' or 'hcv'"),
    ),
    "empty description": (vault("env", description=""), ("vaults.0.description", "at least 1")),
    "tag with a comma": (vault("env", tags=["a,b"]), ("vaults.0.tags", "other than ',' and '/'")),
    "tag with a slash": (vault("env", tags=["a/b"]), ("vaults.0.tags", "other than ',' and '/'")),
    "empty tag": (vault("env", tags=[""]), ("vaults.0.tags", "not empty")),
    "id not a uuid": (vault("env", id="vault-1"), ("vaults.0.id", "must be a UUID")),
    "env prefix pattern": (
        vault("env", {"prefix": "1APP"}),
        ("config.prefix", "'^[A-Za-z_-][A-Za-z0-9_-]*$'"),
    ),
    "env prefix with a space": (vault("env", {"prefix": "A B"}), ("config.prefix", "[A-Za-z_-]")),
    "aws unknown region": (
        vault("aws", {"region": "eu"}),
        ("config.region", "must be an AWS region", "us-east-1", "eu-west-1", "us-gov-west-1"),
    ),
    "aws endpoint_url without host": (
        vault("aws", {"endpoint_url": "https://"}),
        ("config.endpoint_url", "http(s) URL with a host"),
    ),
    "aws endpoint_url not http": (
        vault("aws", {"endpoint_url": "secretsmanager.us-east-1.amazonaws.com"}),
        ("config.endpoint_url", "'^https?://'"),
    ),
    "aws sts_endpoint_url without host": (
        vault("aws", {"sts_endpoint_url": "http:///path"}),
        ("config.sts_endpoint_url", "http(s) URL with a host"),
    ),
    "gcp without project_id": (
        vault("gcp"),
        ("vaults.0.config", "project_id is required for a gcp vault"),
    ),
    "gcp with a null project_id": (
        vault("gcp", {"project_id": None}),
        ("vaults.0.config", "project_id is required"),
    ),
    "hcv protocol": (
        vault("hcv", {**HCV, "protocol": "ftp"}),
        ("config.protocol", "'http' or 'https'"),
    ),
    "hcv kv": (vault("hcv", {**HCV, "kv": "v3"}), ("config.kv", "'v1' or 'v2'")),
    "hcv auth_method": (
        vault("hcv", {**HCV, "auth_method": "ldap"}),
        ("config.auth_method", "'token', 'approle' or 'kubernetes'"),
    ),
    "hcv token auth without token": (
        vault("hcv"),
        ("config.auth_method", "token auth needs token or token_file (or KONG_VAULT_HCV_TOKEN)"),
    ),
    "hcv empty token": (
        vault("hcv", {"token": ""}),
        ("config.token", "at least 1", "token auth needs token"),
    ),
    "hcv kubernetes without kube_role": (
        vault("hcv", {"auth_method": "kubernetes"}),
        ("config.auth_method", "kubernetes auth needs kube_role"),
    ),
    "hcv kubernetes with a token": (
        vault("hcv", {"auth_method": "kubernetes", "kube_role": "r", "token": TOKEN}),
        ("vaults.0.config", "token must not be set when auth_method is kubernetes"),
    ),
    "hcv approle without role id": (
        vault("hcv", {"auth_method": "approle", "approle_secret_id": SECRET_ID}),
        ("config.auth_method", "approle auth needs approle_role_id"),
    ),
    "hcv approle without secret id": (
        vault("hcv", {"auth_method": "approle", "approle_role_id": ROLE_ID}),
        ("config.auth_method", "approle_secret_id or approle_secret_id_file"),
    ),
    "hcv host with a port": (
        vault("hcv", {**HCV, "host": "vault:8200"}),
        ("config.host", "host name or an IP address, without scheme, port or path"),
    ),
    "hcv host as a URL": (vault("hcv", {**HCV, "host": "https://vault"}), ("config.host",)),
    "hcv host with an empty label": (vault("hcv", {**HCV, "host": "a..b"}), ("config.host",)),
    "hcv host bad IPv4": (vault("hcv", {**HCV, "host": "10.0.0.256"}), ("config.host",)),
    "hcv port": (
        vault("hcv", {**HCV, "port": 70000}),
        ("config.port", "less than or equal to 65535"),
    ),
    "hcv empty namespace": (
        vault("hcv", {**HCV, "namespace": ""}),
        ("config.namespace", "at least 1"),
    ),
    "hcv empty mount": (vault("hcv", {**HCV, "mount": ""}), ("config.mount", "at least 1")),
    "hcv empty auth path": (
        vault("hcv", {**HCV, "approle_auth_path": ""}),
        ("config.approle_auth_path", "at least 1"),
    ),
}


@pytest.mark.parametrize(("entity", "named"), REFUSED.values(), ids=REFUSED.keys())
def test_what_kong_refuses_is_refused_when_the_config_loads(
    entity: dict[str, Any], named: tuple[str, ...]
) -> None:
    """Each of Kong's refusals is a ConfigError naming the key and what is allowed."""
    message = refusal({"vaults": [entity]})
    for text in named:
        assert text in message


def test_duplicate_prefixes_are_refused() -> None:
    """Kong's prefix is unique (across workspaces too): a second vault with it is refused."""
    raw = {"vaults": [vault("env"), vault("aws", {"region": "us-east-1"})]}
    assert "prefix 'kv-1' is used by more than one vault" in refusal(raw)


def test_entity_rules_fail_in_load_config(tmp_path: Path) -> None:
    """Rules of Kong's entity schema need no vault built: load_config itself refuses."""
    path = tmp_path / "kong.yaml"
    path.write_text("vaults:\n  - {prefix: sm, name: gcp, config: {location: europe-west1}}\n")
    with pytest.raises(ConfigError, match=r"kong.yaml.vaults.0.config: .*project_id is required"):
        load_config(path)


def test_kong_checks_the_entity_config_alone() -> None:
    """Kong's kubernetes/token rule looks at the entity's own config: a KONG_VAULT_HCV_TOKEN
    meant for {vault://hcv/...} does not make a kubernetes entity invalid."""
    entity = vault("hcv", {"auth_method": "kubernetes", "kube_role": "sidecar"})
    load({"vaults": [entity]}, environ={"KONG_VAULT_HCV_TOKEN": TOKEN})


def test_env_base_config_still_completes_an_entity() -> None:
    """As before, an hcv entity may take its token from KONG_VAULT_HCV_TOKEN (Kong wants it
    in the entity); without one anywhere it is refused."""
    raw = {"vaults": [vault("hcv", {"host": "vault.internal"})]}
    load(raw, environ={"KONG_VAULT_HCV_TOKEN": TOKEN})
    assert "token auth needs token" in refusal(raw)


def test_a_bad_env_base_value_is_named_like_the_entity_field() -> None:
    """KONG_VAULT_<NAME>_<FIELD> goes through the same rules (here an unknown region)."""
    raw = {"vaults": [vault("aws")]}
    message = refusal(raw, environ={"KONG_VAULT_AWS_REGION": "moon-1"})
    assert "vault 'kv-1' (aws) config.region: Value error, must be an AWS region" in message


def test_every_region_of_kongs_aws_schema_is_known() -> None:
    """botocore's list (partitions included) covers Kong's, so no Kong region is refused."""
    assert set(KONG_AWS_REGIONS) <= known_regions()
    assert {"cn-north-1", "us-iso-east-1", "eu-central-2"} <= known_regions()


@pytest.mark.parametrize(
    ("host", "kept"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("vault", "vault"),
        ("vault.service.consul", "vault.service.consul"),
        ("vault.example.com.", "vault.example.com."),  # an FQDN may end in a dot
        ("my_vault-1.internal", "my_vault-1.internal"),
        ("::1", "[::1]"),  # Kong takes a bare IPv6 address; a URL needs the brackets
        ("[fd00::8200]", "[fd00::8200]"),
    ],
)
def test_hcv_hosts_kong_accepts(host: str, kept: str) -> None:
    """Host names and IP addresses that Kong's typedefs.host accepts load."""
    assert HcvSettings(host=host, token=TOKEN).host == kept


DECK = f"""
_format_version: "3.0"
_konnect:
  control_plane_name: default
services:
  - name: example
    url: http://example.com
vaults:
  - id: 2747d1e5-8246-4f65-a939-b392f1ee17f8
    prefix: my-env
    name: env
    description: env vault
    config: {{prefix: MY_}}
    tags: [team-a, "env:prod", "k=v", "Über ops"]
    created_at: 1700000000
    updated_at: 1700000001
  - prefix: aws-gov
    name: aws
    config:
      region: us-gov-west-1
      endpoint_url: https://secretsmanager.us-gov-west-1.amazonaws.com
      assume_role_arn: arn:aws-us-gov:iam::123456789012:role/kong
      role_session_name: KongVault
      sts_endpoint_url: https://sts.us-gov-west-1.amazonaws.com
      ttl: 600
      neg_ttl: 30
      resurrect_ttl: 100000000
      base64_decode: false
  - prefix: gsm
    name: gcp
    config: {{project_id: my-project, ttl: 0, neg_ttl: 0}}  # Kong: no rotation, no negatives
  - prefix: vault-token
    name: hcv
    config:
      protocol: https
      host: vault.example.com
      port: 8200
      namespace: admin/team-a
      mount: secret
      kv: v2
      auth_method: token
      token: {TOKEN}
  - prefix: vault-k8s
    name: hcv
    config: {{auth_method: kubernetes, kube_role: kong, kube_auth_path: k8s,
              kube_api_token_file: /var/run/secrets/kubernetes.io/serviceaccount/token}}
  - prefix: vault-approle
    name: hcv
    config: {{auth_method: approle, approle_auth_path: approle, approle_role_id: {ROLE_ID},
              approle_secret_id_file: /run/secrets/wrapped, approle_response_wrapping: true}}
"""


def test_a_kong_deck_file_with_every_backend_loads(tmp_path: Path) -> None:
    """A decK file valid for Kong loads as is, and every vault in it can be built."""
    path = tmp_path / "kong.yaml"
    path.write_text(DECK)
    config = load_config(path)
    assert [v.prefix for v in config.vaults] == [
        "my-env", "aws-gov", "gsm", "vault-token", "vault-k8s", "vault-approle",
    ]  # fmt: skip
    registry = VaultRegistry(config.vaults, environ={})
    assert [v.backend_name for v in registry] == ["env", "aws", "gcp", "hcv", "hcv", "hcv"]


def test_kongs_minimal_examples_load() -> None:
    """The examples of Kong's vault pages: nothing but the required fields."""
    load(
        {
            "vaults": [
                {"prefix": "env-vault", "name": "env"},
                {"prefix": "aws-vault", "name": "aws", "config": {"region": "us-east-1"}},
                {"prefix": "gcp-vault", "name": "gcp", "config": {"project_id": "p-1"}},
                {"prefix": "hcv-vault", "name": "hcv", "config": {"token": TOKEN}},
            ]
        }
    )
