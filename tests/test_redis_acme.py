"""
The fleet's ACME pieces (tls/acme/redis_store.py) against a real redis-server: the lock's
scripts, the fenced save, keys encrypted at rest, a wrong key file, the shared challenge board.

Twisted's reactor runs in a thread of the test process; the tests call into it as the issuing
thread does (blockingCallFromThread).
"""

from __future__ import annotations

import datetime
import threading
import time

import pytest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread

from support import wait_for

from twisted_gateway.config import RedisConfig
from twisted_gateway.fleet.redis import RedisLink
from twisted_gateway.tls.acme.redis_store import (
    RELEASE, RENEW, LeaseLost, RedisCertificateStore, RedisChallengeBoard, RedisIssuanceLock)
from twisted_gateway.tls.acme.shared import ChallengeBoard

_started = threading.Lock()


def in_reactor(f, *args):
    """Run C{f(*args)} in the reactor thread (started once for the test process)."""
    with _started:
        if not reactor.running:
            threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                             daemon=True).start()
            wait_for(lambda: reactor.running, 10, what="reactor running")
    return blockingCallFromThread(reactor, f, *args)


@pytest.fixture
def redis(redis_env):
    return redis_env.server()


@pytest.fixture
def links(redis):
    made: list[RedisLink] = []

    def make() -> RedisLink:
        link = in_reactor(RedisLink, RedisConfig(url=redis.url, key_prefix="t:"), reactor)
        made.append(link)
        return link
    yield make
    for link in made:
        in_reactor(link.stopService)


def started(link: RedisLink) -> RedisLink:
    in_reactor(link.startService)
    wait_for(lambda: link.up and link.subscribed, 10, what="Redis link up")
    return link


def certificate(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_lock_busy_wrong_token_and_expiry(links, redis):
    link = started(links())
    first = RedisIssuanceLock(link, reactor, ttl=30)
    second = RedisIssuanceLock(link, reactor, ttl=30)
    names = ("alpha.example.test",)
    lease = in_reactor(first.acquire, names)
    assert lease is not None and lease.fence == 1
    assert redis.cli("GET", "t:acme:lock:alpha.example.test") == lease.token
    # A second acquisition, by any holder, is refused while the lock lives.
    assert in_reactor(second.acquire, names) is None
    # Only the holder's token renews or releases.
    lock_key = "t:acme:lock:alpha.example.test"
    assert in_reactor(link.eval, RENEW, [lock_key], ["someone-else", "60000"]) == 0
    assert in_reactor(link.eval, RELEASE, [lock_key], ["someone-else"]) == 0
    assert redis.cli("GET", lock_key) == lease.token
    assert in_reactor(link.eval, RENEW, [lock_key], [lease.token, "60000"]) == 1
    in_reactor(first.release, lease)
    assert redis.cli("EXISTS", lock_key) == "0"
    # Released: the next acquisition has a higher fencing number.
    again = in_reactor(second.acquire, names)
    assert again is not None and again.fence == 2
    in_reactor(second.release, again)

    # A holder that dies: its lock expires by itself and another acquires it, fenced higher.
    short = RedisIssuanceLock(link, reactor, ttl=0.3)
    dead = in_reactor(short.acquire, names)
    assert dead is not None
    in_reactor(short._stop_renewing, dead)  # as if its process were gone
    assert in_reactor(first.acquire, names) is None
    taken = wait_for(lambda: in_reactor(first.acquire, names), 5, what="expired lock taken over")
    assert taken.fence == dead.fence + 1


def test_lock_is_renewed_while_held(links, redis):
    link = started(links())
    lock = RedisIssuanceLock(link, reactor, ttl=0.6)
    lease = in_reactor(lock.acquire, ("renewed.example.test",))
    started_at = time.monotonic()
    # Held well past its ttl, because the holder renews it every ttl/3.
    wait_for(lambda: time.monotonic() - started_at > 1.5, 3)
    assert redis.cli("GET", "t:acme:lock:renewed.example.test") == lease.token
    assert not lease.lost
    in_reactor(lock.release, lease)


def test_fenced_save_refuses_a_stale_holder_and_keys_are_encrypted(links, redis, tmp_path):
    link = started(links())
    fernet_key = Fernet.generate_key()
    key_file = tmp_path / "fernet.key"
    key_file.write_bytes(fernet_key + b"\n")
    store = in_reactor(RedisCertificateStore, link, reactor, str(tmp_path / "a"), str(key_file))
    in_reactor(store._link_up)
    wait_for(lambda: store.key_ok is True, 5, what="key check")
    names = ("fenced.example.test",)
    stale_lock = RedisIssuanceLock(link, reactor, ttl=0.3)
    stale = in_reactor(stale_lock.acquire, names)
    in_reactor(stale_lock._stop_renewing, stale)  # the holder stalls past its ttl
    newer_lock = RedisIssuanceLock(link, reactor, ttl=30)
    newer = wait_for(lambda: in_reactor(newer_lock.acquire, names), 5, what="lock taken over")
    chain_new, key_new = certificate(names[0])
    store.save(names, chain_new, key_new, lease=newer)
    chain_old, key_old = certificate(names[0])
    with pytest.raises(LeaseLost):
        store.save(names, chain_old, key_old, lease=stale)
    # The newer certificate stays, in Redis and in the local copy.
    assert redis.cli("HGET", "t:acme:cert:fenced.example.test", "chain") == chain_new.decode().strip()
    assert redis.cli("HGET", "t:acme:certs", "fenced.example.test") == str(newer.fence)
    assert [s.pair.certificate.public_bytes(serialization.Encoding.PEM) for s in store.load_all()] == [chain_new]
    # The private key is at rest encrypted with the key file's Fernet key.
    stored_key = redis.cli("HGET", "t:acme:cert:fenced.example.test", "key")
    assert "PRIVATE KEY" not in stored_key
    assert Fernet(fernet_key).decrypt(stored_key.encode()) == key_new
    # The account key too; another gateway's store gets it from Redis.
    store.save_account_key("https://ca.example/dir", key_old)
    account = redis.cli("KEYS", "t:acme:account:*").split()
    assert len(account) == 1 and "PRIVATE KEY" not in redis.cli("GET", account[0])
    other = in_reactor(RedisCertificateStore, link, reactor, str(tmp_path / "b"), str(key_file))
    assert other.account_key("https://ca.example/dir") == key_old
    in_reactor(newer_lock.release, newer)


def test_a_save_is_announced_and_copied_by_every_gateway(links, tmp_path):
    fernet = Fernet(Fernet.generate_key())
    writer_link, reader_link = started(links()), started(links())
    writer = in_reactor(lambda: RedisCertificateStore(writer_link, reactor, str(tmp_path / "w"), fernet=fernet))
    reader = in_reactor(lambda: RedisCertificateStore(reader_link, reactor, str(tmp_path / "r"), fernet=fernet))
    for store in (writer, reader):
        in_reactor(store._link_up)
        wait_for(lambda: store.key_ok is True, 5)
    changes: list[int] = []
    in_reactor(reader.add_listener, lambda: changes.append(1))
    chain, key = certificate("shared.example.test")
    lock = RedisIssuanceLock(writer_link, reactor, ttl=30)
    lease = in_reactor(lock.acquire, ("shared.example.test",))
    writer.save(("shared.example.test",), chain, key, lease=lease)
    wait_for(lambda: changes, 5, what="the other gateway's store heard of the save")
    copied = reader.load_all()
    assert [s.names for s in copied] == [("shared.example.test",)]
    assert copied[0].pair.certificate.public_bytes(serialization.Encoding.PEM) == chain
    in_reactor(lock.release, lease)


def test_a_wrong_key_file_is_reported_and_never_crashes_nor_writes(links, redis, tmp_path):
    link = started(links())
    right = in_reactor(lambda: RedisCertificateStore(link, reactor, str(tmp_path / "r"),
                                                     fernet=Fernet(Fernet.generate_key())))
    in_reactor(right._link_up)
    wait_for(lambda: right.key_ok is True, 5)
    chain, key = certificate("secret.example.test")
    lock = RedisIssuanceLock(link, reactor, ttl=30)
    lease = in_reactor(lock.acquire, ("secret.example.test",))
    right.save(("secret.example.test",), chain, key, lease=lease)
    in_reactor(lock.release, lease)

    wrong = in_reactor(lambda: RedisCertificateStore(link, reactor, str(tmp_path / "w"),
                                                     fernet=Fernet(Fernet.generate_key())))
    in_reactor(wrong._link_up)
    wait_for(lambda: wrong.key_ok is False, 5, what="key check refused")
    assert not wrong.can_issue
    # Its certificate is missing here (the key does not decrypt), counted, not installed.
    assert in_reactor(wrong.fetch, "secret.example.test") is None
    assert wrong.decrypt_failures >= 2
    assert wrong.present_but_unreadable(("secret.example.test",))
    assert wrong.load_all() == []
    # And it never writes over the fleet's certificate.
    lease = in_reactor(lock.acquire, ("secret.example.test",))
    with pytest.raises(LeaseLost):
        wrong.save(("secret.example.test",), *certificate("secret.example.test"), lease=lease)
    assert redis.cli("HGET", "t:acme:cert:secret.example.test", "chain") == chain.decode().strip()
    in_reactor(lock.release, lease)


def test_challenge_answers_reach_every_gateway(links, redis, tmp_path):
    issuer_link, peer_link = started(links()), started(links())
    issuer = in_reactor(RedisChallengeBoard, ChallengeBoard(str(tmp_path / "i")), issuer_link, reactor)
    peer_local = ChallengeBoard(str(tmp_path / "p"))
    peer = in_reactor(RedisChallengeBoard, peer_local, peer_link, reactor)
    # Published from the issuing thread: when publish returns, the peer holds it in memory
    # (and in its files, for its supervisor's plain port).
    issuer.publish("tls-alpn-01", "beta.example.test", "key-authorization-1")
    assert peer.read("tls-alpn-01", "beta.example.test") == "key-authorization-1"
    assert peer_local.read("tls-alpn-01", "beta.example.test") == "key-authorization-1"
    assert int(redis.cli("PTTL", "t:acme:challenge:tls-alpn-01:beta.example.test")) > 0
    issuer.withdraw("tls-alpn-01", "beta.example.test")
    wait_for(lambda: peer.read("tls-alpn-01", "beta.example.test") is None, 5, what="withdrawn")
    # A notice missed (a gateway subscribed late): read from Redis on a miss.
    redis.cli("SET", "t:acme:challenge:http-01:tok", "tok.thumbprint", "PX", "60000")
    assert peer.read("http-01", "tok") is None
    assert in_reactor(peer.read_async, "http-01", "tok") == "tok.thumbprint"
    assert peer.read("http-01", "tok") == "tok.thumbprint"


def test_http01_answer_through_the_admin_app_may_wait_for_redis(links, redis, tmp_path):
    from twisted.web.test.requesthelper import DummyRequest
    from twisted_gateway.admin import AdminApp
    from twisted_gateway.tls.acme.responders import HTTP01Responder
    link = started(links())
    board = in_reactor(RedisChallengeBoard, ChallengeBoard(str(tmp_path)), link, reactor)
    redis.cli("SET", "t:acme:challenge:http-01:remote-token", "remote-token.abc", "PX", "60000")
    app = AdminApp(lambda: (True, {}), HTTP01Responder(board))

    def get(token: str):
        request = DummyRequest([])
        return in_reactor(lambda: app.acme_challenge(request, token)), request
    # Not held here: the Redis read answers (a Deferred, which Klein waits for).
    body, request = get("remote-token")
    assert body == b"remote-token.abc" and request.responseCode in (None, 200)
    body, request = get("unknown")
    assert request.responseCode == 404
