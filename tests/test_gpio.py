"""gpio.Gpio outputs and simulation on gpiozero's MockFactory pins.

Output timing (`for:`, max_on, min_interval) runs on a fake clock, except one max_on
test on the real Scheduler. Interlocks are checked on every pin change, recorded by a
MockPin subclass, not only at the end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from edgehook.config import GpioConfig, InputConfig, OutputConfig
from edgehook.errors import CommandError, NoGpioError
from edgehook.events import Event
from edgehook.gpio import Gpio, make_pin_factory
from edgehook.scheduler import Scheduler
from fakeclock import FakeTimers

# --------------------------------------------------------------------------- helpers

_CHANGES: list[tuple[str, bool]] = []   # every output pin change, in order, all pins
_CHANGES_LOCK = threading.Lock()


class RecordingPin(MockPin):
    """A MockPin that logs every state change into one shared, ordered list."""

    def _change_state(self, value: bool) -> bool:
        with _CHANGES_LOCK:
            changed = super()._change_state(value)
            if changed and self._function == "output":
                _CHANGES.append((self.info.name, value))
            return changed


def out(name: str, pin: str, **kw: Any) -> OutputConfig:
    return OutputConfig(name=name, pin=pin, **kw)


class Rig:
    """A started Gpio on a fake clock, with its events."""

    def __init__(self, *outputs: OutputConfig, inputs: tuple[InputConfig, ...] = (),
                 backend: str = "mock", timers: Any = None) -> None:
        self.timers = timers or FakeTimers()
        self.factory = MockFactory(pin_class=RecordingPin)
        self.events: list[Event] = []
        cfg = GpioConfig(backend=backend, outputs={o.name: o for o in outputs},
                         inputs={i.name: i for i in inputs})
        clock = getattr(self.timers, "clock", time.monotonic)
        wall = getattr(self.timers, "wall", time.time)
        self.gpio = Gpio(cfg, self.events.append, self.timers, pin_factory=self.factory,
                         clock=clock, wall=wall)
        with _CHANGES_LOCK:
            _CHANGES.clear()
        self.gpio.start()

    def pin(self, name: str) -> RecordingPin:
        return self.factory.pin(name)

    def state(self, name: str) -> str:
        return self.gpio.output_states()[name]["state"]

    def changes(self) -> list[tuple[str, str, str]]:
        """(output, state, origin) of every output.changed event."""
        return [(e.source, e.data["state"], e.data["origin"]) for e in self.events
                if e.type == "output.changed"]


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        r.gpio.close(apply_on_stop=False)


def rig(rigs: list[Rig], *outputs: OutputConfig, **kw: Any) -> Rig:
    r = Rig(*outputs, **kw)
    rigs.append(r)
    return r


# --------------------------------------------------------------------------- for: reverts

def test_for_reverts_after_the_duration(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("light", "GPIO27"))
    res = r.gpio.set_output("light", "on", 30, "test")
    assert res["state"] == "on" and res["until"] is not None
    assert r.pin("GPIO27").state is True
    r.timers.advance(29.9)
    assert r.state("light") == "on"
    r.timers.advance(0.2)
    assert r.state("light") == "off"
    assert r.pin("GPIO27").state is False
    assert r.changes() == [("light", "on", "test"), ("light", "off", "revert after for:")]
    assert r.gpio.output_states()["light"]["until"] is None


def test_second_for_extends_and_still_ends_off(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("light", "GPIO27"))
    r.gpio.set_output("light", "on", 30)
    r.timers.advance(20)
    r.gpio.set_output("light", "on", 30)     # the doorbell rang again
    r.timers.advance(15)                     # t=35: past the first revert
    assert r.state("light") == "on"
    r.timers.advance(16)                     # t=51: past the second
    assert r.state("light") == "off"
    r.timers.advance(1000)
    assert r.state("light") == "off"
    assert [c[1] for c in r.changes()] == ["on", "off"]


def test_for_on_an_output_already_on_leaves_it_on(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("light", "GPIO27"))
    r.gpio.set_output("light", "on")
    r.gpio.set_output("light", "on", 30)     # "on for 30 s" reverts to the state before: on
    r.timers.advance(100)
    assert r.state("light") == "on"


def test_new_command_cancels_a_pending_revert(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("light", "GPIO27"))
    r.gpio.set_output("light", "on", 30)
    r.timers.advance(10)
    r.gpio.set_output("light", "on")         # plain on: stays on
    r.timers.advance(100)
    assert r.state("light") == "on"

    r.gpio.set_output("light", "off", 5)     # off for 5 s, then back on
    r.timers.advance(1)
    r.gpio.set_output("light", "off")        # plain off cancels that
    r.timers.advance(100)
    assert r.state("light") == "off"


def test_toggle_and_bad_commands(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("light", "GPIO27"))
    assert r.gpio.set_output("light", "toggle")["state"] == "on"
    assert r.gpio.set_output("light", "toggle")["state"] == "off"
    with pytest.raises(CommandError):
        r.gpio.set_output("light", "dim")
    with pytest.raises(KeyError):
        r.gpio.set_output("nope", "on")


# --------------------------------------------------------------------------- max_on

def test_max_on_switches_off_on_time(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("pump", "GPIO22", max_on=600.0))
    res = r.gpio.set_output("pump", "on", origin="api")
    assert res["until"] is not None          # the API shows when it will go off
    r.timers.advance(599.9)
    assert r.state("pump") == "on"
    r.timers.advance(0.2)
    assert r.state("pump") == "off"
    assert r.changes()[-1] == ("pump", "off", "max_on 600 s")


def test_max_on_beats_a_longer_for(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("pump", "GPIO22", max_on=10.0))
    res = r.gpio.set_output("pump", "on", 60)
    r.timers.advance(10.1)
    assert r.state("pump") == "off"
    r.timers.advance(100)
    assert [c[1] for c in r.changes()] == ["on", "off"]
    assert res["until"] is not None


def test_until_is_the_earliest_of_for_and_max_on(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("pump", "GPIO22", max_on=10.0))
    long_for = r.gpio.set_output("pump", "on", 60)["until"]
    r.gpio.set_output("pump", "off")
    r.timers.advance(1)
    short_for = r.gpio.set_output("pump", "on", 5)["until"]
    assert long_for is not None and short_for is not None
    # long: until = on + 10 s (max_on); short: until = on + 5 s (the for:), 1 s later
    from datetime import datetime
    t_long = datetime.fromisoformat(long_for.replace("Z", "+00:00")).timestamp()
    t_short = datetime.fromisoformat(short_for.replace("Z", "+00:00")).timestamp()
    assert t_long == pytest.approx(r.timers.epoch + 10, abs=0.01)
    assert t_short == pytest.approx(r.timers.epoch + 1 + 5, abs=0.01)


def test_max_on_is_local_with_a_real_scheduler_and_nothing_else(rigs) -> None:  # type: ignore[no-untyped-def]
    """No HTTP server, no MQTT, no dispatcher: only Gpio and its timer thread."""
    sched = Scheduler()
    sched.start()
    try:
        r = rig(rigs, out("pump", "GPIO22", max_on=0.2), timers=sched)
        t0 = time.monotonic()
        r.gpio.set_output("pump", "on", origin="a requester that then went away")
        pin = r.pin("GPIO22")
        deadline = t0 + 2.0
        while pin.state and time.monotonic() < deadline:
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        assert pin.state is False
        assert 0.2 <= elapsed <= 0.4, elapsed   # tolerance: +200 ms for a loaded machine
    finally:
        sched.stop()


def test_initial_on_applies_at_start_and_max_on_counts_from_start(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("fan", "GPIO5", initial="on", max_on=5.0),
            out("led", "GPIO6", active="low"))
    assert r.pin("GPIO5").state is True
    assert r.pin("GPIO6").state is True       # active low, initial off: the line is high
    assert r.state("fan") == "on" and r.state("led") == "off"
    r.timers.advance(5.1)
    assert r.state("fan") == "off"


# --------------------------------------------------------------------------- min_interval

def test_min_interval_refuses_a_second_change_and_logs(rigs, caplog) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("relay", "GPIO23", min_interval=1.0))
    r.gpio.set_output("relay", "on", origin="api")
    r.timers.advance(0.5)
    with caplog.at_level(logging.WARNING, logger="edgehook.gpio"), \
            pytest.raises(CommandError, match="min_interval is 1 s"):
        r.gpio.set_output("relay", "off", origin="mqtt")
    assert any("relay" in m and "refused" in m and "mqtt" in m for m in caplog.messages)
    assert r.state("relay") == "on"
    assert r.gpio.set_output("relay", "on")["state"] == "on"   # no change: not refused
    r.timers.advance(0.6)
    assert r.gpio.set_output("relay", "off")["state"] == "off"


def test_min_interval_does_not_block_max_on(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("relay", "GPIO23", min_interval=10.0, max_on=1.0))
    r.gpio.set_output("relay", "on")
    r.timers.advance(1.1)
    assert r.state("relay") == "off"          # safety first, whatever min_interval says


# --------------------------------------------------------------------------- interlock

def never_two_on(on_level: dict[str, bool]) -> None:
    """Replay every recorded pin change: at no point are two outputs of the group on."""
    level = {pin: not on for pin, on in on_level.items()}   # both start off
    for pin, value in _CHANGES:
        if pin in level:
            level[pin] = value
            on = [p for p, v in level.items() if v == on_level[p]]
            assert len(on) <= 1, f"both on after {pin} -> {value}: {_CHANGES}"


def test_interlock_never_shows_two_outputs_on(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("up", "GPIO20", interlock="garage"),
            out("down", "GPIO21", interlock="garage", active="low"),
            out("light", "GPIO19"))
    g = r.gpio
    g.set_output("up", "on")
    g.set_output("down", "on")               # switches `up` off first
    assert (r.state("up"), r.state("down")) == ("off", "on")
    g.set_output("up", "toggle")
    g.set_output("down", "on", 5)            # `up` off, down on for 5 s
    g.set_output("up", "off", 2)             # `up` is off already: nothing to revert
    g.set_output("down", "on")               # plain on: the 5 s revert is gone
    g.set_output("down", "off", 1)           # down off for 1 s, then back on...
    g.set_output("up", "on")                 # ...but up is on now
    r.timers.advance(1.5)                    # the revert of `down` switches `up` off
    assert (r.state("up"), r.state("down")) == ("off", "on")
    g.set_output("light", "on")              # not in the group
    g.set_output("up", "on", 3)
    r.timers.advance(10)
    assert r.state("light") == "on"
    assert len(_CHANGES) >= 8
    never_two_on({"GPIO20": True, "GPIO21": False})
    assert ("down", "off", "interlock with up") in r.changes()


def test_interlock_cancels_the_partners_revert(rigs) -> None:  # type: ignore[no-untyped-def]
    r = rig(rigs, out("up", "GPIO20", interlock="garage"),
            out("down", "GPIO21", interlock="garage"))
    r.gpio.set_output("up", "off", 2)         # nothing pending: up is already off
    r.gpio.set_output("down", "on", 2)
    r.gpio.set_output("up", "on")             # down off by interlock; its revert is moot
    r.timers.advance(5)
    assert (r.state("up"), r.state("down")) == ("on", "off")
    assert r.gpio.output_states()["down"]["until"] is None
    never_two_on({"GPIO20": True, "GPIO21": True})


# --------------------------------------------------------------------------- on_stop

def test_on_stop_off_on_keep_are_honoured_and_lines_stay_driven() -> None:
    r = Rig(out("a_off", "GPIO5", on_stop="off"), out("b_on", "GPIO6", on_stop="on"),
            out("c_keep_on", "GPIO13", on_stop="keep"),
            out("d_keep_off", "GPIO19", on_stop="keep"),
            out("e_low_off", "GPIO26", on_stop="off", active="low"))
    for name in ("a_off", "c_keep_on", "e_low_off"):
        r.gpio.set_output(name, "on", 60)    # a pending revert must not fire later either
    pins = {n: r.pin(p) for n, p in [("a_off", "GPIO5"), ("b_on", "GPIO6"),
                                      ("c_keep_on", "GPIO13"), ("d_keep_off", "GPIO19"),
                                      ("e_low_off", "GPIO26")]}
    r.gpio.close(apply_on_stop=True)
    assert pins["a_off"].state is False
    assert pins["b_on"].state is True
    assert pins["c_keep_on"].state is True
    assert pins["d_keep_off"].state is False
    assert pins["e_low_off"].state is True   # active low: off is a high line
    # gpiozero's close() would have made them inputs; ours leaves them driven
    assert all(p.function == "output" for p in pins.values())
    r.timers.advance(100)
    assert pins["c_keep_on"].state is True


def test_on_stop_logs_each_output(caplog) -> None:  # type: ignore[no-untyped-def]
    r = Rig(out("light", "GPIO27", on_stop="off"), out("fan", "GPIO22", on_stop="keep"))
    r.gpio.set_output("light", "on")
    with caplog.at_level(logging.INFO, logger="edgehook.gpio"):
        r.gpio.close(apply_on_stop=True)
    assert "output light -> off (on_stop: off)" in caplog.messages
    assert "output fan stays off (on_stop: keep)" in caplog.messages


def test_close_without_on_stop_leaves_state_and_frees_pins_for_a_reload() -> None:
    r = Rig(out("light", "GPIO27", on_stop="off"))
    r.gpio.set_output("light", "on")
    r.gpio.close(apply_on_stop=False)
    assert r.pin("GPIO27").state is True
    again = Gpio(GpioConfig(backend="mock", outputs={"light": out("light", "GPIO27")}),
                 lambda e: None, r.timers, pin_factory=r.factory)
    again.start()                             # the pin was released: no GPIOPinInUse
    assert again.output_states()["light"]["state"] == "off"   # initial applies
    again.close(apply_on_stop=False)


def test_on_stop_on_does_not_break_an_interlock() -> None:
    r = Rig(out("up", "GPIO20", interlock="g", on_stop="keep"),
            out("down", "GPIO21", interlock="g", on_stop="on"))
    r.gpio.set_output("up", "on")
    up, down = r.pin("GPIO20"), r.pin("GPIO21")
    r.gpio.close(apply_on_stop=True)
    assert (up.state, down.state) == (True, False)


# --------------------------------------------------------------------------- simulate

BUTTON = InputConfig(name="doorbell", pin="GPIO17", pull="up", hold=0.3)


@pytest.fixture
def sim() -> Iterator[Callable[..., Rig]]:
    made: list[tuple[Rig, Scheduler]] = []

    def make(*inputs: InputConfig, backend: str = "mock") -> Rig:
        sched = Scheduler()
        sched.start()
        r = Rig(inputs=inputs, backend=backend, timers=sched)
        made.append((r, sched))
        return r

    yield make
    for r, sched in made:
        r.gpio.close(apply_on_stop=False)
        sched.stop()


def wait_types(r: Rig, want: list[str], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while [e.type for e in r.events] != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"events {[e.type for e in r.events]}, wanted {want}")
        time.sleep(0.005)


def test_simulate_press_release_click_hold(sim) -> None:  # type: ignore[no-untyped-def]
    r = sim(BUTTON)
    pin = r.pin("GPIO17")
    r.gpio.simulate("doorbell", "press")
    assert pin.state is False                 # pull-up wiring: pressed pulls the line low
    assert r.gpio.input_states()["doorbell"]["state"] == "on"
    r.gpio.simulate("doorbell", "release")
    assert pin.state is True
    wait_types(r, ["input.pressed", "input.released"])
    r.events.clear()
    r.gpio.simulate("doorbell", "click")
    wait_types(r, ["input.pressed", "input.released"])
    r.events.clear()
    r.gpio.simulate("doorbell", "hold")       # at least `hold` (300 ms) down
    wait_types(r, ["input.pressed", "input.held", "input.released"])


def test_two_simulated_clicks_queue_into_a_double_click(sim) -> None:  # type: ignore[no-untyped-def]
    from edgehook.config import Gestures

    r = sim(InputConfig(name="doorbell", pin="GPIO17", pull="up",
                        gestures=Gestures(double_click=0.3, long_press=1.0)))
    r.gpio.simulate("doorbell", "click")
    r.gpio.simulate("doorbell", "click")      # sent while the first is still down
    wait_types(r, ["input.pressed", "input.released", "input.pressed", "input.released",
                   "input.double_click"])


def test_simulate_inverted_active_high_input(sim) -> None:  # type: ignore[no-untyped-def]
    from edgehook.config import Filters

    r = sim(InputConfig(name="door", pin="GPIO18", pull="none", active="high",
                        filters=Filters(invert=True)))
    r.gpio.simulate("door", "press")
    assert r.gpio.input_states()["door"]["state"] == "on"


def test_simulate_refused_unless_mock(sim) -> None:  # type: ignore[no-untyped-def]
    r = sim(BUTTON, backend="auto")           # real-pin config, mock pins injected
    with pytest.raises(CommandError, match="mock"):
        r.gpio.simulate("doorbell", "press")


def test_simulate_unknown_input_or_action(sim) -> None:  # type: ignore[no-untyped-def]
    r = sim(BUTTON)
    with pytest.raises(KeyError):
        r.gpio.simulate("nope", "press")
    with pytest.raises(CommandError, match="unknown action"):
        r.gpio.simulate("doorbell", "smash")


# --------------------------------------------------------------------------- no GPIO

def test_auto_backend_without_gpio_says_so_in_one_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    with pytest.raises(NoGpioError) as info:
        make_pin_factory("auto")
    msg = str(info.value)
    assert "no GPIO found" in msg and "--simulate" in msg and "backend: mock" in msg
    assert "\n" not in msg
    assert isinstance(info.value, RuntimeError)


def test_a_config_without_pins_needs_no_gpio(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """MQTT -> webhook or hooks only: no pin factory is loaded, and none is pretended."""
    def no_gpio(backend: str) -> Any:
        raise NoGpioError("no GPIO found on this machine")

    monkeypatch.setattr("edgehook.gpio.make_pin_factory", no_gpio)
    gpio = Gpio(GpioConfig(backend="auto"), lambda e: None, FakeTimers())
    gpio.start()
    assert gpio.factory is None and gpio.backend == "none"
    assert gpio.input_states() == {} and gpio.output_states() == {}
    gpio.close()
    # with a pin, backend auto still needs GPIO and says so
    with pytest.raises(NoGpioError):
        Gpio(GpioConfig(backend="auto", outputs={"o": out("o", "GPIO27")}), lambda e: None,
             FakeTimers())
