"""The MQTT broker link: connect, reconnect, subscribe, publish, Home Assistant discovery.

One paho client (2.x, callback API v2) whose network thread (`loop_start`) does
all the socket work. The failure modes users of comparable tools hit are handled
here on purpose:

- the broker is down at start: `connect_async` + `loop_start` retry the first
  connect too, every 1 s doubling to at most 30 s;
- the broker restarts: every filter is re-subscribed in `on_connect`, states,
  "online" and discovery are re-published;
- publishes made while disconnected are kept in our own bounded deque (oldest
  dropped and counted) and flushed in order on reconnect. We hand a message to
  paho only while connected, so it is never both in our deque and in paho's
  (paho keeps a QoS>0 publish it could not send and resends it on reconnect;
  that is the only case we leave to paho, and we do not queue it again);
- a persistent session (fixed client id, MQTT 3.1.1 `clean_session=False`,
  MQTT 5 `clean_start=False` + session expiry) so QoS 1 messages sent while the
  daemon restarts are delivered when it comes back.

Acknowledgements are manual (`manual_ack=True`): a QoS 1 message that becomes an
event is PUBACKed by the dispatcher once the event's webhooks are fsynced (a burst
is acknowledged batch by batch, after each batch's one commit); a message that
could not be stored is not acknowledged, so the broker keeps it and sends it
again on the next session. Every other message (commands, skipped or malformed
ones) is acknowledged as soon as it is handled. The broker's in-flight window
bounds how many unacknowledged messages it sends us. The callbacks only translate
and enqueue (`put`, `on_command`): no HTTP, no `wait_for_publish`, no blocking,
and nothing raises out of a callback (an exception would end paho's network
thread).

Input and output states are not queued: the link keeps the latest state per
name and publishes it (retained) on every connect, so the broker ends up with the
newest value, not a replay of every change made while it was away.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import homeassistant as ha
from .config import Device, GpioConfig, MqttConfig
from .errors import CommandError, ConfigError
from .events import Event, make_event, rfc3339
from .mqtt_messages import (
    Filter,
    Message,
    Snapshot,
    check_topic,
    connection_key,
    decode_payload,
    parse_command,
    snapshot,
)

_LOG = logging.getLogger(__name__)

#: Reconnect back-off (paho doubles from MIN up to MAX). paho's own default cap
#: of 120 s would leave us deaf for two minutes after the broker returns.
RECONNECT_MIN = 1.0
RECONNECT_MAX = 30.0
#: MQTT 5: how long the broker keeps our session (subscriptions + queued QoS 1
#: messages) while we are away. MQTT 3.1.1 sessions have no expiry of their own.
SESSION_EXPIRY = 7 * 24 * 3600
#: QoS>0 messages paho keeps in flight at once (its default of 20 throttles bursts).
MAX_INFLIGHT = 100
#: QoS used for "online"/"offline" and discovery configs.
CONTROL_QOS = 1

# --------------------------------------------------------------------------- the link

class MqttLink:
    """The broker link the app starts once and feeds publishes; thread-safe."""

    def __init__(self, cfg: MqttConfig, device: Device, gpio: GpioConfig,
                 filters: Sequence[Filter], *, put: Callable[[Event, Callable[[], None]], None],
                 on_command: Callable[[str, str, float | None], None],
                 states: Callable[[], tuple[dict[str, bool], dict[str, bool]]]) -> None:
        """Build the client; no network I/O happens until `start()`.

        :param filters: (topic filter, QoS) of every MQTT trigger.
        :param put: puts an `mqtt.message` event on the bus with the callable that
            acknowledges it (QoS 1: called once the event's webhooks are durable).
        :param on_command: enqueues an output command (name, on|off|toggle, seconds).
        :param states: current (inputs name->active, outputs name->on), to seed the
            state topics published on connect.
        """
        self._put = put
        self._on_command = on_command
        self._states = states
        self._lock = threading.Lock()  # guards the deque, the caches, connect/flush
        self._snap = snapshot(cfg, device, gpio, filters)
        self._queue: deque[tuple[str, bytes, int, bool]] = deque()
        self._dropped = 0
        self.malformed = 0  # messages that could not be handled (logged and skipped)
        self._inputs: dict[str, bool] = {}
        self._outputs: dict[str, bool] = {}
        self._announced: list[Message] = []  # discovery configs on the broker now
        self._subscribed: dict[str, int] = {}
        self._pending_subs: set[int] = set()  # SUBSCRIBE mids not acknowledged yet
        self._connected = False
        self._since: float | None = None
        self._stopping = False
        self._offline_logged = False
        self._client = self._make_client(cfg)

    # ----------------------------------------------------------------- lifecycle

    def _make_client(self, cfg: MqttConfig) -> paho.Client:
        v5 = cfg.protocol == "5"
        # manual_ack: a QoS 1 message is PUBACKed only once its webhooks are on disk
        # (the dispatcher calls the ack after its fsynced commit); the session is
        # persistent, so the broker sends again whatever was not acknowledged
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                             clean_session=None if v5 else False,
                             protocol=paho.MQTTv5 if v5 else paho.MQTTv311, manual_ack=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            try:
                client.tls_set(ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file,
                               keyfile=cfg.tls.key_file)
            except (OSError, ValueError) as exc:
                raise ConfigError([f"mqtt.tls: {exc}"]) from None
            if cfg.tls.insecure:
                client.tls_insecure_set(True)
        client.will_set(f"{cfg.topic_prefix}/status", "offline", qos=CONTROL_QOS, retain=True)
        client.reconnect_delay_set(int(RECONNECT_MIN), int(RECONNECT_MAX))
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        """Start connecting in paho's thread and return at once (the broker may be down)."""
        cfg = self._snap.cfg
        self._stopping = False
        kwargs: dict[str, Any] = {}
        if cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY
            kwargs.update(clean_start=False, properties=props)
        self._client.connect_async(cfg.host, cfg.port, keepalive=max(1, int(cfg.keepalive)),
                                   **kwargs)
        self._client.loop_start()
        _LOG.info("MQTT: connecting to %s:%d as %r (MQTT %s)", cfg.host, cfg.port,
                  cfg.client_id, cfg.protocol)

    def stop(self, timeout: float = 2.0) -> None:
        """Publish "offline" retained, wait up to `timeout` for it, disconnect, end the thread."""
        self._shutdown(timeout, final=True)

    def _shutdown(self, timeout: float, final: bool) -> None:
        self._stopping = True
        with self._lock:
            was_connected, self._connected = self._connected, False
            self._since = time.time()
            left = len(self._queue)
        if was_connected:
            info = self._client.publish(self._snap.status_topic, "offline", qos=CONTROL_QOS,
                                        retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                _LOG.warning("MQTT: could not publish offline before stopping: %s", exc)
        if left and final:
            _LOG.warning("MQTT: %d queued publishes are dropped at shutdown (broker away)", left)
        self._client.disconnect()
        self._client.loop_stop()

    def reload(self, cfg: MqttConfig, device: Device, gpio: GpioConfig,
               filters: Sequence[Filter]) -> None:
        """Switch to a new config snapshot.

        Subscriptions are changed by difference, vanished entities get an empty
        retained discovery config and their state topics are cleared. Changed
        connection settings (host, credentials, client id, prefix...) need a new
        client: the link then stops and starts again.
        """
        new = snapshot(cfg, device, gpio, filters)
        old = self._snap
        if connection_key(old.cfg) != connection_key(cfg):
            _LOG.info("MQTT: connection settings changed, reconnecting")
            self._shutdown(2.0, final=False)  # the offline queue carries over
            self._snap = new
            with self._lock:
                self._prune_caches(gpio)
                self._subscribed = {}
            self._client = self._make_client(cfg)
            self.start()
            return
        seed = self._seed_states()
        with self._lock:
            self._snap = new
            gone_in = set(old.gpio.inputs) - set(gpio.inputs)
            gone_out = set(old.gpio.outputs) - set(gpio.outputs)
            self._prune_caches(gpio)
            if not self._connected:
                return  # on_connect subscribes, removes and announces from the new snapshot
            unsub = [f for f in self._subscribed if f not in new.subscriptions]
            sub = [(f, q) for f, q in new.subscriptions.items() if self._subscribed.get(f) != q]
            if unsub:
                self._client.unsubscribe(unsub)
            if sub:
                self._subscribe(sub)
            self._subscribed = dict(new.subscriptions)
            for name in sorted(gone_in):
                self._send(f"{old.prefix}/input/{name}", b"", CONTROL_QOS, True)
            for name in sorted(gone_out):
                self._send(f"{old.prefix}/output/{name}", b"", CONTROL_QOS, True)
            self._announce(new)
            self._publish_states(new, seed)

    # ----------------------------------------------------------------- publishing

    def publish(self, topic: str, payload: str | bytes, qos: int = 1,
                retain: bool = False) -> None:
        """Publish now when connected, else keep it (bounded) for the next connect.

        Raises CommandError for a topic with wildcards or a bad QoS.
        """
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise CommandError(f"QoS must be 0, 1 or 2, not {qos!r}")
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        with self._lock:
            self._send(topic, data, qos, retain)

    def input_state(self, name: str, active: bool) -> None:
        """Publish `<prefix>/input/<name>` ON/OFF retained (the latest is re-sent on connect)."""
        self._state("input", self._inputs, name, active)

    def output_state(self, name: str, on: bool) -> None:
        """Publish `<prefix>/output/<name>` ON/OFF retained (the latest is re-sent on connect)."""
        self._state("output", self._outputs, name, on)

    def _state(self, kind: str, latest: dict[str, bool], name: str, on: bool) -> None:
        with self._lock:
            latest[name] = on
            if self._connected:
                self._send(f"{self._snap.prefix}/{kind}/{name}", b"ON" if on else b"OFF",
                           self._snap.cfg.qos, True)

    def input_event(self, name: str, event_type: str, event_id: str) -> None:
        """Publish `<prefix>/input/<name>/event` {"event_type", "id"}, not retained.

        event_type is press, release, hold, click, double_click or long_press (what
        the Home Assistant event entity lists).
        """
        payload = json.dumps({"event_type": event_type, "id": event_id},
                             separators=(",", ":"))
        self.publish(f"{self._snap.prefix}/input/{name}/event", payload, self._snap.cfg.qos)

    def status(self) -> dict[str, Any]:
        """{"connected", "since", "queued", "dropped", "subscribed"} for the API.

        since: when the link last connected or disconnected (RFC 3339); subscribed:
        connected and every subscription acknowledged by the broker.
        """
        with self._lock:
            return {"connected": self._connected,
                    "subscribed": self._connected and not self._pending_subs,
                    "since": rfc3339(self._since) if self._since is not None else None,
                    "queued": len(self._queue), "dropped": self._dropped}

    def _send(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Hand to paho when connected, else queue; caller holds the lock."""
        if self._connected:
            info = self._client.publish(topic, data, qos, retain)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
                return  # the connection just dropped: paho keeps it and resends on reconnect
            if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
                _LOG.error("MQTT: publish to %s failed: %s", topic, paho.error_string(info.rc))
                return
        if len(self._queue) >= self._snap.cfg.queue_size:
            self._queue.popleft()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 100 == 0:
                _LOG.warning("MQTT: offline queue full (%d), dropped the oldest publish "
                             "(%d dropped so far)", self._snap.cfg.queue_size, self._dropped)
        self._queue.append((topic, data, qos, retain))

    def _seed_states(self) -> tuple[dict[str, bool], dict[str, bool]]:
        """The app's current states (called without our lock: it may take its own)."""
        try:
            return self._states()
        except Exception:
            _LOG.exception("MQTT: the states() callback failed; publishing cached states")
            return {}, {}

    def _publish_states(self, snap: Snapshot,
                        seed: tuple[dict[str, bool], dict[str, bool]]) -> None:
        """Publish every known input/output state retained; caller holds the lock.

        Our cache (updated by input_state/output_state) is newer than the seed, so
        it wins; the seed fills names the app has not reported yet.
        """
        for name in snap.gpio.inputs:
            value = self._inputs.get(name, seed[0].get(name))
            if value is not None:
                self._inputs[name] = value
                self._send(f"{snap.prefix}/input/{name}", b"ON" if value else b"OFF",
                           snap.cfg.qos, True)
        for name in snap.gpio.outputs:
            value = self._outputs.get(name, seed[1].get(name))
            if value is not None:
                self._outputs[name] = value
                self._send(f"{snap.prefix}/output/{name}", b"ON" if value else b"OFF",
                           snap.cfg.qos, True)

    def _announce(self, snap: Snapshot) -> None:
        """Remove vanished discovery configs, (re)send current ones; caller holds the lock."""
        for topic, payload in ha.removal_messages(self._announced, snap.discovery):
            self._send(topic, payload.encode(), CONTROL_QOS, True)
        for topic, payload in snap.discovery:
            self._send(topic, payload.encode(), CONTROL_QOS, True)
        self._announced = list(snap.discovery)

    def _prune_caches(self, gpio: GpioConfig) -> None:
        # in place: _state() may hold a reference to either dict
        for latest, known in ((self._inputs, gpio.inputs), (self._outputs, gpio.outputs)):
            for name in [n for n in latest if n not in known]:
                del latest[name]

    # ----------------------------------------------------------------- paho callbacks

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        try:
            if reason.is_failure:
                _LOG.error("MQTT: broker refused the connection: %s", reason)
                return
            if self._stopping:
                return
            seed = self._seed_states()
            with self._lock:
                snap = self._snap
                self._send_now(snap.status_topic, b"online", CONTROL_QOS, True)
                self._pending_subs.clear()
                if snap.subscriptions:
                    self._subscribe(list(snap.subscriptions.items()))
                self._subscribed = dict(snap.subscriptions)
                flushed = len(self._queue)
                while self._queue:
                    self._send_now(*self._queue.popleft())
                self._connected = True
                self._since = time.time()
                self._offline_logged = False
                self._announce(snap)
                self._publish_states(snap, seed)
            _LOG.info("MQTT: connected to %s:%d (session present: %s, %d queued publishes "
                      "sent, %d subscriptions)", snap.cfg.host, snap.cfg.port,
                      flags.session_present, flushed, len(snap.subscriptions))
        except Exception:
            _LOG.exception("MQTT: on_connect failed")

    def _subscribe(self, filters: list[Filter]) -> None:
        """Subscribe and remember the mid until its SUBACK; caller holds the lock."""
        rc, mid = self._client.subscribe(filters)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subs.add(mid)

    def _send_now(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        info = self._client.publish(topic, data, qos, retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            _LOG.error("MQTT: publish to %s failed: %s", topic, paho.error_string(info.rc))

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if not self._offline_logged:
            self._offline_logged = True
            cfg = self._snap.cfg
            _LOG.warning("MQTT: broker %s:%d not reachable; retrying (every %g s at most), "
                         "publishes are queued meanwhile", cfg.host, cfg.port, RECONNECT_MAX)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        was = self._connected
        self._connected = False  # no lock: a racing publish() is safe either way (see _send)
        if was:
            self._since = time.time()
        if not self._stopping and not self._offline_logged:
            self._offline_logged = True
            _LOG.warning("MQTT: lost the broker connection (%s); reconnecting", reason)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        with self._lock:  # reload() adds the mid under the lock, maybe after the SUBACK came
            self._pending_subs.discard(mid)
        bad = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if bad:
            _LOG.error("MQTT: the broker refused subscription(s) (mid %d): %s", mid,
                       ", ".join(bad))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        """Translate and enqueue; acknowledge at once unless an event now owns the ack."""
        queued = False
        try:
            queued = self._route(msg)
        except Exception as exc:  # a bad message is logged and skipped, never a traceback storm
            self.malformed += 1
            _LOG.warning("MQTT: a message could not be handled (skipped): %s: %s",
                         type(exc).__name__, exc)
        if not queued:
            self._ack(msg.mid, msg.qos)

    def _ack(self, mid: int, qos: int) -> None:
        if qos:
            try:
                self._client.ack(mid, qos)
            except Exception as exc:  # the link went away: the broker sends it again
                _LOG.warning("MQTT: could not acknowledge message %d: %s", mid, exc)

    def _route(self, msg: paho.MQTTMessage) -> bool:
        """Translate one message into a command, a re-announce and/or an event; True
        when an event was queued (its ack then goes with it, sent once it is durable)."""
        snap = self._snap
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            _LOG.warning("MQTT: dropped a message whose topic is not UTF-8")
            return False
        payload: bytes = msg.payload
        if len(payload) > snap.cfg.max_payload:
            _LOG.warning("MQTT: dropped a %d-byte message on %s (over max_payload %d)",
                         len(payload), topic, snap.cfg.max_payload)
            return False
        retain = bool(msg.retain)
        cmd_head = snap.command_head
        if topic.startswith(cmd_head) and topic.endswith("/set"):
            name = topic[len(cmd_head):-len("/set")]
            if name and "/" not in name:
                self._command(snap, name, payload, retain, topic)
        elif (topic == snap.ha_status_topic and snap.cfg.ha_discovery and not retain
              and payload.strip().lower() == b"online"):
            self._reannounce()  # a retained "online" arrives on every subscribe: skip it
        if not snap.is_trigger(topic):
            return False
        value, is_b64 = decode_payload(payload)
        data: dict[str, Any] = {"topic": topic, "payload": value, "retain": retain,
                                "qos": msg.qos}
        if is_b64:
            data["payload_base64"] = True
        mid, qos = msg.mid, msg.qos
        self._put(make_event("mqtt.message", source=topic, data=data),
                  lambda: self._ack(mid, qos))
        return True

    def _command(self, snap: Snapshot, name: str, payload: bytes, retain: bool,
                 topic: str) -> None:
        if name not in snap.gpio.outputs:
            _LOG.warning("MQTT: %s: no output named %r; command ignored", topic, name)
            return
        try:
            state, seconds = parse_command(payload)
        except ValueError as exc:
            _LOG.warning("MQTT: %s: malformed command %r ignored: %s", topic,
                         payload[:64], exc)
            return
        if retain and state == "toggle":
            # A retained TOGGLE would flip the output again on every reconnect.
            _LOG.warning("MQTT: %s: retained TOGGLE ignored (publish commands unretained)",
                         topic)
            return
        try:
            self._on_command(name, state, seconds)
        except Exception as exc:  # the app refused it (e.g. min_interval): log, never raise
            _LOG.warning("MQTT: %s: command %s refused: %s", topic, state, exc)

    def _reannounce(self) -> None:
        """Home Assistant (re)started: send discovery and states again."""
        seed = self._seed_states()
        with self._lock:
            if not self._connected:
                return
            snap = self._snap
            self._announce(snap)
            self._publish_states(snap, seed)
        _LOG.info("MQTT: Home Assistant is online, discovery re-sent (%d configs)",
                  len(snap.discovery))
