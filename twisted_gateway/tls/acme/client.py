"""
The ACME order flow with certbot's ``acme`` library, run in a worker thread.

The library is synchronous (requests), so one issuance runs in Twisted's thread pool while
the challenge responders are read from the reactor thread.  Authorizations are polled every
50 ms instead of the library's whole-second sleeps, and a ``badNonce`` rejection is retried
(the library retries only once).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import josepy as jose
from acme import client as acme_client
from acme import crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.logger import Logger

from twisted_gateway import version
from twisted_gateway.tls.acme.challenges import IResponder
from twisted_gateway.tls.acme.store import ICertificateStore


class IssuanceError(Exception):
    """An order failed; the message says which step and why."""


def new_private_key(key_type: str) -> Any:
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class AcmeIssuer:
    log = Logger()

    def __init__(self, directory_url: str, email: str | None, key_type: str, ca_bundle: str | None,
                 store: ICertificateStore, responders: dict[str, IResponder],
                 poll_deadline: float = 120.0) -> None:
        self.directory_url = directory_url
        self.email = email
        self.key_type = key_type
        self.ca_bundle = ca_bundle
        self.store = store
        self.responders = responders
        self.poll_deadline = poll_deadline
        self._client: acme_client.ClientV2 | None = None
        self._account_key: jose.JWK | None = None

    # -- account ----------------------------------------------------------------------------

    def _account_jwk(self) -> jose.JWK:
        pem = self.store.account_key(self.directory_url)
        if pem is None:
            pem = _pem(ec.generate_private_key(ec.SECP256R1()))
            self.store.save_account_key(self.directory_url, pem)
        key = serialization.load_pem_private_key(pem, None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return jose.JWKEC(key=key)
        return jose.JWKRSA(key=key)

    def client(self) -> acme_client.ClientV2:
        if self._client is not None:
            return self._client
        jwk = self._account_jwk()
        alg = jose.ES256 if isinstance(jwk, jose.JWKEC) else jose.RS256
        net = acme_client.ClientNetwork(jwk, alg=alg, user_agent=f"twisted-gateway/{version()}")
        # The library passes verify=net.verify_ssl on every request; requests takes a bundle path.
        net.verify_ssl = self.ca_bundle or True  # type: ignore[assignment]  # acme declares it bool
        directory = acme_client.ClientV2.get_directory(self.directory_url, net)
        client = acme_client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=self.email, terms_of_service_agreed=True)
        try:
            account = client.new_account(registration)
        except errors.ConflictError as e:
            # The key is already registered: adopt that account.
            account = client.query_registration(
                messages.RegistrationResource(uri=e.location, body=messages.Registration()))
        net.account = account
        self._client = client
        self._account_key = jwk
        return client

    def has_renewal_info(self) -> bool:
        try:
            self.client().directory["renewalInfo"]
        except KeyError:
            return False
        return True

    def renewal_time(self, chain_pem: bytes) -> datetime.datetime | None:
        """ARI's suggested renewal time (RFC 9773), or None when the CA offers none."""
        when, _ = self.client().renewal_time(chain_pem)
        return when

    # -- issuance -------------------------------------------------------------------------------

    def issue(self, names: tuple[str, ...], challenge_type: str) -> tuple[bytes, bytes]:
        """Run one order for C{names}; return (full chain PEM, key PEM)."""
        last: Exception | None = None
        for _ in range(3):
            try:
                return self._issue_once(names, challenge_type)
            except messages.Error as e:
                if e.code != "badNonce":
                    raise IssuanceError(f"the CA refused the order: {e}") from None
                last = e
                self._client = None
        raise IssuanceError(f"the CA kept rejecting nonces: {last}")

    def _issue_once(self, names: tuple[str, ...], challenge_type: str) -> tuple[bytes, bytes]:
        client = self.client()
        assert self._account_key is not None
        responder = self.responders.get(challenge_type)
        if responder is None:
            raise IssuanceError(f"no responder for {challenge_type}")
        key = new_private_key(self.key_type)
        key_pem = _pem(key)
        order = client.new_order(crypto_util.make_csr(key_pem, list(names)))
        presented: list[tuple[str, Any, str, Any]] = []
        try:
            pending = []
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                challb = next((c for c in authz.body.challenges if c.chall.typ == challenge_type), None)
                if challb is None:
                    offered = ", ".join(c.chall.typ for c in authz.body.challenges)
                    raise IssuanceError(f"the CA offers no {challenge_type} for "
                                        f"{authz.body.identifier.value} (offers {offered})")
                name = authz.body.identifier.value
                if authz.body.wildcard:
                    name = "*." + name
                response, validation = challb.chall.response_and_validation(self._account_key)
                key_authorization = challb.chall.key_authorization(self._account_key)
                responder.present(name, challb.chall, key_authorization, validation)
                presented.append((name, challb.chall, key_authorization, validation))
                pending.append((authz, challb, response))
            for authz, challb, response in pending:
                client.answer_challenge(challb, response)
            deadline = time.monotonic() + self.poll_deadline
            for authz, _, _ in pending:
                while True:
                    authz, _ = client.poll(authz)
                    status = authz.body.status
                    if status == messages.STATUS_VALID:
                        break
                    if status == messages.STATUS_INVALID:
                        errors_ = [str(c.error) for c in authz.body.challenges if c.error]
                        raise IssuanceError(f"validation of {authz.body.identifier.value} failed: "
                                            f"{'; '.join(errors_) or 'invalid'}")
                    if time.monotonic() > deadline:
                        raise IssuanceError(f"validation of {authz.body.identifier.value} timed out")
                    time.sleep(0.05)
        finally:
            for item in presented:
                try:
                    responder.cleanup(*item)
                except Exception as e:  # noqa: BLE001
                    self.log.warn("challenge cleanup for {name} failed: {error}", name=item[0], error=str(e))
        finalized = client.finalize_order(
            order, datetime.datetime.now() + datetime.timedelta(seconds=self.poll_deadline))
        if not finalized.fullchain_pem:
            raise IssuanceError("the CA returned no certificate")
        return finalized.fullchain_pem.encode(), key_pem
