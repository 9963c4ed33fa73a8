"""The straight event path in one process: pins and timers only enqueue, so no source
thread ever takes the GPIO lock under its own; a reload never loses a batch; a
webhook whose row could not be stored is never sent, and goes out once it is."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from broker import free_port, wait_until
from edgehook import outbox as ob
from edgehook.app import Daemon
from edgehook.config import load_config
from edgehook.events import make_event
from edgehook.rules import WebhookCall
from receiver import Receiver

CONFIG = """\
device: {{id: path, name: Path}}
state_dir: {state}
gpio:
  backend: mock
  inputs:
    bell: {{pin: 17, hold: 20ms, bounce: 0}}
  outputs:
    light: {{pin: 27}}
http: {{listen: "127.0.0.1:{port}"}}
webhooks:
  sink: {{url: "{sink}", retry: {{max_attempts: 3}}}}
rules:
  - name: held
    when: {{input: bell, event: held}}
    do: [{{webhook: sink}}, {{output: light, set: toggle}}]
  - name: ring
    when: {{input: bell}}
    do: [{{webhook: sink}}, {{output: light, set: on}}]
"""


@pytest.fixture()
def sink() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture()
def daemon(tmp_path: Path, sink: Receiver) -> Iterator[Daemon]:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(state=tmp_path / "state", port=free_port(), sink=sink.url))
    d = Daemon(load_config(path, environ={}), pin_factory=MockFactory())
    d.start()
    yield d
    d.stop()


def guarded(fn, what: str, timeout: float = 5.0) -> None:
    """Run fn on a thread and fail (instead of hanging the suite) if it never returns."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{what} never returned: a deadlock"


def test_simulating_while_a_held_timer_runs_its_rule_never_deadlocks(daemon: Daemon) -> None:
    """A held timer's rule switches an output while `sim release` drives the same
    input: two threads, two locks. With events run on the timer's thread (holding
    the input's lock, then wanting the GPIO lock) against `sim` (GPIO lock, then the
    input's lock), this froze the daemon within a few rounds."""
    rng = random.Random(7)

    def rounds() -> None:
        for _ in range(150):
            daemon.simulate("bell", "press")
            time.sleep(0.02 + rng.uniform(-0.002, 0.003))  # release as the hold fires
            daemon.simulate("bell", "release")

    guarded(rounds, "150 press/release rounds racing the hold timer", timeout=60)
    wait_until(lambda: daemon.dispatcher.events_total >= 300, timeout=30,
               what="every event handled")
    assert daemon.dispatcher.healthy()


def test_a_rule_naming_a_target_the_running_config_lacks_still_stores_its_webhook(
        daemon: Daemon, sink: Receiver) -> None:
    """During a reload the engine and the config are swapped one after the other: a
    batch may name a target that the other snapshot lacks. It is stored (with safe
    defaults), not lost to a KeyError with the rest of its batch."""
    event = make_event("input.pressed", "bell")
    call = WebhookCall("new-rule", "added-by-reload", sink.url, {}, b"{}", "application/json")
    daemon._store([(event, call)])
    (row,) = daemon.outbox.list("pending") or daemon.outbox.list("dead")
    assert row["target"] == "added-by-reload" and row["event_id"] == event.id


def test_a_webhook_that_could_not_be_stored_is_never_sent_then_goes_out_once(
        daemon: Daemon, sink: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "STATVFS_CACHE", 0.0)
    monkeypatch.setattr(ob, "MIN_FREE_BYTES", 1 << 62)  # the disk is "full"
    monkeypatch.setattr("edgehook.dispatcher.STORE_RETRY", 0.2)
    daemon.simulate("bell", "click")
    wait_until(lambda: daemon.dispatcher.unstored == 1, what="the press held in memory")
    assert daemon.gpio.output_state("light")["state"] == "on"  # outputs still switch
    ok, detail = daemon.health()
    assert not ok and "storage" in " ".join(detail["problems"])
    time.sleep(0.5)
    assert sink.requests == []  # nothing goes out that is not on disk
    monkeypatch.setattr(ob, "MIN_FREE_BYTES", 8 * 1024 * 1024)  # space is back
    sink.wait_for(1)
    assert json.loads(sink.requests[0].body)["type"] == "input.pressed"
    wait_until(lambda: daemon.dispatcher.unstored == 0, what="the held events stored")
    time.sleep(0.3)
    ids = [r.headers["webhook-id"] for r in sink.requests]
    assert len(ids) == len(set(ids)) == daemon.outbox.counts()["delivered"]  # each once


def test_a_reload_that_cannot_even_be_parsed_keeps_the_daemon_running(
        daemon: Daemon, tmp_path: Path) -> None:
    """500 nested lists make PyYAML recurse past Python's limit: SIGHUP must refuse the
    file and keep the running config, not take the service down."""
    Path(daemon.cfg.path).write_text("rules: " + "[" * 500 + "]" * 500 + "\n")
    daemon.reload()
    assert daemon.dispatcher.healthy()
    daemon.simulate("bell", "click")
    wait_until(lambda: daemon.gpio.output_state("light")["state"] == "on",
               what="the old rules still run")


def test_pins_simulated_at_start_stay_simulated_across_a_reload(daemon: Daemon) -> None:
    """`run --simulate` over a config that says backend: auto: after SIGHUP the pins
    are still the simulated ones (sim keeps working)."""
    path = Path(daemon.cfg.path)
    text = path.read_text().replace("backend: mock", "backend: auto")
    path.write_text(text.replace("light: {pin: 27}", "light: {pin: 27, initial: off}"))
    daemon.reload()
    assert daemon.cfg.gpio.backend == "mock" and daemon.gpio.backend == "mock"
    daemon.simulate("bell", "click")
    wait_until(lambda: daemon.gpio.output_state("light")["state"] == "on", what="sim works")


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk that really fills up (needs root, as CI has)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk_acknowledges_nothing_switches_outputs_and_recovers(
        tiny_disk: Path, sink: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the free-space guard out of the way, SQLite itself meets ENOSPC: a hook
    is answered 503 (not 2xx), the light still switches, nothing is sent that was not
    stored; once space is back the next hook is stored and delivered."""
    import requests

    monkeypatch.setattr(ob, "MIN_FREE_BYTES", 0)  # let the disk fill for real
    port = free_port()
    cfg = tiny_disk / "c.yaml"
    cfg.write_text(CONFIG.format(state=tiny_disk / "state", port=port, sink=sink.url)
                   + "hooks:\n  door: {auth: none}\n")
    text = cfg.read_text().replace("rules:\n", "rules:\n  - name: hooked\n"
                                   "    when: {hook: door}\n"
                                   "    do: [{webhook: sink}, {output: light, set: on}]\n", 1)
    cfg.write_text(text)
    d = Daemon(load_config(cfg, environ={}), pin_factory=MockFactory())
    d.start()
    try:
        url = f"http://127.0.0.1:{port}/hooks/door"
        filler = tiny_disk / "filler"
        with open(filler, "wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        # a commit that still fits in space SQLite already has is durable (202);
        # the first that needs a new block is refused
        accepted, refused = [], None
        for n in range(400):
            r = requests.post(url, json={"n": n}, timeout=15)
            if r.status_code == 503:
                refused = r
                break
            assert r.status_code == 202
            accepted.append(n)
        assert refused is not None, "the full disk never refused a hook"
        assert refused.json()["error"] == "storage_unavailable"
        assert "Retry-After" in refused.headers
        assert d.gpio.output_state("light")["state"] == "on"  # outputs still switch
        assert not d.health()[0], (refused.json(), d.health())
        filler.unlink()  # space is back
        r = requests.post(url, json={"n": "after"}, timeout=15)
        assert r.status_code == 202
        sink.wait_for(len(accepted) + 1, timeout=30)
        got = [json.loads(q.body)["data"]["body"]["n"] for q in sink.requests]
        assert set(got) == {*accepted, "after"}  # every 202 delivered; the 503 one never
    finally:
        d.stop()


def test_fixing_a_targets_url_and_reloading_sends_the_waiting_row_at_once(
        tmp_path: Path, sink: Receiver) -> None:
    """A row backing off after failures against a wrong URL must not wait out that
    backoff once the URL is fixed: the reload makes it due, and it goes to the new URL
    with the same webhook-id."""
    from datetime import datetime

    wrong = f"http://127.0.0.1:{free_port()}"
    path = tmp_path / "c.yaml"
    text = CONFIG.format(state=tmp_path / "state", port=free_port(), sink=sink.url)
    path.write_text(text.replace(sink.url, wrong))
    d = Daemon(load_config(path, environ={}), pin_factory=MockFactory())
    d.start()
    try:
        d.simulate("bell", "click")

        def backing_off() -> bool:
            rows = d.outbox.list("pending")
            if not rows or not rows[-1]["next_attempt_at"] or not rows[-1]["attempts"]:
                return False
            due = datetime.fromisoformat(rows[-1]["next_attempt_at"]).timestamp()
            return due - time.time() > 2.0

        wait_until(backing_off, timeout=30, what="the row backing off for more than 2 s")
        path.write_text(text)  # the URL fixed
        t0 = time.monotonic()
        d.reload()
        sink.wait_for(1, timeout=5)
        assert time.monotonic() - t0 < 1.5  # not after the backoff
    finally:
        d.stop()
