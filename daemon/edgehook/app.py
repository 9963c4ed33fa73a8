"""Composition root: builds the parts from a Config, starts them in order, stops them.

Wiring only: decisions live in rules/dispatcher/gpio/outbox/delivery/mqtt. Signal
handlers only set flags; the main thread does the work (reload, stop).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__
from .api import Api
from .config import Config, load_config, setting_error
from .delivery import Sender
from .dispatcher import Actions, Bus, Dispatcher, Reply
from .errors import ConfigError
from .events import Event, make_event, rfc3339, seconds_since
from .gpio import Gpio
from .health import Snapshot, status_line, verdict
from .http_server import HttpServer
from .metrics import Histogram
from .notify import Notifier, WatchdogPinger
from .outbox import NewDelivery, Outbox
from .rules import Plan, RuleEngine, WebhookCall
from .scheduler import Scheduler
from .triggers import SilenceWatch, TimeTriggers

_LOG = logging.getLogger(__name__)

STOP_DUMP_AFTER = 10.0  # seconds into a stop before every thread's stack is logged
STATUS_EVERY = 2.0          # at most one STATUS= update per this many seconds
_MQTT_EVENT_TYPES = {"pressed": "press", "released": "release", "held": "hold",
                     "click": "click", "double_click": "double_click",
                     "long_press": "long_press"}


class Daemon:
    """One running edgehook: pins, outbox, senders, dispatcher, HTTP, MQTT, systemd."""

    def __init__(self, cfg: Config, pin_factory: Any = None) -> None:
        self.cfg = cfg
        # pins simulated at start stay simulated across reloads (`run --simulate` forces
        # backend: mock into the config): the pin factory is chosen once per process
        self.simulate_pins = cfg.gpio.backend == "mock"
        self.started_at = time.time()
        self.notifier = Notifier()
        self.scheduler = Scheduler()
        self.bus = Bus()
        self.counters: Counter[str] = Counter()
        self.delivery_latency = Histogram()
        # GPIO first: on a machine without pins we exit before creating the outbox file
        self.gpio = Gpio(cfg.gpio, self.bus.put, self.scheduler, pin_factory=pin_factory)
        try:
            self.outbox = Outbox(Path(cfg.state_dir) / "outbox.db")
        except OSError as exc:  # the directory: not creatable, not a directory, not ours
            raise setting_error(cfg, ("state_dir",), cfg.state_dir, exc) from exc
        self.sender = Sender(self.outbox, cfg.webhooks, on_result=self._on_delivery)
        self.dispatcher = Dispatcher(self.bus, RuleEngine(cfg), Actions(
            store=self._store, set_output=self._set_output, publish=self._publish,
            states=self._states, observe=self._observe))
        try:
            self.http = HttpServer(cfg.http.host, cfg.http.port, self._api(cfg),
                                   timeout=cfg.http.timeout)
        except OSError as exc:  # the address: in use, not on this machine, privileged
            host = f"[{cfg.http.host}]" if ":" in cfg.http.host else cfg.http.host
            raise setting_error(cfg, ("http", "listen"), f"{host}:{cfg.http.port}",
                                 exc) from exc
        self.mqtt: Any = None
        self.silence: SilenceWatch | None = None
        self.time_triggers: TimeTriggers | None = None
        self.pinger = WatchdogPinger(self.notifier, self.healthy)
        # Signal handlers only set these flags and write one byte to a pipe: a handler
        # that took a lock (threading.Event.set does) could run while the main thread
        # holds that very lock, and a second signal would then freeze the daemon.
        self._stopping = False
        self._reloading = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._last_status = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start in dependency order; READY once GPIO, outbox and HTTP are up."""
        self.scheduler.start()
        self.gpio.start()
        self.dispatcher.start()
        self.sender.start()
        self.http.start()
        self._start_timers(self.cfg)
        self.notifier.ready()
        # MQTT after READY: SPEC.md says READY does not wait for the broker, and
        # importing paho's client is a fifth of our start-up time
        self._start_mqtt(self.cfg)
        self.pinger.start()
        self._update_status(force=True)
        host, port = self.http.address
        _LOG.info("edgehook %s started: device %s, backend %s, http://%s:%s/, %s",
                  __version__, self.cfg.device.id, self.gpio.backend, host, port,
                  self.cfg.summary().removeprefix("config OK: "))
        self.bus.put(make_event("daemon.started", self.cfg.device.id,
                                {"version": __version__}))

    def _start_mqtt(self, cfg: Config) -> None:
        if cfg.mqtt is None:
            return
        from .mqtt import MqttLink  # paho's client only when the config uses MQTT

        filters = self.dispatcher.engine.mqtt_filters()
        self.mqtt = MqttLink(cfg.mqtt, cfg.device, cfg.gpio, filters,
                             put=self._put_acked, on_command=self._mqtt_command,
                             states=self._bool_states)
        self.mqtt.start()

    def _start_timers(self, cfg: Config) -> None:
        self.time_triggers = TimeTriggers(cfg.rules, self.scheduler, self.bus.put)
        self.time_triggers.start()
        periods = {r.when.name: r.when.expect_every for r in cfg.rules
                   if r.when.kind == "mqtt" and r.when.expect_every}
        self.silence = SilenceWatch(periods, self.scheduler, self.bus.put) if periods else None
        if self.silence:
            from paho.mqtt.client import topic_matches_sub  # only configs with MQTT get here

            self._topic_matches = topic_matches_sub
            self.silence.start()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; reload on SIGHUP. Returns the exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        # A signal may land on any thread; the handler itself runs on the main thread
        # only once it wakes up. The wakeup fd is written at C level by whichever
        # thread got it, so the read below returns and the handler runs.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.start()
        while not self._stopping:
            try:
                os.read(self._wake_r, 64)  # a signal's byte, or request_stop()'s
            except InterruptedError:
                pass
            if self._reloading and not self._stopping:
                self._reloading = False
                self.reload()
        signal.set_wakeup_fd(-1)  # the pipe closes in stop()
        self.stop()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reloading = True
        else:
            self._stopping = True
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full: the main loop is awake anyway; closed: already stopped
            pass

    def request_stop(self) -> None:
        self._stopping = True
        self._poke()

    def stop(self) -> None:
        """SIGTERM: finish in-flight work, publish offline, leave the outbox intact."""
        _LOG.info("stopping")
        # a stop that hangs says where, in the journal, before systemd's kill
        faulthandler.dump_traceback_later(STOP_DUMP_AFTER, exit=False)
        self.notifier.stopping()
        self.pinger.stop()
        self.http.stop()
        if self.time_triggers:
            self.time_triggers.stop()
        if self.silence:
            self.silence.stop()
        self.dispatcher.stop()
        final = self.gpio.close(apply_on_stop=True)
        if self.mqtt is not None:
            # the state left by on_stop goes out before "offline": Home Assistant must
            # not keep showing a light on that on_stop switched off
            for name, on in final.items():
                self.mqtt.output_state(name, on)
        self.sender.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        self.scheduler.stop()
        self.outbox.close()
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        faulthandler.cancel_dump_traceback_later()
        _LOG.info("stopped")

    def reload(self) -> None:
        """SIGHUP: a good new config is swapped in; a bad one is logged, the old one stays.

        Nothing that happens while loading may take the service down: any failure is
        "reload refused, old config kept".
        """
        self.notifier.reloading()
        try:
            new = load_config(self.cfg.path)
            if self.simulate_pins and new.gpio.backend != "mock":
                new = replace(new, gpio=replace(new.gpio, backend="mock"))
        except ConfigError as exc:
            for problem in exc.problems:
                _LOG.error("reload refused: %s", problem)
            _LOG.error("reload refused: keeping the running config")
            self.notifier.ready()
            return
        except Exception as exc:  # RecursionError, MemoryError, a bug: never fatal
            _LOG.error("reload refused: the config could not be loaded (%s: %s); "
                       "keeping the running config", type(exc).__name__, exc)
            self.notifier.ready()
            return
        old = self.cfg
        try:
            self._apply(old, new)
        except Exception:
            _LOG.exception("reload failed half-way; keeping what could be applied")
        self.notifier.ready()
        self._update_status(force=True)
        _LOG.info("reloaded %s: %s", new.path, new.summary())

    def _apply(self, old: Config, new: Config) -> None:
        if new.gpio != old.gpio:
            _LOG.info("GPIO configuration changed: reopening pins")
            was_on = {n: v["state"] == "on" for n, v in self.gpio.output_states().items()}
            # built before the old pins close: pins added to a config that had none need
            # a pin factory, and on a machine without GPIO that fails here, changing nothing
            gpio = Gpio(new.gpio, self.bus.put, self.scheduler, pin_factory=self.gpio.factory)
            self.gpio.close(apply_on_stop=False)
            gpio.start()
            self.gpio = gpio
            # an output whose own config did not change keeps its state (its max_on is
            # armed again; a pending `for:` revert is not carried over)
            for name, on in was_on.items():
                if on and old.gpio.outputs.get(name) == new.gpio.outputs.get(name):
                    gpio.set_output(name, "on", None, "reload: state kept")
        engine = RuleEngine(new)
        # the config before the engine: a rule of the new engine may name a target that
        # only the new config has (the store looks targets up in self.cfg)
        self.cfg = new
        self.dispatcher.engine = engine  # swapped as one reference
        # a CLI may have changed the file while the API was away: seen before any claim
        self.outbox.recount()
        now = time.time()
        for name, target in new.webhooks.items():
            if name in old.webhooks and old.webhooks[name] != target:
                n = self.outbox.make_due(name, now)
                if n:
                    _LOG.info("webhook %s changed: its %d waiting delivery(ies) are tried now",
                              name, n)
        self.sender.reload(new.webhooks)  # senders re-read their queues from the file
        if self.time_triggers:
            self.time_triggers.stop()
        if self.silence:
            self.silence.stop()
        self._start_timers(new)
        if self.mqtt is not None and new.mqtt is not None:
            self.mqtt.reload(new.mqtt, new.device, new.gpio, engine.mqtt_filters())
        elif self.mqtt is not None:
            self.mqtt.stop()
            self.mqtt = None
        elif new.mqtt is not None:
            self._start_mqtt(new)
        if (new.http.host, new.http.port) != (old.http.host, old.http.port):
            _LOG.warning("http.listen changed: restart edgehook to move the listener")
        self.http.set_api(self._api(new))
        self.cfg = new

    def _put_acked(self, event: Event, ack: Any = None) -> None:
        """MQTT: queue a message's event with the PUBACK to send once it is durable."""
        self.bus.put(event, ack=ack)

    # ------------------------------------------------------------------ dispatcher's hands
    def _store(self, calls: Sequence[tuple[Event, WebhookCall]]) -> None:
        """Webhooks of a batch into the outbox, one fsynced commit; then wake senders."""
        webhooks = self.cfg.webhooks
        items = []
        for event, call in calls:
            target = webhooks.get(call.target)
            items.append(NewDelivery(
                target=call.target, event_id=event.id, url=call.url,
                method=target.method if target else "POST",
                headers=call.headers, body=call.body, content_type=call.content_type,
                max_attempts=target.max_attempts if target else 1,
                max_age=target.max_age if target else 0.0))
        self.outbox.add(items)
        self.sender.wake({c.target for _, c in calls})

    def _set_output(self, name: str, state: str, duration: float | None,
                    origin: str) -> dict[str, Any]:
        return self.gpio.set_output(name, state, duration, origin)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.mqtt is None:
            raise KeyError("no mqtt section")
        self.mqtt.publish(topic, payload, qos, retain)

    def _states(self) -> dict[str, Any]:
        return {"inputs": self.gpio.input_states(), "outputs": self.gpio.output_states()}

    def _bool_states(self) -> tuple[dict[str, bool], dict[str, bool]]:
        s = self._states()
        return ({n: v["state"] == "on" for n, v in s["inputs"].items()},
                {n: v["state"] == "on" for n, v in s["outputs"].items()})

    def _observe(self, event: Event, plan: Plan) -> None:
        self.counters["events:" + event.type] += 1
        for rule in plan.fired:
            self.counters["rule:" + rule] += 1
        link = self.mqtt
        kind = event.type.partition(".")[2]
        if link is not None:
            if event.type.startswith("input."):
                if kind in ("pressed", "released"):
                    link.input_state(event.source, kind == "pressed")
                if kind in _MQTT_EVENT_TYPES:
                    link.input_event(event.source, _MQTT_EVENT_TYPES[kind], event.id)
            elif event.type == "output.changed":
                link.output_state(event.source, event.data.get("state") == "on")
        if self.silence is not None and event.type == "mqtt.message":
            for flt in self.silence.periods:
                if self._topic_matches(flt, event.source):
                    self.silence.seen(flt, event.source)
        self._update_status()

    def _mqtt_command(self, name: str, state: str, duration: float | None) -> None:
        """From paho's thread: hand the command to the timer thread and return."""
        def run() -> None:
            try:
                self.gpio.set_output(name, state, duration, "mqtt")
            except KeyError:
                _LOG.warning("mqtt: no output named %r", name)
            except Exception as exc:
                _LOG.warning("mqtt: output %s %s refused: %s", name, state, exc)
                link = self.mqtt
                if link is not None and name in self.gpio.outputs:
                    # so Home Assistant's switch snaps back to the real state
                    on = self.gpio.output_state(name)["state"] == "on"
                    link.output_state(name, on)
        self.scheduler.call_later(0, run)

    def _on_delivery(self, target: str, outcome: str, status: int | None,
                     latency: float) -> None:
        self.counters[f"delivery:{target}:{outcome}"] += 1
        self.delivery_latency.observe(target, latency)

    # ------------------------------------------------------------------ API backend
    def _api(self, cfg: Config) -> Api:
        return Api(self, api_token=cfg.http.api_token, max_body=cfg.http.max_body,
                   hooks=cfg.hooks, max_connections=cfg.http.max_connections,
                   trusted_proxies=cfg.http.trusted_proxies)

    def webhook_health(self) -> dict[str, dict[str, Any]]:
        """Per target: 410 Gone flag, last success/error (sender), rows pending."""
        gone = self.sender.gone_targets()
        seen = self.sender.target_health()
        pending = self.outbox.pending_by_target()
        none = {"last_success": None, "last_error": None, "last_error_at": None}
        return {name: {"gone": name in gone, **seen.get(name, none),
                       "pending": pending.get(name, 0)}
                for name in self.cfg.webhooks}

    def state(self) -> dict[str, Any]:
        return {"device": {"id": self.cfg.device.id, "name": self.cfg.device.name},
                "backend": self.gpio.backend, "version": __version__,
                "inputs": self.gpio.input_states(), "outputs": self.gpio.output_states(),
                "mqtt": self._mqtt_status(),
                "outbox": self.outbox.counts(),
                # a target that answered 410 Gone is flagged until it delivers again
                "webhooks": self.webhook_health(),
                "events": {"total": self.dispatcher.events_total, "dropped": self.bus.dropped,
                           "queued": len(self.bus), "unstored": self.dispatcher.unstored}}

    def _snapshot(self) -> Snapshot:
        st = self._mqtt_status()
        down = 0.0
        if st is not None and not st.get("connected"):
            down = seconds_since(st.get("since"), self.started_at)
        ok, why = self.outbox.health()
        return Snapshot(
            dispatcher_alive=self.dispatcher.alive(),
            stalled_for=self.dispatcher.stuck_for(),
            outbox_ok=ok, outbox_why=why, outbox_counts=self.outbox.counts(),
            sender_age=self.sender.heartbeat_age(), mqtt=st, mqtt_down_for=down,
            unstored=self.dispatcher.unstored, store_failures=self.dispatcher.store_failures,
            last_store_error=self.dispatcher.last_store_error,
            store_failed_ago=(time.monotonic() - self.dispatcher.last_store_failure
                              if self.dispatcher.last_store_failure else None),
            corrupt_moved=self.outbox.corrupt_moved)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(ok, detail) for /healthz (health.verdict decides)."""
        return verdict(self._snapshot())

    def healthy(self) -> bool:
        """For the systemd watchdog: worker threads alive and not stuck."""
        self._update_status(force=True)
        return self.dispatcher.healthy() and self.sender.heartbeat_age() < 120

    def set_output(self, name: str, state: str, duration: float | None) -> dict[str, Any]:
        return self.gpio.set_output(name, state, duration, "api")

    def simulate(self, name: str, action: str) -> None:
        self.gpio.simulate(name, action)

    def outbox_list(self, status: str | None) -> list[dict[str, Any]]:
        return self.outbox.list(status)

    def outbox_retry(self, item_id: int) -> str:
        """"queued" (a dead row), "due" (a pending row, made due now), or why not:
        "missing", "delivered", "no_target" (not configured)."""
        row = self.outbox.get(item_id)
        if row is None:
            return "missing"
        if row["status"] == "delivered":
            return "delivered"
        if row["target"] not in self.cfg.webhooks:
            return "no_target"
        if not self.outbox.retry(item_id, time.time()):
            return "missing"
        self.sender.wake([row["target"]])
        return "queued" if row["status"] == "dead" else "due"

    def outbox_drop(self, item_id: int) -> bool:
        return self.outbox.drop(item_id)

    def outbox_drop_target(self, name: str) -> int:
        return self.outbox.drop_target(name)

    def outbox_retry_dead(self) -> int:
        n = self.outbox.retry_all_dead(time.time())
        if n:
            self.sender.wake(None)
        return n

    def outbox_purge(self) -> int:
        return self.outbox.purge("dead")

    def submit(self, event: Event, wait: float = 10.0) -> Reply:
        """Queue a hook's event and wait up to `wait` s until its webhooks are durable
        and its actions ran; ``reply.done`` unset means not yet (answer 503)."""
        reply = Reply()
        self.bus.put(event, reply)
        reply.done.wait(wait)
        return reply

    def _mqtt_status(self) -> dict[str, Any] | None:
        """The link's status; None without `mqtt:`. Between READY and the link's start
        (a few ms, see start()) a configured link reads as not connected yet."""
        link = self.mqtt
        if link is not None:
            return link.status()
        if self.cfg.mqtt is None:
            return None
        return {"connected": False, "subscribed": False, "since": None, "queued": 0,
                "dropped": 0}

    def recent_events(self) -> list[dict[str, Any]]:
        """The dispatcher's last events, newest first, with what each rule did."""
        return list(self.dispatcher.recent)

    def metrics(self) -> dict[str, Any]:
        """A snapshot of the counters for /metrics (metrics.daemon_families renders it)."""
        return {"version": __version__, "started_at": self.started_at,
                "counters": dict(self.counters), "outbox": self.outbox.counts(),
                "mqtt": self._mqtt_status(),
                "dropped": self.bus.dropped, "queued": len(self.bus),
                "store_failures": self.dispatcher.store_failures,
                "unstored": self.dispatcher.unstored,
                "unstored_dropped": self.dispatcher.unstored_dropped,
                "outbox_corrupt": self.outbox.corrupt_moved,
                "latency": self.delivery_latency,
                "inputs": self.gpio.input_states(), "outputs": self.gpio.output_states()}

    # ------------------------------------------------------------------ systemd STATUS
    def _update_status(self, force: bool = False) -> None:
        if not self.notifier.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_status < STATUS_EVERY:
            return
        self._last_status = now
        last = self.dispatcher.last_event
        self.notifier.status(status_line(
            self._snapshot(),
            f"last event {last.type} {last.source} at {rfc3339(last.ts)}" if last else None))
