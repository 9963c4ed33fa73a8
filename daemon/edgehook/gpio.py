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

SIM_CLICK = 0.05  # seconds a simulated click keeps the button down


def make_pin_factory(backend: str) -> Any:
    """gpiozero's MockFactory for `mock`, else gpiozero's default (lgpio on a Pi 5).

    Raises NoGpioError with one clear line when no real pin factory loads.
    """
    if backend == "mock":
        from gpiozero.pins.mock import MockFactory

        return MockFactory()
    from gpiozero import Device
    from gpiozero.exc import BadPinFactory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpiozero warns once per fallback it tries
        try:
            return Device._default_pin_factory()
        except BadPinFactory:
            raise NoGpioError("no GPIO found on this machine (no gpiozero pin factory could "
                              "load: install lgpio on a Pi); to try edgehook without "
                              "hardware use --simulate or gpio.backend: mock") from None


@dataclass(slots=True)
class _Out:
    cfg: OutputConfig
    device: Any
    revert: Any = None       # scheduler handle of a pending `for:` revert
    max_on: Any = None       # scheduler handle of the max_on switch-off
    until: float | None = None  # wall time of the pending revert / max_on
    revert_to: bool = False  # the state before the first of a chain of `for:` commands
    last_change: float = float("-inf")


class Gpio:
    """Owns the pins: inputs feed InputLogic, outputs obey commands with their limits."""

    def __init__(self, cfg: GpioConfig, put: Callable[[Event], None], timers: Timers,
                 pin_factory: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.backend = cfg.backend
        self._put = put
        self._timers = timers
        self._clock = clock
        self._lock = threading.RLock()
        self.factory = pin_factory if pin_factory is not None else make_pin_factory(cfg.backend)
        self.inputs: dict[str, tuple[Any, InputLogic]] = {}
        self.outputs: dict[str, _Out] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open every pin; `initial` applies to outputs. Raises NoGpioError / CommandError."""
        from gpiozero import DigitalInputDevice, DigitalOutputDevice
        from gpiozero.exc import GPIOZeroError

        try:
            for name, ocfg in self.cfg.outputs.items():
                dev = DigitalOutputDevice(ocfg.pin, active_high=ocfg.active == "high",
                                          initial_value=ocfg.initial == "on",
                                          pin_factory=self.factory)
                out = _Out(ocfg, dev)
                self.outputs[name] = out
                if ocfg.initial == "on":
                    out.last_change = self._clock()
                    self._arm_max_on(out)
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

    def close(self, apply_on_stop: bool = True) -> None:
        """Leave outputs as `on_stop` says, then release every pin."""
        with self._lock:
            for out in self.outputs.values():
                for h in (out.revert, out.max_on):
                    if h is not None:
                        h.cancel()
                if apply_on_stop and out.cfg.on_stop != "keep":
                    try:
                        out.device.value = 1 if out.cfg.on_stop == "on" else 0
                    except Exception:  # a pin that is already gone cannot be set
                        _LOG.warning("output %s: could not apply on_stop", out.cfg.name)
                if out.cfg.on_stop != "keep" or not apply_on_stop:
                    out.device.close()
                # on_stop: keep leaves the device open so the pin is not reset; the process
                # exits right after, and the kernel keeps the line as it was.
            for dev, logic in self.inputs.values():
                logic.close()
                dev.close()
            self.inputs.clear()
            self.outputs.clear()

    # ------------------------------------------------------------------ inputs
    def _emitter(self, name: str) -> Callable[[str, dict[str, Any]], None]:
        def emit(kind: str, data: dict[str, Any]) -> None:
            self._put(make_event("input." + kind, name, data))
        return emit

    def input_states(self) -> dict[str, dict[str, Any]]:
        """name -> {"state": on|off, "class": ...} for the API and templates."""
        return {n: {"state": "on" if lg.state else "off", "class": lg.cfg.cls}
                for n, (_, lg) in self.inputs.items()}

    def simulate(self, name: str, action: str) -> None:
        """Drive a simulated input: press | release | click | hold (mock backend only)."""
        if self.backend != "mock":
            raise CommandError("inputs can only be simulated with gpio.backend: mock "
                               "(or --simulate)")
        if name not in self.inputs:
            raise KeyError(name)
        dev, logic = self.inputs[name]
        pin = dev.pin
        cfg = logic.cfg
        active_low = _active_level_low(cfg)

        def drive(active: bool) -> None:
            level_high = (not active) if active_low else active
            if cfg.filters.invert:
                level_high = not level_high
            if level_high:
                pin.drive_high()
            else:
                pin.drive_low()

        if action == "press":
            drive(True)
        elif action == "release":
            drive(False)
        elif action == "click":
            drive(True)
            self._timers.call_later(SIM_CLICK + cfg.filters.delayed_on, lambda: drive(False))
        elif action == "hold":
            hold = max(cfg.hold or 0.0, cfg.gestures.long_press if cfg.gestures else 0.0)
            drive(True)
            self._timers.call_later(hold + cfg.filters.delayed_on + 0.2, lambda: drive(False))
        else:
            raise CommandError(f"unknown action {action!r}: use press, release, click or hold")

    # ------------------------------------------------------------------ outputs
    def output_states(self) -> dict[str, dict[str, Any]]:
        """name -> {"state", "until", "class"} for the API and templates."""
        with self._lock:
            return {n: self._out_state(o) for n, o in self.outputs.items()}

    def _out_state(self, out: _Out) -> dict[str, Any]:
        return {"state": "on" if out.device.value else "off",
                "until": rfc3339(out.until) if out.until else None, "class": out.cfg.cls}

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
        with self._lock:
            out = self._get(name)
            current = bool(out.device.value)
            target = (not current) if state == "toggle" else state == "on"
            if state not in ("on", "off", "toggle"):
                raise CommandError(f"state {state!r} is not on, off or toggle")
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
            if out.revert is not None:
                out.revert.cancel()
                out.revert = None
                out.until = None
            self._switch(out, target, origin)
            if duration and target != before:
                out.revert_to = before
                out.revert = self._timers.call_later(
                    duration, lambda: self._revert(name, before, out))
                out.until = time.time() + duration
            return {"name": name, **self._out_state(out)}

    def _switch(self, out: _Out, on: bool, origin: str) -> None:
        if on and out.cfg.interlock:
            for other in self.outputs.values():
                if other is not out and other.cfg.interlock == out.cfg.interlock \
                        and other.device.value:
                    self._switch(other, False, f"interlock with {out.cfg.name}")
                    if other.revert is not None:
                        other.revert.cancel()
                        other.revert = None
        previous = bool(out.device.value)
        if previous == on:
            return
        out.device.value = 1 if on else 0
        out.last_change = self._clock()
        if on:
            self._arm_max_on(out)
        else:
            if out.max_on is not None:
                out.max_on.cancel()
                out.max_on = None
            if out.revert is None:
                out.until = None
        _LOG.info("output %s -> %s (%s)", out.cfg.name, "on" if on else "off",
                  origin or "command")
        self._put(make_event("output.changed", out.cfg.name,
                             {"state": "on" if on else "off",
                              "previous": "on" if previous else "off", "origin": origin}))

    def _arm_max_on(self, out: _Out) -> None:
        if out.cfg.max_on:
            if out.max_on is not None:
                out.max_on.cancel()
            name = out.cfg.name
            out.max_on = self._timers.call_later(out.cfg.max_on,
                                                 lambda: self._expire(name, out))
            if out.until is None:
                out.until = time.time() + out.cfg.max_on

    def _expire(self, name: str, out: _Out) -> None:
        with self._lock:
            if self.outputs.get(name) is not out:
                return
            out.max_on = None
            if out.revert is not None:
                out.revert.cancel()
                out.revert = None
            self._switch(out, False, f"max_on {out.cfg.max_on:g} s")

    def _revert(self, name: str, previous: bool, out: _Out) -> None:
        with self._lock:
            if self.outputs.get(name) is not out:
                return
            out.revert = None
            out.until = None
            self._switch(out, previous, "revert after for:")


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
