"""Kubernetes login for the facade: real RSA/ECDSA keys, JWTs signed as the API server
signs projected service-account tokens, the keys from a JWKS file or from OpenID
discovery served over real HTTP(S) on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.config import FacadeKubernetes, FacadeRole
from sidecar.errors import Forbidden, StartupError
from sidecar.facade_login import Issued, KubernetesLogin, LoginRefused
from sidecar.facade_tokens import Holder, TokenTable
from tests.canary import plant_credential
from tests.support import ManualClock
from tests.support_jwt import (
    AUDIENCE,
    ISSUER,
    DiscoveryServer,
    Issuer,
    claims,
    forge,
    forge_hmac,
    public_jwk,
    rsa_key,
    self_signed,
)

pytestmark = pytest.mark.timeout(20)

ROLES = (
    FacadeRole(name="kong", service_accounts=("gateway/kong*",), allow=("aws/kong/*",)),
    FacadeRole(name="ops", service_accounts=("ops/*",), allow=("aws/*", "env/*")),
)


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    """k1 published from the start, k2 the rotation's new key, k3 never published,
    other: an attacker's key."""
    return {kid: rsa_key() for kid in ("k1", "k2", "k3", "other")}


@pytest.fixture
def issuer(keys: dict[str, rsa.RSAPrivateKey]) -> Issuer:
    return Issuer(dict(keys), published=["k1"])


def settings(**changes: Any) -> FacadeKubernetes:
    fields: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "roles": ROLES,
                             "token_ttl": 600}  # fmt: skip
    return FacadeKubernetes(**{**fields, **changes})


class Rig:
    """A login over a JWKS file, its token table and the two clocks of the table."""

    def __init__(self, login: KubernetesLogin, table: TokenTable, clock: ManualClock) -> None:
        self.login, self.table, self.clock = login, table, clock

    async def issue(self, jwt_text: object, role: object = "kong") -> Issued:
        issued = await self.login.login(jwt_text, role)
        plant_credential(issued.token, "facade token")
        return issued

    async def refused(self, jwt_text: object, role: object = "kong") -> LoginRefused:
        with pytest.raises(LoginRefused) as caught:
            await self.login.login(jwt_text, role)
        exc = caught.value
        assert isinstance(exc, Forbidden)
        assert (exc.code, exc.status) == ("forbidden", 403)
        if isinstance(jwt_text, str) and len(jwt_text) > 20:
            assert jwt_text not in exc.message
            parts = jwt_text.split(".")
            if len(parts) == 3:
                assert parts[1][:20] not in exc.message  # not even its claims
        return exc


def make(kube: FacadeKubernetes, clock: ManualClock | None = None, **kw: Any) -> Rig:
    clock = clock or ManualClock()
    table = TokenTable(clock)
    return Rig(KubernetesLogin(kube, table, clock=clock, **kw), table, clock)


@pytest.fixture
async def rig(issuer: Issuer, tmp_path: Path) -> AsyncIterator[Rig]:
    made = make(settings(jwks_file=issuer.write_jwks(tmp_path / "jwks.json")))
    await made.login.start()
    yield made
    await made.login.close()


async def test_login_hands_out_a_token_mapped_to_the_role_for_the_role_ttl(
    rig: Rig, issuer: Issuer
) -> None:
    """A valid JWT of a bound service account gets a token whose holder is the role
    (its allow globs), living token_ttl (600 s) when the JWT lives longer."""
    issued = await rig.issue(issuer.sign(claims("gateway", "kong"), "k1"))
    assert (issued.role, issued.name, issued.policies) == (
        "kong",
        "kubernetes:kong",
        ("kubernetes:kong",),
    )
    assert issued.token.startswith("ss.")
    assert issued.metadata["service_account_namespace"] == "gateway"
    assert issued.metadata["service_account_name"] == "kong"
    assert issued.metadata["service_account_uid"]
    assert issued.lease_seconds == 595  # 600 less the margin for the client's cache
    holder = rig.table.holder(issued.token)
    assert holder == Holder("kubernetes:kong", ("aws/kong/*",), rig.clock.now + 600)
    rig.clock.advance(599)
    assert rig.table.holder(issued.token) is not None
    rig.clock.advance(2)
    assert rig.table.holder(issued.token) is None
    assert rig.login.accepted == 1


async def test_handed_out_token_does_not_outlive_the_jwt(rig: Rig, issuer: Issuer) -> None:
    """A JWT expiring in 120 s gets a token of about 120 s, not token_ttl (600 s)."""
    issued = await rig.issue(issuer.sign(claims(lifetime=120), "k1"))
    assert 100 <= issued.lease_seconds < 120
    rig.clock.advance(110)
    assert rig.table.holder(issued.token) is not None
    rig.clock.advance(11)
    assert rig.table.holder(issued.token) is None


async def test_audience_list_with_ours_among_others_and_a_second_role(
    rig: Rig, issuer: Issuer
) -> None:
    payload = claims("ops", "deployer", audience=["https://kubernetes.default.svc", AUDIENCE])
    issued = await rig.issue(issuer.sign(payload, "k1"), "ops")
    assert rig.table.holder(issued.token) == Holder(
        "kubernetes:ops", ("aws/*", "env/*"), rig.clock.now + 600
    )


async def test_ecdsa_signing_key(tmp_path: Path) -> None:
    """An API server with an ECDSA P-256 service-account key signs ES256."""
    ec_issuer = Issuer({"ec1": ec.generate_private_key(ec.SECP256R1())})
    made = make(settings(jwks_file=ec_issuer.write_jwks(tmp_path / "jwks.json")))
    await made.login.start()
    issued = await made.issue(ec_issuer.sign(claims(), "ec1"))
    assert made.table.holder(issued.token) is not None


def _header(**fields: str) -> dict[str, str]:
    return {"typ": "JWT", **fields}


Maker = Callable[[Issuer], tuple[object, object]]


def _edited(edit: Callable[[dict[str, Any]], None], kid: str = "k1") -> Maker:
    def make_jwt(issuer: Issuer) -> tuple[object, object]:
        payload = claims()
        edit(payload)
        return issuer.sign(payload, kid), "kong"

    return make_jwt


REFUSALS: list[tuple[str, Maker, str, str]] = [
    (
        "wrong audience",
        lambda i: (i.sign(claims(audience="https://kubernetes.default.svc"), "k1"), "kong"),
        "audience",
        "wrong aud",
    ),
    ("no audience", _edited(lambda c: c.pop("aud")), "missing_claim", "'aud'"),
    (
        "wrong issuer",
        lambda i: (i.sign(claims(issuer="https://oidc.example.test"), "k1"), "kong"),
        "issuer",
        "wrong iss",
    ),
    (
        "expired",
        lambda i: (i.sign(claims(now=time.time() - 7200), "k1"), "kong"),
        "expired",
        "expired",
    ),
    (
        "expired within the leeway: a token would outlive the JWT",
        lambda i: (i.sign(claims(now=time.time() - 3610), "k1"), "kong"),
        "expired",
        "expired",
    ),
    ("no exp", _edited(lambda c: c.pop("exp")), "missing_claim", "'exp'"),
    (
        "not valid yet",
        _edited(lambda c: c.update(nbf=int(time.time()) + 600)),
        "not_yet_valid",
        "not valid yet",
    ),
    (
        "signed by another key under a published kid",
        lambda i: (i.sign(claims(), "k1", key=i.keys["other"]), "kong"),
        "signature",
        "signature",
    ),
    (
        "alg none",
        lambda i: (forge(_header(alg="none", kid="k1"), claims(), b""), "kong"),
        "algorithm",
        "algorithm",
    ),
    (
        "HS256 keyed with the issuer's public key (algorithm confusion)",
        lambda i: (forge_hmac(claims(), i.public_pem("k1"), "k1"), "kong"),
        "algorithm",
        "algorithm",
    ),
    (
        "ES256 claimed for an RSA key",
        lambda i: (forge(_header(alg="ES256", kid="k1"), claims(), b"\x01" * 64), "kong"),
        "algorithm",
        "does not match",
    ),
    ("unknown role", lambda i: (i.sign(claims(), "k1"), "admin"), "unknown_role", "'admin'"),
    ("role not a string", lambda i: (i.sign(claims(), "k1"), ["kong"]), "unknown_role", "role"),
    (
        "service account not bound to the role",
        lambda i: (i.sign(claims("gateway", "billing"), "k1"), "kong"),
        "not_bound",
        "gateway/billing is not bound to role 'kong'",
    ),
    (
        "right name, other namespace",
        lambda i: (i.sign(claims("default", "kong"), "k1"), "kong"),
        "not_bound",
        "default/kong",
    ),
    (
        "kubernetes.io namespace disagrees with sub",
        _edited(lambda c: c["kubernetes.io"].update(namespace="ops")),
        "claims_mismatch",
        "disagrees",
    ),
    (
        "kubernetes.io service account disagrees with sub",
        _edited(lambda c: c["kubernetes.io"]["serviceaccount"].update(name="kong-admin")),
        "claims_mismatch",
        "disagrees",
    ),
    (
        "kubernetes.io not an object",
        _edited(lambda c: c.update({"kubernetes.io": "gateway"})),
        "claims_mismatch",
        "disagrees",
    ),
    ("sub not a service account", _edited(lambda c: c.update(sub="admin")), "subject", "sub"),
    (
        "sub with an extra part",
        _edited(lambda c: c.update(sub="system:serviceaccount:gateway:kong:x")),
        "subject",
        "sub",
    ),
    ("not a JWT", lambda i: ("not-a-jwt", "kong"), "malformed", "well-formed"),
    ("three garbage parts", lambda i: ("a.b.c", "kong"), "malformed", "well-formed"),
    ("empty", lambda i: ("", "kong"), "malformed", "non-empty"),
    ("not a string", lambda i: (12345, "kong"), "malformed", "non-empty"),
    ("too long", lambda i: ("e" * 20_000, "kong"), "malformed", "16 KiB"),
    (
        "exp not a number",
        _edited(lambda c: c.update(exp="soon")),
        "malformed",
        "claims are not valid",
    ),
]


@pytest.mark.parametrize(
    ("make_jwt", "reason", "says"),
    [pytest.param(m, r, s, id=label) for label, m, r, s in REFUSALS],
)
async def test_refused(rig: Rig, issuer: Issuer, make_jwt: Maker, reason: str, says: str) -> None:
    """Each refusal is one LoginRefused (403), saying why without the JWT, counted by
    reason; no token is handed out."""
    jwt_text, role = make_jwt(issuer)
    exc = await rig.refused(jwt_text, role)
    assert exc.reason == reason
    assert says in exc.message
    assert rig.login.refusals == {reason: 1}
    assert rig.login.accepted == 0


async def test_unknown_kid_reloads_the_file_at_most_once_a_minute(
    issuer: Issuer, tmp_path: Path
) -> None:
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    made = make(settings(jwks_file=jwks))
    await made.login.start()
    issuer.published = ["k1", "k2"]
    issuer.write_jwks(jwks)
    rotated = issuer.sign(claims(), "k2")
    assert (await made.refused(rotated)).reason == "unknown_key"  # loaded < 60 s ago
    made.clock.advance(61)
    await made.issue(rotated)
    assert made.login.key_ids == {"k1", "k2"}


async def test_rotation_over_discovery(issuer: Issuer) -> None:
    """The issuer starts signing with a new key: logins with it succeed once the keys are
    fetched again, which an unknown kid triggers at most once a minute, once for any
    number of concurrent logins; keys the issuer no longer publishes are dropped."""
    async with DiscoveryServer(issuer) as server:
        made = make(settings(discovery_url=server.discovery_url))
        await made.login.start()
        assert server.fetches == 1
        await made.issue(issuer.sign(claims(), "k1"))

        made.clock.advance(61)
        issuer.published = ["k2"]
        rotated = [issuer.sign(claims(), "k2") for _ in range(5)]
        issued = await asyncio.gather(*(made.issue(text) for text in rotated))
        assert all(made.table.holder(i.token) is not None for i in issued)
        assert server.fetches == 2

        made.clock.advance(30)
        issuer.published = ["k2", "k3"]
        assert (await made.refused(issuer.sign(claims(), "k3"))).reason == "unknown_key"
        assert (await made.refused(issuer.sign(claims(), "k1"))).reason == "unknown_key"
        assert server.fetches == 2  # the second unknown kid within 60 s fetched nothing
        await made.login.close()


async def test_failed_reload_keeps_the_keys_and_waits_a_minute(issuer: Issuer) -> None:
    async with DiscoveryServer(issuer) as server:
        made = make(settings(discovery_url=server.discovery_url))
        await made.login.start()
    made.clock.advance(61)  # the server is gone
    assert (await made.refused(issuer.sign(claims(), "k2"))).reason == "unknown_key"
    await made.issue(issuer.sign(claims(), "k1"))
    assert made.login.key_ids == {"k1"}


async def test_discovery_over_https_with_ca_file(issuer: Issuer, tmp_path: Path) -> None:
    ca_file, context = self_signed(tmp_path)
    async with DiscoveryServer(issuer, tls=context) as server:
        made = make(settings(discovery_url=server.discovery_url, ca_file=ca_file))
        await made.login.start()
        await made.issue(issuer.sign(claims(), "k1"))

        untrusting = make(settings(discovery_url=server.discovery_url))
        with pytest.raises(StartupError, match=r"TLS certificate is not trusted \(set ca_file\)"):
            await untrusting.login.start()


async def test_bearer_token_goes_to_the_discovery_origin_only(
    issuer: Issuer, tmp_path: Path
) -> None:
    """An API server that serves discovery to service accounts only gets the pod's own
    token; a jwks_uri on another origin never sees it."""
    bearer = plant_credential("sa-token-for-discovery-0123456789", "bearer token")
    token_file = tmp_path / "token"
    token_file.write_text(bearer + "\n", encoding="utf-8")
    async with (
        DiscoveryServer(issuer) as elsewhere,
        DiscoveryServer(issuer, bearer=bearer) as server,
    ):
        kube = settings(discovery_url=server.discovery_url)
        anonymous = make(kube)
        with pytest.raises(StartupError, match="answered 401"):
            await anonymous.login.start()

        made = make(kube, bearer_token_file=token_file)
        await made.login.start()
        assert server.authorizations[-2:] == [f"Bearer {bearer}"] * 2

        server.jwks_uri = f"{elsewhere.base}/openid/v1/jwks"
        other = make(kube, bearer_token_file=token_file)
        await other.login.start()
        assert server.authorizations[-1] == f"Bearer {bearer}"
        assert elsewhere.authorizations == [None]

        server.redirect = elsewhere.discovery_url
        redirected = make(kube, bearer_token_file=token_file)
        with pytest.raises(StartupError, match=r"answered 302 \(redirects are not followed"):
            await redirected.login.start()
        assert elsewhere.authorizations == [None]  # the redirect was not followed


async def test_start_failures_are_startup_errors_that_say_what_is_wrong(
    issuer: Issuer, keys: dict[str, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    async def refused_start(kube: FacadeKubernetes, **kw: Any) -> str:
        with pytest.raises(StartupError) as caught:
            await make(kube, **kw).login.start()
        return caught.value.message

    missing = tmp_path / "missing.json"
    assert f"cannot read {missing}" in await refused_start(settings(jwks_file=missing))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    assert "is not JSON" in await refused_start(settings(jwks_file=garbage))

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["k1"]))  # with "d"
    useless = tmp_path / "useless.json"
    useless.write_text(
        json.dumps(
            {
                "keys": [
                    {"kty": "oct", "k": "c2hhcmVkLXNlY3JldA", "kid": "hmac"},
                    public_jwk(weak, "weak"),
                    {**public_jwk(issuer.keys["k1"], "enc"), "use": "enc"},
                    {**private, "kid": "private"},
                    {**public_jwk(issuer.keys["k1"], "hs"), "alg": "HS256"},
                    "not a key",
                ]
            }
        ),
        encoding="utf-8",
    )
    assert "no usable signing key" in await refused_start(settings(jwks_file=useless))

    async with DiscoveryServer(issuer, issuer_url="https://elsewhere.test") as server:
        message = await refused_start(settings(discovery_url=server.discovery_url))
        assert "names issuer 'https://elsewhere.test'" in message
        message = await refused_start(settings(discovery_url=f"{server.base}/nothing"))
        assert message.endswith("answered 404")
    # the server is gone: its port refuses connections
    assert "cannot fetch" in await refused_start(settings(discovery_url=server.discovery_url))

    clear = "http://kubernetes.example.test/.well-known/openid-configuration"
    assert "plain http to a non-loopback host" in await refused_start(settings(discovery_url=clear))
    assert "cannot load ca_file" in await refused_start(
        settings(discovery_url=clear.replace("http:", "https:"), ca_file=missing)
    )


async def test_start_gives_up_after_the_fetch_timeout() -> None:
    """A server that accepts and never answers does not hang the start."""
    silent: list[asyncio.StreamWriter] = []

    def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/.well-known/openid-configuration"
        made = make(settings(discovery_url=url), fetch_timeout=0.2)
        with pytest.raises(StartupError, match=r"did not answer within 0\.2 s"):
            await made.login.start()
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_jwt_without_kid_is_accepted_only_from_a_single_key_issuer(
    issuer: Issuer, tmp_path: Path
) -> None:
    single = make(settings(jwks_file=issuer.write_jwks(tmp_path / "one.json")))
    await single.login.start()
    no_kid = plant_credential(jwt.encode(claims(), issuer.keys["k1"], algorithm="RS256"))
    await single.issue(no_kid)

    issuer.published = ["k1", "k2"]
    several = make(settings(jwks_file=issuer.write_jwks(tmp_path / "two.json")))
    await several.login.start()
    assert (await several.refused(no_kid)).reason == "unknown_key"
