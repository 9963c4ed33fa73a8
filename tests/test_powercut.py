"""Pull the plug under load: nothing edgehook acknowledged may be lost.

The daemon's state_dir sits on lazyfs (tests/lazyfs.py), which keeps every write since
a file's last fsync in memory and drops them all at a "cut", as a power cut drops the
page cache. Under load from MQTT (QoS 1), simulated doorbell presses and inbound hooks
(async and sync), with the webhook receiver down so every delivery stays pending, the
daemon is killed with SIGKILL and the file system cut at the same instant. After a
"reboot" (unmount, mount the same backing directory again) the daemon starts with the
receiver up and the same MQTT client id, so the broker redelivers whatever the daemon
had not acknowledged. Then every acknowledged event must arrive as a webhook:

- every MQTT message the broker PUBACKed to the publisher (the broker keeps what the
  daemon did not acknowledge, so a loss means the daemon acknowledged before fsync);
- every hook answered 2xx (async 202 and sync 200);
- every press answered 200 more than one group-commit interval (``PRESS_GRACE``)
  before the cut: a GPIO edge has nobody to acknowledge to, so the latest ones may go.

Two things make the cut bite as it would on a Pi: every fsync takes ``FSYNC_DELAY``, as
on an SD card, so whatever waits for one is at stake for that long; and the plug is
pulled when the WAL holds the most unsynced pages (:func:`worst_moment`). The counts
per kind (sent, acknowledged, delivered, lost) are printed and written to
tests/artifacts/powercut.txt.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

import lazyfs
from broker import Mosquitto, free_port, wait_until
from daemon_proc import DaemonProc
from receiver import Receiver

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts"
LOAD_SECONDS = 2.0
#: Each fsync takes this long, as on an SD card: what waits for one is at stake that long.
FSYNC_DELAY = 0.01
#: The cut comes once the WAL holds this many unsynced pages, or CUT_WAIT after the load time.
CUT_WAL_PAGES = 30
CUT_WAIT = 1.0
#: A press answered within this long before the cut may still be waiting for its batch.
PRESS_GRACE = 1.0
#: After the restart: done once the outbox is empty and nothing arrived for this long.
QUIET = 1.5
DRAIN_TIMEOUT = 25.0
#: Pauses between two requests of one load thread, so the 2 shared cores keep up.
MQTT_PACE = 0.004
HTTP_PACE = 0.005
#: Event times are RFC 3339 with milliseconds: allow that much rounding either way.
CLOCK_SLACK = 0.002

CONFIG = """\
device: {{id: powercut, name: Power cut}}
state_dir: {state}
gpio:
  backend: mock
  inputs: {{doorbell: {{pin: 17, class: doorbell}}}}
mqtt:
  host: 127.0.0.1
  port: {mqtt_port}
  client_id: edgehook-powercut
  homeassistant: {{discovery: false}}
http: {{listen: "127.0.0.1:{port}"}}
webhooks:
  sink:
    url: "{sink}/hook"
    retry: {{max_attempts: 100, max_age: 1h}}
hooks:
  load-async: {{auth: none, respond: async, rate_limit: {{requests: 100000, per: 1s}}}}
  load-sync: {{auth: none, respond: sync, rate_limit: {{requests: 100000, per: 1s}}}}
rules:
  - name: mqtt-load
    when: {{mqtt: "load/#"}}
    do:
      - webhook: sink
        body: {{kind: mqtt, n: "{{{{ event.payload.n }}}}"}}
  - name: press
    when: {{input: doorbell}}
    do:
      - webhook: sink
        body: {{kind: press, time: "{{{{ event.time }}}}"}}
  - name: hook-async
    when: {{hook: load-async}}
    do:
      - webhook: sink
        body: {{kind: async, n: "{{{{ event.body.n }}}}"}}
  - name: hook-sync
    when: {{hook: load-sync}}
    do:
      - webhook: sink
        body: {{kind: sync, n: "{{{{ event.body.n }}}}"}}
"""


@pytest.fixture()
def mount(tmp_path: Path) -> Iterator[lazyfs.LazyMount]:
    """lazyfs over tmp_path/backing at tmp_path/mnt; skipped without FUSE, unless CI=true."""
    reason = lazyfs.missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}; .ci/run and make test install it")
        pytest.skip(reason)
    m = lazyfs.LazyMount(tmp_path / "backing", tmp_path / "mnt", tmp_path,
                         fsync_delay=FSYNC_DELAY)
    m.mount()
    yield m
    m.unmount()


def test_lazyfs_keeps_exactly_what_was_fsynced(mount: lazyfs.LazyMount) -> None:
    """The file system itself: a cut drops unsynced writes and truncates, nothing else."""
    root = mount.mountpoint
    a = os.open(root / "a", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(a, b"durable")
    os.fsync(a)
    os.write(a, b" lost")
    assert os.pread(a, 100, 0) == b"durable lost"  # reads see unsynced writes
    (root / "b").write_bytes(b"never synced")
    c = os.open(root / "c", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(c, b"x" * 10_000)
    os.fdatasync(c)
    os.ftruncate(c, 100)
    assert os.fstat(c).st_size == 100
    db = sqlite3.connect(root / "t.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES ('synced')")
    db.execute("PRAGMA synchronous = NORMAL")  # commits are no longer fsynced
    db.execute("INSERT INTO t VALUES ('lost')")
    assert db.execute("SELECT count(*) FROM t").fetchone() == (2,)
    assert mount.unsynced()["/t.db-wal"] > 0

    mount.cut()
    with pytest.raises(OSError) as frozen:
        os.stat(root / "a")
    assert frozen.value.errno == errno.EIO  # the power is off
    db.close()
    os.close(a)
    os.close(c)
    mount.unmount()
    mount.mount()

    assert (root / "a").read_bytes() == b"durable"
    assert (root / "b").read_bytes() == b""  # the name is durable at once, the data is not
    assert (root / "c").stat().st_size == 10_000
    db = sqlite3.connect(root / "t.db")
    try:
        assert db.execute("SELECT x FROM t").fetchall() == [("synced",)]
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


@dataclass
class Answered:
    """One kind of load: what the sender was told was taken, and when."""

    sent: int = 0
    acked: list[tuple[str, float, float]] = field(default_factory=list)  # (n, sent, answered)


class Load:
    """The load threads: QoS 1 publishes, presses, async and sync hooks, until stopped."""

    def __init__(self, broker: Mosquitto, api: str) -> None:
        self.api = api
        self.stop = threading.Event()
        self.kinds = {k: Answered() for k in ("mqtt", "press", "async", "sync")}
        self.publishes: list[tuple[str, paho.MQTTMessageInfo]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="powercut-publisher")
        self.client.max_queued_messages_set(0)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(5), "the publisher could not connect"
        self.threads = [threading.Thread(target=self._run, args=(fn,), daemon=True)
                        for fn in (self._publish, self._press, self._hook("async"),
                                   self._hook("sync"))]

    def start(self) -> None:
        """Start every load thread at once."""
        for t in self.threads:
            t.start()

    def join(self) -> None:
        """Stop the threads; then wait for the broker's PUBACKs of what was published."""
        self.stop.set()
        for t in self.threads:
            t.join(10)
        wait_until(lambda: all(info.is_published() for _n, info in self.publishes),
                   timeout=10, what="the broker's PUBACKs")
        self.kinds["mqtt"].acked = [(n, 0.0, 0.0) for n, info in self.publishes
                                    if info.is_published()]
        self.client.disconnect()
        self.client.loop_stop()

    def _run(self, step: Callable[[int], float]) -> None:
        n = 0
        while not self.stop.is_set():
            time.sleep(step(n))
            n += 1

    def _publish(self, n: int) -> float:
        self.kinds["mqtt"].sent += 1
        info = self.client.publish("load/powercut", json.dumps({"n": f"m{n}"}), qos=1)
        self.publishes.append((f"m{n}", info))
        return MQTT_PACE

    def _post(self, kind: str, n: str, path: str, body: dict[str, str]) -> float:
        self.kinds[kind].sent += 1
        sent = time.time()
        try:
            r = requests.post(self.api + path, json=body, timeout=5)
        except requests.RequestException:
            return 0.05  # the daemon is gone
        if 200 <= r.status_code < 300:
            self.kinds[kind].acked.append((n, sent, time.time()))
        return HTTP_PACE

    def _press(self, n: int) -> float:
        """Press (the event happens before the 200; a `click` would only be queued), release."""
        pause = self._post("press", "", "/api/v1/inputs/doorbell/simulate", {"action": "press"})
        with contextlib.suppress(requests.RequestException):
            requests.post(self.api + "/api/v1/inputs/doorbell/simulate",
                          json={"action": "release"}, timeout=5)
        return pause

    def _hook(self, kind: str) -> Callable[[int], float]:
        def step(n: int) -> float:
            return self._post(kind, f"{kind[0]}{n}", f"/hooks/load-{kind}", {"n": f"{kind[0]}{n}"})
        return step


def delivered(sink: Receiver) -> dict[str, list[str]]:
    """The receiver's webhooks by kind: ids, or event times for presses."""
    out: dict[str, list[str]] = {"mqtt": [], "press": [], "async": [], "sync": []}
    for req in list(sink.requests):
        body = json.loads(req.body)
        out[body["kind"]].append(body["time"] if body["kind"] == "press" else body["n"])
    return out


def worst_moment(mount: lazyfs.LazyMount) -> int:
    """Wait (at most CUT_WAIT) until the WAL holds CUT_WAL_PAGES unsynced pages; return them.

    A cut right after the outbox's fsync would lose nothing whatever the daemon does,
    so the plug is pulled when the most is at stake. A daemon that fsyncs before it
    acknowledges has nothing acknowledged among those pages (and may never leave that
    many unsynced, hence the deadline), so the choice cannot fail a correct daemon.
    """
    deadline = time.monotonic() + CUT_WAIT
    while True:
        wal = sum(n for name, n in mount.unsynced().items() if name.endswith("-wal"))
        if wal >= CUT_WAL_PAGES or time.monotonic() >= deadline:
            return wal
        time.sleep(0.005)


def subscribed(d: DaemonProc) -> bool:
    """Connected and subscribed: from now on the broker keeps the session's messages."""
    mqtt = d.api("GET", "/api/v1/state").json()["mqtt"]
    return bool(mqtt and mqtt["connected"] and mqtt.get("subscribed", True))


def unmatched_presses(acked: list[tuple[str, float, float]], times: list[str]) -> int:
    """How many presses have no delivered press event between their request and its answer."""
    seen = sorted(datetime.fromisoformat(t).timestamp() for t in times)
    lost = 0
    for _n, sent, answered in acked:
        i = bisect.bisect_left(seen, sent - CLOCK_SLACK)
        if i == len(seen) or seen[i] > answered + CLOCK_SLACK:
            lost += 1
    return lost


def tally(load: Load, sink: Receiver, cut_at: float) -> dict[str, dict[str, Any]]:
    """Per kind: sent, acknowledged (must arrive), delivered of those, and the lost ids."""
    got = delivered(sink)
    out: dict[str, dict[str, Any]] = {}
    for kind, answered in load.kinds.items():
        if kind == "press":
            must = [p for p in answered.acked if p[2] <= cut_at - PRESS_GRACE]
            lost = unmatched_presses(must, got["press"])
            out[kind] = {"sent": answered.sent, "acknowledged": len(must),
                         "delivered": len(must) - lost, "lost": lost, "lost_ids": []}
        else:
            must_ids = {n for n, _s, _a in answered.acked}
            missing = sorted(must_ids - set(got[kind]), key=lambda n: int(n[1:]))
            out[kind] = {"sent": answered.sent, "acknowledged": len(must_ids),
                         "delivered": len(must_ids) - len(missing), "lost": len(missing),
                         "lost_ids": missing}
    return out


def test_power_cut_under_load_loses_nothing_acknowledged(
        tmp_path: Path, mount: lazyfs.LazyMount, mosquitto: Mosquitto, write_config,
        daemon) -> None:
    # The broker must keep every message for the daemon's session, however many.
    with open(mosquitto.conf, "a") as conf:
        conf.write("max_queued_messages 0\nmax_queued_bytes 0\n")
    mosquitto.restart()
    sink = Receiver(free_port())  # not listening: every delivery stays pending
    port = free_port()
    cfg = write_config(CONFIG.format(state=mount.mountpoint / "state", mqtt_port=mosquitto.port,
                                     port=port, sink=sink.url))

    d = daemon(cfg, port=port)
    d.wait_ready()
    wait_until(lambda: subscribed(d), timeout=10, what="the daemon's MQTT subscription")

    load = Load(mosquitto, d.url(""))
    load.start()
    time.sleep(LOAD_SECONDS)  # the load runs on its own threads meanwhile
    wal_unsynced = worst_moment(mount)
    os.kill(d.proc.pid, signal.SIGKILL)  # the power cut: the process and the page cache
    cut_at = time.time()
    dropped = mount.cut()
    d.proc.wait(10)
    load.join()
    mount.unmount()

    mount.mount()  # reboot: only what was fsynced is there
    sink.start()
    try:
        d2 = daemon(cfg, port=port)
        d2.wait_ready()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:  # until everything arrived, or the daemon has nothing left to send
            counts = tally(load, sink, cut_at)
            if not any(c["lost"] for c in counts.values()):
                break
            state = d2.api("GET", "/api/v1/state").json()
            last = sink.requests[-1].at if sink.requests else 0.0
            if (state["mqtt"] and state["mqtt"]["connected"] and state["outbox"]["pending"] == 0
                    and time.monotonic() - last >= QUIET) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        counts = tally(load, sink, cut_at)
        pending = d2.api("GET", "/api/v1/state").json()["outbox"]["pending"]
    finally:
        sink.stop()

    report = "\n".join([
        f"power cut with {wal_unsynced} unsynced WAL pages; dropped pages: {dropped}; "
        f"still pending after the reboot: {pending}",
        *(f"{kind}: {c['acknowledged']} acknowledged of {c['sent']} sent, {c['delivered']} "
          f"delivered, {c['lost']} lost {c['lost_ids'][:10]}" for kind, c in counts.items())])
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "powercut.txt").write_text(report + "\n")
    (tmp_path / "daemon-before.log").write_text(d.log)
    (tmp_path / "daemon-after.log").write_text(d2.log)
    print(report)
    assert all(c["acknowledged"] for c in counts.values()), f"too little load:\n{report}"
    assert not any(c["lost"] for c in counts.values()), (
        f"acknowledged events lost at the power cut:\n{report}")
