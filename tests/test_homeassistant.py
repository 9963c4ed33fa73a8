"""Home Assistant discovery messages: valid JSON with the keys HA requires, per component."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from edgehook import __version__
from edgehook import homeassistant as ha
from edgehook.config import Device, Gestures, GpioConfig, InputConfig, OutputConfig

# Required keys, from Home Assistant's MQTT docs and the voluptuous schemas behind them
# (homeassistant/components/mqtt/...). A discovery config missing one is rejected by HA.
REQUIRED = {
    # https://www.home-assistant.io/integrations/binary_sensor.mqtt/  (MQTT_RO_SCHEMA)
    "binary_sensor": {"state_topic"},
    # https://www.home-assistant.io/integrations/event.mqtt/  (event.py: event_types required)
    "event": {"state_topic", "event_types"},
    # https://www.home-assistant.io/integrations/switch.mqtt/  (MQTT_RW_SCHEMA)
    "switch": {"command_topic"},
    # https://www.home-assistant.io/integrations/light.mqtt/  (default/basic schema)
    "light": {"command_topic"},
    # https://www.home-assistant.io/integrations/device_trigger.mqtt/
    # (device_trigger.py TRIGGER_DISCOVERY_SCHEMA)
    "device_automation": {"automation_type", "topic", "type", "subtype", "device"},
}
# https://www.home-assistant.io/integrations/mqtt/#discovery-messages : a device needs
# identifiers or connections; an origin needs a name (mqtt/schemas.py).
ENTITY_COMPONENTS = {"binary_sensor", "event", "switch", "light"}
TOPIC = re.compile(r"^homeassistant/(?P<component>[a-z_]+)/(?P<node>[a-zA-Z0-9_-]+)/"
                   r"(?P<object>[a-zA-Z0-9_-]+)/config$")

DEVICE = Device(id="front-door", name="Front door")
PREFIX = "edgehook/front-door"


def gpio(**inputs_and_outputs: InputConfig | OutputConfig) -> GpioConfig:
    ins = {k: v for k, v in inputs_and_outputs.items() if isinstance(v, InputConfig)}
    outs = {k: v for k, v in inputs_and_outputs.items() if isinstance(v, OutputConfig)}
    return GpioConfig(backend="mock", inputs=ins, outputs=outs)


FULL = gpio(
    doorbell=InputConfig("doorbell", 17, cls="doorbell", hold=2.0,
                         gestures=Gestures(0.4, 1.0)),
    button=InputConfig("button", 18, cls="button"),
    motion=InputConfig("motion", 22, cls="motion"),
    garage_door=InputConfig("garage_door", 23, cls="garage_door"),
    plain=InputConfig("plain", 24, cls="none"),
    porch_light=OutputConfig("porch_light", 27, cls="light"),
    relay=OutputConfig("relay", 5, cls="switch"),
)


def messages(g: GpioConfig = FULL) -> list[tuple[str, str, str, dict]]:
    """(component, object id, topic, parsed payload) for every message."""
    out = []
    for topic, payload in ha.discovery_messages(DEVICE, g, PREFIX, "homeassistant"):
        m = TOPIC.match(topic)
        assert m, f"bad discovery topic {topic}"
        assert m["node"] == DEVICE.id
        out.append((m["component"], m["object"], topic, json.loads(payload)))
    return out


def by(component: str, g: GpioConfig = FULL) -> dict[str, dict]:
    return {obj: cfg for comp, obj, _t, cfg in messages(g) if comp == component}


def test_module_required_keys_match_the_docs() -> None:
    for component, keys in REQUIRED.items():
        assert keys <= set(ha.REQUIRED_KEYS[component]["keys"]), component
        assert ha.REQUIRED_KEYS[component]["doc"].startswith("https://www.home-assistant.io/")


def test_every_message_has_the_required_keys() -> None:
    seen = set()
    for component, obj, topic, cfg in messages():
        seen.add(component)
        missing = REQUIRED[component] - set(cfg)
        assert not missing, f"{topic}: missing {missing}"
        assert cfg["device"]["identifiers"] == ["edgehook_front-door"]
        assert cfg["device"]["name"] == "Front door"
        assert cfg["device"]["model"] == "edgehook"
        assert cfg["device"]["sw_version"] == __version__
        assert cfg["origin"]["name"] == "edgehook"
        assert cfg["origin"]["sw_version"] == __version__
        assert cfg["origin"]["support_url"].startswith("https://")
        if component in ENTITY_COMPONENTS:
            assert cfg["availability_topic"] == f"{PREFIX}/status"
            assert (cfg["payload_available"], cfg["payload_not_available"]) == \
                ("online", "offline")
            assert cfg["unique_id"] == f"edgehook_front-door_{obj}"
            # HA 2025.10+: default_entity_id replaces object_id (removed in 2026.4)
            assert "object_id" not in cfg
            assert re.fullmatch(rf"{component}\.[a-z0-9_]+", cfg["default_entity_id"])
    assert seen == set(REQUIRED)


def test_unique_ids_and_entity_ids_are_unique() -> None:
    entities = [cfg for comp, _o, _t, cfg in messages() if comp in ENTITY_COMPONENTS]
    uids = [c["unique_id"] for c in entities]
    assert len(uids) == len(set(uids))
    eids = [c["default_entity_id"] for c in entities]
    assert len(eids) == len(set(eids))
    topics = [t for _c, _o, t, _p in messages()]
    assert len(topics) == len(set(topics))


def test_binary_sensors_with_known_device_classes() -> None:
    sensors = by("binary_sensor")
    assert set(sensors) == {"doorbell", "button", "motion", "garage_door", "plain"}
    for name, cfg in sensors.items():
        assert cfg["state_topic"] == f"{PREFIX}/input/{name}"
        assert (cfg["payload_on"], cfg["payload_off"]) == ("ON", "OFF")
    assert sensors["motion"]["device_class"] == "motion"
    assert sensors["garage_door"]["device_class"] == "garage_door"
    for name in ("doorbell", "button", "plain"):  # not binary_sensor device classes in HA
        assert "device_class" not in sensors[name]


@pytest.mark.parametrize(("inp", "expected"), [
    (InputConfig("b", 1, cls="button"), ["press", "release"]),
    (InputConfig("b", 1, cls="doorbell", hold=2.0), ["press", "release", "hold"]),
    (InputConfig("b", 1, cls="button", gestures=Gestures()),
     ["press", "release", "click", "double_click", "long_press"]),
    (InputConfig("b", 1, cls="doorbell", hold=1.5, gestures=Gestures()),
     ["press", "release", "hold", "click", "double_click", "long_press"]),
])
def test_event_types_follow_the_input_config(inp: InputConfig, expected: list[str]) -> None:
    events = by("event", gpio(b=inp))
    assert events["b_event"]["event_types"] == expected


def test_event_entities_only_for_doorbells_and_buttons() -> None:
    events = by("event")
    assert set(events) == {"doorbell_event", "button_event"}
    assert events["doorbell_event"]["device_class"] == "doorbell"
    assert events["button_event"]["device_class"] == "button"
    assert events["doorbell_event"]["state_topic"] == f"{PREFIX}/input/doorbell/event"
    assert events["doorbell_event"]["unique_id"] == "edgehook_front-door_doorbell_event"


def test_outputs_are_switches_or_lights() -> None:
    lights, switches = by("light"), by("switch")
    assert set(lights) == {"porch_light"} and set(switches) == {"relay"}
    for name, cfg in {**lights, **switches}.items():
        assert cfg["command_topic"] == f"{PREFIX}/output/{name}/set"
        assert cfg["state_topic"] == f"{PREFIX}/output/{name}"
        assert (cfg["payload_on"], cfg["payload_off"]) == ("ON", "OFF")
    assert "schema" not in lights["porch_light"]  # the default (basic) schema


def test_device_triggers_for_gestures() -> None:
    triggers = by("device_automation")
    assert set(triggers) == {"doorbell_click", "doorbell_double_click", "doorbell_long_press"}
    types = {obj: cfg["type"] for obj, cfg in triggers.items()}
    assert types == {"doorbell_click": "button_short_press",
                     "doorbell_double_click": "button_double_press",
                     "doorbell_long_press": "button_long_press"}
    pairs = [(c["type"], c["subtype"]) for c in triggers.values()]
    assert len(pairs) == len(set(pairs))  # HA: type+subtype unique per device
    for obj, cfg in triggers.items():
        assert cfg["automation_type"] == "trigger"
        assert cfg["topic"] == f"{PREFIX}/input/doorbell/event"
        assert cfg["subtype"] == "doorbell"
        # the event payload is {"event_type": ..., "id": ...}: match on the type only
        assert cfg["value_template"] == "{{ value_json.event_type }}"
        assert cfg["payload"] == obj.removeprefix("doorbell_")


def test_no_inputs_no_outputs_no_messages() -> None:
    assert ha.discovery_messages(DEVICE, GpioConfig(), PREFIX, "homeassistant") == []


def test_custom_discovery_prefix() -> None:
    msgs = ha.discovery_messages(DEVICE, FULL, PREFIX, "ha-test")
    assert msgs and all(t.startswith("ha-test/") for t, _ in msgs)


def test_removal_messages_for_vanished_entities() -> None:
    old = ha.discovery_messages(DEVICE, FULL, PREFIX, "homeassistant")
    smaller = gpio(**{k: v for k, v in {**FULL.inputs, **FULL.outputs}.items()
                      if k not in ("doorbell", "relay")})
    new = ha.discovery_messages(DEVICE, smaller, PREFIX, "homeassistant")
    removed = ha.removal_messages(old, new)
    assert all(payload == "" for _t, payload in removed)
    assert {t for t, _ in removed} == {
        "homeassistant/binary_sensor/front-door/doorbell/config",
        "homeassistant/event/front-door/doorbell_event/config",
        "homeassistant/device_automation/front-door/doorbell_click/config",
        "homeassistant/device_automation/front-door/doorbell_double_click/config",
        "homeassistant/device_automation/front-door/doorbell_long_press/config",
        "homeassistant/switch/front-door/relay/config",
    }
    assert ha.removal_messages(new, new) == []
    assert ha.removal_messages(old, []) == [(t, "") for t, _ in old]


def test_an_output_changing_class_removes_the_old_component() -> None:
    old = ha.discovery_messages(DEVICE, gpio(r=OutputConfig("r", 5, cls="switch")), PREFIX,
                                "homeassistant")
    new = ha.discovery_messages(DEVICE, gpio(r=OutputConfig("r", 5, cls="light")), PREFIX,
                                "homeassistant")
    assert ha.removal_messages(old, new) == [("homeassistant/switch/front-door/r/config", "")]


def test_module_is_pure() -> None:
    """No I/O: the module imports only the stdlib's json/re/typing and our pure modules."""
    src = Path(ha.__file__).read_text()
    allowed = {"__future__", "json", "re", "typing", "edgehook", "edgehook.config",
               "edgehook.events", "edgehook.errors"}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["edgehook" + ("." + node.module if node.module else "")
                     if node.level else node.module or ""]
        else:
            continue
        for name in names:
            assert name in allowed, f"homeassistant.py imports {name}"
