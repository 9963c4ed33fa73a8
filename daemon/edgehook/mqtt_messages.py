"""Pure MQTT helpers: which topic filters cover which, what a payload carries, what an
output command says, which topics may be published to, and the link's snapshot of
one config (topics, subscriptions, discovery). No client, no I/O."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from paho.mqtt.matcher import MQTTMatcher

from . import homeassistant as ha
from .config import Device, GpioConfig, MqttConfig, parse_duration
from .errors import CommandError

_COMMAND_WORDS = ("on", "off", "toggle")

Filter = tuple[str, int]


def filter_covers(a: str, b: str) -> bool:
    """True when every topic that matches filter `b` also matches filter `a`."""
    if b.startswith("$") and a[:1] in ("+", "#"):
        return False  # wildcards at the first level never match $-topics
    al, bl = a.split("/"), b.split("/")
    for i, x in enumerate(al):
        if x == "#":
            return len(bl) >= i  # "a/#" also matches "a" itself
        if i >= len(bl) or bl[i] == "#":
            return False
        if x != "+" and x != bl[i]:
            return False
    return len(al) == len(bl)


def minimal_filters(filters: Iterable[Filter]) -> dict[str, int]:
    """Drop filters another one already covers, keeping the highest QoS.

    Overlapping subscriptions make mosquitto deliver a message once per matching
    subscription; with a trigger on `#` every `.../set` command would then run
    twice (a TOGGLE would undo itself).
    """
    qos: dict[str, int] = {}
    for flt, q in filters:
        qos[flt] = max(q, qos.get(flt, 0))
    keep = {f: q for f, q in qos.items()
            if not any(g != f and filter_covers(g, f) for g in qos)}
    for f, q in qos.items():
        for g in keep:
            if filter_covers(g, f):
                keep[g] = max(keep[g], q)
    return keep


def decode_payload(payload: bytes) -> tuple[Any, bool]:
    """Parsed JSON when it parses, else UTF-8 text, else base64; the flag says base64."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), True
    try:
        return json.loads(text, parse_constant=_reject_constant), False
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse: text
        return text, False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity would not survive a webhook


def parse_command(payload: bytes) -> tuple[str, float | None]:
    """Parse an `output/<name>/set` payload into ('on'|'off'|'toggle', seconds or None).

    Accepts ON, OFF, TOGGLE (any case) or {"state": "ON", "for": "30s"}; raises
    ValueError with a reason otherwise.
    """
    text = payload.decode("utf-8").strip()
    if text.lower() in _COMMAND_WORDS:
        return text.lower(), None
    try:
        obj = json.loads(text)
    except ValueError:
        raise ValueError("expected ON, OFF, TOGGLE or {\"state\": \"ON\", \"for\": \"30s\"}") \
            from None
    if isinstance(obj, str) and obj.strip().lower() in _COMMAND_WORDS:
        return obj.strip().lower(), None
    if not isinstance(obj, dict):
        raise ValueError("expected ON, OFF, TOGGLE or a JSON object with a state")
    unknown = set(obj) - {"state", "for"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    state = obj.get("state")
    if not isinstance(state, str) or state.strip().lower() not in _COMMAND_WORDS:
        raise ValueError("state must be ON, OFF or TOGGLE")
    duration = obj.get("for")
    seconds = parse_duration(duration) if duration is not None else None
    return state.strip().lower(), seconds


def check_topic(topic: str) -> None:
    if not topic or any(c in topic for c in "+#\0"):
        raise CommandError(f"cannot publish to {topic!r}: a topic must be non-empty and "
                           "have no + or #")


Message = tuple[str, str]


def connection_key(cfg: MqttConfig) -> tuple[Any, ...]:
    """The settings that need a new client (and connection) when they change."""
    return (cfg.host, cfg.port, cfg.username, cfg.password, cfg.tls, cfg.client_id,
            cfg.keepalive, cfg.protocol, cfg.topic_prefix)


@dataclass(frozen=True)
class Snapshot:
    """Everything derived from one config, built beside the old one and swapped whole."""

    cfg: MqttConfig
    device: Device
    gpio: GpioConfig
    triggers: MQTTMatcher  # trigger filters only
    subscriptions: dict[str, int]  # what we subscribe (minimal cover)
    discovery: list[Message]  # empty when discovery is off
    # topic -> whether a trigger matches it (see is_trigger)
    _trigger_topics: dict[str, bool] = field(default_factory=dict, repr=False,
                                             compare=False)

    @property
    def prefix(self) -> str:
        return self.cfg.topic_prefix

    @property
    def status_topic(self) -> str:
        return f"{self.cfg.topic_prefix}/status"

    # (cached_property: the link reads these for every message it gets)
    @cached_property
    def ha_status_topic(self) -> str:
        return f"{self.cfg.ha_prefix}/status"

    @cached_property
    def command_head(self) -> str:
        """What an output command's topic starts with: ``<prefix>/output/``."""
        return f"{self.cfg.topic_prefix}/output/"

    def is_trigger(self, topic: str) -> bool:
        """True when a trigger filter matches `topic`.

        Remembered per topic: devices publish to the same few topics over and over,
        and paho's matcher walks its tree with a generator for every message. The
        answer cannot change (a reload makes a new snapshot); the memory is bounded.
        """
        hit = self._trigger_topics.get(topic)
        if hit is None:
            hit = next(self.triggers.iter_match(topic), None) is not None
            if len(self._trigger_topics) >= 1024:
                self._trigger_topics.clear()
            self._trigger_topics[topic] = hit
        return hit


def snapshot(cfg: MqttConfig, device: Device, gpio: GpioConfig,
              filters: Sequence[Filter]) -> Snapshot:
    matcher = MQTTMatcher()
    for flt, _qos in filters:
        matcher[flt] = flt
    own: list[Filter] = [(f"{cfg.topic_prefix}/output/+/set", cfg.qos)]
    if cfg.ha_discovery:
        own.append((f"{cfg.ha_prefix}/status", cfg.qos))
    subs = minimal_filters([*filters, *own])
    disc = (ha.discovery_messages(device, gpio, cfg.topic_prefix, cfg.ha_prefix)
            if cfg.ha_discovery else [])
    return Snapshot(cfg, device, gpio, matcher, subs, disc)
