"""Home Assistant MQTT discovery messages, built from the config (pure: no I/O).

`mqtt.py` publishes what this module returns, retained, on every connect and when
Home Assistant says `online` again; keeping the messages a pure function of the
config makes them testable without a broker and lets a reload compute exactly
which entities vanished (`removal_messages`).

Entity ids: Home Assistant 2025.10 deprecated `object_id` in discovery payloads in
favour of `default_entity_id` (`<domain>.<object id>`); `object_id` stops working
in 2026.4. We send only `default_entity_id`: older Home Assistant versions drop
the unknown key (their discovery schemas use REMOVE_EXTRA) and derive the entity
id from the device and entity names instead, which is a fine fallback.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import __version__
from .config import Device, GpioConfig, InputConfig, OutputConfig

MANUFACTURER = "edgehook"
MODEL = "edgehook"
SUPPORT_URL = "https://github.com/edgehook/edgehook"

#: Keys Home Assistant requires in a discovery payload, per component, with the
#: documentation page and schema they come from (tests check every message).
REQUIRED_KEYS: dict[str, dict[str, Any]] = {
    "binary_sensor": {
        "keys": ("state_topic",),
        "doc": "https://www.home-assistant.io/integrations/binary_sensor.mqtt/",
        "schema": "homeassistant/components/mqtt/config.py MQTT_RO_SCHEMA",
    },
    "event": {
        "keys": ("state_topic", "event_types"),
        "doc": "https://www.home-assistant.io/integrations/event.mqtt/",
        "schema": "homeassistant/components/mqtt/event.py _PLATFORM_SCHEMA_BASE",
    },
    "switch": {
        "keys": ("command_topic",),
        "doc": "https://www.home-assistant.io/integrations/switch.mqtt/",
        "schema": "homeassistant/components/mqtt/config.py MQTT_RW_SCHEMA",
    },
    "light": {
        "keys": ("command_topic",),
        "doc": "https://www.home-assistant.io/integrations/light.mqtt/",
        "schema": "homeassistant/components/mqtt/light/schema_basic.py",
    },
    "device_automation": {
        "keys": ("automation_type", "topic", "type", "subtype", "device"),
        "doc": "https://www.home-assistant.io/integrations/device_trigger.mqtt/",
        "schema": "homeassistant/components/mqtt/device_trigger.py TRIGGER_DISCOVERY_SCHEMA",
    },
}
#: A device needs at least one of these; an origin needs a name
#: (homeassistant/components/mqtt/schemas.py).
DEVICE_IDENTIFYING_KEYS = ("identifiers", "connections")
ORIGIN_REQUIRED_KEYS = ("name",)

#: Input classes Home Assistant knows as binary_sensor device classes
#: (https://www.home-assistant.io/integrations/binary_sensor/#device-class).
BINARY_SENSOR_CLASSES = frozenset({
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door",
    "garage_door", "gas", "heat", "light", "lock", "moisture", "motion", "moving",
    "occupancy", "opening", "plug", "power", "presence", "problem", "running", "safety",
    "smoke", "sound", "tamper", "update", "vibration", "window",
})
#: Input classes that also get an `event` entity, and its device class.
EVENT_CLASSES = {"doorbell": "doorbell", "button": "button"}
#: Gesture event -> Home Assistant device trigger type (frontend-supported names).
GESTURE_TRIGGER_TYPES = {
    "click": "button_short_press",
    "double_click": "button_double_press",
    "long_press": "button_long_press",
}

Message = tuple[str, str]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_") or "x"


def _label(name: str) -> str:
    text = re.sub(r"[_-]+", " ", name).strip()
    return text[:1].upper() + text[1:] if text else name


def event_types(inp: InputConfig) -> list[str]:
    """What `<prefix>/input/<name>/event` can carry for this input (the event entity lists it)."""
    types = ["press", "release"]
    if inp.hold:
        types.append("hold")
    if inp.gestures:
        types += ["click", "double_click", "long_press"]
    return types


def device_block(device: Device) -> dict[str, Any]:
    """The one Home Assistant device every entity belongs to."""
    return {"identifiers": [f"edgehook_{device.id}"], "name": device.name,
            "manufacturer": MANUFACTURER, "model": MODEL, "sw_version": __version__}


def origin_block() -> dict[str, Any]:
    """Who published the discovery config (shown in HA's logs and MQTT info)."""
    return {"name": "edgehook", "sw_version": __version__, "support_url": SUPPORT_URL}


class _Builder:
    def __init__(self, device: Device, topic_prefix: str, ha_prefix: str) -> None:
        self.device = device
        self.prefix = topic_prefix.rstrip("/")
        self.ha_prefix = ha_prefix.rstrip("/")
        self.dev = device_block(device)
        self.origin = origin_block()
        self.out: list[Message] = []

    def add(self, component: str, object_id: str, payload: dict[str, Any]) -> None:
        topic = f"{self.ha_prefix}/{component}/{self.device.id}/{object_id}/config"
        self.out.append((topic, json.dumps(payload, separators=(",", ":"))))

    def entity(self, component: str, key: str, name: str) -> dict[str, Any]:
        unique = f"edgehook_{self.device.id}_{key}"
        return {
            "name": name,
            "unique_id": unique,
            "default_entity_id": f"{component}.{_slug(self.device.id)}_{_slug(key)}",
            "availability_topic": f"{self.prefix}/status",
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": self.dev,
            "origin": self.origin,
        }

    def add_input(self, inp: InputConfig) -> None:
        state = f"{self.prefix}/input/{inp.name}"
        cfg = self.entity("binary_sensor", inp.name, _label(inp.name))
        cfg.update(state_topic=state, payload_on="ON", payload_off="OFF")
        if inp.cls in BINARY_SENSOR_CLASSES:
            cfg["device_class"] = inp.cls
        self.add("binary_sensor", inp.name, cfg)
        if inp.cls in EVENT_CLASSES:
            ev = self.entity("event", f"{inp.name}_event", f"{_label(inp.name)} event")
            ev.update(state_topic=f"{state}/event", event_types=event_types(inp),
                      device_class=EVENT_CLASSES[inp.cls])
            self.add("event", f"{inp.name}_event", ev)
        if inp.gestures:
            for gesture, trigger_type in GESTURE_TRIGGER_TYPES.items():
                self.add("device_automation", f"{inp.name}_{gesture}", {
                    "automation_type": "trigger",
                    "topic": f"{state}/event",
                    "type": trigger_type,
                    "subtype": inp.name,
                    "payload": gesture,
                    "value_template": "{{ value_json.event_type }}",
                    "device": self.dev,
                    "origin": self.origin,
                })

    def add_output(self, out: OutputConfig) -> None:
        component = "light" if out.cls == "light" else "switch"
        state = f"{self.prefix}/output/{out.name}"
        cfg = self.entity(component, out.name, _label(out.name))
        cfg.update(command_topic=f"{state}/set", state_topic=state,
                   payload_on="ON", payload_off="OFF")
        if component == "switch":
            cfg.update(state_on="ON", state_off="OFF")
        self.add(component, out.name, cfg)


def discovery_messages(device: Device, gpio: GpioConfig, topic_prefix: str,
                       ha_prefix: str) -> list[Message]:
    """All discovery configs (topic, JSON) for this device; publish them retained.

    Each input is a `binary_sensor`, a doorbell/button input also an `event`
    entity, an input with gestures also three device triggers; each output is a
    `switch` or a `light`.
    """
    b = _Builder(device, topic_prefix, ha_prefix)
    for inp in gpio.inputs.values():
        b.add_input(inp)
    for out in gpio.outputs.values():
        b.add_output(out)
    return b.out


def removal_messages(old: list[Message], new: list[Message]) -> list[Message]:
    """Empty retained configs for topics announced before but not any more.

    An empty retained payload is how Home Assistant removes a discovered entity
    (and clears the retained config from the broker).
    """
    keep = {topic for topic, _ in new}
    seen: set[str] = set()
    out: list[Message] = []
    for topic, _ in old:
        if topic not in keep and topic not in seen:
            seen.add(topic)
            out.append((topic, ""))
    return out
