"""The whole daemon talking sd_notify to a real AF_UNIX datagram socket, as systemd listens.

`edgehook run` is a subprocess with NOTIFY_SOCKET pointing at a socket bound here and
WATCHDOG_USEC=400000 (0.4 s, so pings every 0.2 s). Every wait is a `recv` with a
deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from broker import free_port

WATCHDOG_USEC = 400_000  # 0.4 s timeout -> a ping every 0.2 s
STALL_AFTER = 1.0  # EDGEHOOK_STALL_AFTER for the hang test (the default is 30 s)

CONFIG = """\
device: {{id: notify-test, name: Notify test}}
state_dir: {state}
gpio:
  backend: mock
  inputs:
    doorbell: {{pin: GPIO17, class: doorbell}}
  outputs:
    porch_light: {{pin: GPIO27, class: light}}
http:
  listen: 127.0.0.1:{port}
rules:
  - name: ring
    when: {{input: doorbell}}
    do:
      - output: porch_light
        set: on
"""


class NotifySocket:
    """systemd's side of sd_notify: a bound datagram socket that records every message."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[tuple[float, list[str]]] = []  # (monotonic arrival, lines)

    def close(self) -> None:
        self.sock.close()

    def _recv_one(self, deadline: float) -> bool:
        """Receive one datagram before `deadline`; False when the deadline passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        self.messages.append((time.monotonic(), data.decode("utf-8").split("\n")))
        return True

    def wait_for(self, line: str, after: int = 0, timeout: float = 10.0,
                 prefix: bool = False) -> int:
        """Index of the first message from `after` on with this line (or a line starting
        with it, with `prefix`); receives until one arrives or `timeout` passes."""
        deadline = time.monotonic() + timeout
        i = after
        while True:
            while i < len(self.messages):
                lines = self.messages[i][1]
                if line in lines or prefix and any(x.startswith(line) for x in lines):
                    return i
                i += 1
            if not self._recv_one(deadline):
                raise AssertionError(f"no {line!r} within {timeout} s; got {self.texts()}")

    def wait_count(self, line: str, n: int, after: int = 0, timeout: float = 10.0) -> int:
        """Index of the n-th message from `after` on carrying this line."""
        i = after - 1
        for _ in range(n):
            i = self.wait_for(line, i + 1, timeout)
        return i

    def collect_until(self, deadline: float) -> None:
        """Record everything that arrives until `deadline`."""
        while self._recv_one(deadline):
            pass

    def texts(self, after: int = 0) -> list[str]:
        return ["\\n".join(lines) for _, lines in self.messages[after:]]


@pytest.fixture()
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # AF_UNIX paths are limited to 108 bytes
        path = Path(tempfile.mkdtemp(prefix="eh-notify-")) / "notify.sock"
    ns = NotifySocket(str(path))
    yield ns
    ns.close()
    os.unlink(ns.path)


def start(tmp_path: Path, write_config, daemon, ns: NotifySocket, **env: str):
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "state", port=port))
    return daemon(cfg, port=port, env={"NOTIFY_SOCKET": ns.path,
                                       "WATCHDOG_USEC": str(WATCHDOG_USEC), **env})


def test_ready_status_watchdog_reload_stop(tmp_path: Path, write_config, daemon,
                                           notify_socket: NotifySocket) -> None:
    ns = notify_socket
    d = start(tmp_path, write_config, daemon, ns)

    ready = ns.wait_for("READY=1", timeout=15)
    status = ns.wait_for("STATUS=", prefix=True, timeout=5)
    text = next(x for x in ns.messages[status][1] if x.startswith("STATUS="))
    assert "outbox" in text, text  # something a person reading `systemctl status` can use

    # Pings every 0.2 s: three arrive well within 1.5 s, and none came before READY.
    first = ns.wait_for("WATCHDOG=1")
    assert first > ready, ns.texts()
    third = ns.wait_count("WATCHDOG=1", 3, timeout=1.5)
    assert ns.messages[third][0] - ns.messages[first][0] < 1.0, ns.texts()

    # SIGHUP: RELOADING=1 (with MONOTONIC_USEC for Type=notify-reload), then READY=1 again.
    n = len(ns.messages)
    d.signal(signal.SIGHUP)
    reloading = ns.wait_for("RELOADING=1", after=n)
    assert any(x.startswith("MONOTONIC_USEC=") for x in ns.messages[reloading][1])
    ns.wait_for("READY=1", after=reloading + 1)
    d.wait_log("reloaded")
    # and the watchdog keeps going after the reload
    ns.wait_count("WATCHDOG=1", 2, after=reloading + 1, timeout=2)

    # SIGTERM: STOPPING=1 and exit 0.
    n = len(ns.messages)
    d.signal(signal.SIGTERM)
    ns.wait_for("STOPPING=1", after=n)
    assert d.stop() == 0
    assert "Traceback" not in d.log


def test_hung_dispatcher_stops_the_watchdog(tmp_path: Path, write_config, daemon,
                                            notify_socket: NotifySocket) -> None:
    """The test-only fault EDGEHOOK_TEST_HANG_EVENT hangs the dispatcher on a press;
    after EDGEHOOK_STALL_AFTER the pings stop while the process stays alive, so systemd
    (WatchdogSec=) would kill and restart it."""
    ns = notify_socket
    d = start(tmp_path, write_config, daemon, ns,
              EDGEHOOK_TEST_HANG_EVENT="input.pressed", EDGEHOOK_STALL_AFTER=str(STALL_AFTER))
    ready = ns.wait_for("READY=1", timeout=15)
    ns.wait_count("WATCHDOG=1", 3, after=ready + 1, timeout=3)
    d.wait_ready()

    # An idle daemon runs a press on the thread the edge came in on (here the API
    # request's), so this request hangs with the event: send it from the side.
    def press() -> None:
        with contextlib.suppress(requests.RequestException):  # it never gets its answer
            d.api("POST", "/api/v1/inputs/doorbell/simulate", json={"action": "press"})

    threading.Thread(target=press, daemon=True).start()
    d.wait_log("EDGEHOOK_TEST_HANG_EVENT: dispatcher hangs on")
    hung_at = time.monotonic()  # the dispatcher is stuck no later than this

    # Pings may go on until the stall threshold has passed (plus one 0.2 s interval);
    # from then on, none for more than 1.5 s.
    quiet_from = hung_at + STALL_AFTER + 0.5
    ns.collect_until(quiet_from)
    n = len(ns.messages)
    ns.collect_until(quiet_from + 1.6)
    late = [t for t in ns.texts(n) if "WATCHDOG=1" in t.split("\\n")]
    assert not late, f"watchdog pings went on after the dispatcher hung: {ns.texts()}"
    pings = [t for t, lines in ns.messages if "WATCHDOG=1" in lines]
    assert pings and pings[-1] < quiet_from, ns.texts()

    assert d.proc.poll() is None, "the process must stay alive: systemd is the one to kill it"
    d.wait_log("withholding watchdog pings")
    d.kill()  # a clean stop would wait for the hung dispatcher first
