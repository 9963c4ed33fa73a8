"""The whole daemon against a real mosquitto: triggers, commands, restarts, discovery, LWT."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from broker import Mosquitto, MqttProbe, free_port, retained, wait_until
from receiver import Receiver

pytestmark = pytest.mark.slow

CONFIG = """\
device: {{id: door, name: Door}}
state_dir: {state}
gpio:
  backend: mock
  inputs:
    doorbell: {{pin: 17, class: doorbell, hold: 1s}}
  outputs:
    porch_light: {{pin: 27, class: light}}
mqtt:
  host: 127.0.0.1
  port: {mqtt_port}
http: {{listen: "127.0.0.1:{port}"}}
webhooks:
  sink: {{url: "{sink}/hook"}}
rules:
  - name: alarm
    when: {{mqtt: "alarm/+/state"}}
    if: "{{{{ event.payload.state == 'triggered' }}}}"
    do:
      - webhook: sink
        body: {{zone: "{{{{ event.topic }}}}", state: "{{{{ event.payload.state }}}}"}}
  - name: ring
    when: {{input: doorbell}}
    do: [{{webhook: sink}}]
"""


@pytest.fixture()
def sink() -> Receiver:
    r = Receiver().start()
    yield r
    r.stop()


def start(tmp_path: Path, write_config, daemon, broker_port: int, sink: Receiver):
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "state", mqtt_port=broker_port,
                                     port=port, sink=sink.url))
    d = daemon(cfg, port=port)
    d.wait_ready()
    return d


def connected(d) -> bool:
    mqtt = d.api("GET", "/api/v1/state").json()["mqtt"]
    return bool(mqtt and mqtt["connected"] and mqtt.get("subscribed", True))


def test_trigger_if_retained_and_oversize(tmp_path: Path, write_config, daemon,
                                          mosquitto: Mosquitto, sink: Receiver) -> None:
    with MqttProbe(mosquitto) as probe:
        # a retained alarm from yesterday must not fire at start-up
        probe.publish("alarm/garage/state", json.dumps({"state": "triggered"}), retain=True)
        d = start(tmp_path, write_config, daemon, mosquitto.port, sink)
        wait_until(lambda: connected(d), what="daemon connected")
        d.wait_log("mqtt.message from alarm/garage/state")  # arrived, but did not fire
        assert "rules alarm" not in d.log
        probe.publish("alarm/kitchen/state", json.dumps({"state": "ok"}))
        probe.publish("alarm/kitchen/state", "x" * (1024 * 1024))  # 1 MiB: dropped
        probe.publish("alarm/kitchen/state", json.dumps({"state": "triggered"}))
        (req,) = sink.wait_for(1)
        assert json.loads(req.body) == {"zone": "alarm/kitchen/state", "state": "triggered"}
        assert "larger than" in d.log or "dropped" in d.log
    assert d.stop() == 0


def test_message_to_an_idle_daemon_survives_a_kill_before_it_is_stored(
        tmp_path: Path, write_config, daemon, mosquitto: Mosquitto, sink: Receiver) -> None:
    """A QoS 1 message that finds the dispatcher idle is run on paho's thread, and
    paho acknowledges it only after that returns: killed before its webhook is
    stored, the daemon still has it from the broker (persistent session) after the
    restart. Queued on the bus instead, it would be acknowledged, then lost."""
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "state", mqtt_port=mosquitto.port,
                                     port=port, sink=sink.url))
    d = daemon(cfg, port=port, env={"EDGEHOOK_TEST_HANG_EVENT": "mqtt.message"})
    d.wait_ready()
    wait_until(lambda: connected(d), what="daemon connected")
    with MqttProbe(mosquitto) as probe:
        probe.publish("alarm/attic/state", json.dumps({"state": "triggered"}))
    d.wait_log("EDGEHOOK_TEST_HANG_EVENT: dispatcher hangs on")  # before the outbox
    d.signal(signal.SIGKILL)
    assert d.proc.wait(10) == -signal.SIGKILL
    assert sink.requests == []
    again = daemon(cfg, port=port)
    again.wait_ready()
    (req,) = sink.wait_for(1, timeout=20)
    assert json.loads(req.body) == {"zone": "alarm/attic/state", "state": "triggered"}
    assert again.stop() == 0


def test_commands_states_and_echo(tmp_path: Path, write_config, daemon, mosquitto: Mosquitto,
                                  sink: Receiver) -> None:
    d = start(tmp_path, write_config, daemon, mosquitto.port, sink)
    wait_until(lambda: connected(d), what="daemon connected")
    pre = "edgehook/door"

    def light() -> str:
        return d.api("GET", "/api/v1/state").json()["outputs"]["porch_light"]["state"]

    with MqttProbe(mosquitto) as probe:
        probe.subscribe(f"{pre}/#")
        for payload, want in [("ON", "on"), ("off", "off"), ("TOGGLE", "on"),
                              (json.dumps({"state": "OFF"}), "off"),
                              (json.dumps({"state": "ON", "for": "30s"}), "on")]:
            probe.clear()
            probe.publish(f"{pre}/output/porch_light/set", payload)
            wait_until(lambda want=want: light() == want, what=f"{payload} -> {want}")
            probe.wait_for(f"{pre}/output/porch_light",
                           lambda m, want=want: m.text == want.upper())
        assert d.api("GET", "/api/v1/state").json()["outputs"]["porch_light"]["until"]
        # an HTTP PUT is echoed to MQTT, retained
        d.api("PUT", "/api/v1/outputs/porch_light", json={"state": "off"})
        probe.wait_for(f"{pre}/output/porch_light", lambda m: m.text == "OFF")
        # a GPIO-driven input change is echoed: state (retained) and event (not retained)
        d.api("POST", "/api/v1/inputs/doorbell/simulate", json={"action": "press"})
        probe.wait_for(f"{pre}/input/doorbell", lambda m: m.text == "ON")
        ev = probe.wait_for(f"{pre}/input/doorbell/event")
        assert json.loads(ev.payload)["event_type"] == "press" and not ev.retain
    state = retained(mosquitto, f"{pre}/output/porch_light")
    assert state is not None and state.text == "OFF"
    assert retained(mosquitto, f"{pre}/input/doorbell").text == "ON"  # type: ignore[union-attr]
    assert retained(mosquitto, f"{pre}/status").text == "online"  # type: ignore[union-attr]
    # discovery: retained, for one device, doorbell as binary_sensor and event
    disc = retained(mosquitto, "homeassistant/event/door/doorbell_event/config")
    assert disc is not None
    body = json.loads(disc.payload)
    assert body["device_class"] == "doorbell" and "press" in body["event_types"]
    assert retained(mosquitto, "homeassistant/light/door/porch_light/config") is not None
    assert d.stop() == 0
    assert retained(mosquitto, f"{pre}/status").text == "offline"  # type: ignore[union-attr]


def test_broker_restart_and_change_while_down(tmp_path: Path, write_config, daemon,
                                              mosquitto: Mosquitto, sink: Receiver) -> None:
    d = start(tmp_path, write_config, daemon, mosquitto.port, sink)
    wait_until(lambda: connected(d), what="daemon connected")
    mosquitto.stop()
    wait_until(lambda: not connected(d), what="daemon notices the broker is gone")
    # while the broker is down: an output change, and a press still posts its webhook
    d.api("PUT", "/api/v1/outputs/porch_light", json={"state": "on"})
    d.api("POST", "/api/v1/inputs/doorbell/simulate", json={"action": "press"})
    sink.wait_for(1)
    assert d.api("GET", "/healthz").status_code == 200
    mosquitto.start()
    wait_until(lambda: connected(d), timeout=30, what="reconnect within 30 s")
    state = retained(mosquitto, "edgehook/door/output/porch_light")
    assert state is not None and state.text == "ON"
    with MqttProbe(mosquitto) as probe:
        probe.publish("alarm/hall/state", json.dumps({"state": "triggered"}))
        reqs = sink.wait_for(2, timeout=10)
    assert json.loads(reqs[-1].body)["zone"] == "alarm/hall/state"
    assert d.stop() == 0


def test_broker_down_at_start_then_appears(tmp_path: Path, write_config, daemon,
                                           sink: Receiver) -> None:
    broker = Mosquitto(tmp_path / "late")
    d = start(tmp_path, write_config, daemon, broker.port, sink)  # READY without a broker
    d.api("POST", "/api/v1/inputs/doorbell/simulate", json={"action": "press"})
    sink.wait_for(1)
    assert d.api("GET", "/api/v1/state").json()["mqtt"]["connected"] is False
    with broker:
        wait_until(lambda: connected(d), timeout=30, what="connect once the broker appears")
        assert retained(broker, "edgehook/door/status").text == "online"  # type: ignore
        assert d.stop() == 0


def test_last_will_on_sigkill(tmp_path: Path, write_config, daemon, mosquitto: Mosquitto,
                              sink: Receiver) -> None:
    d = start(tmp_path, write_config, daemon, mosquitto.port, sink)
    wait_until(lambda: connected(d), what="daemon connected")
    with MqttProbe(mosquitto) as probe:
        probe.subscribe("edgehook/door/status")
        probe.wait_for("edgehook/door/status", lambda m: m.text == "online")
        d.signal(signal.SIGKILL)
        # mosquitto sends the will once it sees the socket close
        probe.wait_for("edgehook/door/status", lambda m: m.text == "offline", timeout=10)


def test_on_stop_off_reaches_the_retained_state_before_the_link_closes(
        tmp_path: Path, write_config, daemon, mosquitto: Mosquitto, sink: Receiver) -> None:
    """A light that on_stop switches off at SIGTERM must not stay ON in Home Assistant:
    the retained state topic says OFF once the daemon is gone."""
    cfg = CONFIG.replace("porch_light: {{pin: 27, class: light}}",
                         "porch_light: {{pin: 27, class: light, on_stop: 'off'}}")
    port = free_port()
    d = daemon(write_config(cfg.format(state=tmp_path / "state", mqtt_port=mosquitto.port,
                                       port=port, sink=sink.url)), port=port)
    d.wait_ready()
    wait_until(lambda: connected(d), what="daemon connected")
    assert d.api("PUT", "/api/v1/outputs/porch_light", json={"state": "on"}).status_code == 200
    topic = "edgehook/door/output/porch_light"
    wait_until(lambda: (m := retained(mosquitto, topic)) is not None and m.payload == b"ON",
               what="retained ON")
    assert d.stop() == 0
    msg = retained(mosquitto, topic)
    assert msg is not None and msg.payload == b"OFF"


BURST = """\
device: {{id: burst, name: Burst}}
state_dir: {state}
gpio: {{backend: mock}}
mqtt: {{host: 127.0.0.1, port: {mqtt_port}, client_id: edgehook-burst,
        homeassistant: {{discovery: false}}}}
http: {{listen: "127.0.0.1:{port}"}}
webhooks:
  sink: {{url: "{sink}/burst"}}
rules:
  - when: {{mqtt: "burst/in"}}
    do:
      - webhook: sink
        body: {{n: "{{{{ event.payload.n }}}}"}}
"""


def test_kill_9_aimed_into_a_burst_loses_no_acknowledged_message(
        tmp_path: Path, write_config, daemon, mosquitto: Mosquitto) -> None:
    """A QoS 1 message is PUBACKed only once its row is on disk: SIGKILL in the middle
    of an 800-message burst, and the restarted daemon (same session) delivers them all,
    the ones it had stored and the ones the broker still held for it."""
    import threading

    n = 800
    port = free_port()
    sink_port = free_port()  # nobody listens there during the burst
    text = BURST.format(state=tmp_path / "state", mqtt_port=mosquitto.port, port=port,
                        sink=f"http://127.0.0.1:{sink_port}")
    cfg = write_config(text)
    d = daemon(cfg, port=port)
    d.wait_ready()
    wait_until(lambda: connected(d), what="daemon connected")
    with MqttProbe(mosquitto) as probe:
        publisher = threading.Thread(
            target=lambda: [probe.publish("burst/in", json.dumps({"n": i})) for i in range(n)])
        publisher.start()
        wait_until(lambda: d.api("GET", "/api/v1/state").json()["outbox"]["pending"] >= 150,
                   timeout=20, what="part of the burst stored")
        d.signal(signal.SIGKILL)
        assert d.proc.wait(10) == -signal.SIGKILL
        publisher.join(30)  # every message is with the broker (PUBACK from it)
        assert not publisher.is_alive()
    sink = Receiver(port=sink_port).start()  # the receiver is up for the restart
    try:
        again = daemon(cfg, port=port)
        again.wait_ready()
        try:
            wait_until(lambda: len({json.loads(r.body)["n"] for r in sink.requests}) >= n,
                       timeout=60, what="every message delivered after the restart")
        except AssertionError:
            got = {int(json.loads(r.body)["n"]) for r in sink.requests}
            missing = sorted(set(range(n)) - got)
            raise AssertionError(f"{len(got)} delivered, missing {missing[:20]}..{missing[-5:]}"
                                 f" ({len(missing)}); outbox "
                                 f"{again.api('GET', '/api/v1/state').json()['outbox']}; log:\n"
                                 + "\n".join(again.lines[-15:])) from None
        assert {json.loads(r.body)["n"] for r in sink.requests} == {str(i) for i in range(n)}
        assert again.stop() == 0
    finally:
        sink.stop()
