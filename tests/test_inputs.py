"""InputLogic: filters, hold, gestures and silence.

First with a fake clock (exact, deterministic), then a few of the same through
gpio.Gpio with gpiozero's MockFactory pins and the real Scheduler (real timing,
tolerances stated in each test).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from gpiozero.pins.mock import MockFactory

from edgehook.config import Filters, Gestures, GpioConfig, InputConfig
from edgehook.events import Event
from edgehook.gpio import Gpio
from edgehook.inputs import InputLogic
from edgehook.scheduler import Scheduler
from fakeclock import FakeTimers


class Rig:
    """One InputLogic on a fake clock; `events` is [(time, kind)]."""

    def __init__(self, **kw) -> None:  # type: ignore[no-untyped-def]
        self.timers = FakeTimers()
        self.events: list[tuple[float, str]] = []
        cfg = InputConfig(name="button", pin=17, **kw)
        self.logic = InputLogic(cfg, lambda kind, data: self.events.append(
            (round(self.timers.now, 6), kind)), self.timers)
        self.logic.start(False)

    def level(self, active: bool, then: float = 0.0) -> None:
        self.logic.raw(active)
        self.timers.advance(then)

    def tap(self, down: float, up: float = 0.0) -> None:
        """Press for `down` seconds, then stay released for `up` seconds."""
        self.level(True, down)
        self.level(False, up)

    def kinds(self) -> list[str]:
        return [k for _, k in self.events]


# --------------------------------------------------------------------------- filters

def test_glitch_shorter_than_delayed_on_fires_nothing() -> None:
    r = Rig(filters=Filters(delayed_on=0.05))
    r.tap(0.010, 1.0)                       # a 10 ms spike
    assert r.events == []
    assert r.logic.state is False


def test_held_level_fires_pressed_once_after_delayed_on() -> None:
    r = Rig(filters=Filters(delayed_on=0.05))
    r.level(True, 0.049)
    assert r.events == []
    r.timers.advance(0.001)
    assert r.events == [(0.05, "pressed")]
    r.timers.advance(5)
    assert r.events == [(0.05, "pressed")]


def test_bouncing_contact_fires_one_press_after_it_settles() -> None:
    r = Rig(filters=Filters(delayed_on=0.05))
    for _ in range(5):                     # 5 bounces of 2 ms each
        r.tap(0.002, 0.002)
    r.level(True, 0.2)
    assert r.kinds() == ["pressed"]
    assert r.events[0][0] == pytest.approx(0.02 + 0.05)


def test_delayed_off_swallows_a_short_dropout() -> None:
    r = Rig(filters=Filters(delayed_off=0.1))
    r.level(True, 1.0)
    assert r.events == [(0.0, "pressed")]   # no delayed_on: at once
    r.level(False, 0.05)                    # a 50 ms dropout (a PIR, a reed contact)
    r.level(True, 1.0)
    assert r.kinds() == ["pressed"]
    r.level(False, 0.099)
    assert r.kinds() == ["pressed"]
    r.timers.advance(0.001)
    assert r.events[-1] == (pytest.approx(2.05 + 0.1), "released")


def test_invert_flips_the_logical_level() -> None:
    r = Rig(filters=Filters(invert=True))
    r.logic.start(False)                    # pin inactive at start = logically on
    assert r.logic.state is True
    r.level(True, 0.1)                      # is_active -> logically released
    r.level(False, 0.1)
    assert r.kinds() == ["released", "pressed"]


# --------------------------------------------------------------------------- hold

def test_hold_fires_held_once_and_not_on_a_short_press() -> None:
    r = Rig(hold=2.0)
    r.tap(1.9, 1.0)
    assert r.kinds() == ["pressed", "released"]
    r.events.clear()
    r.level(True, 10.0)
    assert r.kinds() == ["pressed", "held"]
    assert r.events[1][0] == pytest.approx(r.events[0][0] + 2.0)
    r.level(False, 5.0)
    assert r.kinds() == ["pressed", "held", "released"]


# --------------------------------------------------------------------------- gestures

GEST = Gestures(double_click=0.4, long_press=1.0)


def test_single_click_fires_click_after_the_window() -> None:
    r = Rig(gestures=GEST)
    r.tap(0.1, 0.399)
    assert "click" not in r.kinds()          # still waiting for a second press
    r.timers.advance(0.002)
    assert r.kinds() == ["pressed", "released", "click"]
    assert r.events[-1][0] == pytest.approx(0.5)


def test_double_click_fires_only_double_click() -> None:
    r = Rig(gestures=GEST)
    r.tap(0.1, 0.2)
    r.tap(0.1, 2.0)
    gestures = [k for k in r.kinds() if k not in ("pressed", "released")]
    assert gestures == ["double_click"]
    assert r.events[-1] == (pytest.approx(0.4), "double_click")


def test_slow_second_press_started_in_window_is_still_a_double_click() -> None:
    r = Rig(gestures=GEST)
    r.tap(0.1, 0.35)                         # second press 350 ms after the release...
    r.tap(0.3, 2.0)                          # ...released after the window would have ended
    assert [k for k in r.kinds() if k not in ("pressed", "released")] == ["double_click"]


def test_second_press_after_the_window_is_two_clicks() -> None:
    r = Rig(gestures=GEST)
    r.tap(0.1, 0.5)
    r.tap(0.1, 1.0)
    assert [k for k in r.kinds() if k not in ("pressed", "released")] == ["click", "click"]


def test_long_press_fires_while_held_and_no_click() -> None:
    r = Rig(gestures=GEST)
    r.level(True, 0.999)
    assert r.kinds() == ["pressed"]
    r.timers.advance(0.002)
    assert r.kinds() == ["pressed", "long_press"]
    r.level(False, 2.0)
    assert r.kinds() == ["pressed", "long_press", "released"]


def test_click_then_long_press_is_click_and_long_press() -> None:
    r = Rig(gestures=GEST)
    r.tap(0.1, 0.2)
    r.tap(1.5, 2.0)
    assert [k for k in r.kinds() if k not in ("pressed", "released")] == \
        ["click", "long_press"]


def test_gestures_use_the_filtered_level() -> None:
    r = Rig(gestures=GEST, filters=Filters(delayed_on=0.05, delayed_off=0.05))
    r.tap(0.1, 0.01)                         # 10 ms gap: not a release at all
    r.tap(0.1, 2.0)
    assert [k for k in r.kinds() if k not in ("pressed", "released")] == ["click"]
    assert r.kinds().count("pressed") == 1


# --------------------------------------------------------------------------- silence

def test_silent_once_then_resumed_on_the_next_change() -> None:
    r = Rig(expect_every=10.0)
    r.timers.advance(9.9)
    assert r.events == []
    r.timers.advance(0.2)
    assert r.events == [(10.0, "silent")]
    r.timers.advance(100)
    assert r.kinds() == ["silent"]           # once, not every 10 s
    r.level(True, 0.0)
    assert r.kinds() == ["silent", "resumed", "pressed"]
    r.level(False, 9.0)
    r.timers.advance(1.5)                    # 10 s after the last change
    assert r.kinds() == ["silent", "resumed", "pressed", "released", "silent"]


def test_every_change_rearms_silence_without_piling_up_timers() -> None:
    r = Rig(expect_every=10.0)
    for _ in range(50):
        r.tap(1.0, 1.0)
    assert "silent" not in r.kinds()
    assert r.timers.pending() == 1


def test_close_cancels_everything() -> None:
    r = Rig(expect_every=1.0, hold=0.5, gestures=GEST, filters=Filters(delayed_on=0.05))
    r.logic.raw(True)
    r.logic.close()
    r.timers.advance(10)
    r.logic.raw(False)
    assert r.events == []


# --------------------------------------------------------------------------- real pins, real time

class Collector:
    """The bus stand-in: events are appended from gpiozero's and the timer thread."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []
        self._lock = threading.Lock()

    def put(self, event: Event) -> None:
        with self._lock:
            self.events.append((time.monotonic(), event))

    def of(self, type_: str) -> list[float]:
        with self._lock:
            return [t for t, e in self.events if e.type == type_]

    def types(self) -> list[str]:
        with self._lock:
            return [e.type for _, e in self.events]


def wait_for(pred: Callable[[], object], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)


def settle(bus: Collector, quiet: float = 0.3, timeout: float = 3.0) -> None:
    """Wait until no event arrived for `quiet` seconds (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = bus.events[-1][0] if bus.events else 0.0
        if time.monotonic() - last >= quiet:
            return
        time.sleep(0.01)
    raise AssertionError("events kept coming")


@pytest.fixture
def real() -> Callable[..., tuple[Gpio, Collector, object]]:
    made: list[tuple[Gpio, Scheduler]] = []

    def make(**kw):  # type: ignore[no-untyped-def]
        sched = Scheduler()
        sched.start()
        bus = Collector()
        cfg = GpioConfig(backend="mock", inputs={"button": InputConfig(
            name="button", pin="GPIO17", pull="up", **kw)})
        factory = MockFactory()
        gpio = Gpio(cfg, bus.put, sched, pin_factory=factory)
        gpio.start()
        made.append((gpio, sched))
        return gpio, bus, factory.pin("GPIO17")

    yield make
    for gpio, sched in made:
        gpio.close(apply_on_stop=False)
        sched.stop()


def test_real_glitch_under_delayed_on_fires_nothing(real) -> None:  # type: ignore[no-untyped-def]
    gpio, bus, pin = real(filters=Filters(delayed_on=0.05))
    pin.drive_low()                          # pull-up wiring: low = pressed
    time.sleep(0.01)                         # the glitch itself is 10 ms of level
    pin.drive_high()
    time.sleep(0.2)                          # 4x delayed_on: a press would have shown by now
    assert bus.types() == []


def test_real_held_level_fires_once_between_50_and_250_ms(real) -> None:  # type: ignore[no-untyped-def]
    gpio, bus, pin = real(filters=Filters(delayed_on=0.05))
    t0 = time.monotonic()
    pin.drive_low()
    wait_for(lambda: bus.of("input.pressed"))
    dt = bus.of("input.pressed")[0] - t0
    assert 0.05 <= dt <= 0.25, dt
    settle(bus)
    assert bus.types() == ["input.pressed"]
    assert gpio.input_states()["button"]["state"] == "on"


def test_real_gestures_each_fire_their_own_event(real) -> None:  # type: ignore[no-untyped-def]
    gpio, bus, pin = real(gestures=Gestures(double_click=0.3, long_press=0.6))

    def gestures() -> list[str]:
        return [t for t in bus.types() if t.split(".")[1] in
                ("click", "double_click", "long_press")]

    # one click: press 50 ms; the click comes once the 300 ms window has passed
    pin.drive_low()
    time.sleep(0.05)
    pin.drive_high()
    released = time.monotonic()
    wait_for(lambda: bus.of("input.click"))
    assert 0.3 <= bus.of("input.click")[0] - released <= 0.5
    settle(bus)
    assert gestures() == ["input.click"]

    # a double click: two 50 ms presses 50 ms apart
    bus.events.clear()
    for _ in range(2):
        pin.drive_low()
        time.sleep(0.05)
        pin.drive_high()
        time.sleep(0.05)
    wait_for(lambda: bus.of("input.double_click"))
    settle(bus, quiet=0.45)                  # longer than the window: no late click
    assert gestures() == ["input.double_click"]

    # a long press: 600 ms threshold, fired while still held (tolerance +200 ms)
    bus.events.clear()
    t0 = time.monotonic()
    pin.drive_low()
    wait_for(lambda: bus.of("input.long_press"))
    assert 0.6 <= bus.of("input.long_press")[0] - t0 <= 0.8
    pin.drive_high()
    settle(bus, quiet=0.45)
    assert gestures() == ["input.long_press"]


def test_real_silence_fires_once_then_resumed(real) -> None:  # type: ignore[no-untyped-def]
    gpio, bus, pin = real(expect_every=0.1)
    wait_for(lambda: bus.of("input.silent"))
    time.sleep(0.3)                          # three more periods: still one `silent`
    assert bus.types() == ["input.silent"]
    pin.drive_low()
    wait_for(lambda: bus.of("input.pressed"))
    assert bus.types()[:3] == ["input.silent", "input.resumed", "input.pressed"]
