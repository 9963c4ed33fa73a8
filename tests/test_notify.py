"""notify.py against a real AF_UNIX datagram socket, the way systemd listens."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgehook import notify
from edgehook.notify import Notifier, WatchdogPinger

RECV_TIMEOUT = 2.0


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT)
    yield sock, path
    sock.close()


def recv(sock: socket.socket) -> str:
    """The next datagram, as systemd would decode it (UTF-8)."""
    return sock.recv(4096).decode("utf-8")


def assert_nothing(sock: socket.socket, within: float = 0.2) -> None:
    """No datagram arrives within ``within`` seconds."""
    sock.settimeout(within)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return
    finally:
        sock.settimeout(RECV_TIMEOUT)
    pytest.fail(f"unexpected message {data!r}")


def test_messages_arrive_as_sent(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.watchdog_interval is None

    n.ready()
    assert recv(sock) == "READY=1"
    n.status("MQTT connected · outbox 0 pending, 0 dead")
    assert recv(sock) == "STATUS=MQTT connected · outbox 0 pending, 0 dead"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    lines = recv(sock).split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after
    n.stopping()
    assert recv(sock) == "STOPPING=1"
    n.watchdog()
    assert recv(sock) == "WATCHDOG=1"


def test_duplicate_status_is_suppressed(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.status("starting")
    n.status("starting")
    n.status("running")
    n.status("running")
    n.status("starting")
    assert [recv(sock) for _ in range(3)] == [
        "STATUS=starting", "STATUS=running", "STATUS=starting"]
    assert_nothing(sock)


def test_status_newlines_cannot_inject_assignments(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).status("last event: x\nREADY=1")
    assert recv(sock) == "STATUS=last event: x READY=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_abstract_socket_name() -> None:
    name = f"edgehook-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECV_TIMEOUT)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert recv(sock) == "READY=1"


def test_disabled_without_notify_socket(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    with caplog.at_level(logging.DEBUG):
        n.ready()
        n.status("x")
        n.reloading()
        n.stopping()
        n.watchdog()
    assert caplog.records == []
    pinger = WatchdogPinger(n, lambda: True)
    pinger.start()
    pinger.stop()


def test_unsupported_address_disables_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgehook.notify"):
        n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert len(caplog.records) == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock", **env})
    assert n.watchdog_interval == expected


def test_pinger_pings_only_while_healthy(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = listener
    # 40 ms timeout -> a ping every 20 ms.
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})
    assert n.watchdog_interval == pytest.approx(0.02)
    healthy = threading.Event()
    healthy.set()
    pinger = WatchdogPinger(n, healthy.is_set)
    caplog.set_level(logging.INFO, logger="edgehook.notify")
    pinger.start()
    try:
        for _ in range(3):
            assert recv(sock) == "WATCHDOG=1"
        healthy.clear()
        # Pings sent before the flip may still be queued: drain until the
        # socket stays quiet for ten intervals, within a hard deadline.
        deadline = time.monotonic() + RECV_TIMEOUT
        sock.settimeout(0.2)
        while True:
            assert time.monotonic() < deadline, "pings did not stop"
            try:
                sock.recv(4096)
            except TimeoutError:
                break
        assert_nothing(sock)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, "one warning per unhealthy stretch"
        assert "withholding watchdog" in warnings[0].getMessage()

        healthy.set()
        assert recv(sock) == "WATCHDOG=1"
        assert recv(sock) == "WATCHDOG=1"
    finally:
        started = time.monotonic()
        pinger.stop()
        assert time.monotonic() - started < 1.0


def test_pinger_treats_a_failing_health_check_as_unhealthy(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    checked = threading.Event()

    def broken() -> bool:
        checked.set()
        raise RuntimeError("heartbeat table is gone")

    pinger = WatchdogPinger(n, broken)
    with caplog.at_level(logging.WARNING, logger="edgehook.notify"):
        pinger.start()
        assert checked.wait(RECV_TIMEOUT)
        assert_nothing(sock)
        pinger.stop()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_pinger_stop_is_prompt_with_a_long_interval(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(60 * 1_000_000)})
    monkeypatch.setattr(notify, "STOP_JOIN_TIMEOUT", 2.0)
    pinger = WatchdogPinger(n, lambda: True)
    pinger.start()
    started = time.monotonic()
    pinger.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "edgehook-watchdog" for t in threading.enumerate())


def test_vanished_socket_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT)
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready()
    assert recv(sock) == "READY=1"
    sock.close()
    os.unlink(path)

    with caplog.at_level(logging.WARNING, logger="edgehook.notify"):
        n.status("a")
        n.status("b")
        n.watchdog()
        n.stopping()
    warnings = [r for r in caplog.records if r.name == "edgehook.notify"]
    assert len(warnings) == 1
    assert "cannot notify systemd" in warnings[0].getMessage()

    # The notifier reconnects when the socket is back, and a status that
    # failed to go out is sent again rather than treated as a duplicate.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
        again.bind(path)
        again.settimeout(RECV_TIMEOUT)
        n.status("b")
        assert recv(again) == "STATUS=b"


def test_disabled_notifier_does_not_import_sdnotify() -> None:
    code = (
        "import sys; from edgehook.notify import Notifier; "
        "n = Notifier({}); n.ready(); n.status('x'); n.watchdog(); "
        "print('sdnotify' in sys.modules)"
    )
    source_root = str(Path(notify.__file__).resolve().parents[1])
    env = {**os.environ, "NOTIFY_SOCKET": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
    )
    assert out.stdout.strip() == "False"
