"""Pass 3's shared ground and its rules half: where a value came from, errors at
FILE:LINE:COL, templates compiled, and rules, triggers and actions checked against the
inputs, outputs, webhooks and hooks the config defines (checker.Builder builds the rest
on top of this).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .model import (
    Action,
    GpioConfig,
    HookConfig,
    MqttConfig,
    OutputAction,
    PublishAction,
    Rule,
    Trigger,
    WebhookAction,
    WebhookConfig,
)
from .schemacheck import SchemaChecker, suggest
from .templates import Template, TemplateError, compile_template, compile_tree
from .yamlload import Mark


class RuleChecks:
    """Marks, errors and templates for pass 3, and the checks of the rules section.

    `lenient` (CLI commands outside the service) skips what needs the machine the
    daemon runs on (pin data, TLS files) and tolerates values whose tag could not
    be resolved.
    """

    def __init__(self, checker: SchemaChecker, environ: dict[str, str], base: Path,
                 lenient: bool = False) -> None:
        self.c = checker
        self.environ = environ
        self.base = base  # relative file names are relative to the config file
        self.lenient = lenient

    def mark(self, *path: Any) -> Mark:
        while path and path not in self.c.marks:
            path = path[:-1]
        return self.c.marks.get(path, Mark("?", 1, 1))

    def err(self, path: tuple[Any, ...], msg: str) -> None:
        self.c.err(self.mark(*path), msg)

    def template(self, text: str | None, path: tuple[Any, ...]) -> Template | None:
        if text is None:
            return None
        try:
            return compile_template(text)
        except TemplateError as exc:
            self.err(path, f"{'.'.join(map(str, path))}: {exc}")
            return None

    def tree(self, value: Any, path: tuple[Any, ...]) -> Any:
        try:
            return compile_tree(value)
        except TemplateError as exc:
            self.err(path, f"{'.'.join(map(str, path))}: {exc}")
            return None

    def rule_names(self, rules: list[Any]) -> None:
        """Rule names appear in logs and metrics, so two rules may not share one."""
        first: dict[str, int] = {}
        for i, r in enumerate(rules):
            name = r.get("name") if isinstance(r, dict) else None
            if not name:
                continue
            if name in first:
                line = self.mark("rules", first[name], "name").line
                self.err(("rules", i, "name"), f"rules[{i}].name: {name!r} is already the name "
                                               f"of rules[{first[name]}] (line {line})")
            else:
                first[name] = i

    def rule(self, i: int, r: dict[str, Any], gpio: GpioConfig,
             webhooks: dict[str, WebhookConfig], hooks: dict[str, HookConfig],
             mqtt: MqttConfig | None) -> Rule | None:
        p = ("rules", i)
        name = r.get("name") or f"rule-{i + 1}"
        w = r.get("when")
        trigger = self.trigger(w, (*p, "when"), gpio, hooks, mqtt) if w else None
        actions = []
        for j, a in enumerate(r.get("do") or []):
            act = self.action(a, (*p, "do", j), gpio, webhooks, mqtt) if a else None
            if act is not None:
                actions.append(act)
        cond = self.template(r.get("if"), (*p, "if"))
        if trigger is None:
            return None
        return Rule(name=name, when=trigger, actions=tuple(actions), condition=cond,
                    cooldown=r.get("cooldown"))

    def trigger(self, w: dict[str, Any], p: tuple[Any, ...], gpio: GpioConfig,
                hooks: dict[str, HookConfig], mqtt: MqttConfig | None) -> Trigger | None:
        kind = w["__kind__"]
        qos = mqtt.qos if mqtt else 1
        if kind == "input":
            if w["input"] not in gpio.inputs:
                self._missing(p, "input", w["input"], list(gpio.inputs))
                return None
            inp = gpio.inputs[w["input"]]
            ev = w["event"]
            if ev == "held" and not inp.hold:
                self.err((*p, "event"), f"event held needs gpio.inputs.{inp.name}.hold")
            if ev in ("click", "double_click", "long_press") and not inp.gestures:
                self.err((*p, "event"), f"event {ev} needs gpio.inputs.{inp.name}.gestures")
            if ev in ("silent", "resumed") and not inp.expect_every:
                self.err((*p, "event"), f"event {ev} needs gpio.inputs.{inp.name}.expect_every")
            return Trigger("input", inp.name, ev)
        if kind == "mqtt":
            if mqtt is None:
                self.err((*p, "mqtt"), "an mqtt trigger needs an mqtt: section")
                return None
            flt = w["mqtt"]
            if not _valid_filter(flt):
                self.err((*p, "mqtt"), f"{flt!r} is not a valid MQTT topic filter (+ and # "
                                       "must fill a whole level, # only at the end)")
                return None
            if w["event"] in ("silent", "resumed") and not w.get("expect_every"):
                self.err((*p, "event"), f"event {w['event']} needs expect_every")
            return Trigger("mqtt", flt, w["event"], qos=w.get("qos") if w.get("qos") is not None
                           else qos, retained=w["retained"], expect_every=w.get("expect_every"))
        if kind == "hook":
            if w["hook"] not in hooks:
                self._missing(p, "hook", w["hook"], list(hooks))
                return None
            return Trigger("hook", w["hook"])
        if kind == "output":
            if w["output"] not in gpio.outputs:
                self._missing(p, "output", w["output"], list(gpio.outputs))
                return None
            return Trigger("output", w["output"], w.get("state") or "")
        if kind == "start":
            return Trigger("start")
        if kind == "at":
            return Trigger("at", w["at"].zfill(5))
        if kind == "every":
            if not w["every"] or w["every"] < 1:
                self.err((*p, "every"), "every: must be at least 1s")
                return None
            return Trigger("every", every=w["every"])
        return None

    def action(self, a: dict[str, Any], p: tuple[Any, ...], gpio: GpioConfig,
               webhooks: dict[str, WebhookConfig], mqtt: MqttConfig | None) -> Action | None:
        kind = a["__kind__"]
        if kind == "webhook":
            if a["webhook"] not in webhooks:
                self._missing(p, "webhook", a["webhook"], list(webhooks))
                return None
            body = a.get("body")
            return WebhookAction(a["webhook"], self.tree(body, (*p, "body"))
                                 if body is not None else None)
        if kind == "output":
            if a["output"] not in gpio.outputs:
                self._missing(p, "output", a["output"], list(gpio.outputs))
                return None
            setv = a["set"]
            if isinstance(setv, str) and setv.strip().lower() in ("true", "false"):
                setv = "on" if setv.strip().lower() == "true" else "off"
            tpl = self.template(setv, (*p, "set"))
            if tpl is not None and getattr(tpl, "is_static", False) \
                    and tpl.source.strip().lower() not in ("on", "off", "toggle"):
                self.err((*p, "set"), f"set: {tpl.source!r} is not on, off or toggle")
            return OutputAction(a["output"], tpl, a.get("for")) if tpl else None
        if kind == "publish":
            if mqtt is None:
                self.err((*p, "publish"), "a publish action needs an mqtt: section")
                return None
            topic = self.template(a["publish"], (*p, "publish"))
            if topic is not None and (*p, "publish") not in self.c.unresolved:
                self.publish_topic(topic, (*p, "publish"))
            payload = self.tree(a.get("payload"), (*p, "payload"))
            return PublishAction(topic, payload, a.get("qos") if a.get("qos") is not None
                                 else mqtt.qos, a["retain"]) if topic else None
        return None

    def publish_topic(self, topic: Template, path: tuple[Any, ...]) -> None:
        """What rendering cannot fix: an empty topic, or + / # written into it.

        A template is judged by its literal text only; what its expressions render is
        checked when the action runs.
        """
        static = getattr(topic, "is_static", False)
        literal = topic.source if static else _literal_text(topic.source)
        wild = sorted({c for c in "+#" if c in literal})
        if static and not topic.source:
            self.err(path, "publish: the topic is empty")
        elif wild:
            self.err(path, f"publish: {topic.source!r} has the wildcard "
                           f"{' and '.join(wild)}: a topic to publish to names one topic "
                           "(wildcards belong in an mqtt trigger)")
        elif "\0" in literal:
            self.err(path, "publish: the topic contains a NUL character")

    def _missing(self, p: tuple[Any, ...], what: str, name: str, known: list[str]) -> None:
        self.err((*p, what), f"no {what} named {name!r}{suggest(name, known)}"
                             + ("" if known else f" (no {what}s are defined)"))


def _literal_text(source: str) -> str:
    """The text of a Jinja2 template outside its {{ }}, {% %} and {# #} blocks."""
    from jinja2 import Environment  # already loaded: the template was just compiled

    return "".join(value for _, kind, value in Environment().lex(source) if kind == "data")

def _valid_filter(flt: str) -> bool:
    if not flt or "\0" in flt:
        return False
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True
