"""
Authorization of requests to private HTTP ports with a JWT issued by the control plane.

A token is verified with pyjwt against exactly one key and algorithm family (HS256 with a shared
secret, or RS256/ES256 with a public key), so ``alg: none`` and algorithm confusion (an HS256
token signed with the RSA public key) fail as a wrong algorithm.  ``exp`` and ``iat`` are
required; ``iss`` and ``aud`` are checked when configured.  The ``prefixes`` claim lists the
task-name prefixes the holder may reach.
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twisted_gateway import metrics


@attrs.frozen
class AuthDecision:
    outcome: str
    """allowed, missing, malformed, expired, bad_signature, invalid, forbidden."""
    status: int
    message: str
    claims: dict[str, Any] | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome == "allowed"


def task_covered(task: str, prefixes: Iterable[str]) -> bool:
    return any(task.startswith(p) for p in prefixes if p)


class TokenVerifier:
    def __init__(self, secret: str | None = None, public_key_pem: bytes | None = None,
                 issuer: str | None = None, audience: str | None = None,
                 leeway: float = 30.0) -> None:
        if (secret is None) == (public_key_pem is None):
            raise ValueError("configure exactly one of a shared secret or a public key")
        if secret is not None:
            self._key: Any = secret
            self.algorithms = ["HS256"]
        else:
            assert public_key_pem is not None
            key = serialization.load_pem_public_key(public_key_pem)
            if isinstance(key, rsa.RSAPublicKey):
                self.algorithms = ["RS256"]
            elif isinstance(key, ec.EllipticCurvePublicKey):
                self.algorithms = ["ES256"]
            else:
                raise ValueError("the public key must be RSA (RS256) or EC P-256 (ES256)")
            self._key = key
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    def verify(self, token: str) -> AuthDecision:
        options = {"require": ["exp", "iat"], "verify_aud": self.audience is not None}
        try:
            claims = jwt.decode(token, self._key, algorithms=self.algorithms, options=options,
                                leeway=self.leeway, issuer=self.issuer, audience=self.audience)
        except jwt.ExpiredSignatureError:
            return AuthDecision("expired", 401, "the token has expired")
        except jwt.InvalidSignatureError:
            return AuthDecision("bad_signature", 401, "the token's signature is not valid")
        except jwt.InvalidAlgorithmError:
            return AuthDecision("bad_signature", 401,
                                f"the token's algorithm is not accepted (expected {self.algorithms[0]})")
        except jwt.DecodeError:
            return AuthDecision("malformed", 400, "the token is not a well-formed JWT")
        except jwt.MissingRequiredClaimError as e:
            return AuthDecision("invalid", 401, f"the token lacks the {e.claim!r} claim")
        except jwt.InvalidTokenError as e:
            return AuthDecision("invalid", 401, f"the token is not valid: {e}")
        prefixes = claims.get("prefixes")
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            return AuthDecision("invalid", 401, "the token's 'prefixes' claim is not a list of strings")
        return AuthDecision("allowed", 200, "ok", claims)

    def authorize(self, token: str | None, task: str) -> AuthDecision:
        decision = self._authorize(token, task)
        metrics.AUTH_DECISIONS.labels(outcome=decision.outcome).inc()
        return decision

    def _authorize(self, token: str | None, task: str) -> AuthDecision:
        if not token:
            return AuthDecision("missing", 401, "this port is private: a bearer token is required")
        decision = self.verify(token)
        if not decision.allowed:
            return decision
        assert decision.claims is not None
        if not task_covered(task, decision.claims["prefixes"]):
            return AuthDecision("forbidden", 403, f"the token does not cover task {task}", decision.claims)
        return decision


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def verifier_from_config(auth: Any, source: str) -> TokenVerifier | None:
    """Build the verifier for an C{AuthConfig}; raise C{ConfigError} naming the key on failure."""
    from twisted_gateway.config import ConfigError
    secret = auth.jwt_secret
    if auth.jwt_secret_file:
        try:
            with open(auth.jwt_secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ConfigError(source, "auth.jwt_secret_file", f"cannot read: {e.strerror}") from None
        if not secret:
            raise ConfigError(source, "auth.jwt_secret_file", "the file is empty")
    public_pem = None
    if auth.jwt_public_key:
        try:
            with open(auth.jwt_public_key, "rb") as f:
                public_pem = f.read()
        except OSError as e:
            raise ConfigError(source, "auth.jwt_public_key", f"cannot read: {e.strerror}") from None
    if secret is None and public_pem is None:
        return None
    try:
        return TokenVerifier(secret=secret, public_key_pem=public_pem, issuer=auth.issuer,
                             audience=auth.audience, leeway=auth.leeway)
    except ValueError as e:
        raise ConfigError(source, "auth.jwt_public_key", str(e)) from None
