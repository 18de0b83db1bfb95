"""
Authorization of requests to private HTTP ports with a JWT issued by the control plane.

A token is verified with pyjwt against exactly one key and algorithm family (HS256 with a shared
secret, or RS256/ES256 with a public key), so ``alg: none`` and algorithm confusion (an HS256
token signed with the RSA public key) fail as a wrong algorithm.  ``exp`` and ``iat`` are
required; ``iss`` and ``aud`` are checked when configured.  The ``prefixes`` claim lists the
task-name prefixes the holder may reach.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twisted.application.internet import TimerService
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway import metrics
from twisted_gateway.logs import error_text

if TYPE_CHECKING:
    from jwt.types import Options


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


class JWKSKeys(TimerService):
    """
    Public keys from the control plane's JWKS URL, fetched with treq at start and every
    C{refresh} seconds (a TimerService; the next round waits for a fetch in flight), and early
    (at most every C{min_interval} seconds) when a token names a key id not seen yet, so
    rotated keys are picked up without waiting.
    """

    log = Logger()

    def __init__(self, url: str, refresh: float, reactor: Any = None, min_interval: float = 10.0) -> None:
        super().__init__(refresh, self._poll)
        self.clock = reactor
        self.url = url
        self.min_interval = min_interval
        self.keys: dict[str, tuple[Any, str]] = {}
        self.loaded = False
        self._last_fetch = -1e9
        self._fetching = False
        self._clock = reactor

    @property
    def refresh(self) -> float:
        """Seconds between fetches (the timer's step)."""
        return float(self.step)

    def _now(self) -> float:
        if self._clock is None:
            from twisted.internet import reactor
            self._clock = reactor
        return self._clock.seconds()

    def _poll(self) -> Any:
        try:
            return self.fetch()
        except Exception:  # noqa: BLE001 - logged; a TimerService whose call raises stops for good
            self._fetching = False
            self._failed(Failure())
            return None

    def key_for(self, kid: str | None) -> tuple[Any, str] | None:
        if kid is not None and kid in self.keys:
            return self.keys[kid]
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        if self._now() - self._last_fetch >= self.min_interval:
            self.fetch()
        return None

    def fetch(self) -> Any:
        if self._fetching:
            return None
        import treq
        self._fetching = True
        self._last_fetch = self._now()
        d = treq.get(self.url, timeout=10)
        d.addCallback(self._got_response)
        d.addCallback(self._got_document)
        d.addErrback(self._failed)

        def done(_: Any) -> None:
            self._fetching = False
        d.addBoth(done)
        return d

    def _got_response(self, response: Any) -> Any:
        if response.code != 200:
            raise ValueError(f"HTTP {response.code}")
        return response.json()

    def _got_document(self, doc: Any) -> None:
        keys: dict[str, tuple[Any, str]] = {}
        for entry in (doc or {}).get("keys", []):
            try:
                jwk = jwt.PyJWK.from_dict(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, KeyError) as e:
                self.log.warn("JWKS {url}: skipping a key: {error}", url=self.url, error=str(e))
                continue
            algorithm = entry.get("alg") or {"RSA": "RS256", "EC": "ES256"}.get(entry.get("kty", ""))
            if algorithm not in ("RS256", "ES256"):
                self.log.warn("JWKS {url}: skipping key {kid} with algorithm {alg}",
                              url=self.url, kid=entry.get("kid"), alg=algorithm)
                continue
            keys[entry.get("kid") or f"key-{len(keys)}"] = (jwk.key, algorithm)
        if not keys:
            raise ValueError("the document holds no usable RS256 or ES256 key")
        self.keys = keys
        self.loaded = True
        metrics.JWKS_REFRESHES.labels(outcome="success").inc()
        self.log.info("JWKS {url}: {count} keys", url=self.url, count=len(keys))

    def _failed(self, failure: Any) -> None:
        metrics.JWKS_REFRESHES.labels(outcome="failure").inc()
        self.log.warn("JWKS {url} refresh failed, keeping {count} known keys: {error}",
                      url=self.url, count=len(self.keys), error=error_text(failure))


class TokenVerifier:
    def __init__(self, secret: str | None = None, public_key_pem: bytes | None = None,
                 issuer: str | None = None, audience: str | None = None,
                 leeway: float = 30.0, jwks: JWKSKeys | None = None) -> None:
        self.jwks = jwks
        self._key: str | rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None
        """The shared secret or public key; None with a JWKS, whose keys are looked up per token."""
        if jwks is not None:
            if secret is not None or public_key_pem is not None:
                raise ValueError("configure exactly one of a shared secret, a public key or a JWKS URL")
            self._key = None
            self.algorithms = ["RS256", "ES256"]
        elif (secret is None) == (public_key_pem is None):
            raise ValueError("configure exactly one of a shared secret or a public key")
        elif secret is not None:
            self._key = secret
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
        options: Options = {"require": ["exp", "iat"], "verify_aud": self.audience is not None}
        key, algorithms = self._key, self.algorithms
        if self.jwks is not None:
            try:
                kid = jwt.get_unverified_header(token).get("kid")
            except jwt.DecodeError:
                return AuthDecision("malformed", 400, "the token is not a well-formed JWT")
            found = self.jwks.key_for(kid)
            if found is None:
                return AuthDecision("bad_signature", 401, f"the token's key id {kid!r} is not known (yet)")
            key, algorithm = found
            algorithms = [algorithm]
        assert key is not None  # the configured secret or public key, or the JWKS key found
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, options=options,
                                leeway=self.leeway, issuer=self.issuer, audience=self.audience)
        except jwt.ExpiredSignatureError:
            return AuthDecision("expired", 401, "the token has expired")
        except jwt.InvalidSignatureError:
            return AuthDecision("bad_signature", 401, "the token's signature is not valid")
        except jwt.InvalidAlgorithmError:
            return AuthDecision("bad_signature", 401,
                                f"the token's algorithm is not accepted (expected {algorithms[0]})")
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


def verifier_from_config(auth: Any, source: str, reactor: Any = None) -> TokenVerifier | None:
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
    if auth.jwks_url:
        return TokenVerifier(issuer=auth.issuer, audience=auth.audience, leeway=auth.leeway,
                             jwks=JWKSKeys(auth.jwks_url, auth.jwks_refresh, reactor))
    if secret is None and public_pem is None:
        return None
    try:
        return TokenVerifier(secret=secret, public_key_pem=public_pem, issuer=auth.issuer,
                             audience=auth.audience, leeway=auth.leeway)
    except ValueError as e:
        raise ConfigError(source, "auth.jwt_public_key", str(e)) from None
