"""gpiozero devices from config, with an injected pin factory; outputs and their safety.

Real and simulated pins are one code path: `backend: mock` (or `--simulate`) only
swaps in gpiozero's MockFactory. Pin callbacks arrive on gpiozero's threads and only
feed `InputLogic`, which emits events through `put`.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import GpioConfig, InputConfig, OutputConfig
from .errors import CommandError, NoGpioError
from .events import Event, make_event, rfc3339
from .inputs import InputLogic, Timers

_LOG = logging.getLogger(__name__)

SIM_CLICK = 0.05  # seconds a simulated click keeps the button down (plus delayed_on)
SIM_GAP = 0.05    # seconds between two queued simulated actions (plus delayed_off)
SIM_HOLD = 1.0    # seconds a simulated hold lasts when the input has no hold/long_press


def make_pin_factory(backend: str) -> Any:
    """gpiozero's MockFactory for `mock`, else gpiozero's default (lgpio on a Pi 5).

    Raises NoGpioError with one clear line when no real pin factory loads.
    """
    if backend == "mock":
        from gpiozero.pins.mock import MockFactory

        return MockFactory()
    from gpiozero import Device

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpiozero warns once per fallback it tries
        try:
            return Device._default_pin_factory()
        except Exception as exc:  # BadPinFactory, or the named factory's ImportError
            why = str(exc).strip().rstrip("!.") or type(exc).__name__
            raise NoGpioError(f"no GPIO found on this machine (gpiozero: {why}; on a Pi, "
                              "install lgpio); to run without hardware use --simulate or "
                              "gpio.backend: mock") from None


@dataclass(eq=False, slots=True)
class _Job:
    """A pending revert or max_on switch-off; its identity is its token."""

    at: float                # wall time it is due (for the API's `until`)
    handle: Any = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


@dataclass(eq=False, slots=True)
class _Out:
    cfg: OutputConfig
    device: Any
    revert: _Job | None = None   # a pending `for:` revert
    max_on: _Job | None = None   # the max_on switch-off while on
    revert_to: bool = False      # the state before the first of a chain of `for:` commands
    last_change: float = float("-inf")

    @property
    def until(self) -> float | None:
        due = [j.at for j in (self.revert, self.max_on) if j is not None]
        return min(due) if due else None


class Gpio:
    """Owns the pins: inputs feed InputLogic, outputs obey commands with their limits."""

    def __init__(self, cfg: GpioConfig, put: Callable[[Event], None], timers: Timers,
                 pin_factory: Any = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._put = put
        self._timers = timers
        self._clock = clock
        self._wall = wall
        self._lock = threading.RLock()
        # A config without pins (MQTT -> webhook, hooks only) needs no GPIO hardware:
        # no pin factory is loaded, and the state says backend "none".
        if pin_factory is None and (cfg.inputs or cfg.outputs):
            pin_factory = make_pin_factory(cfg.backend)
        self.factory = pin_factory
        self.backend = cfg.backend if pin_factory is not None else "none"
        self.inputs: dict[str, tuple[Any, InputLogic]] = {}
        self.outputs: dict[str, _Out] = {}
        self._sim_free: dict[str, float] = {}  # input -> clock time its simulation is done

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open every pin; `initial` applies to outputs. Raises CommandError on a bad pin."""
        from gpiozero import DigitalInputDevice, DigitalOutputDevice
        from gpiozero.exc import GPIOZeroError

        try:
            with self._lock:
                for name, ocfg in self.cfg.outputs.items():
                    dev = DigitalOutputDevice(ocfg.pin, active_high=ocfg.active == "high",
                                              initial_value=ocfg.initial == "on",
                                              pin_factory=self.factory)
                    # Write it again: a line still claimed as an output (left driven by
                    # a reload's close) ignores the initial state of a new claim in lgpio.
                    dev.value = 1 if ocfg.initial == "on" else 0
                    out = _Out(ocfg, dev)
                    self.outputs[name] = out
                    if ocfg.initial == "on":
                        out.last_change = self._clock()
                        self._arm_max_on(out)
                    _LOG.debug("output %s on %s: initial %s", name, ocfg.pin, ocfg.initial)
                for name, icfg in self.cfg.inputs.items():
                    dev = DigitalInputDevice(
                        icfg.pin, pull_up=_pull(icfg), active_state=_active(icfg),
                        bounce_time=icfg.bounce, pin_factory=self.factory)
                    logic = InputLogic(icfg, self._emitter(name), self._timers)
                    logic.start(bool(dev.is_active))
                    dev.when_activated = lambda _d=None, lg=logic: lg.raw(True)
                    dev.when_deactivated = lambda _d=None, lg=logic: lg.raw(False)
                    self.inputs[name] = (dev, logic)
        except GPIOZeroError as exc:
            self.close(apply_on_stop=False)
            raise CommandError(f"GPIO setup failed: {exc}") from None

    def close(self, apply_on_stop: bool = True) -> dict[str, bool]:
        """Leave outputs as `on_stop` says (or as they are), then release every pin.

        Outputs are released without gpiozero's reset to input, so the line keeps the
        level set here until the process exits (docs/gpio.md). Returns each output's
        final state (True = on), so the caller can publish it before MQTT closes.
        """
        final: dict[str, bool] = {}
        with self._lock:
            outs = list(self.outputs.values())
            for out in outs:
                for job in (out.revert, out.max_on):
                    if job is not None:
                        job.cancel()
                out.revert = out.max_on = None
            if apply_on_stop:
                # offs (and keeps) first, so an `on` never meets an interlocked partner
                for out in sorted(outs, key=lambda o: o.cfg.on_stop == "on"):
                    self._apply_on_stop(out)
            for out in outs:
                try:
                    final[out.cfg.name] = bool(out.device.value)
                except Exception:  # a pin that is already gone has no state to report
                    pass
                _release_driven(out.device)
            for dev, logic in self.inputs.values():
                logic.close()
                dev.close()
            self.inputs.clear()
            self.outputs.clear()
        return final

    def _apply_on_stop(self, out: _Out) -> None:
        mode = out.cfg.on_stop
        name = out.cfg.name
        try:
            current = bool(out.device.value)
            if mode == "keep":
                _LOG.info("output %s stays %s (on_stop: keep)", name, _word(current))
                return
            want = mode == "on"
            if want and out.cfg.interlock and any(
                    o is not out and o.cfg.interlock == out.cfg.interlock and o.device.value
                    for o in self.outputs.values()):
                _LOG.warning("output %s: on_stop: on skipped: another output of interlock "
                             "group %r is on", name, out.cfg.interlock)
                want = False
            if current != want:
                out.device.value = 1 if want else 0
            _LOG.info("output %s -> %s (on_stop: %s)", name, _word(want), mode)
        except Exception as exc:  # a pin that is already gone cannot be set
            _LOG.warning("output %s: could not apply on_stop: %s", name, exc)

    # ------------------------------------------------------------------ inputs
    def _emitter(self, name: str) -> Callable[[str, dict[str, Any]], None]:
        def emit(kind: str, data: dict[str, Any]) -> None:
            self._put(make_event("input." + kind, name, data))
        return emit

    def input_states(self) -> dict[str, dict[str, Any]]:
        """name -> {"state": on|off, "class": ...} for the API and templates."""
        return {n: {"state": _word(lg.state), "class": lg.cfg.cls}
                for n, (_, lg) in self.inputs.items()}

    def simulate(self, name: str, action: str) -> None:
        """Drive a simulated input: press | release | click | hold (mock backend only).

        Actions on one input queue behind each other, so two `click`s sent at once
        are two clicks (a double click), not one long press.
        """
        if self.backend != "mock":
            raise CommandError("inputs can only be simulated with gpio.backend: mock "
                               "(or --simulate)")
        if action not in ("press", "release", "click", "hold"):
            raise CommandError(f"unknown action {action!r}: use press, release, click or hold")
        with self._lock:
            if name not in self.inputs:
                raise KeyError(name)
            dev, logic = self.inputs[name]
            cfg = logic.cfg
            f = cfg.filters
            if action in ("press", "release"):
                steps, busy = [(0.0, action == "press")], 0.0
            else:
                if action == "click":
                    down = SIM_CLICK + f.delayed_on
                else:
                    down = max(cfg.hold or 0.0, cfg.gestures.long_press if cfg.gestures
                               else 0.0) or SIM_HOLD
                    down += f.delayed_on + 0.2
                steps, busy = [(0.0, True), (down, False)], down + SIM_GAP + f.delayed_off
            now = self._clock()
            begin = max(now, self._sim_free.get(name, now))
            self._sim_free[name] = begin + busy
            for offset, active in steps:
                delay = begin - now + offset
                if delay <= 0:
                    self._drive(name, dev, active)
                else:
                    self._timers.call_later(
                        delay, lambda d=dev, a=active: self._drive(name, d, a))

    def _drive(self, name: str, dev: Any, active: bool) -> None:
        """Set a mock input pin so that the input reads `active` (before invert)."""
        with self._lock:
            entry = self.inputs.get(name)
            if entry is None or entry[0] is not dev:
                return  # closed or reloaded meanwhile
            cfg = entry[1].cfg
            high = active != _active_level_low(cfg)
            if cfg.filters.invert:
                high = not high
            if high:
                dev.pin.drive_high()
            else:
                dev.pin.drive_low()

    # ------------------------------------------------------------------ outputs
    def output_states(self) -> dict[str, dict[str, Any]]:
        """name -> {"state", "until", "class"} for the API and templates."""
        with self._lock:
            return {n: self._out_state(o) for n, o in self.outputs.items()}

    def _out_state(self, out: _Out) -> dict[str, Any]:
        until = out.until
        return {"state": _word(bool(out.device.value)),
                "until": rfc3339(until) if until else None, "class": out.cfg.cls}

    def output_state(self, name: str) -> dict[str, Any]:
        """The API shape of one output: {"name", "state", "until"}."""
        with self._lock:
            out = self._get(name)
            return {"name": name, **self._out_state(out)}

    def _get(self, name: str) -> _Out:
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(name) from None

    def set_output(self, name: str, state: str, duration: float | None = None,
                   origin: str = "") -> dict[str, Any]:
        """Switch an output: on | off | toggle, reverting after `duration`.

        Raises KeyError for an unknown output and CommandError when min_interval refuses.
        Returns the API shape of the output's new state.
        """
        if state not in ("on", "off", "toggle"):
            raise CommandError(f"state {state!r} is not on, off or toggle")
        with self._lock:
            out = self._get(name)
            current = bool(out.device.value)
            target = (not current) if state == "toggle" else state == "on"
            now = self._clock()
            if target != current and out.cfg.min_interval is not None:
                since = now - out.last_change
                if since < out.cfg.min_interval:
                    _LOG.warning("output %s: %s refused (%s): changed %.2f s ago, min_interval "
                                 "is %g s", name, state, origin or "command", since,
                                 out.cfg.min_interval)
                    raise CommandError(f"output {name} changed {since:.2f} s ago; "
                                       f"min_interval is {out.cfg.min_interval:g} s")
            # A new command cancels a pending revert; a new `for:` on top of one keeps the
            # state from before the first, so "on for 30s" twice still ends off.
            before = out.revert_to if out.revert is not None else current
            self._cancel_revert(out)
            self._switch(out, target, origin)
            if duration and target != before:
                out.revert_to = before
                out.revert = self._arm(out, "revert", duration,
                                       lambda: self._switch(out, before, "revert after for:"))
            return {"name": name, **self._out_state(out)}

    def _arm(self, out: _Out, kind: str, delay: float, fn: Callable[[], None]) -> _Job:
        """Schedule `fn` under the lock; it runs only while this job is still current."""
        job = _Job(self._wall() + delay)

        def run() -> None:
            with self._lock:
                if self.outputs.get(out.cfg.name) is not out or getattr(out, kind) is not job:
                    return  # cancelled after the timer thread had picked it up, or closed
                setattr(out, kind, None)
                fn()

        job.handle = self._timers.call_later(delay, run)
        return job

    def _cancel_revert(self, out: _Out) -> None:
        if out.revert is not None:
            out.revert.cancel()
            out.revert = None

    def _switch(self, out: _Out, on: bool, origin: str) -> None:
        if on and out.cfg.interlock:
            for other in self.outputs.values():
                if other is not out and other.cfg.interlock == out.cfg.interlock \
                        and other.device.value:
                    self._cancel_revert(other)
                    self._switch(other, False, f"interlock with {out.cfg.name}")
        previous = bool(out.device.value)
        if previous == on:
            return
        out.device.value = 1 if on else 0
        out.last_change = self._clock()
        if on:
            self._arm_max_on(out)
        elif out.max_on is not None:
            out.max_on.cancel()
            out.max_on = None
        # a rule's change is already logged by the dispatcher with its event id
        _LOG.log(logging.DEBUG if origin.startswith("rule ") else logging.INFO,
                 "output %s -> %s (%s)", out.cfg.name, _word(on), origin or "command")
        self._put(make_event("output.changed", out.cfg.name,
                             {"state": _word(on), "previous": _word(previous),
                              "origin": origin}))

    def _arm_max_on(self, out: _Out) -> None:
        if not out.cfg.max_on:
            return
        if out.max_on is not None:
            out.max_on.cancel()

        def expire() -> None:
            self._cancel_revert(out)
            self._switch(out, False, f"max_on {out.cfg.max_on:g} s")

        out.max_on = self._arm(out, "max_on", out.cfg.max_on, expire)


def _word(on: bool) -> str:
    return "on" if on else "off"


def _release_driven(dev: Any) -> None:
    """Close a gpiozero output device without its reset of the line to an input.

    gpiozero's `close()` (and its `__del__`) turn the pin back into an input, which
    would undo `on_stop` (lgpio: gpio_claim_input). Releasing the reservation and
    dropping the pin first leaves the line driven; the factory still owns the pin.
    """
    pin = getattr(dev, "_pin", None)
    if pin is not None:
        try:
            dev.pin_factory.release_pins(dev, pin.info.name)
            dev._pin = None
        except Exception:  # an unexpected gpiozero shape: fall back to a plain close
            _LOG.debug("could not detach %r; closing it normally", dev, exc_info=True)
    dev.close()


def _pull(cfg: InputConfig) -> bool | None:
    return {"up": True, "down": False, "none": None}[cfg.pull]


def _active(cfg: InputConfig) -> bool | None:
    if cfg.pull == "none":
        return cfg.active == "high"
    return None


def _active_level_low(cfg: InputConfig) -> bool:
    """True when the pin reads low while pressed (pull-up wiring, or active: low)."""
    if cfg.pull == "none":
        return cfg.active == "low"
    return cfg.pull == "up"
