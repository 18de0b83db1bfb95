"""
Unit tests of the request policy (twisted_gateway.http.policy) without sockets: which
``orig_url`` the ``/auth-redirect`` answer may send a browser to (read as the WHATWG URL standard
reads it), the ``Location`` values the gateway builds, the token check of ``/auth-redirect``,
and whose forwarding fields are believed.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import jwt
import pytest

from twisted_gateway.http.auth import AuthDecision, TokenVerifier
from twisted_gateway.http.policy import (
    MAX_REDIRECT_URL, auth_redirect, forwarding_headers, header_value_ok, redirect_target, refusal,
    trusted_peer,
)
from twisted_gateway.limits import parse_networks

HOST = "gw.test"
SECRET = "policy-test-secret-of-at-least-32-bytes"


# -- redirect_target -------------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("https://gw.test/", "https://gw.test/"),
    ("https://gw.test", "https://gw.test/"),                       # a special URL's path is never empty
    ("https://GW.TEST/x", "https://gw.test/x"),                    # the host is lowercased...
    ("HTTPS://gw.test/X", "https://gw.test/X"),                    # ... the scheme too, never the path
    ("https://a-80.gw.test:8443/p?q=1#f", "https://a-80.gw.test:8443/p?q=1#f"),
    ("https://gw.test:443/p", "https://gw.test/p"),                # the default port is dropped
    ("https://gw.test:08443/p", "https://gw.test:8443/p"),         # leading zeros are a number
    ("https://gw.test:65535/", "https://gw.test:65535/"),
    ("https://gw.test?q", "https://gw.test/?q"),
    ("https://gw.test#f", "https://gw.test/#f"),
    ("https://gw.test/?", "https://gw.test/?"),
    ("https://gw.test/a\\b", "https://gw.test/a/b"),             # "\" is "/" in a special path
    ("https://gw.test/a?b\\c#d\\e", "https://gw.test/a?b\\c#d\\e"),  # ... but not in query or fragment
    ("https://gw.test\\@evil.example/", "https://gw.test/@evil.example/"),  # "@" after the host: path
    ("https:/\\gw.test/", "https://gw.test/"),                      # "/\" is read as "//"
    ("https:\\\\gw.test", "https://gw.test/"),                      # and so is "\\"
    ("https://gw.test/%0d%0aSet-Cookie:%20x", "https://gw.test/%0d%0aSet-Cookie:%20x"),  # encoded: inert
    ("https://gw.test//evil.example/", "https://gw.test//evil.example/"),  # a path, on our host
    ("https://a.b.gw.test/", "https://a.b.gw.test/"),
    # Serialized as the parser leaves it: dot segments resolved, the same characters encoded.
    ("https://gw.test/a/../b/./c", "https://gw.test/b/c"),
    ("https://gw.test/a/%2E%2e", "https://gw.test/"),
    ("https://gw.test/../../x", "https://gw.test/x"),
    ("https://gw.test/a/.", "https://gw.test/a/"),
    ("https://gw.test/\"<x>`{}|^", "https://gw.test/%22%3Cx%3E%60%7B%7D|^"),
    ("https://gw.test/?'\"<>`", "https://gw.test/?%27%22%3C%3E`"),
    ("https://gw.test/#'\"<>`?", "https://gw.test/#'%22%3C%3E%60?"),
])
def test_redirect_target_accepts_our_https_urls_normalized(url: str, expected: str) -> None:
    assert redirect_target(url, HOST) == expected


@pytest.mark.parametrize("url", [
    # The known open redirect: urlsplit reads the host as gw.test; a browser reads "\" as "/"
    # and goes to evil.example (path /@gw.test/).
    "https://evil.example\\@gw.test/",
    "https://gw.test@evil.example/",             # userinfo: the host is evil.example
    "https://user:pw@gw.test/",                  # userinfo at all
    "https://@gw.test/",
    "https://gw.test.evil.example/",             # our name as a label of theirs
    "https://evilgw.test/",                      # a suffix that is not a label boundary
    "https://gw.testevil/",
    "//evil.example/",                           # scheme-relative
    "//gw.test/",
    "/path",
    "https:\\\\evil.example",                    # read as https://evil.example
    "https:/evil.example",                       # host or path depending on the base: refused
    "https:evil.example",
    "https:///gw.test/",                         # extra slashes are skipped by browsers: refused
    "https:/\\/gw.test/",
    "http://gw.test/",                           # not https
    "ftp://gw.test/",
    "javascript:alert(document.domain)//https://gw.test/",
    "javascript://gw.test/%0aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "https://gw.test\t/",                        # tab, CR and LF are stripped by browsers: refused
    "https://gw\t.test/",
    "https://gw.test/\r\nSet-Cookie: x=1",
    "https://gw.test/\nx",
    "https://gw.test/\rx",
    "https://gw.test/\x00",
    "https://gw.test/\x7f",
    " https://gw.test/",                         # leading and trailing spaces are stripped too
    "https://gw.test/ ",
    "https://gw.test/a b",
    "https://gw.test/\u00e9",                    # non-ASCII anywhere
    "https://g\u00fc.gw.test/",
    "https://gw\u3002test/",                     # an ideographic full stop is a dot after IDNA mapping
    "https://gw.test%2eevil.example/",           # percent-encoding in the host
    "https://%67w.test/",
    "https://gw.test./",                         # a trailing dot
    "https://a..gw.test/",
    "https://.gw.test/",
    "https://-a.gw.test/",
    "https://a_b.gw.test/",
    "https://[::1]/",
    "https://gw.test:/",                         # empty port
    "https://gw.test:0/",
    "https://gw.test:65536/",
    "https://gw.test:123456/",
    "https://gw.test:-1/",
    "https://gw.test:80:80/",
    "https://gw.test:8x/",
    "https://",
    "https:",
    "",
    "https://gw.test/" + "a" * MAX_REDIRECT_URL,  # a very long URL
])
def test_redirect_target_refuses_what_is_not_ours_as_a_browser_reads_it(url: str) -> None:
    assert redirect_target(url, HOST) is None


def test_redirect_target_refuses_ipv4_readings_of_a_subdomain() -> None:
    # A host whose last label is a number is an IPv4 address to a browser, not a name.
    assert redirect_target("https://127.0.0.1/", "127.0.0.1") == "https://127.0.0.1/"
    assert redirect_target("https://5.127.0.0.1/", "127.0.0.1") is None
    assert redirect_target("https://a.gw.0x1/", "gw.0x1") is None


def test_redirect_target_hostname_is_matched_case_insensitively() -> None:
    assert redirect_target("https://a.gw.test/", "GW.Test") == "https://a.gw.test/"


def test_redirect_target_long_urls_up_to_the_limit() -> None:
    url = "https://gw.test/" + "a" * (MAX_REDIRECT_URL - len("https://gw.test/"))
    assert redirect_target(url, HOST) == url
    assert redirect_target(url + "a", HOST) is None


# -- header_value_ok --------------------------------------------------------------------------------

def test_header_value_ok() -> None:
    assert header_value_ok(b"https://gw.test/?a=b c\t\x80\xff")
    assert header_value_ok(b"")
    for byte in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]:
        assert not header_value_ok(b"a" + bytes([byte]) + b"b"), byte


# -- refusal and auth_redirect -------------------------------------------------------------------

@attrs.define
class Context:
    """The parts of an HTTPRouteContext the policy functions use."""

    verifier: TokenVerifier | None = attrs.field(factory=lambda: TokenVerifier(secret=SECRET))
    hostname: str = HOST
    signin_url: str | None = "https://console.example/signin"
    cookie_name: bytes = b"__Host-gateway-token"
    cookie_max_age: int = 3600


def make_token(prefixes: list[str], exp_in: int = 300) -> str:
    now = int(time.time())
    return jwt.encode({"prefixes": prefixes, "iat": now, "exp": now + exp_in, "sub": "u"}, SECRET,
                      algorithm="HS256")


def query(token: str | None, orig_url: str) -> str:
    from urllib.parse import urlencode
    args = {"orig_url": orig_url}
    if token is not None:
        args["token"] = token
    return urlencode(args)


def headers_of(answer: Any) -> dict[bytes, bytes]:
    return dict(answer.headers)


def test_auth_redirect_sets_the_cookie_and_sends_to_the_normalized_url() -> None:
    good = make_token(["acme/"])
    answer = auth_redirect(Context(), query(good, "https://A-80.GW.test:8443/p?q=1#f"))
    assert answer.status == 307
    headers = headers_of(answer)
    assert headers[b"location"] == b"https://a-80.gw.test:8443/p?q=1#f"
    assert headers[b"set-cookie"].startswith(b"__Host-gateway-token=" + good.encode() + b"; Path=/; Secure")
    assert headers[b"cache-control"] == b"no-store"


@pytest.mark.parametrize("orig_url", [
    "https://evil.example\\@gw.test/", "https://gw.test@evil.example/", "https://gw.test/\r\nx: y",
    "https://evil.example/", "",
])
def test_auth_redirect_refuses_foreign_urls_before_the_token(orig_url: str) -> None:
    answer = auth_redirect(Context(), query(make_token(["acme/"]), orig_url))
    assert answer.status == 400 and answer.error is not None and answer.error[0] == "bad_orig_url"
    assert b"set-cookie" not in headers_of(answer)


def test_auth_redirect_percent_encoded_newlines_in_orig_url_are_refused() -> None:
    # parse_qs decodes %0d%0a: the decoded URL carries CR LF and is refused.
    answer = auth_redirect(Context(), "token=x&orig_url=https%3A%2F%2Fgw.test%2F%0d%0aSet-Cookie%3A%20a")
    assert answer.status == 400


def test_auth_redirect_without_task_takes_any_valid_token() -> None:
    ctx = Context()
    assert auth_redirect(ctx, query(make_token(["other/"]), "https://gw.test/")).status == 307
    missing = auth_redirect(ctx, query(None, "https://gw.test/"))
    assert missing.status == 401 and b"set-cookie" not in headers_of(missing)
    expired = auth_redirect(ctx, query(make_token(["acme/"], exp_in=-3600), "https://gw.test/"))
    assert expired.status == 401 and b"set-cookie" not in headers_of(expired)
    assert auth_redirect(ctx, query("garbage", "https://gw.test/")).status == 400


def test_auth_redirect_with_task_needs_a_token_that_opens_it() -> None:
    ctx = Context()
    ok = auth_redirect(ctx, query(make_token(["acme/"]), "https://a-80.gw.test/"), task="acme/alpha")
    assert ok.status == 307 and b"set-cookie" in headers_of(ok)
    foreign = auth_redirect(ctx, query(make_token(["other/"]), "https://a-80.gw.test/"), task="acme/alpha")
    assert foreign.status == 403 and foreign.error is not None and foreign.error[0] == "forbidden"
    assert b"set-cookie" not in headers_of(foreign) and b"location" not in headers_of(foreign)
    missing = auth_redirect(ctx, query(None, "https://a-80.gw.test/"), task="acme/alpha")
    assert missing.status == 401 and b"set-cookie" not in headers_of(missing)
    assert headers_of(missing)[b"www-authenticate"].startswith(b'Bearer error="invalid_token"')


def test_auth_redirect_without_verifier_is_refused() -> None:
    answer = auth_redirect(Context(verifier=None), query("x", "https://gw.test/"), task="acme/alpha")
    assert answer.status == 403 and b"set-cookie" not in headers_of(answer)


def test_refusal_sends_a_browser_to_sign_in_with_a_quoted_orig_url() -> None:
    decision = AuthDecision("missing", 401, "no token")
    answer = refusal(Context(), decision, b"GET", True, "https://a-80.gw.test/p?x=1\r\nSet-Cookie: a")
    assert answer.status == 307
    location = headers_of(answer)[b"location"]
    assert location.startswith(b"https://console.example/signin?orig_url=https%3A%2F%2Fa-80.gw.test")
    assert header_value_ok(location) and b"%0D%0A" in location


def test_refusal_never_sends_a_location_with_controls() -> None:
    # A sign-in URL that is not a field value (configuration gone wrong) is not sent.
    ctx = Context(signin_url="https://console.example/signin\r\nX-Injected: 1")
    answer = refusal(ctx, AuthDecision("missing", 401, "no token"), b"GET", True, "https://gw.test/")
    assert answer.status == 401 and b"location" not in headers_of(answer)
    assert all(header_value_ok(v) for v in headers_of(answer).values())


def test_refusal_challenge_quotes_the_message() -> None:
    decision = AuthDecision("bad_signature", 401, "the token's key id 'a\"b\\\\c' is not known (yet)")
    challenge = headers_of(refusal(Context(), decision, b"POST", False, "https://gw.test/"))[b"www-authenticate"]
    assert challenge == (b'Bearer error="invalid_token", '
                         b'error_description="the token\'s key id \'a\\"b\\\\\\\\c\' is not known (yet)"')
    controls = AuthDecision("invalid", 401, "bad\r\nX-Injected: 1")
    challenge = headers_of(refusal(Context(), controls, b"POST", False, "https://gw.test/"))[b"www-authenticate"]
    assert challenge == b'Bearer error="invalid_token"'
    # A browser without a sign-in URL, or a non-GET, gets the error itself.
    assert refusal(Context(signin_url=None), AuthDecision("missing", 401, "no token"), b"GET", True,
                   "https://gw.test/").status == 401
    assert refusal(Context(), AuthDecision("forbidden", 403, "no"), b"GET", True, "https://gw.test/").status == 403


# -- forwarding headers ---------------------------------------------------------------------------

def test_forwarding_headers_from_an_untrusted_client_replace_its_claims() -> None:
    out = dict(forwarding_headers([b"203.0.113.9"], [b"for=203.0.113.9"], "198.51.100.4", b"a-80.gw.test"))
    assert out[b"x-forwarded-for"] == b"198.51.100.4"
    assert out[b"forwarded"] == b"for=198.51.100.4;proto=https;host=a-80.gw.test"
    assert out[b"x-forwarded-proto"] == b"https" and out[b"x-forwarded-host"] == b"a-80.gw.test"


def test_forwarding_headers_from_a_trusted_proxy_are_appended_to() -> None:
    out = dict(forwarding_headers([b"203.0.113.9", b"10.0.0.1"], [b"for=203.0.113.9"], "2001:db8::1",
                                  b"a-80.gw.test", trusted=True))
    assert out[b"x-forwarded-for"] == b"203.0.113.9, 10.0.0.1, 2001:db8::1"
    assert out[b"forwarded"] == b'for=203.0.113.9, for="[2001:db8::1]";proto=https;host=a-80.gw.test'


def test_trusted_peer() -> None:
    networks = ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7")
    assert trusted_peer("10.1.2.3", networks)
    assert trusted_peer("::ffff:10.1.2.3", networks)          # IPv4-mapped: the IPv4 address
    assert trusted_peer("2001:db8::5", networks)
    assert trusted_peer("fe80::1%eth0", ("fe80::/10",))        # the zone index is ignored
    assert trusted_peer("192.0.2.7", networks)
    assert not trusted_peer("192.0.2.8", networks)
    assert not trusted_peer("11.0.0.1", networks)
    assert not trusted_peer("not an address", networks)
    assert not trusted_peer("10.1.2.3", ())
    assert trusted_peer("10.1.2.3", parse_networks(["10.0.0.0/8"]))  # parsed networks work too
    assert trusted_peer("10.1.2.3", ["10.0.0.0/8"])                 # as does any iterable
    with pytest.raises(ValueError):
        trusted_peer("10.1.2.3", ("10.0.0.0/33",))
