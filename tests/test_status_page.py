"""The status page in headless Chromium, driven over the DevTools protocol.

Signs in through the login form, checks the DOM (inputs, outputs, MQTT, outbox, events),
clicks a toggle with a real (synthesised) mouse click and waits for the output to
change in the daemon, presses a simulated input, takes screenshots at phone (390 px)
and desktop (1280 px) widths into tests/artifacts/, and fails on any console error,
uncaught exception or CSP violation. The DevTools websocket client is a few lines of
stdlib below (no test dependency).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgehook.app import Daemon
from test_http_api import API_TOKEN, start_daemon

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    shutil.which("google-chrome")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="chromium is not installed (apt-get install -y chromium); required when CI=true")


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


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("page"))
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
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    # 2. the page: inputs, outputs, MQTT, outbox, events
    doc = dt.js("""(() => ({
        outputs: [...document.querySelectorAll('[data-output]')].map(e => e.dataset.output),
        inputs: [...document.querySelectorAll('[data-input-row]')].map(e => e.dataset.inputRow),
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
    assert doc["press"] and doc["mqtt"] == "MQTT not configured"
    assert doc["counts"] == ["pending", "dead", "delivered"]
    assert doc["events"] >= 1 and "Test box" in doc["title"]
    assert doc["overflow"] <= 0, "the page scrolls sideways on a phone"
    # 3. a toggle that works: real click -> PUT -> the daemon's pin -> the page's pill
    before = daemon.gpio.output_states()["porch_light"]["state"]
    after = "off" if before == "on" else "on"
    dt.click("button[data-toggle=porch_light]")
    wait_for(lambda: daemon.gpio.output_states()["porch_light"]["state"] == after, 5,
             "the output to switch")
    wait_for(lambda: dt.js("document.querySelector('[data-output=porch_light] [data-state]')"
                           ".textContent") == after, 5, "the page to show the new state")
    # 4. a simulated press shows up in the event list by itself (polling)
    dt.click("button[data-sim=click][data-input=doorbell]")
    wait_for(lambda: dt.js("[...document.querySelectorAll('#event-list .type')]"
                           ".some(e => e.textContent === 'input.pressed')"), 6,
             "the press to appear in the events")
    # 5. its webhook has nowhere to go (max_attempts 1): a dead delivery with its error
    wait_for(lambda: dt.js("document.querySelectorAll('#dead li').length") >= 1, 6,
             "the dead delivery to appear")
    dead = dt.js("document.querySelector('#dead li').textContent")
    assert "dead_end" in dead and "Retry" in dead
    assert dt.js("document.querySelector('[data-count=dead]').textContent") != "0"
    assert dt.js("document.getElementById('stale').hidden") is True
    assert dt.js("getComputedStyle(document.getElementById('stale')).display") == "none"
    dt.screenshot(ARTIFACTS / "status-phone-390.png")
    # 6. desktop width
    dt.call("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1,
            mobile=False)
    dt.navigate(url)
    assert dt.js("document.querySelectorAll('[data-output]').length") == 2
    dt.screenshot(ARTIFACTS / "status-desktop-1280.png")
    dt.pump(0.5)
    assert dt.errors() == []
    assert (ARTIFACTS / "status-phone-390.png").stat().st_size > 5000
