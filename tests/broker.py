"""A real mosquitto for tests: own config, free loopback port, stop/restart on the same port.

`from broker import *` (tests/conftest.py) brings in the `mosquitto` fixture, the
`Mosquitto` class and `MqttProbe`, a small test-side client that records every
message with its retain flag and waits for one with a deadline (no bare sleeps).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["Mosquitto", "MqttProbe", "ProbeMessage", "find_mosquitto", "free_port",
           "mosquitto", "retained", "wait_until", "APT_HINT"]

APT_HINT = "sudo apt-get install -y mosquitto"
START_TIMEOUT = 10.0


def find_mosquitto() -> str | None:
    """The mosquitto binary (it lives in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 5.0,
               interval: float = 0.01, what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Mosquitto:
    """One mosquitto process with its own config in `workdir`, on one fixed port."""

    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None,
                 binary: str | None = None) -> None:
        self.binary = binary or find_mosquitto()
        if not self.binary:
            raise FileNotFoundError(f"mosquitto is not installed ({APT_HINT})")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "connection_messages true\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT) -> Mosquitto:
        """Start and wait until it accepts connections (retries while the port frees up)."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log,
                                             stderr=subprocess.STDOUT)
            if self._wait_ready(deadline):
                return self
            if time.monotonic() >= deadline:
                raise RuntimeError(f"mosquitto did not start on {self.port}:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.05)  # exited (port still in use?): try again

    def _wait_ready(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.01)
        return False

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (SIGTERM: clients see the connection close)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def restart(self) -> Mosquitto:
        """Stop and start again on the same port (retained messages and sessions are lost)."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """What mosquitto logged so far; complete only after stop() (its stdout is buffered)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh mosquitto per test (starts in ~20 ms); fails in CI if it is missing."""
    if not find_mosquitto():
        msg = f"mosquitto is not installed: {APT_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass(frozen=True)
class ProbeMessage:
    """One message as the probe received it."""

    topic: str
    payload: bytes
    retain: bool
    qos: int

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode("utf-8", "replace")


class MqttProbe:
    """A test-side MQTT client: subscribe, publish, record messages, wait for one."""

    _count = 0

    def __init__(self, broker: Mosquitto, client_id: str | None = None,
                 clean: bool = True) -> None:
        MqttProbe._count += 1
        self.client_id = client_id or f"probe-{os.getpid()}-{MqttProbe._count}"
        self.messages: list[ProbeMessage] = []
        self._cond = threading.Condition()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   clean_session=clean)
        self._client.on_message = self._on_message
        connected = threading.Event()
        self._client.on_connect = lambda *a: connected.set()
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()
        if not connected.wait(5):
            self.close()
            raise AssertionError("probe could not connect to mosquitto")

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(ProbeMessage(msg.topic, bytes(msg.payload), bool(msg.retain),
                                              msg.qos))
            self._cond.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> MqttProbe:
        """Subscribe and wait for the SUBACK."""
        done = threading.Event()
        self._client.on_subscribe = lambda *a: done.set()
        self._client.subscribe(topic_filter, qos)
        if not done.wait(timeout):
            raise AssertionError(f"no SUBACK for {topic_filter}")
        return self

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> None:
        """Publish and wait until the broker has it (PUBACK for QoS 1)."""
        info = self._client.publish(topic, payload, qos, retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise AssertionError(f"publish to {topic} not acknowledged")

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._cond:
            self.messages.clear()

    def received(self, topic: str | None = None) -> list[ProbeMessage]:
        """Messages so far, optionally only one topic's."""
        with self._cond:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def wait_for(self, topic: str, predicate: Callable[[ProbeMessage], bool] | None = None,
                 timeout: float = 5.0) -> ProbeMessage:
        """The first message (already received or coming) on `topic` that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if m.topic == topic and (predicate is None or predicate(m)):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:80], m.retain) for m in self.messages][-20:]
                    raise AssertionError(f"timed out after {timeout:g} s waiting for {topic}; "
                                         f"last messages: {seen}")
                self._cond.wait(left)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def retained(broker: Mosquitto, topic: str, timeout: float = 2.0) -> ProbeMessage | None:
    """The retained message on `topic` now, via a fresh subscription (None if none)."""
    with MqttProbe(broker) as probe:
        probe.subscribe(topic)
        try:
            return probe.wait_for(topic, lambda m: m.retain, timeout=timeout)
        except AssertionError:
            return None
