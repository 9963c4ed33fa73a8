"""What a raw pin level means: filters, hold, gestures and silence, per input.

This is our own logic, applied to edges the same way on every pin factory (gpiozero's
MockPin ignores `bounce_time`, so a driver's debounce can't be tested or relied on
everywhere). It owns no thread: timing comes from an injected scheduler, which makes
it testable with a fake clock and cheap at rest (no polling).

Timing, for one input with `filters: {delayed_on: 50ms}`, `hold: 2s` and
`gestures: {double_click: 400ms, long_press: 1s}`:

    raw      ___|‾|____|‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾|_____
    level    ___________|‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾|_____   (10 ms glitch dropped, +50 ms)
    events              pressed   long_press  held   released
                        (t)       (t+1s)      (t+2s)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from .config import InputConfig


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle: ...


Emit = Callable[[str, dict[str, Any]], None]


class InputLogic:
    """Turns raw levels of one input into its events; thread-safe."""

    def __init__(self, cfg: InputConfig, emit: Emit, timers: Timers) -> None:
        self.cfg = cfg
        self._emit = emit
        self._timers = timers
        self._lock = threading.RLock()
        self.state = False          # the filtered, logical level (True = pressed/active)
        self._raw = False
        self._pending: TimerHandle | None = None   # delayed_on / delayed_off commit
        self._hold: TimerHandle | None = None
        self._long: TimerHandle | None = None
        self._click: TimerHandle | None = None     # a first click waiting for a second
        self._long_fired = False
        self._silence: TimerHandle | None = None
        self._silent = False

    def start(self, level: bool) -> None:
        """Take the pin's level at start without emitting, and arm the silence watchdog."""
        with self._lock:
            self._raw = self.state = level != self.cfg.filters.invert
            self._arm_silence()

    def raw(self, active: bool) -> None:
        """A pin edge: `active` is gpiozero's is_active (before our invert)."""
        level = active != self.cfg.filters.invert
        with self._lock:
            if level == self._raw:
                return
            self._raw = level
            if self._pending is not None:
                self._pending.cancel()
                self._pending = None
            if level == self.state:
                return  # a glitch that came back before its delay ran out
            delay = self.cfg.filters.delayed_on if level else self.cfg.filters.delayed_off
            if delay > 0:
                self._pending = self._timers.call_later(delay, lambda: self._commit(level))
            else:
                self._commit(level)

    def _commit(self, level: bool) -> None:
        with self._lock:
            self._pending = None
            if level == self.state or level != self._raw:
                return
            self.state = level
            if self._silent:
                self._silent = False
                self._emit("resumed", {"state": _word(level)})
            self._arm_silence()
            self._emit("pressed" if level else "released", {"state": _word(level)})
            if level:
                self._on_press()
            else:
                self._on_release()

    def _on_press(self) -> None:
        if self.cfg.hold:
            self._hold = self._timers.call_later(self.cfg.hold, self._fire_hold)
        g = self.cfg.gestures
        if g:
            self._long_fired = False
            self._long = self._timers.call_later(g.long_press, self._fire_long)

    def _on_release(self) -> None:
        for t in (self._hold, self._long):
            if t is not None:
                t.cancel()
        self._hold = self._long = None
        g = self.cfg.gestures
        if not g or self._long_fired:
            return
        if self._click is not None:
            self._click.cancel()
            self._click = None
            self._emit("double_click", {"state": "off"})
        else:
            self._click = self._timers.call_later(g.double_click, self._fire_click)

    def _fire_hold(self) -> None:
        with self._lock:
            if self.state and self._hold is not None:
                self._hold = None
                self._emit("held", {"state": "on", "seconds": self.cfg.hold})

    def _fire_long(self) -> None:
        with self._lock:
            if not self.state or self._long is None:
                return
            self._long = None
            if self._click is not None:  # a click before this press stands on its own
                self._click.cancel()
                self._click = None
                self._emit("click", {"state": "on"})
            self._long_fired = True
            self._emit("long_press", {"state": "on"})

    def _fire_click(self) -> None:
        with self._lock:
            if self._click is None:
                return
            self._click = None
            self._emit("click", {"state": _word(self.state)})

    def _arm_silence(self) -> None:
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        if self.cfg.expect_every:
            self._silence = self._timers.call_later(self.cfg.expect_every, self._fire_silent)

    def _fire_silent(self) -> None:
        with self._lock:
            if self._silence is None or self._silent:
                return
            self._silence = None
            self._silent = True
            self._emit("silent", {"state": _word(self.state), "seconds": self.cfg.expect_every})

    def close(self) -> None:
        """Cancel every pending timer."""
        with self._lock:
            for t in (self._pending, self._hold, self._long, self._click, self._silence):
                if t is not None:
                    t.cancel()


def _word(level: bool) -> str:
    return "on" if level else "off"
