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

Gestures (after the filters): a press shorter than `long_press` is a click, reported
once the `double_click` window after its release has passed with no second press. If a
second press starts inside that window, the pair is one `double_click` (reported at
the second release) and no `click` at all. A press that reaches `long_press` fires
`long_press` while still held and is never a click. The README ("Inputs and outputs")
has the diagrams.
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
    """Turns raw levels of one input into its events; thread-safe.

    Every timer is kept in a named slot with a token: a job that the scheduler had
    already taken when it was cancelled finds its token gone and does nothing.
    """

    def __init__(self, cfg: InputConfig, emit: Emit, timers: Timers) -> None:
        self.cfg = cfg
        self._emit = emit
        self._timers = timers
        self._lock = threading.RLock()
        self.state = False          # the filtered, logical level (True = pressed/active)
        self._raw = False
        self._slots: dict[str, tuple[object, TimerHandle | None]] = {}
        self._second = False        # this press started inside a double_click window
        self._long_fired = False
        self._silent = False
        self._closed = False

    # ------------------------------------------------------------------ timers
    def _arm(self, slot: str, delay: float, fn: Callable[[], None]) -> None:
        self._cancel(slot)
        token = object()

        def run() -> None:
            with self._lock:
                if self._closed or self._slots.get(slot, (None,))[0] is not token:
                    return
                del self._slots[slot]
                fn()

        self._slots[slot] = (token, None)
        handle = self._timers.call_later(delay, run)
        if self._slots.get(slot, (None,))[0] is token:
            self._slots[slot] = (token, handle)

    def _cancel(self, slot: str) -> bool:
        """Cancel the job in `slot`; True if one was pending."""
        entry = self._slots.pop(slot, None)
        if entry is None:
            return False
        if entry[1] is not None:
            entry[1].cancel()
        return True

    # ------------------------------------------------------------------ edges
    def start(self, level: bool) -> None:
        """Take the pin's level at start without emitting, and arm the silence watchdog."""
        with self._lock:
            self._raw = self.state = level != self.cfg.filters.invert
            self._arm_silence()

    def raw(self, active: bool) -> None:
        """A pin edge: `active` is gpiozero's is_active (before our invert)."""
        level = active != self.cfg.filters.invert
        with self._lock:
            if self._closed or level == self._raw:
                return
            self._raw = level
            self._cancel("filter")
            if level == self.state:
                return  # a glitch that came back before its delay ran out
            delay = self.cfg.filters.delayed_on if level else self.cfg.filters.delayed_off
            if delay > 0:
                self._arm("filter", delay, lambda: self._commit(level))
            else:
                self._commit(level)

    def _commit(self, level: bool) -> None:
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

    # ------------------------------------------------------------------ hold, gestures
    def _on_press(self) -> None:
        if self.cfg.hold:
            self._arm("hold", self.cfg.hold, self._fire_hold)
        g = self.cfg.gestures
        if g:
            self._long_fired = False
            self._second = self._cancel("click")  # a first click was waiting for this
            self._arm("long", g.long_press, self._fire_long)

    def _on_release(self) -> None:
        self._cancel("hold")
        self._cancel("long")
        g = self.cfg.gestures
        if not g:
            return
        second, self._second = self._second, False
        if self._long_fired:
            return
        if second:
            self._emit("double_click", {"state": "off"})
        else:
            self._arm("click", g.double_click, self._fire_click)

    def _fire_hold(self) -> None:
        if self.state:
            self._emit("held", {"state": "on", "seconds": self.cfg.hold})

    def _fire_long(self) -> None:
        if not self.state:
            return
        if self._second:  # the click before this press stands on its own
            self._second = False
            self._emit("click", {"state": "on"})
        self._long_fired = True
        self._emit("long_press", {"state": "on"})

    def _fire_click(self) -> None:
        self._emit("click", {"state": _word(self.state)})

    # ------------------------------------------------------------------ silence
    def _arm_silence(self) -> None:
        if self.cfg.expect_every:
            self._arm("silence", self.cfg.expect_every, self._fire_silent)

    def _fire_silent(self) -> None:
        if not self._silent:
            self._silent = True
            self._emit("silent", {"state": _word(self.state), "seconds": self.cfg.expect_every})

    def close(self) -> None:
        """Cancel every pending timer; later edges are ignored."""
        with self._lock:
            self._closed = True
            for slot in list(self._slots):
                self._cancel(slot)


def _word(level: bool) -> str:
    return "on" if level else "off"
