"""The status page: its HTML as a pure function, and in headless Chromium.

The pure tests check what the server renders without JavaScript: times as UTC
`<time>` elements, each webhook target's health, undelivered rows with the event
they came from, and rules that matched but did not fire, with why.

The browser test runs Chromium in Tokyo's time zone over the DevTools protocol:
signs in through the login form, checks the DOM (inputs, outputs, MQTT, webhook
health, outbox, events), checks every time is shown in the browser's zone, clicks
a toggle with a real (synthesised) mouse click and waits for the output to change
in the daemon, presses a simulated input, takes screenshots at phone (390 px) and
desktop (1280 px) widths into tests/artifacts/, and fails on any console error,
uncaught exception or CSP violation. The DevTools websocket client is a few lines
of stdlib below (no test dependency).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from edgehook.app import Daemon
from edgehook.config import load_config
from edgehook.status_page import event_summary, status_page
from test_http_api import API_TOKEN, free_port

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    shutil.which("google-chrome")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="chromium is not installed (apt-get install -y chromium); required when CI=true")
BROWSER_TZ = "Asia/Tokyo"  # never UTC: a time left in UTC reads differently there


class DevTools:
    """A minimal Chrome DevTools Protocol client over one websocket (RFC 6455, text only)."""

    def __init__(self, ws_url: str) -> None:
        rest = ws_url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=15)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("devtools closed during the handshake")
            head += chunk
        assert b" 101 " in head.split(b"\r\n", 1)[0], head
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _send(self, text: str) -> None:
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("devtools closed")
            buf += chunk
        return buf

    def _recv(self) -> dict[str, Any]:
        message = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._recv_exact(8))[0]
            payload = self._recv_exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("devtools sent close")
            if opcode in (0x9, 0xA):  # ping/pong: ignore
                continue
            message += payload
            if b0 & 0x80:
                return json.loads(message)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        my_id = self.next_id
        self._send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = self._recv()
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                msg = self._recv()
            except TimeoutError:
                break
            finally:
                self.sock.settimeout(15)
            if msg.get("method") == method:
                return msg
            self.events.append(msg)
        raise TimeoutError(f"no {method} within {timeout} s")

    def pump(self, seconds: float) -> None:
        """Collect events for a while (console messages arrive asynchronously)."""
        self.call("Runtime.evaluate", expression="1")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.settimeout(max(0.05, end - time.monotonic()))
            try:
                self.events.append(self._recv())
            except TimeoutError:
                break
            finally:
                self.sock.settimeout(15)

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"page JS failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def navigate(self, url: str) -> None:
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view)."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def errors(self) -> list[str]:
        out = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails"))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
        return out

    def close(self) -> None:
        self.sock.close()


def wait_for(check: Callable[[], Any], timeout: float = 6.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- the HTML, no browser
UTC_TIME = "2026-11-28T06:00:00.123Z"


def page(state: dict[str, Any] | None = None, events: list[dict[str, Any]] | None = None,
         dead: list[dict[str, Any]] | None = None,
         pending: list[dict[str, Any]] | None = None) -> str:
    base = {"device": {"id": "porch", "name": "Porch"}, "backend": "mock",
            "inputs": {}, "outputs": {}, "mqtt": None,
            "outbox": {"pending": len(pending or []), "dead": len(dead or []), "delivered": 0}}
    return status_page({**base, **(state or {})}, events or [], dead or [], "n0nce", False,
                       pending)


def target_card(html: str, name: str) -> str:
    """The text of one webhook target's card, tags stripped."""
    m = re.search(rf'<li class="card" data-target="{re.escape(name)}">(.*?)</li>', html)
    assert m, f"no card for {name}"
    return re.sub(r"<[^>]+>", "", m.group(1))


def test_times_are_utc_time_elements_the_script_can_convert() -> None:
    html = page({"outputs": {"porch_light": {"state": "on", "until": UTC_TIME}}},
                [{"id": "E1", "type": "input.pressed", "source": "doorbell", "time": UTC_TIME}])
    element = f'<time datetime="{UTC_TIME}" title="{UTC_TIME}">06:00:00 UTC</time>'
    assert html.count(element) == 2  # the event and the output's "until"
    assert "06:00:00Z" not in html


EARLY, LATE = "2026-11-28T06:00:00.000Z", "2026-11-28T07:30:00.000Z"
HEALTH_CASES = [
    # id, the state API's entry for a target, its health word, text that must be in its card
    ("gone", {"gone": True, "last_success": LATE, "pending": 0}, "gone", ["0 pending"]),
    ("failing-since-success", {"gone": False, "last_success": EARLY, "last_error": "HTTP 502",
                               "last_error_at": LATE, "pending": 4},
     "failing", ["last success 2026-11-28 06:00:00 UTC", "4 pending",
                 "last error 2026-11-28 07:30:00 UTC: HTTP 502"]),
    ("never-delivered", {"last_error": "connection refused", "last_error_at": EARLY},
     "failing", ["last error 2026-11-28 06:00:00 UTC: connection refused"]),
    ("recovered", {"last_success": LATE, "last_error": "timeout", "last_error_at": EARLY,
                   "pending": 0}, "ok", ["last success", "last error"]),
    ("sending", {"last_success": None, "last_error": None, "pending": 3}, "sending",
     ["3 pending"]),
    ("only-gone-key", {"gone": False}, "no deliveries yet", []),
    ("empty", {}, "no deliveries yet", []),
]


@pytest.mark.parametrize("health,word,texts", [c[1:] for c in HEALTH_CASES],
                         ids=[c[0] for c in HEALTH_CASES])
def test_each_webhook_target_shows_its_health(health: dict[str, Any], word: str,
                                              texts: list[str]) -> None:
    card = target_card(page({"webhooks": {"discord": health}}), "discord")
    assert card.startswith("discord" + word)
    for text in texts:
        assert text in card
    if "pending" not in health:
        assert "pending" not in card
    if not health.get("last_error"):
        assert "last error" not in card


def test_undelivered_rows_name_their_event_and_what_they_wait_behind() -> None:
    events = [{"id": "01EVENTA", "type": "input.pressed", "source": "doorbell",
               "time": UTC_TIME}]
    dead = [{"id": 3, "event_id": "01EVENTA", "target": "discord", "status": "dead",
             "attempts": 1, "last_error": "HTTP 404"}]
    pending = [{"id": 9, "event_id": "01EVENTA", "target": "slow", "status": "pending",
                "attempts": 2, "next_attempt_at": UTC_TIME, "waiting_behind": None},
               {"id": 12, "event_id": "01GONE", "target": "slow", "status": "pending",
                "attempts": 0, "next_attempt_at": UTC_TIME, "waiting_behind": 9}]
    html = page({"outbox": {"pending": 7, "dead": 1, "delivered": 0}}, events, dead, pending)
    rows = dict(re.findall(r'<li class="\w+" data-row="(\d+)">(.*?)</li>', html))
    text = {k: re.sub(r"<[^>]+>", "", v) for k, v in rows.items()}
    assert text["3"] == ("#3 discord dead · 1 attempt from input.pressed doorbell at "
                         "06:00:00 UTC HTTP 404 Retry")
    assert '<a href="#ev-01EVENTA">' in rows["3"] and 'id="ev-01EVENTA"' in html
    assert text["9"] == ("#9 slow pending · 2 attempts · next try 06:00:00 UTC from "
                         "input.pressed doorbell at 06:00:00 UTC")
    assert text["12"] == ("#12 slow pending · 0 attempts · next try 06:00:00 UTC from event "
                          "01GONE waiting behind #9")
    assert "data-retry" not in rows["9"]
    assert "5 more pending (edgehook outbox list)" in html  # 7 pending, 2 shown


SKIP = [{"rule": "ring", "reason": "cooldown: 7.2 s left"},
        {"rule": "night", "reason": "if: false"}]
EVENT_CASES = [
    # id, what the dispatcher recorded, the API's summary line, lines under the event
    ("nothing-matched", {}, "no rule", ["no rule"]),
    ("fired", {"rules": ["ring"], "results": [{"webhook": "discord", "queued": True}]},
     "ring: webhook discord queued", ["ring: webhook discord queued"]),
    ("only-skipped", {"rules": [], "skipped": SKIP},
     "no rule fired — skipped ring (cooldown: 7.2 s left); night (if: false)",
     ["no rule fired", "skipped ring: cooldown: 7.2 s left", "skipped night: if: false"]),
    ("fired-skipped-failed", {"rules": ["light"], "skipped": SKIP[1:],
                              "results": [{"output": "porch", "state": "on", "until": UTC_TIME}],
                              "errors": ["rule light: publish a/b: not connected"]},
     "light: porch on until 06:00:00Z — skipped night (if: false) — ERROR: rule light: "
     "publish a/b: not connected",
     ["light: porch on until 06:00:00 UTC", "skipped night: if: false",
      "error: rule light: publish a/b: not connected"]),
]


@pytest.mark.parametrize("recorded,summary,lines", [c[1:] for c in EVENT_CASES],
                         ids=[c[0] for c in EVENT_CASES])
def test_events_say_which_rules_fired_and_which_skipped_why(
        recorded: dict[str, Any], summary: str, lines: list[str]) -> None:
    ev = {"id": "E1", "type": "input.pressed", "source": "doorbell", "time": UTC_TIME,
          **recorded}
    assert event_summary(ev) == summary
    row = re.search(r'<li id="ev-E1"[^>]*>(.*?)</li>', page(events=[ev])).group(1)
    found = [re.sub(r"<[^>]+>", "", x) for x in re.findall(r"<div class=\"\w+\">(.*?)</div>", row)]
    assert found == lines
    assert ('class="failed"' in page(events=[ev])) == bool(recorded.get("errors"))


def test_new_fields_are_escaped() -> None:
    bad = "<script>x</script>"
    html = page({"webhooks": {bad: {"last_error": bad, "last_error_at": bad}}},
                [{"id": bad, "type": bad, "source": bad, "time": bad,
                  "skipped": [{"rule": bad, "reason": bad}], "errors": [bad]}],
                pending=[{"id": 1, "event_id": bad, "target": bad, "waiting_behind": bad,
                          "last_error": bad, "next_attempt_at": bad}])
    assert bad not in html.replace("<script nonce", "")
    assert html.count("&lt;script&gt;") >= 8


# ---------------------------------------------------------------- the page in Chromium
CONFIG = """\
device: {{id: test, name: Test box}}
state_dir: {state}
gpio:
  backend: mock
  inputs:
    doorbell: {{pin: GPIO17, pull: up, class: doorbell}}
  outputs:
    porch_light: {{pin: GPIO27, class: light}}
    fan: {{pin: GPIO22, class: switch}}
http:
  listen: 127.0.0.1:{port}
  api_token: {token}
webhooks:
  dead_end:
    url: http://127.0.0.1:9/nowhere
    timeout: 1s
    retry: {{max_attempts: 1}}
  later:
    url: http://127.0.0.1:9/later
    timeout: 1s
    retry: {{max_attempts: 20, max_age: 1h}}
rules:
  - name: ring
    when: {{input: doorbell, event: pressed}}
    do:
      - webhook: dead_end
      - webhook: later
  - name: ring-once-an-hour
    when: {{input: doorbell, event: pressed}}
    cooldown: 1h
    do: [{{output: fan, set: on}}]
  - name: only-for-the-mailman
    when: {{input: doorbell, event: pressed}}
    if: "{{{{ event.source == 'mailbox' }}}}"
    do: [{{output: porch_light, set: on}}]
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("page")
    path = directory / "edgehook.yaml"
    path.write_text(CONFIG.format(state=directory / "state", port=free_port(), token=API_TOKEN))
    d = Daemon(load_config(path))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    if CHROMIUM is None:
        pytest.fail("CI=true but chromium is missing: .ci/run installs it")
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
         f"--user-data-dir={profile}", "--window-size=1280,800", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TZ": BROWSER_TZ})
    try:
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 20,
                 "chromium's DevToolsActivePort")
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                                    timeout=10).read())
        page = next(t for t in targets if t.get("type") == "page")
        dt = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            dt.call(f"{domain}.enable")
        yield dt
        dt.close()
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def api_get(daemon: Daemon, path: str) -> Any:
    host, port = daemon.http.address
    req = urllib.request.Request(f"http://{host}:{port}{path}",
                                 headers={"Authorization": f"Bearer {API_TOKEN}"})
    return json.loads(urllib.request.urlopen(req, timeout=5).read())


def in_browser_zone(iso: str) -> set[str]:
    """The clock readings, 24 h and 12 h, of a UTC time in BROWSER_TZ."""
    local = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(ZoneInfo(BROWSER_TZ))
    return {local.strftime("%H:%M:%S"), local.strftime("%I:%M:%S")}


def assert_local_time(dt: DevTools, selector: str) -> None:
    """The `<time>` at `selector` reads as the browser's clock, not as the UTC it came in."""
    iso, text = dt.js(f"(() => {{ const t = document.querySelector({json.dumps(selector)});"
                      "return [t.dateTime, t.textContent]; })()")
    assert iso.endswith("Z") and "UTC" not in text and iso[11:19] not in text, (iso, text)
    assert any(clock in text for clock in in_browser_zone(iso)), (iso, text)


@needs_chromium
def test_status_page_in_chromium(daemon: Daemon, browser: DevTools) -> None:
    host, port = daemon.http.address
    url = f"http://{host}:{port}/"
    dt = browser
    dt.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2,
            mobile=True)
    # 1. the login form (api_token is set), then sign in
    dt.navigate(url)
    assert dt.js("!!document.querySelector('form[action=\"/login\"] input[name=token]')")
    assert dt.js("document.querySelector('[data-output]') === null")  # nothing leaks
    dt.js(f"document.getElementById('token').value = {json.dumps(API_TOKEN)}")
    dt.events = [e for e in dt.events if e.get("method") != "Page.loadEventFired"]
    dt.js("document.querySelector('form').submit()")
    dt.wait_event("Page.loadEventFired")
    assert dt.js("Intl.DateTimeFormat().resolvedOptions().timeZone") == BROWSER_TZ
    # 2. the page: inputs, outputs, MQTT, webhooks, outbox, events
    doc = dt.js("""(() => ({
        outputs: [...document.querySelectorAll('[data-output]')].map(e => e.dataset.output),
        inputs: [...document.querySelectorAll('[data-input-row]')].map(e => e.dataset.inputRow),
        targets: [...document.querySelectorAll('[data-target]')].map(e => e.dataset.target),
        porch: document.querySelector('[data-output=porch_light] [data-state]').textContent,
        press: !!document.querySelector('button[data-sim=click][data-input=doorbell]'),
        mqtt: document.getElementById('mqtt').textContent,
        counts: [...document.querySelectorAll('[data-count]')].map(e => e.dataset.count),
        events: document.querySelectorAll('#event-list li').length,
        title: document.title,
        overflow: document.documentElement.scrollWidth - window.innerWidth,
    }))()""")
    assert doc["outputs"] == ["porch_light", "fan"]
    assert doc["inputs"] == ["doorbell"]
    assert doc["targets"] == ["dead_end", "later"]
    assert doc["press"] and doc["mqtt"] == "MQTT not configured"
    assert doc["counts"] == ["pending", "dead", "delivered"]
    assert doc["events"] >= 1 and "Test box" in doc["title"]
    assert doc["overflow"] <= 0, "the page scrolls sideways on a phone"
    # the daemon's start event, rendered by the server, now in Tokyo's time
    assert_local_time(dt, "#event-list time")
    # 3. a toggle that works: real click -> PUT -> the daemon's pin -> the page's pill
    before = daemon.gpio.output_states()["porch_light"]["state"]
    after = "off" if before == "on" else "on"
    dt.click("button[data-toggle=porch_light]")
    wait_for(lambda: daemon.gpio.output_states()["porch_light"]["state"] == after, 5,
             "the output to switch")
    wait_for(lambda: dt.js("document.querySelector('[data-output=porch_light] [data-state]')"
                           ".textContent") == after, 5, "the page to show the new state")
    # 4. a simulated press shows up in the event list by itself (polling), and the
    # rule the `if` held back is named with why
    dt.click("button[data-sim=click][data-input=doorbell]")
    wait_for(lambda: dt.js("[...document.querySelectorAll('#event-list .type')]"
                           ".some(e => e.textContent === 'input.pressed')"), 6,
             "the press to appear in the events")
    mailman = "skipped only-for-the-mailman: if: false"
    wait_for(lambda: dt.js("[...document.querySelectorAll('#event-list .skipped')]"
                           f".some(e => e.textContent === {json.dumps(mailman)})"),
             6, "the rule its if held back to be named")
    # a second press: the cooldown's rule says how long is left
    dt.click("button[data-sim=click][data-input=doorbell]")
    wait_for(lambda: dt.js("[...document.querySelectorAll('#event-list .skipped')]"
                           ".some(e => /^skipped ring-once-an-hour: cooldown: 59 min \\d+ s left$/"
                           ".test(e.textContent))"), 6, "the cooldown's rule to be named")
    assert_local_time(dt, "#event-list li:first-child time")
    # 5. dead_end has nowhere to go (max_attempts 1): a dead delivery with its error and
    # the event it came from; `later` keeps both presses pending, the second behind the first
    wait_for(lambda: dt.js("document.querySelectorAll('#dead li').length") >= 1, 6,
             "the dead delivery to appear")
    dead = dt.js("document.querySelector('#dead li').textContent")
    assert "dead_end" in dead and "Retry" in dead and "from input.pressed doorbell at" in dead
    assert dt.js("document.querySelector('[data-count=dead]').textContent") != "0"
    wait_for(lambda: dt.js("[...document.querySelectorAll('#pending li')]"
                           ".some(e => / waiting behind #\\d+/.test(e.textContent))"), 8,
             "a pending delivery waiting behind the one before it")
    assert_local_time(dt, "#pending li time")
    # each target's health, as the state API has it
    def health_shown() -> bool:
        state = api_get(daemon, "/api/v1/state")["webhooks"]
        card = dt.js("document.querySelector('[data-target=later]').textContent")
        pending = state["later"].get("pending")
        return pending is not None and pending >= 1 and f"{pending} pending" in card and \
            card.startswith("later" + ("failing" if state["later"].get("last_error")
                                       else "sending"))
    wait_for(health_shown, 8, "the webhook target's health")
    state = api_get(daemon, "/api/v1/state")["webhooks"]["dead_end"]
    if state.get("last_error"):  # the sender reports it
        wait_for(lambda: "last error" in dt.js(
            "document.querySelector('[data-target=dead_end]').textContent"), 6,
            "the target's last error")
        assert_local_time(dt, "[data-target=dead_end] .error time")
    assert dt.js("document.getElementById('stale').hidden") is True
    assert dt.js("getComputedStyle(document.getElementById('stale')).display") == "none"
    assert dt.js("document.documentElement.scrollWidth - window.innerWidth") <= 0
    dt.screenshot(ARTIFACTS / "status-phone-390.png")
    # 6. desktop width; the server's rows, localized by the script on load
    dt.call("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1,
            mobile=False)
    dt.navigate(url)
    assert dt.js("document.querySelectorAll('[data-output]').length") == 2
    assert_local_time(dt, "#event-list time")
    assert dt.js("document.querySelector('#event-list .skipped') !== null")
    wait_for(lambda: dt.js("document.querySelectorAll('#pending li').length") >= 1, 1.5,
             "the pending rows without waiting for the next poll")
    dt.screenshot(ARTIFACTS / "status-desktop-1280.png")
    dt.pump(0.5)
    assert dt.errors() == []
    assert (ARTIFACTS / "status-phone-390.png").stat().st_size > 5000
