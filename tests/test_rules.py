"""The pure rule engine, table-driven: which events fire which rules, and what they plan."""

from __future__ import annotations

import json
import os
import random
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgehook import events
from edgehook.config import Config, load_config
from edgehook.events import make_event, new_id, rfc3339
from edgehook.rules import (
    SKIP_IF_ERROR,
    SKIP_IF_FALSE,
    SKIP_RETAINED,
    OutputCall,
    PublishCall,
    RuleEngine,
    WebhookCall,
    encode_body,
)

CONFIG = """\
device: {id: porch, name: Porch}
gpio:
  backend: mock
  inputs:
    doorbell: {pin: 17, hold: 1s, gestures: {double_click: 300ms}}
  outputs:
    light: {pin: 27}
mqtt: {host: 127.0.0.1}
webhooks:
  chat:
    url: "http://127.0.0.1:1/{{ event.source }}"
    headers: {X-Device: "{{ device.id }}"}
  plain: {url: "http://127.0.0.1:1/plain"}
hooks:
  porch: {auth: none}
  slow: {auth: none}
rules:
  - name: ring
    when: {input: doorbell}
    cooldown: 10s
    do:
      - webhook: chat
        body: {text: "ring at {{ device.name }}"}
      - output: light
        set: on
        for: 30s
  - name: double
    when: {input: doorbell, event: double_click}
    do: [{webhook: plain}]
  - name: alarm
    when: {mqtt: "alarm/+/state"}
    if: "{{ event.payload.state == 'triggered' }}"
    do:
      - webhook: plain
  - name: retained-ok
    when: {mqtt: "sensors/#", retained: true}
    do: [{publish: "echo/{{ event.topic }}", payload: {v: "{{ event.payload }}"}}]
  - name: hook
    when: {hook: porch}
    do:
      - output: light
        set: "{{ event.body.state }}"
  - name: broken
    when: {hook: porch}
    do:
      - webhook: plain
        body: "{{ event.body.missing.deeper }}"
      - publish: after/broken
  - name: light-on
    when: {output: light, state: on}
    do: [{publish: light/on}]
  - name: hello
    when: {start: true}
    do: [{webhook: plain, body: "static text"}]
  - name: held-guard
    when: {input: doorbell, event: held}
    if: "{{ event.nope.deeper }}"
    do: [{publish: guard}]
  - name: held-light
    when: {input: doorbell, event: held}
    do: [{output: light, set: off}]
  - name: slow
    when: {hook: slow}
    cooldown: 2h
    do: [{publish: slow}]
"""


@pytest.fixture()
def cfg(tmp_path: Path) -> Config:
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(CONFIG))
    return load_config(p, environ={})


CASES = [
    # event type, source, data, expected fired rules
    ("input.pressed", "doorbell", {"state": "on"}, ["ring"]),
    ("input.released", "doorbell", {"state": "off"}, []),
    ("input.double_click", "doorbell", {}, ["double"]),
    ("input.pressed", "other", {}, []),
    ("mqtt.message", "alarm/kitchen/state", {"payload": {"state": "triggered"}, "retain": False},
     ["alarm"]),
    ("mqtt.message", "alarm/kitchen/state", {"payload": {"state": "ok"}, "retain": False}, []),
    ("mqtt.message", "alarm/kitchen/state", {"payload": {"state": "triggered"}, "retain": True},
     []),
    ("mqtt.message", "alarm/kitchen/other", {"payload": {"state": "triggered"}}, []),
    ("mqtt.message", "sensors/a/b", {"payload": 3, "retain": True}, ["retained-ok"]),
    ("hook.received", "porch", {"body": {"state": "off"}}, ["hook", "broken"]),
    ("output.changed", "light", {"state": "on"}, ["light-on"]),
    ("output.changed", "light", {"state": "off"}, []),
    ("daemon.started", "porch", {}, ["hello"]),
    ("input.held", "doorbell", {}, ["held-light"]),
]


@pytest.mark.parametrize("etype,source,data,fired", CASES)
def test_matching(cfg: Config, etype: str, source: str, data: dict, fired: list[str]) -> None:
    plan = RuleEngine(cfg).evaluate(make_event(etype, source, data))
    assert plan.fired == fired


def test_webhook_and_output_calls_are_rendered(cfg: Config) -> None:
    plan = RuleEngine(cfg).evaluate(make_event("input.pressed", "doorbell", {"state": "on"}))
    hook, out = plan.calls
    assert isinstance(hook, WebhookCall)
    assert hook.url == "http://127.0.0.1:1/doorbell"
    assert hook.headers == {"X-Device": "porch"}
    assert json.loads(hook.body) == {"text": "ring at Porch"}
    assert hook.content_type == "application/json"
    assert out == OutputCall("ring", "light", "on", 30.0)


def test_event_body_is_the_wire_format_by_default(cfg: Config) -> None:
    event = make_event("input.double_click", "doorbell", {"state": "off"})
    (call,) = RuleEngine(cfg).evaluate(event).calls
    assert isinstance(call, WebhookCall)
    assert json.loads(call.body) == {
        "id": event.id, "type": "input.double_click", "time": event.time,
        "device": {"id": "porch", "name": "Porch"}, "source": "doorbell",
        "data": {"state": "off"}}


def test_cooldown(cfg: Config) -> None:
    engine = RuleEngine(cfg)
    e1 = make_event("input.pressed", "doorbell", ts=1000.0)
    e2 = make_event("input.pressed", "doorbell", ts=1005.0)
    e3 = make_event("input.pressed", "doorbell", ts=1010.5)
    assert engine.evaluate(e1).fired == ["ring"]
    assert engine.evaluate(e2).fired == []
    assert engine.evaluate(e3).fired == ["ring"]


ALARM = "alarm/kitchen/state"
SKIP_CASES = [
    # id, events run first (type, source, data, time), the event, (fired, skipped)
    ("first-press-fires", [], ("input.pressed", "doorbell", {}, 1000.0), ["ring"], []),
    ("cooldown-seconds", [("input.pressed", "doorbell", {}, 1000.0)],
     ("input.pressed", "doorbell", {}, 1002.8), [], [("ring", "cooldown: 7.2 s left")]),
    ("cooldown-last-tenth", [("input.pressed", "doorbell", {}, 1000.0)],
     ("input.pressed", "doorbell", {}, 1009.99), [], [("ring", "cooldown: 0.1 s left")]),
    ("cooldown-over", [("input.pressed", "doorbell", {}, 1000.0)],
     ("input.pressed", "doorbell", {}, 1010.0), ["ring"], []),
    ("cooldown-hours", [("hook.received", "slow", {}, 0.0)],
     ("hook.received", "slow", {}, 12.0), [], [("slow", "cooldown: 1 h 59 min left")]),
    ("cooldown-minutes", [("hook.received", "slow", {}, 0.0)],
     ("hook.received", "slow", {}, 7140.0), [], [("slow", "cooldown: 1 min 0 s left")]),
    ("cooldown-just-begun", [("hook.received", "slow", {}, 0.0)],
     ("hook.received", "slow", {}, 3600.4), [], [("slow", "cooldown: 59 min 59 s left")]),
    ("cooldown-almost-a-minute", [("hook.received", "slow", {}, 0.0)],
     ("hook.received", "slow", {}, 7140.03), [], [("slow", "cooldown: 1 min 0 s left")]),
    ("cooldown-under-a-minute", [("hook.received", "slow", {}, 0.0)],
     ("hook.received", "slow", {}, 7140.1), [], [("slow", "cooldown: 59.9 s left")]),
    ("if-false", [], ("mqtt.message", ALARM, {"payload": {"state": "ok"}}, 1.0),
     [], [("alarm", SKIP_IF_FALSE)]),
    ("if-true", [], ("mqtt.message", ALARM, {"payload": {"state": "triggered"}}, 1.0),
     ["alarm"], []),
    ("retained-not-taken", [],
     ("mqtt.message", ALARM, {"payload": {"state": "triggered"}, "retain": True}, 1.0),
     [], [("alarm", SKIP_RETAINED)]),
    ("retained-taken", [], ("mqtt.message", "sensors/a", {"payload": 1, "retain": True}, 1.0),
     ["retained-ok"], []),
    ("if-error-beside-a-firing-rule", [], ("input.held", "doorbell", {}, 1.0),
     ["held-light"], [("held-guard", SKIP_IF_ERROR)]),
    ("no-rule-matches", [], ("input.released", "doorbell", {}, 1.0), [], []),
    ("other-topic", [], ("mqtt.message", "alarm/x/other", {"retain": True}, 1.0), [], []),
]


@pytest.mark.parametrize("before,event,fired,skipped",
                         [c[1:] for c in SKIP_CASES], ids=[c[0] for c in SKIP_CASES])
def test_rules_that_matched_but_did_not_fire_say_why(
        cfg: Config, before: list[tuple[str, str, dict, float]],
        event: tuple[str, str, dict, float], fired: list[str],
        skipped: list[tuple[str, str]]) -> None:
    engine = RuleEngine(cfg)
    for etype, source, data, ts in before:
        engine.evaluate(make_event(etype, source, data), now=ts)
    etype, source, data, ts = event
    plan = engine.evaluate(make_event(etype, source, data), now=ts)
    assert (plan.fired, plan.skipped) == (fired, skipped)


def test_an_if_that_fails_is_an_error_and_a_skip(cfg: Config) -> None:
    plan = RuleEngine(cfg).evaluate(make_event("input.held", "doorbell"))
    assert len(plan.errors) == 1 and plan.errors[0].startswith("rule held-guard: if:")
    assert ("held-guard", SKIP_IF_ERROR) in plan.skipped


@pytest.mark.parametrize("call,text", [
    (WebhookCall("r", "discord", "http://x/", {}, b"", "application/json"), "webhook discord"),
    (OutputCall("r", "porch_light", "on"), "output porch_light on"),
    (OutputCall("r", "porch_light", "toggle", 30.0), "output porch_light toggle for 30 s"),
    (OutputCall("r", "fan", "off", 0.25), "output fan off for 0.25 s"),
    (PublishCall("r", "home/porch/light", b"on", 1, True), "publish home/porch/light"),
])
def test_calls_describe_themselves_as_the_config_names_them(
        call: WebhookCall | OutputCall | PublishCall, text: str) -> None:
    assert call.describe() == text


def test_failing_template_skips_only_its_action(cfg: Config) -> None:
    plan = RuleEngine(cfg).evaluate(make_event("hook.received", "porch",
                                               {"body": {"state": "toggle"}}))
    assert [type(c).__name__ for c in plan.calls] == ["OutputCall", "PublishCall"]
    assert plan.calls[0] == OutputCall("hook", "light", "toggle", None)
    assert len(plan.errors) == 1 and "rule broken: action 1" in plan.errors[0]


def test_bad_set_value_is_an_error_not_a_call(cfg: Config) -> None:
    plan = RuleEngine(cfg).evaluate(make_event("hook.received", "porch",
                                               {"body": {"state": "purple"}}))
    assert not any(isinstance(c, OutputCall) for c in plan.calls)
    assert any("not on, off or toggle" in e for e in plan.errors)


def test_publish_payload_mapping_becomes_json(cfg: Config) -> None:
    plan = RuleEngine(cfg).evaluate(make_event("mqtt.message", "sensors/x",
                                               {"topic": "sensors/x", "payload": 7,
                                                "retain": False}))
    (call,) = plan.calls
    assert call == PublishCall("retained-ok", "echo/sensors/x", b'{"v":"7"}', 1, False)


def test_mqtt_filters_for_subscription(cfg: Config) -> None:
    assert RuleEngine(cfg).mqtt_filters() == [("alarm/+/state", 1), ("sensors/#", 1)]


def test_sandbox_refuses_unsafe_template(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""\
        webhooks: {w: {url: "http://127.0.0.1:1/"}}
        rules:
          - when: {start: true}
            do:
              - webhook: w
                body: "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        """))
    plan = RuleEngine(load_config(p, environ={})).evaluate(make_event("daemon.started", "x"))
    assert plan.calls == [] and "SecurityError" in plan.errors[0]


@pytest.mark.parametrize("value,body,ctype", [
    ({"a": 1}, b'{"a":1}', "application/json"),
    ([1, 2], b"[1,2]", "application/json"),
    ('{"raw": true}', b'{"raw": true}', "application/json"),
    ("hello", b"hello", "text/plain; charset=utf-8"),
])
def test_encode_body(value: object, body: bytes, ctype: str) -> None:
    assert encode_body(value) == (body, ctype)


def test_event_ids_sort_in_time_order() -> None:
    ids = [new_id(1_700_000_000.0 + i / 1000) for i in range(50)]
    same_ms = [new_id(1_800_000_000.0) for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert same_ms == sorted(same_ms) and len(set(same_ms)) == 50
    assert len(ids[0]) == 26
    assert rfc3339(0.123) == "1970-01-01T00:00:00.123Z"


def test_event_ids_encode_time_and_randomness_in_crockford_base32() -> None:
    def reference(ms: int, rand: int) -> str:  # the ULID layout, one character at a time
        value = ms << 80 | rand
        alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
        return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(26)))

    rng = random.Random(7)
    for ms, rand in [(0, 0), ((1 << 48) - 1, (1 << 80) - 1), (1, 1)] + \
            [(rng.getrandbits(48), rng.getrandbits(80)) for _ in range(200)]:
        assert events._crockford(ms << 80 | rand) == reference(ms, rand)


def test_a_forked_child_draws_its_own_random_bits() -> None:
    """Random bits come from a pool of os.urandom output; a child process must not
    reuse the parent's pool, or both would make the same id in the same ms."""
    new_id()  # the pool is filled in the parent
    # a millisecond neither process used yet (ids are monotonic: past the last one)
    when = max(time.time(), events._last_ms / 1000) + 0.05
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id, then leave at once
        os.write(write, new_id(when).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = new_id(when)
    assert child[:10] == parent[:10] and child != parent


@given(st.one_of(st.floats(0, 4e9), st.integers(0, 4_000_000_000).map(lambda s: s + 0.9999995),
                 st.integers(1_700_000_000_000, 1_800_000_000_000).map(lambda ms: ms / 1000)))
@settings(max_examples=2000, deadline=None)
def test_rfc3339_per_second_cache_agrees_with_datetime(ts: float) -> None:
    """The formatter caches the date and time to the second; the result must be what
    datetime itself gives, milliseconds and the carry into the next second included."""
    dt = datetime.fromtimestamp(ts, UTC)
    assert rfc3339(ts) == dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    assert rfc3339(ts) == rfc3339(ts)  # from the cache, the same
