"""The MQTT link against a real mosquitto: triggers, commands, states, outages, sessions."""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from broker import Mosquitto, MqttProbe, mosquitto, retained, wait_until  # noqa: F401
from edgehook import mqtt as mqtt_mod
from edgehook.config import (
    Device,
    Gestures,
    GpioConfig,
    InputConfig,
    MqttConfig,
    OutputConfig,
    load_config,
)
from edgehook.events import Event
from edgehook.mqtt import MqttLink
from edgehook.mqtt_messages import (
    decode_payload,
    filter_covers,
    minimal_filters,
    parse_command,
    snapshot,
)

DEVICE = Device(id="testdev", name="Test device")
PREFIX = "edgehook/testdev"
GPIO = GpioConfig(
    backend="mock",
    inputs={"doorbell": InputConfig("doorbell", 17, cls="doorbell", gestures=Gestures()),
            "motion": InputConfig("motion", 22, cls="motion")},
    outputs={"porch_light": OutputConfig("porch_light", 27, cls="light"),
             "relay": OutputConfig("relay", 5)},
)
ROOT = Path(__file__).resolve().parent.parent


def mqtt_cfg(broker: Mosquitto, **kw: object) -> MqttConfig:
    base = dict(host=broker.host, port=broker.port, topic_prefix=PREFIX,
                client_id=f"edgehook-test-{uuid.uuid4().hex[:8]}", keepalive=10.0)
    base.update(kw)
    return MqttConfig(**base)  # type: ignore[arg-type]


class Harness:
    """A MqttLink wired to queues instead of the app."""

    def __init__(self, cfg: MqttConfig, gpio: GpioConfig = GPIO,
                 filters: list[tuple[str, int]] | None = None,
                 device: Device = DEVICE) -> None:
        self.cfg = cfg
        self.events: queue.Queue[Event] = queue.Queue()
        self.commands: queue.Queue[tuple[str, str, float | None]] = queue.Queue()
        self.inputs = {"doorbell": False, "motion": True}
        self.outputs = {"porch_light": False, "relay": True}
        self.link = MqttLink(cfg, device, gpio, filters if filters is not None else [],
                             put=self.events.put,
                             on_command=lambda n, s, f: self.commands.put((n, s, f)),
                             states=lambda: (dict(self.inputs), dict(self.outputs)))

    def start(self, wait: bool = True) -> Harness:
        self.link.start()
        if wait:
            self.wait_subscribed()
        return self

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        wait_until(lambda: self.link.status()["subscribed"], timeout, what="link subscribed")

    def event(self, timeout: float = 5.0) -> Event:
        return self.events.get(timeout=timeout)

    def command(self, timeout: float = 5.0) -> tuple[str, str, float | None]:
        return self.commands.get(timeout=timeout)


@pytest.fixture
def make_link() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*args: object, **kw: object) -> Harness:
        h = Harness(*args, **kw)  # type: ignore[arg-type]
        made.append(h)
        return h

    yield make
    for h in made:
        h.link.stop(timeout=0.5)


@pytest.fixture
def probe(mosquitto: Mosquitto) -> Iterator[MqttProbe]:  # noqa: F811
    with MqttProbe(mosquitto) as p:
        yield p


# --------------------------------------------------------------------------- pure parts

def test_snapshot_knows_its_trigger_topics_and_command_head() -> None:
    cfg = MqttConfig(host="127.0.0.1", port=1883, topic_prefix=PREFIX)
    snap = snapshot(cfg, DEVICE, GPIO, [("sensors/+/temp", 1), ("$SYS/#", 0)])
    for _ in range(2):  # the second time from memory
        assert snap.is_trigger("sensors/kitchen/temp")
        assert not snap.is_trigger("sensors/kitchen/humidity")
        assert not snap.is_trigger("sensors/temp")
        assert snap.is_trigger("$SYS/broker/uptime")
    assert snap.command_head == f"{PREFIX}/output/"
    assert snap.ha_status_topic == f"{cfg.ha_prefix}/status"


def test_filter_covers_and_minimal_filters() -> None:
    assert filter_covers("#", "a/b")
    assert filter_covers("a/#", "a")
    assert filter_covers("a/+/c", "a/b/c")
    assert filter_covers("+/+", "+/b")
    assert not filter_covers("a/+", "a/#")
    assert not filter_covers("a/b", "a/+")
    assert not filter_covers("#", "$SYS/x")
    assert minimal_filters([("a/#", 0), ("a/+/s", 1), ("b", 0), ("b", 2)]) == {"a/#": 1, "b": 2}


@pytest.mark.parametrize(("raw", "expected"), [
    (b"ON", ("on", None)), (b"off", ("off", None)), (b" Toggle\n", ("toggle", None)),
    (b'{"state": "ON", "for": "30s"}', ("on", 30.0)), (b'{"state": "off"}', ("off", None)),
    (b'{"state": "on", "for": 90}', ("on", 90.0)), (b'"ON"', ("on", None)),
])
def test_parse_command_accepts(raw: bytes, expected: tuple[str, float | None]) -> None:
    assert parse_command(raw) == expected


@pytest.mark.parametrize("raw", [b"", b"BLINK", b"{bad", b'{"state": "dim"}', b"[1]",
                                 b'{"state": "ON", "for": "soon"}', b'{"state": "ON", "x": 1}',
                                 b"\xff\xfe"])
def test_parse_command_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_command(raw)


def test_decode_payload() -> None:
    assert decode_payload(b'{"a": 1}') == ({"a": 1}, False)
    assert decode_payload(b"42") == (42, False)
    assert decode_payload(b"hello") == ("hello", False)
    assert decode_payload(b"NaN") == ("NaN", False)
    assert decode_payload(b"") == ("", False)
    assert decode_payload(b"\xff\x00") == ("/wA=", True)


def test_mqtt_module_imports_no_other_edge() -> None:
    import ast
    src = Path(mqtt_mod.__file__).read_text()
    edges = {"gpio", "outbox", "delivery", "transport", "http_server", "notify", "app", "cli",
             "__main__"}
    for node in ast.walk(ast.parse(src)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if (node.level and not mod) or mod == "edgehook":
                names = [a.name for a in node.names]  # from . import x / from edgehook import x
            elif node.level:
                names = [mod.split(".")[0]]
            elif mod.startswith("edgehook."):
                names = [mod.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("edgehook.")]
        assert not edges & set(names), names


# --------------------------------------------------------------------------- triggers

def test_trigger_from_yaml_config_reaches_put(mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
                                              make_link: Callable[..., Harness],
                                              tmp_path: Path) -> None:
    path = tmp_path / "edgehook.yaml"
    path.write_text(textwrap.dedent(f"""\
        device: {{id: yamldev, name: Yaml device}}
        gpio:
          backend: mock
          inputs: {{doorbell: {{pin: 17, class: doorbell}}}}
          outputs: {{porch_light: {{pin: 27, class: light}}}}
        mqtt:
          host: 127.0.0.1
          port: {mosquitto.port}
        webhooks:
          sink: {{url: "http://127.0.0.1:9/"}}
        rules:
          - when: {{mqtt: "alarm/+/state"}}
            if: "{{{{ event.payload.state == 'triggered' }}}}"
            do: [{{webhook: sink}}]
        """))
    cfg = load_config(path, environ={})
    assert cfg.mqtt is not None
    filters = [(r.when.name, r.when.qos) for r in cfg.rules if r.when.kind == "mqtt"]
    h = make_link(cfg.mqtt, cfg.gpio, filters, device=cfg.device).start()
    probe.publish("alarm/kitchen/state", json.dumps({"state": "triggered"}))
    ev = h.event()
    assert (ev.type, ev.source) == ("mqtt.message", "alarm/kitchen/state")
    assert ev.data == {"topic": "alarm/kitchen/state", "payload": {"state": "triggered"},
                       "retain": False, "qos": 1}
    probe.publish("alarm/garage/state", "plain text", qos=0)
    ev = h.event()
    assert ev.data["payload"] == "plain text" and ev.data["qos"] == 0
    probe.publish("alarm/garage/state", b"\x00\xff\x10")
    ev = h.event()
    assert ev.data["payload_base64"] is True and ev.data["payload"] == "AP8Q"
    probe.publish("alarm/garage/other", "not matched")
    probe.publish("alarm/garage/state", "sync")
    assert h.event().data["payload"] == "sync"  # the unmatched topic made no event
    assert h.events.empty()


def test_retained_message_before_start_arrives_with_retain_true(
        mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
        make_link: Callable[..., Harness]) -> None:
    probe.publish("sensors/door", "open", retain=True)
    h = make_link(mqtt_cfg(mosquitto), filters=[("sensors/#", 1)]).start()
    ev = h.event()
    assert ev.data["topic"] == "sensors/door" and ev.data["retain"] is True
    assert ev.data["payload"] == "open"
    probe.publish("sensors/door", "closed")
    assert h.event().data["retain"] is False


def test_oversized_payload_is_dropped_and_the_next_arrives(
        mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
        make_link: Callable[..., Harness], caplog: pytest.LogCaptureFixture) -> None:
    h = make_link(mqtt_cfg(mosquitto), filters=[("big/#", 1)]).start()
    with caplog.at_level(logging.WARNING, logger="edgehook.mqtt"):
        probe.publish("big/one", b"x" * (1 << 20))
        probe.publish("big/two", "small")
        ev = h.event()
    assert ev.data["topic"] == "big/two"
    assert any("over max_payload" in r.getMessage() for r in caplog.records)
    assert h.link.status()["connected"]


def test_overlapping_filters_deliver_once(mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
                                          make_link: Callable[..., Harness]) -> None:
    h = make_link(mqtt_cfg(mosquitto), filters=[("#", 1), (f"{PREFIX}/output/+/set", 1),
                                                 ("x/+", 0)]).start()
    probe.publish(f"{PREFIX}/output/relay/set", "TOGGLE")
    assert h.command() == ("relay", "toggle", None)
    probe.publish("x/y", "sync")
    topics = []
    while True:
        ev = h.event()
        topics.append(ev.data["topic"])
        if ev.data["topic"] == "x/y":
            break
    assert topics.count(f"{PREFIX}/output/relay/set") == 1 and topics.count("x/y") == 1
    assert h.commands.empty()  # the command ran once, not once per matching filter


# --------------------------------------------------------------------------- commands

def test_set_commands_reach_on_command(mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
                                       make_link: Callable[..., Harness],
                                       caplog: pytest.LogCaptureFixture) -> None:
    h = make_link(mqtt_cfg(mosquitto)).start()
    topic = f"{PREFIX}/output/porch_light/set"
    with caplog.at_level(logging.WARNING, logger="edgehook.mqtt"):
        for payload in ["ON", "off", "toggle", '{"state": "ON", "for": "30s"}']:
            probe.publish(topic, payload)
        assert [h.command() for _ in range(4)] == [
            ("porch_light", "on", None), ("porch_light", "off", None),
            ("porch_light", "toggle", None), ("porch_light", "on", 30.0)]
        for bad in ["BLINK", "{not json", '{"state": "ON", "for": "soon"}']:
            probe.publish(topic, bad)
        probe.publish(f"{PREFIX}/output/nope/set", "ON")
        probe.publish(f"{PREFIX}/output/relay/set", "OFF")
        assert h.command() == ("relay", "off", None)
    assert h.commands.empty()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("malformed command" in m for m in msgs) == 3
    assert any("no output named 'nope'" in m for m in msgs)
    assert h.link.status()["connected"]


def test_on_command_that_raises_does_not_break_the_link(
        mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
        make_link: Callable[..., Harness]) -> None:
    h = make_link(mqtt_cfg(mosquitto), filters=[("t/#", 1)])
    calls: list[str] = []

    def refuse(name: str, state: str, seconds: float | None) -> None:
        calls.append(state)
        raise ValueError("min_interval")

    h.link._on_command = refuse
    h.start()
    probe.publish(f"{PREFIX}/output/relay/set", "ON")
    probe.publish("t/after", "1")
    assert h.event().data["topic"] == "t/after"
    assert calls == ["on"]


# --------------------------------------------------------------------------- states

def test_states_and_status_are_retained(mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
                                        make_link: Callable[..., Harness]) -> None:
    h = make_link(mqtt_cfg(mosquitto, ha_discovery=False)).start()
    # published from states() on connect
    for topic, value in [("input/doorbell", "OFF"), ("input/motion", "ON"),
                         ("output/porch_light", "OFF"), ("output/relay", "ON")]:
        msg = wait_until(lambda t=topic: retained(mosquitto, f"{PREFIX}/{t}"),
                         what=f"retained {topic}")
        assert msg.text == value, topic
    assert retained(mosquitto, f"{PREFIX}/status").text == "online"
    probe.subscribe(f"{PREFIX}/#")
    h.link.input_state("doorbell", True)
    h.link.output_state("porch_light", True)
    h.link.input_event("doorbell", "press", "01TESTID")
    ev = probe.wait_for(f"{PREFIX}/input/doorbell/event")
    assert json.loads(ev.payload) == {"event_type": "press", "id": "01TESTID"}
    assert retained(mosquitto, f"{PREFIX}/input/doorbell").text == "ON"
    assert retained(mosquitto, f"{PREFIX}/output/porch_light").text == "ON"
    assert retained(mosquitto, f"{PREFIX}/input/doorbell/event", timeout=0.3) is None
    h.link.stop()
    assert retained(mosquitto, f"{PREFIX}/status").text == "offline"
    assert h.link.status()["connected"] is False


def test_last_will_when_the_process_dies(mosquitto: Mosquitto,  # noqa: F811
                                         tmp_path: Path) -> None:
    script = tmp_path / "link.py"
    script.write_text(textwrap.dedent(f"""\
        import time
        from edgehook.config import Device, GpioConfig, MqttConfig
        from edgehook.mqtt import MqttLink
        cfg = MqttConfig(host="127.0.0.1", port={mosquitto.port}, topic_prefix="{PREFIX}",
                         client_id="edgehook-will-test", keepalive=10)
        link = MqttLink(cfg, Device("testdev", "T"), GpioConfig(), [], put=print,
                        on_command=print, states=lambda: ({{}}, {{}}))
        link.start()
        while not link.status()["subscribed"]:
            time.sleep(0.01)
        print("ready", flush=True)
        time.sleep(60)
        """))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon"))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and proc.stdout.readline().strip() == b"ready"
        assert retained(mosquitto, f"{PREFIX}/status").text == "online"
        with MqttProbe(mosquitto) as p:
            p.subscribe(f"{PREFIX}/status")
            proc.kill()  # SIGKILL: no DISCONNECT, the broker sends the will
            p.wait_for(f"{PREFIX}/status", lambda m: m.text == "offline")
        assert retained(mosquitto, f"{PREFIX}/status").text == "offline"
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- outages

def test_broker_restart_queues_publishes_and_restores_subscriptions(
        mosquitto: Mosquitto, make_link: Callable[..., Harness]) -> None:  # noqa: F811
    h = make_link(mqtt_cfg(mosquitto), filters=[("alarm/#", 1)]).start()
    mosquitto.stop()
    wait_until(lambda: not h.link.status()["connected"], what="link noticed the outage")
    h.link.publish("report/queued", "while down", qos=1, retain=True)
    h.link.output_state("relay", False)
    st = h.link.status()
    assert st["queued"] == 1 and st["since"] is not None
    t0 = time.monotonic()
    mosquitto.start()
    h.wait_subscribed(timeout=30)
    assert time.monotonic() - t0 < 30
    assert retained(mosquitto, "report/queued").text == "while down"
    assert retained(mosquitto, f"{PREFIX}/output/relay").text == "OFF"
    assert retained(mosquitto, f"{PREFIX}/status").text == "online"
    assert h.link.status()["queued"] == 0
    with MqttProbe(mosquitto) as p:
        p.publish("alarm/kitchen", "fire")
    assert h.event().data["topic"] == "alarm/kitchen"


def test_start_with_the_broker_down_then_up(tmp_path: Path,
                                            make_link: Callable[..., Harness]) -> None:
    broker = Mosquitto(tmp_path / "late")
    broker.conf.write_text(broker.conf.read_text() + "log_type debug\n")
    cfg = mqtt_cfg(broker, queue_size=3, ha_discovery=False)
    h = make_link(cfg, filters=[("late/#", 1)]).start(wait=False)
    try:
        for i in range(5):
            h.link.publish(f"q/{i}", str(i))
        assert h.link.status() | {"since": None} == {
            "connected": False, "subscribed": False, "since": None, "queued": 3, "dropped": 2}
        broker.start()
        h.wait_subscribed(timeout=30)
        with MqttProbe(broker) as p:
            p.publish("late/x", "hi")
        assert h.event().data["topic"] == "late/x"
        h.link.stop()
        broker.stop()  # flushes mosquitto's log (stdout to a file is block-buffered)
        # the three newest arrived at the broker, in order (mosquitto's debug log)
        got = [line.split("'")[1] for line in broker.log_text().splitlines()
               if f"PUBLISH from {cfg.client_id}" in line and "'q/" in line]
        assert got == ["q/2", "q/3", "q/4"]
    finally:
        h.link.stop(timeout=0.5)
        broker.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_persistent_session_delivers_what_was_sent_while_stopped(
        mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
        make_link: Callable[..., Harness], protocol: str) -> None:
    cfg = mqtt_cfg(mosquitto, protocol=protocol, ha_discovery=False)
    first = make_link(cfg, filters=[("cmd/#", 1)]).start()
    first.link.stop()
    for i in range(3):
        probe.publish(f"cmd/{i}", str(i), qos=1)
    second = make_link(cfg, filters=[("cmd/#", 1)]).start()
    got = sorted(second.event().data["payload"] for _ in range(3))
    assert got == [0, 1, 2]


# --------------------------------------------------------------------------- discovery

def test_discovery_retained_and_resent_when_home_assistant_comes_online(
        mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
        make_link: Callable[..., Harness]) -> None:
    make_link(mqtt_cfg(mosquitto)).start()
    topic = "homeassistant/binary_sensor/testdev/doorbell/config"
    msg = wait_until(lambda: retained(mosquitto, topic), what="retained discovery")
    assert json.loads(msg.payload)["state_topic"] == f"{PREFIX}/input/doorbell"
    assert retained(mosquitto, "homeassistant/device_automation/testdev/doorbell_click/config")
    probe.subscribe("homeassistant/+/testdev/#")
    probe.wait_for(topic, lambda m: m.retain)
    probe.clear()
    probe.publish("homeassistant/status", "online")
    again = probe.wait_for(topic)
    assert json.loads(again.payload) == json.loads(msg.payload)
    probe.subscribe(f"{PREFIX}/input/doorbell")
    assert probe.wait_for(f"{PREFIX}/input/doorbell").text == "OFF"


def test_reload_removes_entities_and_changes_subscriptions(
        mosquitto: Mosquitto, probe: MqttProbe,  # noqa: F811
        make_link: Callable[..., Harness]) -> None:
    cfg = mqtt_cfg(mosquitto)
    h = make_link(cfg, filters=[("old/#", 1)]).start()
    topic = "homeassistant/binary_sensor/testdev/motion/config"
    wait_until(lambda: retained(mosquitto, topic), what="retained discovery")
    probe.subscribe("homeassistant/+/testdev/#")
    probe.wait_for(topic, lambda m: m.retain)
    smaller = replace(GPIO, inputs={"doorbell": GPIO.inputs["doorbell"]})
    h.link.reload(cfg, DEVICE, smaller, [("new/#", 1)])
    assert probe.wait_for(topic, lambda m: m.payload == b"").retain is False
    assert retained(mosquitto, topic, timeout=0.3) is None
    assert retained(mosquitto, f"{PREFIX}/input/motion", timeout=0.3) is None
    assert retained(mosquitto, "homeassistant/binary_sensor/testdev/doorbell/config")
    h.wait_subscribed()
    probe.publish("old/x", "gone")
    probe.publish("new/x", "here")
    assert h.event().data["topic"] == "new/x"
    assert h.events.empty()


def test_a_payload_nested_too_deep_to_parse_is_text_not_a_traceback() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    value, b64 = decode_payload(deep)
    assert value == deep.decode() and b64 is False
