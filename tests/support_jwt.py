"""A stand-in for a Kubernetes API server's token issuer: signing keys, projected
service-account JWTs signed the way the API server signs them, and its OpenID
discovery endpoints (``/.well-known/openid-configuration``, ``/openid/v1/jwks``)
served over real HTTP, or HTTPS with a test CA, on loopback.

Every JWT made here is planted as a credential (``tests.canary``), so a test that
logs one fails the suite's scan.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.canary import plant_credential

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "secret-sidecar"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    """The JWK the API server publishes for ``key`` (``use``, ``alg``, ``kid`` set)."""
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm: Any = jwt.algorithms.RSAAlgorithm
        alg = "RS256"
    else:
        algorithm = jwt.algorithms.ECAlgorithm
        alg = "ES256"
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    return {**jwk, "use": "sig", "kid": kid, "alg": alg}


def claims(
    namespace: str = "gateway",
    name: str = "kong",
    *,
    audience: str | list[str] = AUDIENCE,
    issuer: str = ISSUER,
    lifetime: float = 3600,
    now: float | None = None,
) -> dict[str, Any]:
    """Claims of a projected token for a pod of service account ``namespace/name``."""
    issued = int(time.time() if now is None else now)
    return {
        "aud": [audience] if isinstance(audience, str) else audience,
        "exp": issued + int(lifetime),
        "iat": issued,
        "nbf": issued,
        "iss": issuer,
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-1", "uid": str(uuid.uuid4())},
            "pod": {"name": f"{name}-7d9f8b6c5-x2x4z", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
            "warnafter": issued + 3000,
        },
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes) -> str:
    """A JWT assembled by hand, for the ones PyJWT rightly refuses to make."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return plant_credential(f"{signing_input}.{_b64(signature)}", "forged JWT")


def forge_hmac(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    """HS256 keyed with ``secret``: the algorithm-confusion attack when ``secret`` is the
    issuer's public key, which a verifier that trusts the header would accept."""
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return plant_credential(f"{signing_input}.{_b64(signature)}", "forged JWT")


@dataclass
class Issuer:
    """Signing keys by kid; ``published`` are the kids its JWKS lists."""

    keys: dict[str, PrivateKey]
    published: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.published:
            self.published = list(self.keys)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self.keys[kid], kid) for kid in self.published]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()), encoding="utf-8")
        return path

    def sign(self, payload: dict[str, Any], kid: str, *, key: PrivateKey | None = None) -> str:
        """``payload`` signed as the API server does (RS256 or ES256, ``kid`` header);
        ``key`` signs with another key under the same ``kid``."""
        signer = self.keys[kid] if key is None else key
        alg = "RS256" if isinstance(signer, rsa.RSAPrivateKey) else "ES256"
        token = jwt.encode(payload, signer, algorithm=alg, headers={"kid": kid})
        return plant_credential(token, "service-account JWT")

    def public_pem(self, kid: str) -> bytes:
        return (
            self.keys[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


class DiscoveryServer:
    """The issuer's OpenID discovery document and JWKS on a loopback port.

    ``fetches`` counts JWKS requests and ``authorizations`` records the Authorization
    header of each request; with ``bearer`` set, both endpoints answer 401 unless
    ``Authorization: Bearer <bearer>`` is sent (as the API server does for callers
    outside ``system:service-account-issuer-discovery``); ``tls`` serves HTTPS;
    ``jwks_uri`` advertises keys served elsewhere; ``redirect`` answers discovery with a
    302 there.
    """

    def __init__(
        self,
        issuer: Issuer,
        *,
        issuer_url: str = ISSUER,
        bearer: str | None = None,
        tls: ssl.SSLContext | None = None,
        jwks_uri: str | None = None,
        redirect: str | None = None,
    ) -> None:
        self.issuer = issuer
        self.jwks_uri = jwks_uri
        self.redirect = redirect
        self.issuer_url = issuer_url
        self.bearer = bearer
        self.tls = tls
        self.fetches = 0
        self.authorizations: list[str | None] = []
        self._runner: web.AppRunner | None = None
        self.base = ""

    @property
    def discovery_url(self) -> str:
        return f"{self.base}/.well-known/openid-configuration"

    def _allowed(self, request: web.Request) -> bool:
        presented = request.headers.get("Authorization")
        self.authorizations.append(presented)
        return self.bearer is None or presented == f"Bearer {self.bearer}"

    async def _discovery(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return web.json_response({"message": "Unauthorized"}, status=401)
        if self.redirect is not None:
            raise web.HTTPFound(self.redirect)
        return web.json_response(
            {
                "issuer": self.issuer_url,
                "jwks_uri": self.jwks_uri or f"{self.base}/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return web.json_response({"message": "Unauthorized"}, status=401)
        self.fetches += 1
        return web.json_response(self.issuer.jwks(), content_type="application/jwk-set+json")

    async def __aenter__(self) -> DiscoveryServer:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/openid/v1/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls).start()
        port = self._runner.addresses[0][1]
        self.base = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def self_signed(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 (its own CA), as ``(ca_file, server context)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test API server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file = directory / "server.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(ca_file, key_file)
    return ca_file, context
