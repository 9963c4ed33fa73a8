"""sd_notify: tell systemd the truth about readiness, status, reloads and health.

systemd (``Type=notify``) learns that edgehook is up only from ``READY=1``, and
restarts it when ``WATCHDOG=1`` pings stop. Both are lies if sent blindly, so
this module sends what the caller says and nothing on its own: the
:class:`WatchdogPinger` pings only while a ``healthy()`` callable the app
supplies (worker-thread heartbeats) says so.

Transport: the ``sdnotify`` package, with ``debug=True`` so failures raise
instead of vanishing in its bare ``except:``. We log the first failure and stay
quiet about later ones, so a missing socket is visible once, not every 15 s.

Two things sdnotify does not do for us, handled here:

- It reads ``NOTIFY_SOCKET`` from ``os.environ`` in its constructor; we take the
  address from the mapping given to :class:`Notifier` (so tests and the app can
  pass an explicit environment) and connect sdnotify's socket ourselves.
  Abstract socket names (``@name``) are supported: sdnotify maps ``@`` to a
  leading NUL, and so do we when connecting.
- It encodes messages as Latin-1, which mangles (or refuses) non-ASCII status
  text; systemd expects UTF-8. We pre-encode so the bytes on the wire are UTF-8.

Without ``NOTIFY_SOCKET`` (running by hand, in tests, in Docker) every method is
a no-op and sdnotify is never imported.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

_LOG = logging.getLogger(__name__)

#: How long :meth:`WatchdogPinger.stop` waits for the thread to finish.
STOP_JOIN_TIMEOUT = 5.0


def _socket_address(value: str) -> str | None:
    """Return the AF_UNIX address for a NOTIFY_SOCKET value, or None if unsupported.

    systemd documents two forms we can use: an absolute path and ``@name`` for
    the abstract namespace. (``vsock:`` addresses, for VMs, are not supported.)
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _parse_watchdog(environ: Mapping[str, str]) -> float | None:
    """Return the ping interval (half of WATCHDOG_USEC, in seconds) or None.

    systemd recommends pinging at half the timeout. WATCHDOG_PID, when set,
    names the process the watchdog is meant for; a child that inherited the
    environment must not ping on its parent's behalf.
    """
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            _LOG.warning("ignoring WATCHDOG_PID=%r: not a number", pid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        _LOG.warning("ignoring WATCHDOG_USEC=%r: not a number", raw)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _wire_text(text: str) -> str:
    """Return text that sdnotify's Latin-1 encoder turns into UTF-8 bytes.

    Latin-1 maps code points 0-255 one-to-one to bytes, so decoding the UTF-8
    bytes as Latin-1 gives a string whose Latin-1 encoding is those bytes.
    """
    return text.encode("utf-8").decode("latin-1")


class Notifier:
    """Sends sd_notify messages to systemd, or nothing when not run by systemd."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from ``environ``.

        Nothing is connected yet: the socket is opened at the first message,
        and reopened after a failure, so a notifier created early is harmless.
        """
        raw = environ.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            _LOG.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; "
                         "systemd will not hear from edgehook", raw)
        self.enabled: bool = self._address is not None
        self.watchdog_interval: float | None = (
            _parse_watchdog(environ) if self.enabled else None)
        self._lock = threading.Lock()
        self._sd: Any = None  # sdnotify.SystemdNotifier once connected
        self._failed_before = False
        self._last_status: str | None = None

    def ready(self) -> None:
        """Say the daemon is up (again, after a reload)."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """Set the one-line status `systemctl status` shows; repeats are not sent.

        Newlines would start new assignments in the datagram (a status text
        could otherwise smuggle in READY=1), so they become spaces.
        """
        if not self.enabled:
            return
        text = " ".join(text.splitlines())
        with self._lock:
            if text == self._last_status:
                return
            if self._send_locked("STATUS=" + text):
                self._last_status = text

    def reloading(self) -> None:
        """Say a reload started; READY=1 must follow when it is done.

        systemd >= 253 (Type=notify-reload) wants MONOTONIC_USEC with it, to
        tell this reload from an older one; earlier versions ignore the field.
        """
        if not self.enabled:
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Say a clean shutdown began, so systemd does not treat it as a crash."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the watchdog. Call only when the daemon is known to be healthy."""
        self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        """Send one message if enabled (the fast path takes no lock)."""
        if not self.enabled:
            return
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: str) -> bool:
        """Send under the lock; log the first failure only. Returns success."""
        try:
            if self._sd is None:
                self._sd = self._connect()
            self._sd.notify(_wire_text(message))
        except Exception as exc:  # sdnotify(debug=True) re-raises anything
            # Drop the socket: the next message reconnects, so a notify socket
            # that comes back (or a new systemd) is found again.
            self._close()
            if not self._failed_before:
                self._failed_before = True
                _LOG.warning("cannot notify systemd (%s): %s; "
                             "further notify errors are not logged",
                             message.split("=", 1)[0], exc)
            return False
        return True

    def _connect(self) -> Any:
        """Return an sdnotify notifier connected to our address, raising on failure."""
        import sdnotify  # only here: no cost at all without NOTIFY_SOCKET

        assert self._address is not None
        sd = sdnotify.SystemdNotifier.__new__(sdnotify.SystemdNotifier)
        # Do what SystemdNotifier.__init__ does, but with our address: its
        # constructor only looks at os.environ.
        sd.debug = True
        sd.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sd.socket.connect(self._address)
        except OSError:
            sd.socket.close()
            raise
        return sd

    def _close(self) -> None:
        """Close the socket, if any."""
        if self._sd is not None:
            sock = getattr(self._sd, "socket", None)
            if sock is not None:
                sock.close()
            self._sd = None


class WatchdogPinger:
    """A daemon thread that pings the watchdog only while ``healthy()`` says so.

    Stopping the pings is the whole point: when a worker thread hangs, systemd
    stops hearing from us and restarts the service after WatchdogSec=.
    """

    def __init__(self, notifier: Notifier, healthy: Callable[[], bool]) -> None:
        """:param healthy: true while the worker threads' heartbeats are fresh."""
        self._notifier = notifier
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start pinging every watchdog_interval; a no-op without a watchdog."""
        interval = self._notifier.watchdog_interval
        if interval is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="edgehook-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging and wait for the thread (it wakes at once)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_JOIN_TIMEOUT)

    def _run(self, interval: float) -> None:
        """Loop: wait one interval (or until stopped), then ping if healthy."""
        unhealthy = False
        while not self._stop.wait(interval):
            try:
                ok = bool(self._healthy())
            except Exception:
                if not unhealthy:
                    _LOG.exception("health check failed; not pinging the watchdog")
                unhealthy = True
                continue
            if ok:
                if unhealthy:
                    _LOG.info("healthy again; watchdog pings resume")
                    unhealthy = False
                self._notifier.watchdog()
            elif not unhealthy:
                unhealthy = True
                _LOG.warning("worker threads unhealthy; withholding watchdog pings "
                             "so systemd restarts edgehook")
