"""Pure rule evaluation: an event in, the planned actions out (nothing is executed here).

Rules are indexed by trigger once, when the config is loaded, so matching an event
costs a dict lookup (or a topic-trie walk for MQTT, remembered per topic), never a
scan of every rule. A rule whose `if` and actions hold no template syntax needs no
template context, so none is built for it (no clock read, no state snapshot).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .config import Config, OutputAction, PublishAction, Rule, WebhookAction
from .events import Event, compact_json
from .templates import TemplateError, is_truthy, render_tree, tree_is_static

_LOG = logging.getLogger(__name__)

TOPIC_CACHE = 1024  # MQTT topics whose matching rules are remembered (cleared when full)


@dataclass(frozen=True, slots=True)
class WebhookCall:
    """Post `body` to a target; the URL and headers are already rendered."""

    rule: str
    target: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_type: str

    def describe(self) -> str:
        """The action as the config names it, for messages: `webhook discord`."""
        return f"webhook {self.target}"


@dataclass(frozen=True, slots=True)
class OutputCall:
    """Set an output on, off or toggle, optionally reverting after `duration`."""

    rule: str
    output: str
    state: str
    duration: float | None = None

    def describe(self) -> str:
        """The action as the config names it, for messages: `output porch_light on for 30 s`."""
        text = f"output {self.output} {self.state}"
        return f"{text} for {self.duration:g} s" if self.duration else text


@dataclass(frozen=True, slots=True)
class PublishCall:
    """Publish an MQTT message."""

    rule: str
    topic: str
    payload: bytes
    qos: int
    retain: bool

    def describe(self) -> str:
        """The action as the config names it, for messages: `publish home/porch/light`."""
        return f"publish {self.topic}"


Call = WebhookCall | OutputCall | PublishCall


@dataclass(slots=True)
class Plan:
    """What one event asks for: the calls in order, the rules that fired, what failed.

    `skipped` holds (rule name, reason) for every rule whose trigger matched but that
    did not fire, so a log line or the status page can say why instead of "no rule".
    """

    calls: list[Call] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


SKIP_IF_FALSE = "if: false"
SKIP_IF_ERROR = "if: template error"
SKIP_RETAINED = "retained message (the rule has no retained: true)"


_NO_CONTEXT: dict[str, Any] = {}  # what a rule with no template syntax "renders" with


def event_context(event: Event, device: dict[str, str]) -> dict[str, Any]:
    """The `event` template variable: the wire shape with `data` keys also at the top."""
    ctx = dict(event.data)
    ctx.update(event.to_wire(device))
    return ctx


class RuleEngine:
    """Matches events to rules and renders their actions; tracks cooldowns."""

    def __init__(self, cfg: Config, clock: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self.device = {"id": cfg.device.id, "name": cfg.device.name}
        self._index: dict[tuple[str, ...], list[tuple[int, Rule]]] = {}
        self._mqtt: Any = None
        self._topics: dict[str, list[tuple[int, Rule]]] = {}
        self._last_fired: dict[int, float] = {}
        for i, rule in enumerate(cfg.rules):
            w = rule.when
            if w.kind == "mqtt":
                if w.event == "message":
                    if self._mqtt is None:  # paho only for a config that uses MQTT
                        from paho.mqtt.matcher import MQTTMatcher

                        self._mqtt = MQTTMatcher()
                    try:
                        self._mqtt[w.name].append((i, rule))
                    except KeyError:
                        self._mqtt[w.name] = [(i, rule)]
                else:
                    self._add(("mqtt." + w.event, w.name), i, rule)
            elif w.kind == "input":
                self._add(("input." + w.event, w.name), i, rule)
            elif w.kind in ("hook", "output"):
                self._add((w.kind, w.name), i, rule)
            elif w.kind == "start":
                self._add(("start",), i, rule)
            else:  # at / every: the scheduler names the rule by index
                self._add(("timer", str(i)), i, rule)
        self._static_bodies = self._prerender_static()
        self._needs_ctx = {i: self._rule_needs_ctx(rule) for i, rule in enumerate(cfg.rules)}

    def _rule_needs_ctx(self, rule: Rule) -> bool:
        """False when nothing the rule renders has template syntax (its output is fixed)."""
        if rule.condition is not None:
            return True
        for a in rule.actions:
            if isinstance(a, WebhookAction):
                target = self.cfg.webhooks.get(a.webhook)
                if target is None or not tree_is_static(target.url) or \
                        not tree_is_static(target.headers) or \
                        (a.body is not None and not tree_is_static(a.body)):
                    return True
            elif isinstance(a, OutputAction):
                if not tree_is_static(a.set):
                    return True
            elif isinstance(a, PublishAction):
                if not (tree_is_static(a.topic) and tree_is_static(a.payload)):
                    return True
            else:
                return True
        return False

    def _add(self, key: tuple[str, ...], i: int, rule: Rule) -> None:
        self._index.setdefault(key, []).append((i, rule))

    def _prerender_static(self) -> dict[tuple[int, int], tuple[bytes, str]]:
        out = {}
        for i, rule in enumerate(self.cfg.rules):
            for j, a in enumerate(rule.actions):
                if isinstance(a, WebhookAction) and a.body is not None and \
                        tree_is_static(a.body):
                    out[(i, j)] = encode_body(render_tree(a.body, {}))
        return out

    def mqtt_filters(self) -> list[tuple[str, int]]:
        """Every MQTT filter the rules need, with its QoS (highest wins)."""
        qos: dict[str, int] = {}
        for rule in self.cfg.rules:
            if rule.when.kind == "mqtt":
                qos[rule.when.name] = max(qos.get(rule.when.name, 0), rule.when.qos)
        return sorted(qos.items())

    def match(self, event: Event) -> list[tuple[int, Rule]]:
        """The rules whose trigger matches the event (before `if` and cooldown)."""
        t = event.type
        if t == "mqtt.message":
            found = self._topic_rules(event.source)
            if event.data.get("retain"):
                return [(i, r) for i, r in found if r.when.retained]
            return found
        if t.startswith("input.") or t in ("mqtt.silent", "mqtt.resumed"):
            return self._index.get((t, event.source), [])
        if t == "hook.received":
            return self._index.get(("hook", event.source), [])
        if t == "output.changed":
            state = event.data.get("state")
            return [(i, r) for i, r in self._index.get(("output", event.source), [])
                    if not r.when.event or r.when.event == state]
        if t == "daemon.started":
            return self._index.get(("start",), [])
        if t == "timer.fired":
            return self._index.get(("timer", str(event.data.get("rule_index"))), [])
        return []

    def _topic_rules(self, topic: str) -> list[tuple[int, Rule]]:
        """The rules whose MQTT filter matches `topic`, retained or not (remembered)."""
        found = self._topics.get(topic)
        return self._match_topic(topic) if found is None else found

    def _match_topic(self, topic: str) -> list[tuple[int, Rule]]:
        found: list[tuple[int, Rule]] = []
        if self._mqtt is not None:
            for rules in self._mqtt.iter_match(topic):
                found.extend(rules)
            found.sort(key=lambda x: x[0])
        if len(self._topics) >= TOPIC_CACHE:
            self._topics.clear()
        self._topics[topic] = found
        return found

    def evaluate(self, event: Event, states: Callable[[], dict[str, Any]] | None = None,
                 now: float | None = None) -> Plan:
        """Plan the actions for one event; a failing template skips only its action.

        A rule that matched but did not fire (cooldown, `if` false or failing, a
        retained MQTT message it does not take) is named in `plan.skipped` with why.
        """
        plan = Plan()
        retained = event.type == "mqtt.message" and bool(event.data.get("retain"))
        # a retained message walks every rule of its topic, to name those that skip it
        matched = self._topic_rules(event.source) if retained else self.match(event)
        if not matched:
            return plan
        ts = event.ts if now is None else now
        ctx: dict[str, Any] | None = None
        for i, rule in matched:
            if retained and not rule.when.retained:
                plan.skipped.append((rule.name, SKIP_RETAINED))
                continue
            if rule.cooldown:
                left = rule.cooldown - (ts - self._last_fired.get(i, float("-inf")))
                if left > 0:
                    plan.skipped.append((rule.name, f"cooldown: {_seconds(left)} left"))
                    continue
            if ctx is None and self._needs_ctx[i]:
                ctx = self._context(event, states)
            rctx = _NO_CONTEXT if ctx is None else ctx
            if rule.condition is not None:
                try:
                    if not is_truthy(rule.condition.render(rctx)):
                        plan.skipped.append((rule.name, SKIP_IF_FALSE))
                        continue
                except TemplateError as exc:
                    plan.errors.append(f"rule {rule.name}: if: {exc}")
                    plan.skipped.append((rule.name, SKIP_IF_ERROR))
                    continue
            self._last_fired[i] = ts
            plan.fired.append(rule.name)
            for j, action in enumerate(rule.actions):
                try:
                    plan.calls.append(self._render(i, j, rule, action, event, rctx))
                except TemplateError as exc:
                    plan.errors.append(f"rule {rule.name}: action {j + 1}: {exc}")
        return plan

    def _context(self, event: Event, states: Callable[[], dict[str, Any]] | None
                 ) -> dict[str, Any]:
        ctx: dict[str, Any] = {"event": event_context(event, self.device),
                               "device": self.device, "now": datetime.now().astimezone()}
        extra = states() if states else {}
        ctx["inputs"] = extra.get("inputs", {})
        ctx["outputs"] = extra.get("outputs", {})
        return ctx

    def _render(self, i: int, j: int, rule: Rule, action: Any, event: Event,
                ctx: dict[str, Any]) -> Call:
        if isinstance(action, WebhookAction):
            target = self.cfg.webhooks[action.webhook]
            if action.body is None:
                body, ctype = compact_json(event.to_wire(self.device)).encode(), "application/json"
            elif (i, j) in self._static_bodies:
                body, ctype = self._static_bodies[(i, j)]
            else:
                body, ctype = encode_body(render_tree(action.body, ctx))
            return WebhookCall(rule.name, action.webhook, target.url.render(ctx),
                               {k: v.render(ctx) for k, v in target.headers.items()},
                               body, ctype)
        if isinstance(action, OutputAction):
            state = action.set.render(ctx).strip().lower()
            state = {"true": "on", "false": "off", "1": "on", "0": "off"}.get(state, state)
            if state not in ("on", "off", "toggle"):
                raise TemplateError(f"set rendered {state!r}, not on, off or toggle")
            return OutputCall(rule.name, action.output, state, action.duration)
        if isinstance(action, PublishAction):
            payload = render_tree(action.payload, ctx)
            if isinstance(payload, (dict, list)):
                data = compact_json(payload).encode()
            else:
                data = ("" if payload is None else str(payload)).encode()
            topic = action.topic.render(ctx)
            if not topic or "+" in topic or "#" in topic:
                raise TemplateError(f"publish topic {topic!r} is not a valid topic")
            return PublishCall(rule.name, topic, data, action.qos, action.retain)
        raise TypeError(action)


def _seconds(left: float) -> str:
    """A wait as a person reads it: `7.2 s`, `4 min 48 s`, `1 h 5 min` (never rounded up
    into the next minute or hour, so a 1 h cooldown just begun reads `59 min 59 s`)."""
    if round(left, 1) < 60:
        return f"{max(left, 0.1):.1f} s"
    whole = max(int(left), 60)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def encode_body(value: Any) -> tuple[bytes, str]:
    """A mapping or list becomes JSON; a string is sent as-is, as JSON if it parses."""
    if isinstance(value, (dict, list, int, float, bool)) or value is None:
        return compact_json(value).encode(), "application/json"
    text = str(value)
    try:
        json.loads(text)
    except ValueError:
        return text.encode(), "text/plain; charset=utf-8"
    return text.encode(), "application/json"
