"""Pins to rules to pins, in one process: gpiozero's MockFactory drives the inputs and
the output pins' own states are asserted (revert, cooldown, if, hold, a failing template)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from broker import free_port, wait_until
from edgehook.app import Daemon
from edgehook.config import load_config
from edgehook.dispatcher import Bus
from edgehook.events import make_event

CONFIG = """\
device: {{id: flow, name: Flow}}
state_dir: {state}
gpio:
  backend: mock
  inputs:
    doorbell: {{pin: 17, hold: 300ms}}
    motion: {{pin: 22, pull: down}}
  outputs:
    light: {{pin: 27}}
    chime: {{pin: 5}}
    porch: {{pin: 6}}
http: {{listen: "127.0.0.1:{port}"}}
rules:
  - name: ring
    when: {{input: doorbell}}
    cooldown: 1s
    do:
      - output: light
        set: on
        for: 400ms
  - name: long
    when: {{input: doorbell, event: held}}
    do: [{{output: chime, set: on}}]
  - name: both
    when: {{input: motion}}
    if: "{{{{ inputs.doorbell.state == 'on' }}}}"
    do: [{{output: porch, set: toggle}}]
  - name: broken
    when: {{input: motion, event: released}}
    do:
      - output: porch
        set: "{{{{ event.nope.deeper }}}}"
"""


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(state=tmp_path / "state", port=free_port()))
    d = Daemon(load_config(path, environ={}), pin_factory=MockFactory())
    d.start()
    yield d
    d.stop()


def pin_in(d: Daemon, name: str):  # the MockPin behind an input
    return d.gpio.inputs[name][0].pin


def pin_out(d: Daemon, name: str) -> bool:
    return bool(d.gpio.outputs[name].device.pin.state)


def fired(d: Daemon, etype: str, source: str) -> list[list[str]]:
    """Rules fired by each recorded event of that type, oldest first."""
    return [e["rules"] for e in reversed(d.dispatcher.recent)
            if e["type"] == etype and e["source"] == source]


def test_press_switches_the_pin_and_it_reverts(daemon: Daemon) -> None:
    pin_in(daemon, "doorbell").drive_low()  # pull-up wiring: low = pressed
    wait_until(lambda: pin_out(daemon, "light"), timeout=2, what="light pin high")
    # for: 400ms -> back off, by itself, without any other event
    wait_until(lambda: not pin_out(daemon, "light"), timeout=2, what="light reverted")
    pin_in(daemon, "doorbell").drive_high()


def test_cooldown_and_hold(daemon: Daemon) -> None:
    bell = pin_in(daemon, "doorbell")
    bell.drive_low()
    wait_until(lambda: pin_out(daemon, "chime"), timeout=2, what="held after 300 ms")
    bell.drive_high()
    bell.drive_low()  # second press inside the 1 s cooldown
    wait_until(lambda: len(fired(daemon, "input.pressed", "doorbell")) == 2, what="2 presses")
    assert fired(daemon, "input.pressed", "doorbell") == [["ring"], []]
    bell.drive_high()


def test_if_uses_other_inputs_state(daemon: Daemon) -> None:
    motion = pin_in(daemon, "motion")
    motion.drive_high()  # pull-down wiring: high = active
    wait_until(lambda: fired(daemon, "input.pressed", "motion"), what="motion event")
    assert fired(daemon, "input.pressed", "motion") == [[]]
    assert not pin_out(daemon, "porch")
    motion.drive_low()
    pin_in(daemon, "doorbell").drive_low()
    motion.drive_high()
    wait_until(lambda: pin_out(daemon, "porch"), timeout=2, what="porch toggled on")
    assert fired(daemon, "input.pressed", "motion")[-1] == ["both"]


def test_failing_template_does_not_stop_the_next_event(daemon: Daemon,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="edgehook")
    motion = pin_in(daemon, "motion")
    motion.drive_high()
    motion.drive_low()  # released -> rule "broken": its template fails
    wait_until(lambda: fired(daemon, "input.released", "motion"), what="release handled")
    rec = next(e for e in daemon.dispatcher.recent if e["type"] == "input.released")
    assert rec["errors"] and "rule broken" in rec["errors"][0]
    assert any("rule broken" in r.getMessage() and rec["id"] in r.getMessage()
               for r in caplog.records)
    pin_in(daemon, "doorbell").drive_low()  # the next event still runs its rules
    wait_until(lambda: pin_out(daemon, "light"), timeout=2, what="next event handled")
    assert daemon.dispatcher.healthy()


def test_bus_overflow_drops_the_oldest_counts_and_logs(caplog) -> None:
    bus = Bus(maxsize=3)
    events = [make_event("input.pressed", f"b{i}") for i in range(5)]
    for e in events:
        bus.put(e)
    assert bus.dropped == 2
    assert [item.event.source for item in bus.take(10)] == ["b2", "b3", "b4"]
    assert sum("dropped oldest event" in r.getMessage() for r in caplog.records) == 2
