"""The pure hook checks: addresses, auth, replay cache, token bucket, bodies, headers."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgehook.config import HookAuth, HookConfig, Signing
from edgehook.hooks import (
    FirstAnswer,
    HookError,
    HookGuards,
    ReplayCache,
    TokenBucket,
    check_auth,
    check_encoding,
    client_allowed,
    forwarded_client,
    parse_body,
    parse_client,
    safe_headers,
)
from edgehook.signing import sign_github, standard_headers

NETS = [ipaddress.ip_network(n) for n in ("192.168.1.0/24", "fd00::/8", "127.0.0.1/32")]


@pytest.mark.parametrize("addr, nets, ok", [
    ("192.168.1.20", NETS, True),
    ("192.168.2.20", NETS, False),
    ("::ffff:192.168.1.20", NETS, True),       # IPv4-mapped, as a dual-stack socket reports it
    ("::ffff:192.168.2.20", NETS, False),
    ("fd00::1", NETS, True),
    ("fe80::1%eth0", NETS, False),             # zone id dropped, then not in the list
    ("fe80::1%eth0", [ipaddress.ip_network("fe80::/10")], True),
    ("127.0.0.1", NETS, True),
    ("::1", NETS, False),
    ("::1", [ipaddress.ip_network("::1/128")], True),
    ("10.0.0.1", [ipaddress.ip_network("::ffff:10.0.0.0/104")], True),  # v6-written v4 range
    ("not-an-ip", NETS, False),
    ("anything", [], True),                     # no allow_from: everyone
])
def test_client_allowed(addr: str, nets: list, ok: bool) -> None:
    assert client_allowed(addr, nets) is ok


PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("172.16.0.0/12"),
           ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize("peer, forwarded, trusted, want", [
    ("127.0.0.1", ["10.1.2.3"], (), ("127.0.0.1", False)),            # nothing trusted
    ("127.0.0.1", None, PROXIES, ("127.0.0.1", False)),               # no header
    ("192.0.2.1", ["10.1.2.3"], PROXIES, ("192.0.2.1", False)),       # peer not a proxy
    ("127.0.0.1", ["10.1.2.3"], PROXIES, ("10.1.2.3", False)),
    ("::ffff:127.0.0.1", ["10.1.2.3"], PROXIES, ("10.1.2.3", False)),  # dual-stack peer
    ("127.0.0.1", ["6.6.6.6, 10.1.2.3"], PROXIES, ("10.1.2.3", False)),  # forged left part
    ("127.0.0.1", ["6.6.6.6", "10.1.2.3, 172.16.9.9"], PROXIES, ("10.1.2.3", False)),
    ("127.0.0.1", ["172.16.0.1, 172.16.0.2"], PROXIES, ("172.16.0.1", False)),  # all trusted
    ("127.0.0.1", ["10.1.2.3:5000"], PROXIES, ("10.1.2.3", False)),
    ("127.0.0.1", ["[2001:db8::7]:443"], PROXIES, ("2001:db8::7", False)),
    ("127.0.0.1", ["2001:db8::7, fd00::2"], PROXIES, ("2001:db8::7", False)),
    ("127.0.0.1", ["::ffff:10.1.2.3"], PROXIES, ("10.1.2.3", False)),
    ("127.0.0.1", ["unknown"], PROXIES, ("127.0.0.1", True)),
    ("127.0.0.1", ["10.1.2.3, "], PROXIES, ("127.0.0.1", True)),
    ("127.0.0.1", ["[2001:db8::7"], PROXIES, ("127.0.0.1", True)),
    ("127.0.0.1", ["6.6.6.6, 10.1.2.3:x"], PROXIES, ("127.0.0.1", True)),
])
def test_forwarded_client(peer: str, forwarded: list[str] | None, trusted: tuple,
                          want: tuple[str, bool]) -> None:
    assert forwarded_client(peer, forwarded, trusted) == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=60), max_size=4))
def test_forwarded_client_never_raises(values: list[str]) -> None:
    client, _ = forwarded_client("127.0.0.1", values, PROXIES)
    assert client == "127.0.0.1" or parse_client(client) is not None


def test_parse_client_maps_ipv4() -> None:
    assert str(parse_client("::ffff:10.1.2.3")) == "10.1.2.3"
    assert parse_client("garbage") is None


STD = Signing("standard", ("whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHM=", "old-plain-secret"))
GH = Signing("github", ("gh-secret",))


def _std(body: bytes, ts: float, msg_id: str = "msg_1", secret: str | None = None
         ) -> dict[str, str]:
    return standard_headers([secret or STD.secrets[0]], msg_id, int(ts), body)


def _auth_case(auth: HookAuth, headers: dict[str, str], body: bytes = b"{}",
               now: float | None = None) -> int | str | None:
    try:
        return check_auth(auth, headers, body, now or time.time())
    except HookError as exc:
        assert exc.detail == "missing or invalid credentials"  # never says which part
        return exc.status


NOW = time.time()


@pytest.mark.parametrize("auth, headers, body, want", [
    (HookAuth("none"), {}, b"", None),
    (HookAuth("token", token="t0k"), {"Authorization": "Bearer t0k"}, b"", None),
    (HookAuth("token", token="t0k"), {"Authorization": "bearer   t0k "}, b"", None),
    (HookAuth("token", token="t0k"), {"X-Edgehook-Token": "t0k"}, b"", None),
    (HookAuth("token", token="t0k"), {"Authorization": "Bearer t0K"}, b"", 401),
    (HookAuth("token", token="t0k"), {"Authorization": "Basic t0k"}, b"", 401),
    (HookAuth("token", token="t0k"), {}, b"", 401),
    (HookAuth("token", token="tök"), {"X-Edgehook-Token": "tök".encode().decode("latin-1")},
     b"", None),  # a non-ASCII token, as http.client hands it over
    (HookAuth("hmac", signing=STD), _std(b"{}", NOW), b"{}", "msg_1"),
    (HookAuth("hmac", signing=STD), _std(b"{}", NOW, secret="old-plain-secret"), b"{}",
     "msg_1"),  # second secret of a rotation
    (HookAuth("hmac", signing=STD), _std(b"{}", NOW), b"{ }", 401),        # body changed
    (HookAuth("hmac", signing=STD), _std(b"{}", NOW - 301), b"{}", 401),   # stale
    (HookAuth("hmac", signing=STD), _std(b"{}", NOW + 301), b"{}", 401),   # future
    (HookAuth("hmac", signing=STD), _std(b"{}", NOW - 290), b"{}", "msg_1"),
    (HookAuth("hmac", signing=STD), {**_std(b"{}", NOW), "webhook-id": "other"}, b"{}", 401),
    (HookAuth("hmac", signing=STD), {**_std(b"{}", NOW), "webhook-timestamp": "²"}, b"{}",
     401),  # a unicode digit must not crash the verifier
    (HookAuth("hmac", signing=STD), {}, b"{}", 401),
    (HookAuth("hmac", signing=GH), {"X-Hub-Signature-256": sign_github("gh-secret", b"x")},
     b"x", None),
    (HookAuth("hmac", signing=GH), {"X-Hub-Signature-256": sign_github("nope", b"x")},
     b"x", 401),
    (HookAuth("hmac", signing=GH), {"X-Hub-Signature-256": "sha256=\udcff"}, b"x", 401),
])
def test_check_auth(auth: HookAuth, headers: dict[str, str], body: bytes,
                    want: int | str | None) -> None:
    assert _auth_case(auth, headers, body, NOW) == want


def test_replay_cache() -> None:
    cache = ReplayCache(ttl=10, max_size=3)
    assert not cache.seen("a", 0)
    assert cache.add("a", 0)
    assert not cache.add("a", 5)           # a concurrent replay loses
    assert cache.first("a", 5) == FirstAnswer(None, None)  # still being handled
    cache.settle("a", 202, "E1")
    assert cache.first("a", 9.9) == FirstAnswer(202, "E1")
    assert cache.seen("a", 9.9)
    assert not cache.seen("a", 10.1)       # forgotten after the ttl
    assert cache.add("b", 11)
    cache.forget("b")                      # not taken after all: free again
    assert cache.first("b", 11) is None and cache.add("b", 11)
    for i in range(5):
        cache.add(f"id{i}", 20)
    assert len(cache) == 3                 # bounded


def test_replayed_signature_still_authenticates() -> None:
    """check_auth judges the signature and timestamp only; a repeat of an accepted id is
    the handler's business (answered as a duplicate), not an auth failure."""
    auth = HookAuth("hmac", signing=STD)
    headers = _std(b"{}", NOW)
    assert _auth_case(auth, headers, b"{}", NOW) == "msg_1"
    assert _auth_case(auth, headers, b"{}", NOW + 1) == "msg_1"
    assert _auth_case(auth, headers, b"{}", NOW + 301) == 401   # too old now
    assert _auth_case(auth, headers, b"{ }", NOW + 1) == 401    # body changed


def test_token_bucket() -> None:
    b = TokenBucket(2, 60.0, now=0.0)
    assert b.take(0.0) == 0.0
    assert b.take(0.0) == 0.0
    wait = b.take(0.0)
    assert 29.9 < wait <= 30.0             # one token per 30 s
    assert b.take(29.0) > 0
    assert b.take(30.1) == 0.0


def test_guards_keep_bucket_until_rate_changes() -> None:
    clock = [0.0]
    guards = HookGuards(clock=lambda: clock[0])
    hook = HookConfig("h", HookAuth("none"), rate_requests=1, rate_per=10.0)
    guards.rate_check(hook)
    with pytest.raises(HookError) as exc:
        guards.rate_check(hook)
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "10"
    changed = HookConfig("h", HookAuth("none"), rate_requests=5, rate_per=10.0)
    guards.rate_check(changed)             # a reload with a new limit starts a new bucket


@pytest.mark.parametrize("ctype, body, want", [
    ("application/json", b'{"state": "on"}', {"state": "on"}),
    ("application/json; charset=utf-8", b"[1, 2]", [1, 2]),
    ("application/vnd.github+json", b'{"a": 1}', {"a": 1}),
    ("application/x-www-form-urlencoded", b"state=on&x=1&x=2", {"state": "on",
                                                                "x": ["1", "2"]}),
    ("text/plain", b"hello", "hello"),
    ("text/plain; charset=latin-1", "é".encode("latin-1"), "é"),
    ("text/plain; charset=bogus", b"hi", "hi"),
    (None, b"", {}),
    ("application/octet-stream", b"", {}),
    ("text/plain", b"", {}),
    ("application/x-www-form-urlencoded", b"", {}),
    ("application/json", b"", {}),          # no body is no data (HA rest_command)
    ("application/vnd.github+json", b"", {}),
    ("application/json", b"{bad", 400),
    ("application/json", b"NaN", 400),
    ("application/json", b"[" * 5000, 400),
    ("application/json", b"[" * 40 + b"]" * 40, 400),
    ("application/json", b"\xff\xfe\xfa", 400),
    ("application/x-www-form-urlencoded", b"\xff=1", 400),
    ("application/x-www-form-urlencoded", b"&".join(b"a%d=1" % i for i in range(300)), 400),
    ("application/octet-stream", b"\x00", 415),
    ("multipart/form-data; boundary=x", b"--x--", 415),
    (None, b"state=on", 415),
])
def test_parse_body(ctype: str | None, body: bytes, want: object) -> None:
    if isinstance(want, int):
        with pytest.raises(HookError) as exc:
            parse_body(ctype, body)
        assert exc.value.status == want
    else:
        assert parse_body(ctype, body) == want


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.sampled_from(["application/json", "text/plain",
                                              "application/x-www-form-urlencoded",
                                              "application/foo+json", "image/png"]),
                 st.text(max_size=40)),
       st.binary(max_size=300))
def test_parse_body_only_raises_hook_errors(ctype: str | None, body: bytes) -> None:
    try:
        parse_body(ctype, body)
    except HookError as exc:
        assert exc.status in (400, 415)


@pytest.mark.parametrize("values, ok", [
    ([], True),
    (["identity"], True),
    (["Identity"], True),
    (["gzip"], False),
    (["identity, gzip"], False),
    (["identity", "br"], False),
])
def test_check_encoding(values: list[str], ok: bool) -> None:
    import email.message

    headers = email.message.Message()
    for v in values:
        headers["Content-Encoding"] = v
    if ok:
        check_encoding(headers)
    else:
        with pytest.raises(HookError) as exc:
            check_encoding(headers)
        assert exc.value.status == 415 and exc.value.headers == {"Accept-Encoding": "identity"}


def test_safe_headers_drop_credentials() -> None:
    headers = [("Authorization", "Bearer x"), ("Cookie", "a=b"), ("X-Edgehook-Token", "t"),
               ("webhook-signature", "v1,abc"), ("X-Hub-Signature-256", "sha256=1"),
               ("X-Api-Key", "k"), ("X-My-Secret", "s"), ("Content-Type", "text/plain"),
               ("User-Agent", "HA"), ("webhook-id", "msg_1"), ("X-Request-Id", "r" * 600)]
    got = safe_headers(headers)
    assert got == {"content-type": "text/plain", "user-agent": "HA", "webhook-id": "msg_1",
                   "x-request-id": "r" * 512}
