"""The HTTP edge through real sockets against a real running Daemon (mock pins).

Every status code of SPEC.md's hooks and API, Standard Webhooks replay and staleness,
IPv6 and IPv4-mapped addresses, the limits (deadline, header caps, connection cap),
hypothesis fuzzing, and /metrics + /healthz.
"""

from __future__ import annotations

import email.message
import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgehook.api import Api
from edgehook.app import Daemon
from edgehook.config import HookAuth, HookConfig, load_config
from edgehook.dispatcher import Reply
from edgehook.errors import CommandError
from edgehook.http_server import HttpServer
from edgehook.metrics import Histogram, escape_label, format_value, render
from edgehook.routing import Request
from edgehook.signing import sign_github, standard_headers

API_TOKEN = "api-secret-token"
HOOK_TOKEN = "s3cret-token"
STD_SECRET = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM="
CONFIG = """\
device: {{id: test, name: Test box}}
state_dir: {state}
gpio:
  backend: {backend}
  inputs:
    doorbell: {{pin: GPIO17, pull: up, class: doorbell}}
  outputs:
    porch_light: {{pin: GPIO27, class: light}}
    fan: {{pin: GPIO22, class: switch}}
http:
  listen: 127.0.0.1:{port}
  api_token: {token}
  max_body: 1KiB
  timeout: 2s
  max_connections: 48
hooks:
  open: {{auth: none, rate_limit: {{requests: 100000, per: 1s}}}}
  tok: {{auth: {{token: {hook_token}}}, rate_limit: {{requests: 100000, per: 1s}}}}
  std: {{auth: {{hmac: {{scheme: standard, secret: {std}}}}}}}
  gh: {{auth: {{hmac: {{scheme: github, secret: gh-secret}}}}}}
  lan: {{auth: none, allow_from: [10.0.0.0/8, "fd00::/8"]}}
  limited: {{auth: none, rate_limit: {{requests: 2, per: 60s}}}}
  light: {{auth: {{token: {hook_token}}}, respond: sync,
          rate_limit: {{requests: 100000, per: 1s}}}}
webhooks:
  dead_end:
    url: http://127.0.0.1:9/nowhere
    timeout: 1s
    retry: {{max_attempts: 1}}
rules:
  - name: ring
    when: {{input: doorbell, event: pressed}}
    do:
      - webhook: dead_end
  - name: light-hook
    when: {{hook: light}}
    do:
      - output: porch_light
        set: "{{{{ event.body.state }}}}"
"""


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_config(directory: Path, port: int, backend: str = "mock", token: str = API_TOKEN
                 ) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "edgehook.yaml"
    path.write_text(CONFIG.format(state=directory / "state", port=port, backend=backend,
                                  token=token, hook_token=HOOK_TOKEN, std=STD_SECRET))
    return path


def start_daemon(directory: Path, backend: str = "mock") -> Daemon:
    """A real Daemon from a YAML file, started without signal handlers."""
    cfg = load_config(write_config(directory, free_port(), backend))
    pin_factory = None
    if backend != "mock":
        from gpiozero.pins.mock import MockFactory

        pin_factory = MockFactory()
    d = Daemon(cfg, pin_factory=pin_factory)
    d.start()
    return d


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("api"))
    yield d
    d.stop()


def base(d: Daemon) -> str:
    host, port = d.http.address
    return f"http://{host}:{port}"


AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def raw(d: Daemon | tuple[str, int], data: bytes, timeout: float = 3.0) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes."""
    addr = d.http.address if isinstance(d, Daemon) else d
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
        except TimeoutError:
            pass
    return b"".join(chunks)


def status_of(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def read_answer(s: socket.socket) -> bytes:
    """One whole answer (head and Content-Length body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, data
        body += chunk
    assert len(body) == length
    return head + b"\r\n\r\n" + body


# ---------------------------------------------------------------------- hooks: every code
J = {"Content-Type": "application/json"}
HOOK_CASES = [
    # (id, method, path, headers, body, status)
    ("async-202", "POST", "/hooks/open", J, b'{"state":"on"}', 202),
    ("put-202", "PUT", "/hooks/open", J, b'{"a":1}', 202),
    ("empty-202", "POST", "/hooks/open", {}, b"", 202),
    ("form-202", "POST", "/hooks/open", {"Content-Type": "application/x-www-form-urlencoded"},
     b"state=on", 202),
    ("text-202", "POST", "/hooks/open", {"Content-Type": "text/plain"}, b"ding", 202),
    ("get-405", "GET", "/hooks/open", {}, b"", 405),
    ("delete-405", "DELETE", "/hooks/open", {}, b"", 405),
    ("unknown-404", "POST", "/hooks/nope", J, b"{}", 404),
    ("no-token-401", "POST", "/hooks/tok", J, b"{}", 401),
    ("wrong-token-401", "POST", "/hooks/tok", {**J, "Authorization": "Bearer nope"}, b"{}",
     401),
    ("bearer-202", "POST", "/hooks/tok", {**J, "Authorization": f"Bearer {HOOK_TOKEN}"}, b"{}",
     202),
    ("x-token-202", "POST", "/hooks/tok", {**J, "X-Edgehook-Token": HOOK_TOKEN}, b"{}", 202),
    ("api-token-is-not-hook-token-401", "POST", "/hooks/tok", {**J, **AUTH}, b"{}", 401),
    ("unsigned-401", "POST", "/hooks/std", J, b"{}", 401),
    ("github-unsigned-401", "POST", "/hooks/gh", J, b"{}", 401),
    ("address-403", "POST", "/hooks/lan", J, b"{}", 403),
    ("size-413", "POST", "/hooks/open", J, b'{"a":"' + b"x" * 2000 + b'"}', 413),
    ("type-415", "POST", "/hooks/open", {"Content-Type": "application/octet-stream"}, b"\x00",
     415),
    ("no-type-415", "POST", "/hooks/open", {}, b"state=on", 415),
    ("malformed-400", "POST", "/hooks/open", J, b'{"state":', 400),
    ("empty-json-202", "POST", "/hooks/open", J, b"", 202),   # no body is no data, as HA sends
    ("gzip-415", "POST", "/hooks/open", {**J, "Content-Encoding": "gzip"},
     gzip.compress(b'{"state":"on"}'), 415),
    ("identity-202", "POST", "/hooks/open", {**J, "Content-Encoding": "identity"}, b"{}", 202),
    ("nan-400", "POST", "/hooks/open", J, b"NaN", 400),
    ("auth-before-type", "POST", "/hooks/tok", {"Content-Type": "image/png"}, b"\x00", 401),
    ("auth-before-json", "POST", "/hooks/tok", J, b"{", 401),
]


@pytest.mark.parametrize("method, path, headers, body, status",
                         [c[1:] for c in HOOK_CASES], ids=[c[0] for c in HOOK_CASES])
def test_hook_status_codes(daemon: Daemon, method: str, path: str, headers: dict[str, str],
                           body: bytes, status: int) -> None:
    r = requests.request(method, base(daemon) + path, headers=headers, data=body, timeout=5)
    assert r.status_code == status, r.text
    doc = r.json()
    if status >= 400:
        assert set(doc) >= {"error", "detail"}
        assert HOOK_TOKEN not in r.text and API_TOKEN not in r.text
    else:
        assert len(doc["event_id"]) == 26
    if status == 405:
        assert r.headers["Allow"] == "POST, PUT"
    if "Content-Encoding" in headers and status == 415:
        assert r.headers["Accept-Encoding"] == "identity"


def test_rate_limit_429_with_retry_after(daemon: Daemon) -> None:
    codes = [requests.post(base(daemon) + "/hooks/limited", timeout=5) for _ in range(3)]
    assert [r.status_code for r in codes] == [202, 202, 429]
    assert codes[2].headers["Retry-After"] == "30"
    assert codes[2].json()["error"] == "rate_limited"


def _std_post(d: Daemon, body: bytes, ts: float, msg_id: str,
              secret: str = STD_SECRET) -> requests.Response:
    headers = {**J, **standard_headers([secret], msg_id, int(ts), body)}
    return requests.post(base(d) + "/hooks/std", data=body, headers=headers, timeout=5)


def _hook_events(d: Daemon, hook: str) -> list[str]:
    items = requests.get(base(d) + "/api/v1/events", params={"limit": 1000}, headers=AUTH,
                         timeout=5).json()["items"]
    return [e["id"] for e in items if e["type"] == "hook.received" and e["source"] == hook]


def test_standard_webhooks_replay_and_staleness(daemon: Daemon) -> None:
    body = b'{"n":1}'
    now = time.time()
    ok = _std_post(daemon, body, now, "msg_replay")
    assert ok.status_code == 202, ok.text
    stale = _std_post(daemon, body, now - 6 * 60, "msg_stale")
    future = _std_post(daemon, body, now + 6 * 60, "msg_future")
    wrong = _std_post(daemon, body, now, "msg_wrong", secret="whsec_" + "AAAA")
    details = set()
    for r in (stale, future, wrong):
        assert r.status_code == 401, r.text
        details.add(r.json()["detail"])
    assert details == {"missing or invalid credentials"}  # never which part was wrong
    # a stale request never consumed its id: once fresh, the same id goes through
    assert _std_post(daemon, body, time.time(), "msg_stale").status_code == 202
    # a replayed id with a bad signature or an old timestamp is still refused
    assert _std_post(daemon, body, now, "msg_replay", secret="whsec_AAAA").status_code == 401
    assert _std_post(daemon, body, now - 6 * 60, "msg_replay").status_code == 401


def test_standard_webhooks_resend_of_a_stored_id_is_rejected_naming_its_event(
        daemon: Daemon) -> None:
    """A sender that lost the 2xx re-sends the same webhook-id: SPEC says a seen id is
    rejected; the 409 names the event the first one made, and nothing is stored again."""
    body = b'{"n":2}'
    first = _std_post(daemon, body, time.time(), "msg_resent")
    assert first.status_code == 202, first.text
    event_id = first.json()["event_id"]
    again = _std_post(daemon, body, time.time(), "msg_resent")  # re-signed, same id
    assert again.status_code == 409, again.text
    assert again.json()["error"] == "duplicate" and again.json()["event_id"] == event_id
    time.sleep(0.3)
    assert _hook_events(daemon, "std").count(event_id) == 1
    assert len([e for e in _hook_events(daemon, "std") if e > event_id]) == 0


def test_standard_webhook_refused_by_rate_limit_keeps_its_id(tmp_path: Path) -> None:
    """A 429 must not burn the webhook-id: the sender's retry (same id) gets through."""
    clock = [0.0]
    api = Api(_Stub(), hooks={"h": HookConfig(
        "h", HookAuth("hmac", signing=_signing()), rate_requests=1, rate_per=60.0)})
    api.guards.clock = lambda: clock[0]
    first = _stub_req("POST", "/hooks/h", {**J, **standard_headers(
        [STD_SECRET], "m1", int(time.time()), b"{}")}, b"{}")
    assert api.handle(first).status == 202
    second = lambda: _stub_req("POST", "/hooks/h", {**J, **standard_headers(  # noqa: E731
        [STD_SECRET], "m2", int(time.time()), b"{}")}, b"{}")
    assert api.handle(second()).status == 429
    clock[0] += 61
    assert api.handle(second()).status == 202
    again = api.handle(second())  # and now it is a duplicate: rejected, not stored again
    assert again.status == 409 and again.body["error"] == "duplicate"
    assert len(api.backend.events) == 2


def test_github_signature(daemon: Daemon) -> None:
    body = b'{"zen":"hi"}'
    ok = requests.post(base(daemon) + "/hooks/gh", data=body, timeout=5, headers={
        **J, "X-Hub-Signature-256": sign_github("gh-secret", body)})
    assert ok.status_code == 202
    bad = requests.post(base(daemon) + "/hooks/gh", data=body, timeout=5, headers={
        **J, "X-Hub-Signature-256": sign_github("other", body)})
    assert bad.status_code == 401 and "sha256" not in bad.text


def test_sync_hook_answers_with_the_new_output_state(daemon: Daemon) -> None:
    h = {**J, "Authorization": f"Bearer {HOOK_TOKEN}"}
    r = requests.post(base(daemon) + "/hooks/light", json={"state": "on"}, headers=h,
                      timeout=10)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["rules"] == ["light-hook"]
    assert doc["results"][0]["output"] == "porch_light"
    assert doc["results"][0]["state"] == "on"
    assert daemon.gpio.output_states()["porch_light"]["state"] == "on"
    r = requests.post(base(daemon) + "/hooks/light", json={"state": "off"}, headers=h,
                      timeout=10)
    assert r.json()["results"][0]["state"] == "off"
    # an action that cannot run: 409 with the reason
    r = requests.post(base(daemon) + "/hooks/light", json={"state": "purple"}, headers=h,
                      timeout=10)
    assert r.status_code == 409
    assert r.json()["error"] == "action_failed" and "purple" in r.json()["detail"]


def test_every_answer_carries_the_current_date(daemon: Daemon) -> None:
    """The Date header is formatted once a second and shared: it must still be the
    time of the answer, in HTTP's format, whichever thread answers."""
    import email.utils

    for _ in range(3):
        before = time.time()
        r = requests.get(base(daemon) + "/healthz", timeout=5)
        after = time.time()
        when = email.utils.parsedate_to_datetime(r.headers["Date"]).timestamp()
        assert r.headers["Date"].endswith(" GMT"), r.headers["Date"]
        assert int(before) <= when <= after, (before, r.headers["Date"], after)
        time.sleep(0.6)  # across a second boundary at least once


def test_hook_event_reaches_the_event_list(daemon: Daemon) -> None:
    r = requests.post(base(daemon) + "/hooks/open?src=test", json={"marker": 1}, timeout=5)
    event_id = r.json()["event_id"]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        items = requests.get(base(daemon) + "/api/v1/events", headers=AUTH, timeout=5
                             ).json()["items"]
        if any(e["id"] == event_id for e in items):
            ev = next(e for e in items if e["id"] == event_id)
            assert ev["type"] == "hook.received" and ev["source"] == "open"
            assert "summary" in ev
            return
        time.sleep(0.05)
    pytest.fail("hook event never reached the dispatcher")


# ---------------------------------------------------------------------- hook event data
class _Stub:
    """An ApiBackend that records what the Api asks of it."""

    def __init__(self, backend: str = "mock") -> None:
        self.events: list[Any] = []
        self.backend = backend

    def state(self) -> dict[str, Any]:
        return {"device": {"id": "stub", "name": "Stub <b>&"}, "backend": self.backend,
                "version": "0", "inputs": {"in<1>": {"state": "on", "class": "button"}},
                "outputs": {"out\"1": {"state": "off", "until": None, "class": "switch"}},
                "mqtt": {"connected": False, "since": None, "queued": 0},
                "outbox": {"pending": 1, "dead": 2, "delivered": 3}}

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ok"}

    def set_output(self, name: str, state: str, duration: float | None) -> dict[str, Any]:
        if name != "out\"1":
            raise KeyError(name)
        if state == "toggle":
            raise CommandError("min_interval")
        return {"name": name, "state": state, "until": None}

    def simulate(self, name: str, action: str) -> None:
        if self.backend != "mock":
            raise CommandError("not mock")
        raise KeyError(name)

    def outbox_list(self, status: str | None) -> list[dict[str, Any]]:
        return [{"id": 7, "target": "t<x>", "attempts": 3, "last_error": "HTTP 500 <script>"}]

    def outbox_retry(self, item_id: int) -> bool:
        return item_id == 7

    def outbox_retry_dead(self) -> int:
        return 2

    def outbox_purge(self) -> int:
        return 2

    def submit(self, event: Any, wait: float) -> Reply:
        self.events.append(event)
        reply = Reply(results=[{"output": "o", "state": "on"}], fired=["r"])
        reply.done.set()
        return reply

    def recent_events(self) -> list[dict[str, Any]]:
        return [{"id": "E1", "type": "hook.received", "source": "x<y>", "time":
                 "2026-01-01T00:00:00.000Z", "rules": ["r"], "results": [], "errors": ["e&"]}]

    def metrics(self) -> dict[str, Any]:
        return {"counters": {"events:hook.received": 2, "rule:r": 1, "delivery:t:dead": 1}}


def _signing() -> Any:
    from edgehook.config import Signing

    return Signing("standard", (STD_SECRET,))


def _headers(pairs: dict[str, str] | list[tuple[str, str]]) -> email.message.Message:
    msg = email.message.Message()
    for k, v in (pairs.items() if isinstance(pairs, dict) else pairs):
        msg[k] = v
    return msg


def _stub_req(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]],
              body: bytes = b"", client: str = "127.0.0.1", query: str = "") -> Request:
    from urllib.parse import parse_qs

    return Request(method=method, path=path, query=parse_qs(query), headers=_headers(headers),
                   peer=client, body=body, raw_query=query)


def test_hook_event_data_shape() -> None:
    stub = _Stub()
    api = Api(stub, hooks={"h": HookConfig("h", HookAuth("token", token="tt"))})
    req = _stub_req("POST", "/hooks/h", [
        ("Content-Type", "application/json"), ("Authorization", "Bearer tt"),
        ("Cookie", "session=1"), ("User-Agent", "HomeAssistant"), ("X-Request-Id", "42")],
        b'{"state": "on"}', client="::ffff:192.168.1.9", query="a=1&b=2&b=3")
    resp = api.handle(req)
    assert resp.status == 202
    ev = stub.events[0]
    assert ev.type == "hook.received" and ev.source == "h" and resp.body["event_id"] == ev.id
    assert ev.data == {"body": {"state": "on"}, "query": {"a": "1", "b": ["2", "3"]},
                       "headers": {"content-type": "application/json",
                                   "user-agent": "HomeAssistant", "x-request-id": "42"},
                       "content_type": "application/json", "remote": "192.168.1.9"}


def test_api_guards_without_token() -> None:
    """No api_token: loopback Host only (DNS rebinding), same-origin for changes (CSRF)."""
    api = Api(_Stub())
    assert api.handle(_stub_req("GET", "/api/v1/state", {"Host": "127.0.0.1:8080"})
                      ).status == 200
    assert api.handle(_stub_req("GET", "/api/v1/state", {"Host": "localhost"})).status == 200
    assert api.handle(_stub_req("GET", "/api/v1/state", {"Host": "[::1]:80"})).status == 200
    assert api.handle(_stub_req("GET", "/api/v1/state", {"Host": "evil.example:8080"})
                      ).status == 403
    assert api.handle(_stub_req("GET", "/", {"Host": "evil.example"})).status == 403
    cross = _stub_req("PUT", "/api/v1/outputs/out%221", {
        "Host": "127.0.0.1:8080", "Origin": "http://evil.example"}, b'{"state":"on"}')
    assert api.handle(cross).status == 403
    same = _stub_req("PUT", '/api/v1/outputs/out"1', {
        "Host": "127.0.0.1:8080", "Origin": "http://127.0.0.1:8080"}, b'{"state":"on"}')
    assert api.handle(same).status == 200


def test_status_page_escapes_everything() -> None:
    resp = Api(_Stub()).handle(_stub_req("GET", "/", {}))
    page = resp.body
    assert resp.status == 200 and "<script>" not in page.replace("<script nonce", "")
    for raw_text in ("Stub <b>&", "in<1>", "HTTP 500 <script>", "x<y>", "t<x>"):
        assert raw_text not in page
    assert "Stub &lt;b&gt;&amp;" in page and "script-src 'nonce-" in \
        resp.headers["Content-Security-Policy"]


def test_status_page_login_cookie(daemon: Daemon) -> None:
    """Before the fuzz tests: their POSTs to /login spend the shared sign-in attempts."""
    url = base(daemon)
    s = requests.Session()
    page = s.get(url + "/", timeout=5)
    assert page.status_code == 200 and 'action="/login"' in page.text
    assert "porch_light" not in page.text                  # nothing before signing in
    bad = s.post(url + "/login", data={"token": "nope"}, timeout=5, allow_redirects=False)
    assert bad.status_code == 303 and bad.headers["Location"] == "/?login=failed"
    assert "Wrong token." in s.get(url + "/?login=failed", timeout=5).text
    cross = s.post(url + "/login", data={"token": API_TOKEN}, allow_redirects=False,
                   headers={"Origin": "http://evil.example"}, timeout=5)
    assert cross.status_code == 403                         # login CSRF refused
    ok = s.post(url + "/login", data={"token": API_TOKEN}, timeout=5, allow_redirects=False)
    assert ok.status_code == 303
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and API_TOKEN not in cookie
    assert "porch_light" in s.get(url + "/", timeout=5).text
    assert s.get(url + "/api/v1/state", timeout=5).status_code == 200
    evil = s.put(url + "/api/v1/outputs/fan", json={"state": "on"}, timeout=5,
                 headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403                          # cookie + foreign origin
    value = s.cookies["edgehook_session"]
    forged = requests.get(url + "/api/v1/state", timeout=5, cookies={
        "edgehook_session": value[:-1] + ("0" if value[-1] != "0" else "1")})
    assert forged.status_code == 401
    expired = requests.get(url + "/api/v1/state", timeout=5,
                           cookies={"edgehook_session": "1." + value.split(".")[1]})
    assert expired.status_code == 401
    out = s.post(url + "/logout", timeout=5, allow_redirects=False)
    assert out.status_code == 303 and "Max-Age=0" in out.headers["Set-Cookie"]


def test_outbox_retry_answers_for_each_backend_outcome() -> None:
    """The backend says what became of a retry; a True/False backend still works."""
    stub = _Stub()
    api = Api(stub)
    retry = lambda item: api.handle(_stub_req("POST", f"/api/v1/outbox/{item}/retry",  # noqa
                                              {"Host": "127.0.0.1"}))
    assert retry(7).status == 200 and retry(7).body == {"id": 7, "status": "pending",
                                                         "was": "dead"}
    assert retry(8).status == 404
    stub.outbox_retry = lambda item: "due"  # type: ignore[method-assign]
    assert retry(7).status == 200 and retry(7).body["was"] == "pending"
    for outcome, status, error in [("queued", 200, None), ("missing", 404, "not_found"),
                                   ("delivered", 409, "already_delivered"),
                                   ("no_target", 409, "target_gone")]:
        stub.outbox_retry = lambda item, o=outcome: o  # type: ignore[method-assign]
        resp = retry(7)
        assert resp.status == status and (error is None or resp.body["error"] == error)
    assert "target t<x> is not in the config" in retry(7).body["detail"]  # from the list
    assert "target of delivery 9 is not" in retry(9).body["detail"]      # not listed


# ---------------------------------------------------------------------- API
def test_api_needs_the_token(daemon: Daemon) -> None:
    for method, path in [("GET", "/api/v1/state"), ("GET", "/api/v1/outbox"),
                         ("PUT", "/api/v1/outputs/fan"), ("GET", "/api/v1/events"),
                         ("POST", "/api/v1/inputs/doorbell/simulate"), ("GET", "/metrics"),
                         ("POST", "/api/v1/outbox/1/retry"), ("POST", "/api/v1/outbox/retry"),
                         ("DELETE", "/api/v1/outbox?status=dead"),
                         ("DELETE", "/api/v1/outbox/1"), ("DELETE", "/api/v1/outbox?target=x")]:
        r = requests.request(method, base(daemon) + path, timeout=5,
                             headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, (method, path)
        assert r.json()["error"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


API_CASES = [
    ("state", "GET", "/api/v1/state", None, 200),
    ("put-on", "PUT", "/api/v1/outputs/fan", {"state": "on"}, 200),
    ("put-toggle", "PUT", "/api/v1/outputs/fan", {"state": "toggle"}, 200),
    ("put-bad-state", "PUT", "/api/v1/outputs/fan", {"state": "purple"}, 400),
    ("put-bad-for", "PUT", "/api/v1/outputs/fan", {"state": "on", "for": "soon"}, 400),
    ("put-inf-for", "PUT", "/api/v1/outputs/fan", {"state": "on", "for": "inf"}, 400),
    ("put-list", "PUT", "/api/v1/outputs/fan", [1], 400),
    ("put-unknown", "PUT", "/api/v1/outputs/nope", {"state": "on"}, 404),
    ("put-get-405", "GET", "/api/v1/outputs/fan", None, 405),
    ("sim", "POST", "/api/v1/inputs/doorbell/simulate", {"action": "click"}, 200),
    ("sim-bad", "POST", "/api/v1/inputs/doorbell/simulate", {"action": "lick"}, 400),
    ("sim-unknown", "POST", "/api/v1/inputs/nope/simulate", {"action": "press"}, 404),
    ("outbox", "GET", "/api/v1/outbox", None, 200),
    ("outbox-dead", "GET", "/api/v1/outbox?status=dead", None, 200),
    ("outbox-bad", "GET", "/api/v1/outbox?status=lost", None, 400),
    ("retry-404", "POST", "/api/v1/outbox/999/retry", None, 404),
    ("retry-huge-404", "POST", "/api/v1/outbox/" + "9" * 40 + "/retry", None, 404),
    ("retry-all-dead", "POST", "/api/v1/outbox/retry", None, 200),
    ("purge-dead", "DELETE", "/api/v1/outbox?status=dead", None, 200),
    ("purge-pending-400", "DELETE", "/api/v1/outbox?status=pending", None, 400),
    ("purge-nothing-400", "DELETE", "/api/v1/outbox", None, 400),
    ("drop-404", "DELETE", "/api/v1/outbox/999", None, 404),
    ("drop-target-none", "DELETE", "/api/v1/outbox?target=nobody", None, 200),
    ("drop-target-empty-400", "DELETE", "/api/v1/outbox?target=", None, 400),
    ("unknown-404", "GET", "/api/v2/nothing", None, 404),
    ("events", "GET", "/api/v1/events?limit=5", None, 200),
    ("healthz", "GET", "/healthz", None, 200),
]


@pytest.mark.parametrize("method, path, body, status", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_api_status_codes(daemon: Daemon, method: str, path: str, body: Any,
                          status: int) -> None:
    r = requests.request(method, base(daemon) + path, json=body, headers=AUTH, timeout=5)
    assert r.status_code == status, r.text
    if status >= 400:
        assert set(r.json()) >= {"error", "detail"}


def test_put_output_for_reports_until(daemon: Daemon) -> None:
    r = requests.put(base(daemon) + "/api/v1/outputs/fan", json={"state": "on", "for": "30s"},
                     headers=AUTH, timeout=5)
    doc = r.json()
    assert doc["name"] == "fan" and doc["state"] == "on" and doc["until"].endswith("Z")
    state = requests.get(base(daemon) + "/api/v1/state", headers=AUTH, timeout=5).json()
    assert state["outputs"]["fan"]["until"] == doc["until"]
    assert state["backend"] == "mock" and state["device"]["id"] == "test"
    requests.put(base(daemon) + "/api/v1/outputs/fan", json={"state": "off"}, headers=AUTH,
                 timeout=5)


def test_simulate_409_unless_mock(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, backend="auto")
    try:
        r = requests.post(base(d) + "/api/v1/inputs/doorbell/simulate",
                          json={"action": "press"}, headers=AUTH, timeout=5)
        assert r.status_code == 409 and "mock" in r.json()["detail"]
    finally:
        d.stop()


def test_healthz_names_the_failing_part(daemon: Daemon, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    ok = requests.get(base(daemon) + "/healthz", timeout=5)
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    assert ok.json()["checks"]["dispatcher"] == "ok"
    monkeypatch.setattr(daemon.outbox, "health", lambda: (False, "disk nearly full (1 KiB)"))
    bad = requests.get(base(daemon) + "/healthz", timeout=5)
    assert bad.status_code == 503
    assert bad.json()["status"] == "unhealthy"
    assert bad.json()["problems"] == ["outbox: disk nearly full (1 KiB)"]


def test_metrics(daemon: Daemon) -> None:
    requests.post(base(daemon) + "/hooks/open", json={}, timeout=5)
    r = requests.get(base(daemon) + "/metrics", headers=AUTH, timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for needle in ('edgehook_events_total{type="hook.received"}',
                   'edgehook_outbox_deliveries{status="pending"} 0',
                   'edgehook_http_requests_total{handler="hook",code="202"}',
                   'edgehook_hook_requests_total{hook="open",code="202"}',
                   "edgehook_events_dropped_total 0", "# TYPE edgehook_deliveries_total counter",
                   'edgehook_output_on{output="porch_light"}'):
        assert needle in text, needle
    _check_exposition(text)


def _check_exposition(text: str) -> None:
    """Every line is a comment or `name{labels} value`, and TYPE comes once per family."""
    import re

    types = set()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*"'
                        r',?)*\})? (-?[0-9.e+]+|\+Inf|-Inf|NaN)$')
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in types
            types.add(name)
        elif not line.startswith("# HELP "):
            assert sample.match(line), line


def test_metrics_format_pieces() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert [format_value(v) for v in (1, 2.5, float("inf"), float("nan"), True, 3.0)] == \
        ["1", "2.5", "+Inf", "NaN", "1", "3"]
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 5.0):
        h.observe("discord", v)
    text = render([h.family("lat_seconds", "latency", "target")])
    assert 'lat_seconds_bucket{target="discord",le="0.1"} 2' in text
    assert 'lat_seconds_bucket{target="discord",le="1"} 3' in text
    assert 'lat_seconds_bucket{target="discord",le="+Inf"} 4' in text
    assert 'lat_seconds_count{target="discord"} 4' in text
    assert 'lat_seconds_sum{target="discord"} 5.65' in text
    _check_exposition(text)


# ---------------------------------------------------------------------- protocol limits
@pytest.mark.parametrize("data, status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(80)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"POST /hooks/open HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"POST /hooks/open HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /hooks/open HTTP/1.1\r\nContent-Length: 99999999999999999\r\n\r\n", 400),
    (b"POST /hooks/open HTTP/1.1\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n", 413),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 505),
    (b"BREW /hooks/open HTTP/1.1\r\nConnection: close\r\n\r\n", 501),  # no such method
    (b"GET /healthz\r\n\r\n", 400),  # HTTP/0.9
    (b"GET /healthz HTTP/1.1\r\nNo colon here\r\nConnection: close\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nX-A : 1\r\nConnection: close\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\n folded: x\r\nConnection: close\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nX-A: 1\r\n folded\r\nConnection: close\r\n\r\n", 400),
    (b"POST /hooks/open HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 5\r\n"
     b"Content-Type: text/plain\r\n\r\nhi", 400),  # and closed: no 408 for "hi" after it
    (b"GET http://127.0.0.1/healthz HTTP/1.1\r\nConnection: close\r\n\r\n", 200),
    (b"GET /healthz HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
     b"Connection: close\r\n\r\n", 200),  # not a header defect (nor is a bare multipart)
    (b"GET /healthz HTTP/1.1\r\nContent-Type: multipart/mixed\r\nConnection: close\r\n\r\n",
     200),
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
     b"Connection: close\r\n\r\n", 400),  # RFC 9112 3.2: more than one Host
    (b"GET http:///healthz HTTP/1.1\r\nConnection: close\r\n\r\n", 400),  # no host in it
    (b"POST /hooks/open HTTP/1.1\r\nExpect: tea\r\nContent-Length: 2\r\n\r\n{}", 417),
    (b"POST /hooks/open HTTP/1.1\r\nExpect: 100-continue\r\nExpect: tea\r\n"
     b"Content-Length: 2\r\n\r\n", 417),
])
def test_raw_protocol_errors(daemon: Daemon, data: bytes, status: int) -> None:
    resp = raw(daemon, data)
    assert status_of(resp) == status, resp[:300]
    assert resp.count(b"HTTP/1.1 ") == 1 and b"\r\nServer: edgehook/" in resp
    if status != 200:
        assert b'"error"' in resp and b"Connection: close" in resp


def test_multipart_hook_body_is_415_naming_the_accepted_types(daemon: Daemon) -> None:
    """`curl -F state=on`: a multipart body is not one SPEC's hooks accept (JSON, a
    urlencoded form, text); the answer is 415 saying which are, not a 400 about headers."""
    r = requests.post(base(daemon) + "/hooks/open", files={"state": (None, "on")}, timeout=5)
    assert r.status_code == 415, r.text
    doc = r.json()
    assert doc["error"] == "unsupported_media_type"
    for word in ("application/json", "application/x-www-form-urlencoded", "text/plain",
                 "multipart/form-data"):
        assert word in doc["detail"]
    r = requests.post(base(daemon) + "/hooks/open", data={"state": "on"}, timeout=5)
    assert r.status_code == 202, r.text  # the same field as a urlencoded form (curl -d)


@pytest.mark.parametrize("length", [9000, 70000])  # ours, and http.server's own cap
def test_414_detail_names_the_limit(daemon: Daemon, length: int) -> None:
    resp = raw(daemon, b"GET /" + b"a" * length + b" HTTP/1.1\r\n\r\n")
    assert status_of(resp) == 414
    doc = json.loads(resp.partition(b"\r\n\r\n")[2])
    assert doc["error"] == "request_uri_too_long" and "8192 bytes" in doc["detail"], doc


def test_absolute_form_target_host_wins_over_the_host_header() -> None:
    """RFC 9112 3.2.2: the host in `GET http://host/...` is the request's host, so the
    loopback-Host guard (no api_token) judges it, not the Host header beside it."""
    srv = HttpServer("127.0.0.1", 0, Api(_Stub()))
    srv.start()
    try:
        evil = raw(srv.address, b"GET http://evil.example/api/v1/state HTTP/1.1\r\n"
                                b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status_of(evil) == 403, evil[:300]
        local = raw(srv.address, b"GET http://127.0.0.1:8080/api/v1/state?x=1 HTTP/1.1\r\n"
                                 b"Host: evil.example\r\nConnection: close\r\n\r\n")
        assert status_of(local) == 200, local[:300]
        assert status_of(raw(srv.address, b"GET /api/v1/state HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                          b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
                         ) == 400
    finally:
        srv.stop()


def test_partial_requests_past_the_timeout_always_get_408() -> None:
    """A request cut short at http.timeout is answered 408 (JSON) and closed every time,
    wherever it stopped (request line, head, body), even with many at once: never a
    silent close from the socket's own timeout racing the deadline."""
    api = Api(_Stub(), max_connections=64, hooks={"x": HookConfig("x", HookAuth("none"))})
    srv = HttpServer("127.0.0.1", 0, api, timeout=0.3)
    srv.start()
    partial = [b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
               b"POST /hooks/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"]
    answers: list[tuple[bytes, bytes]] = []

    def one(data: bytes) -> None:
        with socket.create_connection(srv.address, timeout=5) as s:
            s.sendall(data)
            answer = b""
            while chunk := s.recv(4096):  # until the server closes
                answer += chunk
            answers.append((data, answer))

    try:
        threads = [threading.Thread(target=one, args=(partial[i % 3],)) for i in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(answers) == 60
        for data, answer in answers:
            assert answer.startswith(b"HTTP/1.1 408 "), (data, answer[:80])
            assert b'"error":"request_timeout"' in answer and b"Connection: close" in answer
    finally:
        srv.stop()


def test_keep_alive_after_unread_body_closes(daemon: Daemon) -> None:
    """A refused body that was never read cannot be taken for the next request."""
    body = b'{"a":1}'
    req = (b"POST /hooks/lan HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(body)).encode() + b"\r\n\r\n" + body)
    resp = raw(daemon, req + b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status_of(resp) == 403 and b"Connection: close" in resp
    assert resp.count(b"HTTP/1.1 ") == 1


def timed_healthz(daemon: Daemon, session: requests.Session, n: int,
                  pause: float = 0.0) -> list[float]:
    """Seconds each of `n` GET /healthz took (each must answer 200 within 1 s)."""
    times = []
    for _ in range(n):
        start = time.monotonic()
        r = session.get(base(daemon) + "/healthz", timeout=1.0)
        times.append(time.monotonic() - start)
        assert r.status_code == 200
        if pause:
            time.sleep(pause)
    return times


def test_slow_client_does_not_block_others(daemon: Daemon) -> None:
    """One header byte per second on one connection while 20 requests finish, each < 1 s;
    the trickler is cut off at http.timeout (2 s here) however steadily it sends."""
    s = socket.create_connection(daemon.http.address, timeout=10)
    stop = threading.Event()
    cut_at: list[float] = []
    t0 = time.monotonic()

    def trickle() -> None:
        try:
            for b in b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n\r\n":
                if stop.is_set():
                    return
                s.send(bytes([b]))
                time.sleep(1.0)
        except OSError:
            cut_at.append(time.monotonic() - t0)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    times = timed_healthz(daemon, requests.Session(), 20, pause=0.05)
    assert max(times) < 1.0, times
    s.settimeout(4)
    answer = s.recv(4096)  # the server gives up on the trickler: 408, then close
    assert status_of(answer) == 408
    assert time.monotonic() - t0 < 4.0
    stop.set()
    s.close()


def test_a_body_that_does_not_come_holds_up_nobody_and_ends_in_408(daemon: Daemon) -> None:
    """A request whose body never arrives delays nobody else, and is answered 408 at
    http.timeout (2 s here) on the dot, not after a per-read timeout a trickle resets."""
    s = socket.create_connection(daemon.http.address, timeout=10)
    t0 = time.monotonic()
    s.sendall(b"POST /hooks/open HTTP/1.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 10\r\n\r\n{}")  # 2 of 10 bytes
    session = requests.Session()
    times = timed_healthz(daemon, session, 10)
    assert max(times) < 0.5, times
    s.sendall(b"[")  # one more byte inside the deadline does not buy more time
    s.settimeout(4)
    answer = read_answer(s)
    elapsed = time.monotonic() - t0
    assert status_of(answer) == 408 and b'"request_timeout"' in answer
    assert 1.5 < elapsed < 3.0, elapsed
    s.close()


def test_idle_keep_alive_connection_is_closed_quietly(daemon: Daemon) -> None:
    """After an answer, a kept-alive connection that sends nothing more is closed at
    http.timeout without an error answer (nothing was asked)."""
    with socket.create_connection(daemon.http.address, timeout=6) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_answer(s)) == 200
        t0 = time.monotonic()
        assert s.recv(65536) == b""
        assert 1.0 < time.monotonic() - t0 < 4.0


def test_connection_cap_answers_503_quickly() -> None:
    api = Api(_Stub(), max_connections=2)
    srv = HttpServer("127.0.0.1", 0, api, timeout=3.0)
    srv.start()
    try:
        idle = [socket.create_connection(srv.address, timeout=5) for _ in range(2)]
        time.sleep(0.2)
        start = time.monotonic()
        resp = raw(srv.address, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert status_of(resp) == 503 and b"Retry-After: 1" in resp
        assert time.monotonic() - start < 0.5
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert status_of(raw(srv.address, b"GET /healthz HTTP/1.1\r\nConnection: close"
                                          b"\r\n\r\n")) == 200
        assert api.stats.rejected_connections == 1
    finally:
        srv.stop()


# ---------------------------------------------------------------------- IPv6
def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_loopback_honoured_by_allow_from() -> None:
    hooks = {"six": HookConfig("six", HookAuth("none"),
                               allow_from=(__import__("ipaddress").ip_network("::1/128"),)),
             "lan": HookConfig("lan", HookAuth("none"),
                               allow_from=(__import__("ipaddress").ip_network("10.0.0.0/8"),))}
    srv = HttpServer("::1", 0, Api(_Stub(), hooks=hooks))
    srv.start()
    try:
        url = f"http://[::1]:{srv.address[1]}"
        assert requests.post(url + "/hooks/six", timeout=5).status_code == 202
        assert requests.post(url + "/hooks/lan", timeout=5).status_code == 403
    finally:
        srv.stop()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 on this machine")
def test_ipv4_mapped_caller_on_dual_stack_listener() -> None:
    import ipaddress

    hooks = {"v4": HookConfig("v4", HookAuth("none"),
                              allow_from=(ipaddress.ip_network("127.0.0.0/8"),))}
    stub = _Stub()
    srv = HttpServer("::", 0, Api(stub, hooks=hooks))
    srv.start()
    try:
        r = requests.post(f"http://127.0.0.1:{srv.address[1]}/hooks/v4", timeout=5)
        assert r.status_code == 202
        assert stub.events[0].data["remote"] == "127.0.0.1"  # not ::ffff:127.0.0.1
    finally:
        srv.stop()


def test_reload_keeps_replay_cache_and_stats() -> None:
    hooks = {"h": HookConfig("h", HookAuth("hmac", signing=_signing()))}
    srv = HttpServer("127.0.0.1", 0, Api(_Stub(), hooks=hooks))
    srv.start()
    try:
        url = f"http://127.0.0.1:{srv.address[1]}/hooks/h"
        headers = {**J, **standard_headers([STD_SECRET], "m-reload", int(time.time()), b"{}")}
        assert requests.post(url, data=b"{}", headers=headers, timeout=5).status_code == 202
        srv.set_api(Api(_Stub(), hooks=hooks))
        again = requests.post(url, data=b"{}", headers=headers, timeout=5)
        assert again.status_code == 409 and again.json()["error"] == "duplicate"
        assert srv.api.backend.events == []  # the new snapshot knew the id: nothing stored
        assert srv.api.stats.hooks[("h", "202")] == 1
        assert srv.api.stats.hooks[("h", "409")] == 1
    finally:
        srv.stop()


# ---------------------------------------------------------------------- fuzzing
PATHS = st.one_of(
    st.sampled_from(["/", "/hooks/open", "/hooks/tok", "/hooks/std", "/hooks/gh",
                     "/hooks/lan", "/hooks/light", "/hooks/limited", "/hooks/", "/hooks/x/y",
                     "/api/v1/state", "/api/v1/outputs/fan", "/api/v1/outputs/",
                     "/api/v1/inputs/doorbell/simulate", "/api/v1/outbox",
                     "/api/v1/outbox/1/retry", "/api/v1/events", "/healthz", "/metrics",
                     "/login", "/logout", "//hooks/open", "/hooks/%2e%2e"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(
        lambda s: "/" + s))
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS",
                           "TRACE", "BREW"])
CTYPES = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-"
                          "urlencoded", "multipart/form-data", "application/json; charset=x",
                          "", ";;;", "text/plain; charset=utf-16"])
HEADER_NAMES = st.sampled_from(["Authorization", "X-Edgehook-Token", "webhook-id",
                                "webhook-timestamp", "webhook-signature", "X-Hub-Signature-256",
                                "Cookie", "Origin", "Host", "Content-Type", "X-Other"])
HEADER_VALUES = st.one_of(
    st.sampled_from([f"Bearer {API_TOKEN}", f"Bearer {HOOK_TOKEN}", "v1,AAAA", "²", "0",
                     "99999999999999999999", "edgehook_session=1.abc", "http://evil",
                     "null", "sha256=00"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30))
BODIES = st.one_of(st.binary(max_size=200), st.sampled_from([
    b'{"state":"on"}', b'{"state":"toggle","for":"1e308"}', b'{"action":"press"}',
    b'{"state":"on","for":"nan"}', b"[" * 200, b'{"for":-1,"state":"on"}', b"token=x",
    b'{"state":{"a":1}}', b'"on"']))


HTTP_LOGGERS = ("edgehook.http_server", "edgehook.api", "edgehook.routing",
                "edgehook.webauth", "edgehook.hooks")
ROUTED_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}


def _assert_clean(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.name.startswith(HTTP_LOGGERS) and
           (r.exc_info or r.levelno >= logging.ERROR)]
    assert not bad, [r.getMessage() for r in bad]


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=METHODS, path=PATHS, ctype=CTYPES,
       headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4), body=BODIES,
       query=st.text(max_size=20))
def test_fuzz_api_handle(daemon: Daemon, caplog: pytest.LogCaptureFixture, method: str,
                         path: str, ctype: str | None, headers: list[tuple[str, str]],
                         body: bytes, query: str) -> None:
    """Api.handle with real Request objects over the running daemon's backend: no 5xx."""
    caplog.set_level(logging.INFO)
    pairs = list(headers) + ([("Content-Type", ctype)] if ctype is not None else [])
    req = _stub_req(method, path, pairs, body, query="")
    req.raw_query = query
    resp = daemon.http.api.handle(req)
    assert resp.status < 500 or resp.status == 503, (resp.status, resp.body)
    if resp.status >= 400:
        assert set(resp.body) >= {"error", "detail"}
    _assert_clean(caplog)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=METHODS, path=PATHS, ctype=CTYPES,
       headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4), body=BODIES,
       extra=st.one_of(st.none(), st.binary(max_size=60)))
def test_fuzz_through_socket(daemon: Daemon, caplog: pytest.LogCaptureFixture, method: str,
                             path: str, ctype: str | None, headers: list[tuple[str, str]],
                             body: bytes, extra: bytes | None) -> None:
    """Raw requests, sometimes with garbage appended: never 5xx, the server still answers."""
    caplog.set_level(logging.INFO)
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Connection: close"]
    for k, v in headers:
        lines.append(k.encode() + b": " + v.encode("latin-1"))
    if ctype is not None:
        lines.append(b"Content-Type: " + ctype.encode())
    lines.append(b"Content-Length: " + str(len(body)).encode())
    data = b"\r\n".join(lines) + b"\r\n\r\n" + body + (extra or b"")
    resp = raw(daemon, data)
    if resp:  # never 5xx but 501 for a method the API does not use
        code = status_of(resp)
        assert code < 500 or (code == 501 and method not in ROUTED_METHODS), resp[:400]
    _assert_clean(caplog)


def test_server_still_answers_after_fuzz(daemon: Daemon) -> None:
    assert requests.get(base(daemon) + "/healthz", timeout=5).status_code == 200
    codes = {code for (_, code) in daemon.http.api.stats.requests}
    assert not codes & {"500", "502", "504"}, codes  # 501: BREW, TRACE; 505: HTTP/9.9


# ---------------------------------------------------------------------- trusted proxies
def _proxy_server(stub: _Stub, trusted: tuple[str, ...]) -> HttpServer:
    import ipaddress

    hooks = {"lan": HookConfig("lan", HookAuth("none"),
                               allow_from=(ipaddress.ip_network("10.0.0.0/8"),)),
             "open": HookConfig("open", HookAuth("none"))}
    api = Api(stub, hooks=hooks,
              trusted_proxies=tuple(ipaddress.ip_network(n) for n in trusted))
    srv = HttpServer("127.0.0.1", 0, api, timeout=3.0)
    srv.start()
    return srv


def _post_via(srv: HttpServer, hook: str, forwarded: list[str]) -> tuple[int, bytes]:
    """POST to a hook with these X-Forwarded-For headers (one header line each)."""
    lines = [f"POST /hooks/{hook} HTTP/1.1", "Host: x", "Content-Length: 0",
             "Connection: close", *(f"X-Forwarded-For: {v}" for v in forwarded)]
    resp = raw(srv.address, ("\r\n".join(lines) + "\r\n\r\n").encode())
    return status_of(resp), resp


@pytest.mark.parametrize("trusted, forwarded, status, remote", [
    # no trusted proxies: the header is ignored, whatever it claims
    ((), ["10.1.2.3"], 403, "127.0.0.1"),
    # the peer is a trusted proxy: the address it forwarded is the client
    (("127.0.0.1/32",), ["10.1.2.3"], 202, "10.1.2.3"),
    (("127.0.0.1/32",), ["10.1.2.3:51234"], 202, "10.1.2.3"),
    # a client that forges the header itself is on its left: never reached
    (("127.0.0.1/32",), ["10.9.9.9, 192.0.2.7"], 403, "192.0.2.7"),
    (("127.0.0.1/32",), ["10.9.9.9", "192.0.2.7"], 403, "192.0.2.7"),  # two header lines
    # two trusted proxies in a row: walked past both
    (("127.0.0.1/32", "172.16.0.0/12"), ["10.1.2.3, 172.16.0.5"], 202, "10.1.2.3"),
    (("127.0.0.1/32",), ["10.1.2.3, 172.16.0.5"], 403, "172.16.0.5"),
    # a peer outside the trusted networks is not believed
    (("192.168.0.0/16",), ["10.1.2.3"], 403, "127.0.0.1"),
    # a malformed entry: the peer is the client
    (("127.0.0.1/32",), ["10.1.2.3, not-an-address"], 403, "127.0.0.1"),
    (("127.0.0.1/32",), ["[fd00::1]:443"], 202, "fd00::1"),
])
def test_trusted_proxy_forwarded_client(trusted: tuple[str, ...], forwarded: list[str],
                                        status: int, remote: str) -> None:
    """allow_from judges the forwarded client only behind a trusted proxy; the event's
    remote is the same address."""
    stub = _Stub()
    srv = _proxy_server(stub, trusted)
    try:
        code, resp = _post_via(srv, "lan", forwarded)
        if remote == "fd00::1":  # not in 10/8 but allowed by the open hook
            code, resp = _post_via(srv, "open", forwarded)
        assert code == status, resp
        code, resp = _post_via(srv, "open", forwarded)
        assert code == 202, resp
        assert stub.events[-1].data["remote"] == remote
    finally:
        srv.stop()


def test_malformed_forwarded_header_is_logged_once_and_refusals_name_the_client(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgehook")
    srv = _proxy_server(_Stub(), ("127.0.0.1/32",))
    try:
        assert _post_via(srv, "lan", ["192.0.2.44"])[0] == 403
        assert any("lan" in r.getMessage() and "192.0.2.44" in r.getMessage()
                   for r in caplog.records if r.name == "edgehook.api")
        for _ in range(3):
            assert _post_via(srv, "lan", ["garbage"])[0] == 403
        malformed = [r for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
        assert len(malformed) == 1 and "127.0.0.1" in malformed[0].getMessage()
    finally:
        srv.stop()


# ---------------------------------------------------------------------- durability
STORE_CONFIG = """\
device: {{id: store, name: Store box}}
state_dir: {state}
gpio:
  backend: mock
  outputs:
    lamp: {{pin: GPIO27, class: light}}
http:
  listen: 127.0.0.1:{port}
  api_token: {token}
hooks:
  note: {{auth: none, rate_limit: {{requests: 1000, per: 1s}}}}
  lamp: {{auth: none, respond: sync, rate_limit: {{requests: 1000, per: 1s}}}}
  lost: {{auth: none, rate_limit: {{requests: 1000, per: 1s}}}}
  signed: {{auth: {{hmac: {{scheme: standard, secret: {std}}}}}}}
webhooks:
  sink: {{url: "{sink}/in", retry: {{max_attempts: 1}}}}
{gone}rules:
  - when: {{hook: note}}
    do: [{{webhook: sink}}]
  - when: {{hook: lamp}}
    do: [{{output: lamp, set: "on"}}, {{webhook: sink}}]
  - when: {{hook: signed}}
    do: [{{webhook: sink}}]
{lost_rule}"""
GONE_TARGET = '  gone: {url: "http://127.0.0.1:9/x", timeout: 1s, retry: {max_attempts: 1}}\n'
LOST_RULE = "  - when: {hook: lost}\n    do: [{webhook: gone}]\n"


def _store_config(path: Path, port: int, sink: str, with_gone: bool = True) -> Path:
    path.write_text(STORE_CONFIG.format(
        state=path.parent / "state", port=port, token=API_TOKEN, sink=sink, std=STD_SECRET,
        gone=GONE_TARGET if with_gone else "", lost_rule=LOST_RULE if with_gone else ""))
    return path


@pytest.fixture()
def store_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Any, Path]]:
    """A daemon whose hooks write webhooks to a real receiver (and to a dead end)."""
    from receiver import Receiver

    with Receiver() as sink:
        path = _store_config(tmp_path / "edgehook.yaml", free_port(), sink.url)
        d = Daemon(load_config(path))
        d.start()
        try:
            yield d, sink, path
        finally:
            d.stop()


def _outbox_rows(d: Daemon, status: str | None = None) -> list[dict[str, Any]]:
    url = base(d) + "/api/v1/outbox" + (f"?status={status}" if status else "")
    r = requests.get(url, headers=AUTH, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _wait_row(d: Daemon, event_id: str, status: str, timeout: float = 10.0
              ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in _outbox_rows(d) if r["event_id"] == event_id]
        if rows and rows[0]["status"] == status:
            return rows[0]
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


def test_hook_202_means_its_webhook_is_stored(store_daemon: tuple[Daemon, Any, Path]) -> None:
    d, sink, _ = store_daemon
    for _ in range(5):
        r = requests.post(base(d) + "/hooks/note", json={"n": 1}, timeout=10)
        assert r.status_code == 202, r.text
        # at the moment of the 202 the row is in the file, read by another connection
        rows = [row for row in _outbox_rows(d) if row["event_id"] == r.json()["event_id"]]
        assert [row["target"] for row in rows] == ["sink"]
    sink.wait_for(5)


def test_hook_not_stored_is_503_storage_unavailable_and_outputs_still_switch(
        store_daemon: tuple[Daemon, Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk the outbox will not fill any further: both hook kinds answer 503 with
    Retry-After 30; the sync hook's output has switched all the same."""
    import edgehook.outbox

    d, _, _ = store_daemon
    monkeypatch.setattr(edgehook.outbox, "MIN_FREE_BYTES", 1 << 60)  # "disk nearly full"
    r = requests.post(base(d) + "/hooks/note", json={}, timeout=10)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "storage_unavailable" and r.headers["Retry-After"] == "30"
    assert "disk nearly full" in r.json()["detail"]
    assert not [row for row in _outbox_rows(d) if row["event_id"] == r.json()["event_id"]]
    r = requests.post(base(d) + "/hooks/lamp", json={}, timeout=10)
    assert r.status_code == 503 and r.json()["error"] == "storage_unavailable", r.text
    assert d.gpio.output_states()["lamp"]["state"] == "on"
    monkeypatch.undo()
    assert requests.post(base(d) + "/hooks/note", json={}, timeout=10).status_code == 202


def test_standard_webhooks_id_of_a_request_not_stored_stays_free(
        store_daemon: tuple[Daemon, Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 (not stored) must not turn the sender's retry into a "duplicate":
    the retry is stored as the first event of that webhook-id."""
    import edgehook.outbox

    d, sink, _ = store_daemon
    body = b'{"n":3}'

    def post() -> requests.Response:
        headers = {**J, **standard_headers([STD_SECRET], "msg_lost", int(time.time()), body)}
        return requests.post(base(d) + "/hooks/signed", data=body, headers=headers, timeout=10)

    monkeypatch.setattr(edgehook.outbox, "MIN_FREE_BYTES", 1 << 60)  # "disk nearly full"
    assert post().status_code == 503
    monkeypatch.undo()
    retry = post()
    assert retry.status_code == 202, retry.text
    assert [r["target"] for r in _outbox_rows(d) if r["event_id"] == retry.json()["event_id"]
            ] == ["sink"]
    again = post()
    assert again.status_code == 409 and again.json()["event_id"] == retry.json()["event_id"]


def test_hook_not_stored_in_time_is_503_busy(store_daemon: tuple[Daemon, Any, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the outbox's write lock longer than the hook may wait:
    503 busy with Retry-After 5 for both kinds; the event is stored once the lock goes."""
    import sqlite3

    import edgehook.api

    d, _, _ = store_daemon
    monkeypatch.setattr(edgehook.api, "SYNC_WAIT", 0.3)
    db = sqlite3.connect(d.outbox.path, timeout=5, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        answers = [requests.post(base(d) + f"/hooks/{h}", json={}, timeout=10)
                   for h in ("note", "lamp")]
        for r in answers:
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "busy" and r.headers["Retry-After"] == "5"
    finally:
        db.execute("ROLLBACK")
        db.close()
    for r in answers:  # not acknowledged, but not lost either
        _wait_row(d, r.json()["event_id"], "delivered")


# ---------------------------------------------------------------------- outbox endpoints
def test_outbox_retry_drop_and_drop_target(store_daemon: tuple[Daemon, Any, Path]) -> None:
    d, sink, path = store_daemon
    url = base(d) + "/api/v1/outbox"
    lost = [requests.post(base(d) + "/hooks/lost", json={}, timeout=10).json()["event_id"]
            for _ in range(3)]
    dead = [_wait_row(d, e, "dead")["id"] for e in lost]
    r = requests.post(f"{url}/{dead[0]}/retry", headers=AUTH, timeout=5)
    assert r.status_code == 200 and r.json() == {"id": dead[0], "status": "pending", "was": "dead"}
    _wait_row(d, lost[0], "dead")
    r = requests.delete(f"{url}/{dead[0]}", headers=AUTH, timeout=5)
    assert r.status_code == 200 and r.json() == {"dropped": 1, "id": dead[0]}
    r = requests.delete(f"{url}/{dead[0]}", headers=AUTH, timeout=5)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert requests.post(f"{url}/{dead[0]}/retry", headers=AUTH, timeout=5).status_code == 404

    delivered = requests.post(base(d) + "/hooks/note", json={}, timeout=10).json()["event_id"]
    row = _wait_row(d, delivered, "delivered")
    r = requests.post(f"{url}/{row['id']}/retry", headers=AUTH, timeout=5)
    assert r.status_code == 409 and r.json()["error"] == "already_delivered", r.text

    _store_config(path, d.http.address[1], sink.url, with_gone=False)
    d.reload()
    assert "gone" not in d.cfg.webhooks
    r = requests.post(f"{url}/{dead[1]}/retry", headers=AUTH, timeout=5)
    assert r.status_code == 409, r.text
    assert r.json() == {"error": "target_gone", "detail": "target gone is not in the config; "
                        "fix the config or drop the row"}
    r = requests.delete(url, params={"target": "gone"}, headers=AUTH, timeout=5)
    assert r.status_code == 200 and r.json() == {"dropped": 2, "target": "gone"}
    assert not [row for row in _outbox_rows(d) if row["target"] == "gone"]
    r = requests.delete(url, params={"target": "gone", "status": "dead"}, headers=AUTH,
                        timeout=5)
    assert r.status_code == 400
    r = requests.delete(url, params={"target": "gone"}, timeout=5)
    assert r.status_code == 401
