"""YAML -> validated, frozen dataclasses; every error with FILE:LINE:COL, all at once.

Three passes: read the YAML into located values (`yamlload`), check it against the
declarative schema (`schema`) into plain values with defaults, then build frozen
dataclasses and check what the schema cannot say (cross-references, templates,
`pull: none` needs `active`, a LAN listener needs a token).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import schema as S
from .errors import ConfigError
from .signing import secret_key
from .templates import Template, TemplateError, compile_template, compile_tree
from .yamlload import Located, Mark, YamlProblems, read_yaml

DEFAULT_CONFIG = "/etc/edgehook/edgehook.yaml"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
               "gb": 1000**3, "gib": 1024**3}
_ONOFF = {True: "on", False: "off", "on": "on", "off": "off", "true": "on", "false": "off",
          "high": "on", "low": "off", "1": "on", "0": "off"}


# --------------------------------------------------------------------------- values

def parse_duration(value: Any) -> float:
    """Parse `250ms`, `10s`, `5m`, `1h`, `1h30m` or a number of seconds; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 250ms, 10s, 5m, 1h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    text = str(value).strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos and text[pos:m.start()].strip():
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos == 0 or text[pos:].strip():
            raise ValueError(f"{value!r} is not a duration (use 250ms, 10s, 5m, 1h)") from None
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Parse `64KiB`, `1MiB`, `1000` bytes; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 64KiB")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size (use 64KiB, 1MiB or bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower() or None])


def parse_onoff(value: Any) -> str:
    """Normalise on/off words and YAML booleans to 'on' or 'off'; raises ValueError."""
    key = value.strip().lower() if isinstance(value, str) else value
    if key in _ONOFF:
        return _ONOFF[key]
    raise ValueError(f"{value!r} is not on or off")


def parse_listen(text: str) -> tuple[str, int]:
    """Split `host:port` / `[v6]:port` / `:port`; raises ValueError."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:8080 or [::1]:8080)")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def redact_url(text: str) -> str:
    """The URL with the password of `user:password@` masked, for messages and summaries."""
    scheme = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text)
    if not scheme:
        return text
    rest = text[scheme.end():]
    end = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if i != -1:
            end = min(end, i)
    authority, tail = rest[:end], rest[end:]
    if "@" not in authority:
        return text
    userinfo, host = authority.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    masked = f"{user}:********" if ":" in userinfo else user
    return f"{scheme.group(0)}{masked}@{host}{tail}"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- dataclasses

@dataclass(frozen=True, slots=True)
class Device:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Filters:
    delayed_on: float = 0.0
    delayed_off: float = 0.0
    invert: bool = False


@dataclass(frozen=True, slots=True)
class Gestures:
    double_click: float = 0.4
    long_press: float = 1.0


@dataclass(frozen=True, slots=True)
class InputConfig:
    name: str
    pin: int | str
    pull: str = "up"
    active: str | None = None
    bounce: float | None = None
    hold: float | None = None
    cls: str = "button"
    filters: Filters = field(default_factory=Filters)
    gestures: Gestures | None = None
    expect_every: float | None = None


@dataclass(frozen=True, slots=True)
class OutputConfig:
    name: str
    pin: int | str
    active: str = "high"
    initial: str = "off"
    cls: str = "switch"
    max_on: float | None = None
    on_stop: str = "off"
    min_interval: float | None = None
    interlock: str | None = None


@dataclass(frozen=True, slots=True)
class GpioConfig:
    backend: str = "auto"
    inputs: dict[str, InputConfig] = field(default_factory=dict)
    outputs: dict[str, OutputConfig] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    topic_prefix: str = "edgehook/device"
    client_id: str = "edgehook-device"
    keepalive: float = 60.0
    protocol: str = "3.1.1"
    qos: int = 1
    max_payload: int = 262144
    queue_size: int = 1000
    ha_discovery: bool = True
    ha_prefix: str = "homeassistant"


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_token: str | None = None
    max_body: int = 65536
    timeout: float = 5.0
    max_connections: int = 32
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Signing:
    scheme: str
    secrets: tuple[str, ...]

    def __repr__(self) -> str:  # never print a secret, even in a traceback
        return f"Signing(scheme={self.scheme!r}, secrets=<{len(self.secrets)} hidden>)"


@dataclass(frozen=True, slots=True)
class WebhookTls:
    """TLS files for one target: a private CA, and a client certificate for mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    name: str
    url: Template
    method: str = "POST"
    headers: dict[str, Template] = field(default_factory=dict)
    timeout: float = 10.0
    signing: Signing | None = None
    max_attempts: int = 12
    max_age: float = 900.0
    tls: WebhookTls | None = None


@dataclass(frozen=True, slots=True)
class HookAuth:
    kind: str  # token | hmac | none
    token: str | None = None
    signing: Signing | None = None

    def __repr__(self) -> str:
        return f"HookAuth(kind={self.kind!r})"


@dataclass(frozen=True, slots=True)
class HookConfig:
    name: str
    auth: HookAuth
    allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    respond: str = "async"
    rate_requests: int = 30
    rate_per: float = 60.0


@dataclass(frozen=True, slots=True)
class Trigger:
    kind: str  # input | mqtt | hook | output | start | at | every
    name: str = ""  # input/hook/output name, mqtt filter, "HH:MM", or "" for start/every
    event: str = ""  # input event, mqtt event (message|silent|resumed), output state
    qos: int = 1
    retained: bool = False
    expect_every: float | None = None
    every: float | None = None


@dataclass(frozen=True, slots=True)
class WebhookAction:
    webhook: str
    body: Any = None  # compiled tree, or None for "the event itself"


@dataclass(frozen=True, slots=True)
class OutputAction:
    output: str
    set: Template
    duration: float | None = None


@dataclass(frozen=True, slots=True)
class PublishAction:
    topic: Template
    payload: Any = ""
    qos: int = 1
    retain: bool = False


Action = WebhookAction | OutputAction | PublishAction


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: Trigger
    actions: tuple[Action, ...]
    condition: Template | None = None
    cooldown: float | None = None


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    device: Device
    state_dir: str
    gpio: GpioConfig
    mqtt: MqttConfig | None
    http: HttpConfig
    webhooks: dict[str, WebhookConfig]
    hooks: dict[str, HookConfig]
    rules: tuple[Rule, ...]
    raw: Any = field(default=None, compare=False, repr=False)  # validated plain values
    secret_paths: frozenset[tuple[Any, ...]] = field(default=frozenset(), compare=False,
                                                     repr=False)

    def summary(self) -> str:
        """The one line `edgehook check` prints."""
        def n(count: int, word: str) -> str:
            return f"{count} {word}" + ("" if count == 1 else "s")
        return ("config OK: " + ", ".join([
            n(len(self.gpio.inputs), "input"), n(len(self.gpio.outputs), "output"),
            n(len(self.rules), "rule"), n(len(self.webhooks), "webhook"),
            n(len(self.hooks), "hook")]))


# --------------------------------------------------------------------------- pass 2: schema

class _Checker:
    """Checks located YAML against schema nodes; returns plain values with defaults."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.marks: dict[tuple[Any, ...], Mark] = {}
        self.secrets: set[tuple[Any, ...]] = set()
        self._current: tuple[Any, ...] = ()

    def err(self, mark: Mark, msg: str) -> None:
        self.problems.append(f"{mark}: {msg}")

    def check(self, node: S.Node, loc: Located, path: tuple[Any, ...]) -> Any:
        self.marks[path] = loc.mark
        if loc.secret:
            self.secrets.add(path)
        if isinstance(node, S.Scalar):
            return self.scalar(node, loc, path)
        if isinstance(node, S.Obj):
            return self.obj(node, loc, path)
        if isinstance(node, S.NamedMap):
            return self.named_map(node, loc, path)
        if isinstance(node, S.ListOf):
            return self.list_of(node, loc, path)
        if isinstance(node, S.Union):
            return self.union(node, loc, path)
        if isinstance(node, S.BoolOr):
            if isinstance(loc.value, bool):
                return loc.value
            return self.obj(node.obj, loc, path)
        raise AssertionError(node)

    def _name(self, path: tuple[Any, ...]) -> str:
        parts = [p if isinstance(p, str) else f"[{p}]" for p in path]
        return ".".join(parts).replace(".[", "[") or "config"

    def _plain(self, v: Any, path: tuple[Any, ...]) -> Any:
        """A free-form value as plain data; tagged leaves inside it stay marked secret."""
        if isinstance(v, Located):
            if v.secret:
                self.secrets.add(path)
            v = v.value
        if isinstance(v, dict):
            return {str(k): self._plain(x, (*path, str(k))) for k, x in v.items()}
        if isinstance(v, list):
            return [self._plain(x, (*path, i)) for i, x in enumerate(v)]
        return v

    def scalar(self, node: S.Scalar, loc: Located, path: tuple[Any, ...]) -> Any:
        self._current = path
        v = loc.value
        where = self._name(path)
        if v is None:
            self.err(loc.mark, f"{where}: a value is required")
            return None
        if isinstance(v, (dict, list)) and node.kind != S.ANY:
            self.err(loc.mark, f"{where}: expected a {node.kind}, got a "
                               f"{'mapping' if isinstance(v, dict) else 'list'}")
            return None
        try:
            out = self._convert(node, v, loc.secret)
        except ValueError as exc:
            self.err(loc.mark, f"{where}: {exc}")
            return None
        if node.choices and out not in node.choices:
            hint = _suggest(str(out), [str(c) for c in node.choices])
            self.err(loc.mark, f"{where}: {out!r} is not one of "
                               f"{', '.join(map(str, node.choices))}{hint}")
            return None
        if node.minimum is not None and out < node.minimum:
            self.err(loc.mark, f"{where}: {out} is below the minimum {node.minimum:g}")
            return None
        if node.maximum is not None and out > node.maximum:
            self.err(loc.mark, f"{where}: {out} is above the maximum {node.maximum:g}")
            return None
        if node.pattern and not re.match(node.pattern, str(out)):
            self.err(loc.mark, f"{where}: {out!r} does not match {node.pattern}")
            return None
        return out

    def _convert(self, node: S.Scalar, v: Any, from_tag: bool) -> Any:
        kind = node.kind
        if kind == S.ANY:
            return self._plain(v, self._current)
        if kind == S.DURATION:
            return parse_duration(v)
        if kind == S.SIZE:
            return parse_size(v)
        if kind == S.ONOFF:
            return parse_onoff(v)
        if kind == S.BOOL:
            if isinstance(v, bool):
                return v
            if from_tag and str(v).lower() in ("true", "false", "yes", "no", "on", "off"):
                return str(v).lower() in ("true", "yes", "on")
            raise ValueError(f"expected true or false, got {v!r}")
        if kind == S.INT:
            if isinstance(v, bool) or not isinstance(v, int):
                if from_tag and re.fullmatch(r"-?\d+", str(v).strip()):
                    return int(v)
                raise ValueError(f"expected a whole number, got {v!r}")
            return v
        if kind == S.PIN:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ValueError(f"expected a pin like 17 or GPIO17, got {v!r}")
            return v
        if isinstance(v, bool):
            if kind == S.TEMPLATE or (node.choices and _onoff_word(v) in node.choices):
                return _onoff_word(v)  # `on_stop: off` parses as a YAML boolean
            raise ValueError(f"expected text, got {str(v).lower()} (quote it)")
        if isinstance(v, float) and node.choices and str(v) in node.choices:
            return str(v)  # protocol: 3.1 or 5
        if isinstance(v, int) and node.choices and str(v) in node.choices:
            return str(v)
        return str(v)

    def obj(self, node: S.Obj, loc: Located, path: tuple[Any, ...]) -> dict[str, Any] | None:
        where = self._name(path)
        if loc.value is None:
            loc = Located({}, loc.mark)
        if not isinstance(loc.value, dict):
            self.err(loc.mark, f"{where}: expected a mapping with keys "
                               f"{', '.join(node.keys)}")
            return None
        out: dict[str, Any] = {}
        given: dict[str, Located] = loc.value
        for key, value in given.items():
            if key not in node.keys:
                self.err(_key_mark(key, value, loc),
                         f"{where}: unknown key {key!r}{_suggest(key, list(node.keys))}")
        for key, spec in node.keys.items():
            if key in given:
                out[key] = self.check(spec.node, given[key], (*path, key))
            elif spec.required:
                self.err(loc.mark, f"{where}: missing required key {key!r}")
            else:
                out[key] = _copy_default(spec)
        return out

    def named_map(self, node: S.NamedMap, loc: Located, path: tuple[Any, ...]) -> dict[str, Any]:
        where = self._name(path)
        if loc.value is None:
            return {}
        if not isinstance(loc.value, dict):
            self.err(loc.mark, f"{where}: expected a mapping of names")
            return {}
        out = {}
        for name, value in loc.value.items():
            if not re.match(node.name_pattern, name):
                self.err(value.mark, f"{where}: name {name!r} may only use letters, digits, "
                                     "_ and -")
                continue
            out[name] = self.check(node.value, value, (*path, name))
        return out

    def list_of(self, node: S.ListOf, loc: Located, path: tuple[Any, ...]) -> list[Any]:
        where = self._name(path)
        items = loc.value
        if items is None:
            items = []
        if not isinstance(items, list):
            if node.single_ok:
                items = [loc]
            else:
                self.err(loc.mark, f"{where}: expected a list")
                return []
        if len(items) < node.min_items:
            self.err(loc.mark, f"{where}: needs at least {node.min_items} item(s)")
        return [self.check(node.item, item, (*path, i)) for i, item in enumerate(items)]

    def union(self, node: S.Union, loc: Located, path: tuple[Any, ...]) -> Any:
        where = self._name(path)
        v = loc.value
        if isinstance(v, str) and v in node.words:
            return v
        if not isinstance(v, dict):
            words = ", ".join(f"the word {w!r}" for w in node.words)
            self.err(loc.mark, f"{where}: expected a mapping with one of "
                               f"{', '.join(node.variants)}" + (f" or {words}" if words else ""))
            return None
        present = [k for k in node.variants if k in v]
        if len(present) != 1:
            if present:
                self.err(loc.mark, f"{where}: use only one of {', '.join(present)}")
            else:
                keys = list(v)
                hint = _suggest(keys[0], list(node.variants)) if keys else ""
                self.err(loc.mark, f"{where}: needs one of {', '.join(node.variants)}{hint}")
            return None
        out = self.obj(node.variants[present[0]], loc, path)
        if out is not None:
            out["__kind__"] = present[0]
        return out


def _onoff_word(v: bool) -> str:
    return "on" if v else "off"


def _key_mark(key: str, value: Located, parent: Located) -> Mark:
    """Where a key was written (falls back to its value's position)."""
    return (parent.keys or {}).get(key, value.mark)


def _copy_default(spec: S.Key) -> Any:
    d = spec.default
    if isinstance(d, dict):
        return dict(d)
    if isinstance(d, list):
        return list(d)
    return d


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- pass 3: build

class _Builder:
    """Turns checked plain values into dataclasses and checks cross-references."""

    def __init__(self, checker: _Checker, environ: dict[str, str], base: Path) -> None:
        self.c = checker
        self.environ = environ
        self.base = base  # relative file names are relative to the config file

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

    def build(self, raw: dict[str, Any], path: str) -> Config:
        dev = raw.get("device") or {}
        host = re.sub(r"[^a-z0-9_-]", "-", socket.gethostname().lower()) or "edgehook"
        device = Device(id=dev.get("id") or host, name=dev.get("name") or dev.get("id") or host)
        state_dir = raw.get("state_dir") or self.environ.get("STATE_DIRECTORY") or "./state"
        gpio = self.gpio(raw.get("gpio") or {})
        mqtt = self._each({"mqtt": raw.get("mqtt")},
                          lambda _, m: self.mqtt(m, device)).get("mqtt")
        http = self.http(raw.get("http") or {})
        webhooks = self._each(raw.get("webhooks"), self.webhook)
        hooks = self._each(raw.get("hooks"), self.hook)
        rules = tuple(self._each(
            dict(enumerate(raw.get("rules") or [])),
            lambda i, r: self.rule(i, r, gpio, webhooks, hooks, mqtt)).values())
        return Config(path=path, device=device, state_dir=state_dir, gpio=gpio, mqtt=mqtt,
                      http=http, webhooks=webhooks, hooks=hooks, rules=rules, raw=raw,
                      secret_paths=frozenset(self.c.secrets))

    def _each(self, items: dict[Any, Any] | None, build: Any) -> dict[Any, Any]:
        """Build each named item; one whose values already failed the schema is skipped.

        A value the schema rejected is None here, so building it may raise; that is
        only a consequence of a problem already reported, never a new one.
        """
        out = {}
        for name, value in (items or {}).items():
            if not value:
                continue
            try:
                built = build(name, value)
            except (TypeError, KeyError, AttributeError):
                if not self.c.problems:
                    raise
                continue
            if built is not None:
                out[name] = built
        return out

    def gpio(self, g: dict[str, Any]) -> GpioConfig:
        inputs: dict[str, InputConfig] = {}
        outputs: dict[str, OutputConfig] = {}
        pins: dict[str, tuple[str, ...]] = {}
        for name, i in (g.get("inputs") or {}).items():
            if not i or i.get("pin") is None:
                continue
            p = ("gpio", "inputs", name)
            if i["pull"] == "none" and not i.get("active"):
                self.err(p, f"gpio.inputs.{name}: pull: none needs active: high or low")
            elif i["pull"] != "none" and i.get("active"):
                self.err((*p, "active"), f"gpio.inputs.{name}: active is only used with "
                                         "pull: none (pull: up means active low)")
            f = i.get("filters") or {}
            gest = i.get("gestures")
            inputs[name] = InputConfig(
                name=name, pin=i["pin"], pull=i["pull"], active=i.get("active"),
                bounce=i.get("bounce"), hold=i.get("hold"), cls=i["class"],
                filters=Filters(f.get("delayed_on") or 0.0, f.get("delayed_off") or 0.0,
                                bool(f.get("invert"))),
                gestures=Gestures(gest["double_click"], gest["long_press"]) if gest else None,
                expect_every=i.get("expect_every"))
            self._pin(pins, i["pin"], (*p, "pin"))
        for name, o in (g.get("outputs") or {}).items():
            if not o or o.get("pin") is None:
                continue
            p = ("gpio", "outputs", name)
            outputs[name] = OutputConfig(
                name=name, pin=o["pin"], active=o["active"], initial=o["initial"],
                cls=o["class"], max_on=o.get("max_on"), on_stop=o["on_stop"],
                min_interval=o.get("min_interval"), interlock=o.get("interlock"))
            self._pin(pins, o["pin"], (*p, "pin"))
        for key in ("initial", "on_stop"):
            groups: dict[str, list[str]] = {}
            for o in outputs.values():
                if o.interlock and getattr(o, key) == "on":
                    groups.setdefault(o.interlock, []).append(o.name)
            for group, names in groups.items():
                if len(names) > 1:
                    self.err(("gpio", "outputs", names[1], key),
                             f"gpio.outputs.{names[1]}: {key}: on conflicts with {names[0]} "
                             f"in interlock group {group!r}")
        dup = set(inputs) & set(outputs)
        for name in sorted(dup):
            self.err(("gpio", "outputs", name), f"gpio.outputs.{name}: an input has the same "
                                                "name")
        return GpioConfig(backend=g.get("backend") or "auto", inputs=inputs, outputs=outputs)

    def _pin(self, pins: dict[str, tuple[str, ...]], pin: Any, path: tuple[str, ...]) -> None:
        key = _pin_key(pin)
        if key in pins:
            other = pins[key]
            self.err(path, f"{'.'.join(path[:-1])}: pin {pin} is already used by "
                           f"{'.'.join(other[:-1])} (line {self.mark(*other).line})")
        else:
            pins[key] = path

    def mqtt(self, m: dict[str, Any], device: Device) -> MqttConfig:
        tls = m.get("tls")
        tls_cfg = None
        if tls is True:
            tls_cfg = TlsConfig()
        elif isinstance(tls, dict):
            tls_cfg = TlsConfig(tls.get("ca_file"), tls.get("cert_file"), tls.get("key_file"),
                                bool(tls.get("insecure")))
            if bool(tls_cfg.cert_file) != bool(tls_cfg.key_file):
                self.err(("mqtt", "tls"), "mqtt.tls: cert_file and key_file go together")
        ha = m.get("homeassistant") or {"discovery": True, "prefix": "homeassistant"}
        prefix = (m.get("topic_prefix") or f"edgehook/{device.id}").rstrip("/")
        if any(c in prefix for c in "+#"):
            self.err(("mqtt", "topic_prefix"), "mqtt.topic_prefix: may not contain + or #")
        return MqttConfig(
            host=m["host"], port=m["port"], username=m.get("username"),
            password=m.get("password"), tls=tls_cfg, topic_prefix=prefix,
            client_id=m.get("client_id") or f"edgehook-{device.id}", keepalive=m["keepalive"],
            protocol=m["protocol"], qos=m["qos"], max_payload=m["max_payload"],
            queue_size=m["queue_size"], ha_discovery=ha["discovery"], ha_prefix=ha["prefix"])

    def http(self, h: dict[str, Any]) -> HttpConfig:
        try:
            host, port = parse_listen(h.get("listen") or "127.0.0.1:8080")
        except ValueError as exc:
            self.err(("http", "listen"), f"http.listen: {exc}")
            host, port = "127.0.0.1", 8080
        token = h.get("api_token")
        if not is_loopback(host) and not token:
            self.err(("http", "listen"), f"http.listen: {host} is reachable from the network, "
                                         "so http.api_token is required")
        return HttpConfig(host=host, port=port, api_token=token,
                          max_body=h.get("max_body") or 65536, timeout=h.get("timeout") or 5.0,
                          max_connections=h.get("max_connections") or 32,
                          trusted_proxies=self.networks(h.get("trusted_proxies"),
                                                        ("http", "trusted_proxies")))

    def networks(self, items: list[Any] | None, path: tuple[Any, ...],
                 ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Addresses and CIDR ranges; a bare address is a one-address network."""
        nets = []
        for i, cidr in enumerate(items or []):
            if cidr is None:
                continue
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                self.err((*path, i), f"{'.'.join(map(str, path))}: {cidr!r} is not an "
                                     "address or CIDR range (e.g. 192.168.1.0/24)")
        return tuple(nets)

    def tls_files(self, t: dict[str, Any] | None, path: tuple[Any, ...]) -> WebhookTls | None:
        """Each file must exist and be readable now, not at the first delivery."""
        if not t:
            return None
        where = ".".join(map(str, path))
        files: dict[str, str | None] = {}
        for key in ("ca_file", "cert_file", "key_file"):
            value = t.get(key)
            if not value:
                files[key] = None
                continue
            p = Path(value).expanduser()
            if not p.is_absolute():
                p = self.base / p
            files[key] = str(p)
            try:
                with open(p, "rb"):
                    pass
            except OSError as exc:
                reason = exc.strerror or str(exc)
                if isinstance(exc, PermissionError):
                    reason += " (the daemon's user must be able to read it)"
                self.err((*path, key), f"{where}.{key}: cannot read {p}: {reason}")
        if files["key_file"] and not files["cert_file"]:
            self.err((*path, "key_file"), f"{where}.key_file: needs cert_file (the client "
                                          "certificate the key belongs to)")
        return WebhookTls(**files)

    def signing(self, s: dict[str, Any] | None, path: tuple[Any, ...] = ()) -> Signing | None:
        if not s:
            return None
        secrets = tuple(x for x in s["secret"] if x)
        for i, secret in enumerate(secrets):
            try:
                secret_key(secret)
            except ValueError as exc:  # a whsec_ secret that is not base64
                self.err((*path, "secret", i), f"{'.'.join(map(str, path))}.secret: {exc}")
        return Signing(scheme=s["scheme"], secrets=secrets)

    def webhook(self, name: str, w: dict[str, Any]) -> WebhookConfig:
        p = ("webhooks", name)
        url = self.template(w["url"], (*p, "url"))
        if url is not None and getattr(url, "is_static", False) and not _http_url(url.source):
            self.err((*p, "url"), f"webhooks.{name}.url: {redact_url(url.source)!r} is not an "
                                  "http(s) URL")
        headers = {k: self.template(v, (*p, "headers", k)) for k, v in w["headers"].items()}
        retry = w.get("retry") or {"max_attempts": 12, "max_age": 900.0}
        return WebhookConfig(name=name, url=url, method=w["method"], headers=headers,
                             timeout=w["timeout"],
                             signing=self.signing(w.get("signing"), (*p, "signing")),
                             max_attempts=retry["max_attempts"], max_age=retry["max_age"],
                             tls=self.tls_files(w.get("tls"), (*p, "tls")))

    def hook(self, name: str, h: dict[str, Any]) -> HookConfig:
        p = ("hooks", name)
        a = h.get("auth")
        if a == "none":
            auth = HookAuth("none")
        elif isinstance(a, dict) and a.get("__kind__") == "token":
            auth = HookAuth("token", token=a["token"])
        elif isinstance(a, dict) and a.get("__kind__") == "hmac":
            auth = HookAuth("hmac", signing=self.signing(a["hmac"], (*p, "auth", "hmac")))
        else:
            auth = HookAuth("none")
        nets = self.networks(h.get("allow_from"), (*p, "allow_from"))
        rl = h.get("rate_limit") or {"requests": 30, "per": 60.0}
        if rl["per"] <= 0:
            self.err((*p, "rate_limit", "per"), f"hooks.{name}.rate_limit.per: must be > 0")
        return HookConfig(name=name, auth=auth, allow_from=nets, respond=h["respond"],
                          rate_requests=rl["requests"], rate_per=rl["per"] or 60.0)

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
            payload = self.tree(a.get("payload"), (*p, "payload"))
            return PublishAction(topic, payload, a.get("qos") if a.get("qos") is not None
                                 else mqtt.qos, a["retain"]) if topic else None
        return None

    def _missing(self, p: tuple[Any, ...], what: str, name: str, known: list[str]) -> None:
        self.err((*p, what), f"no {what} named {name!r}{_suggest(name, known)}"
                             + ("" if known else f" (no {what}s are defined)"))


def _pin_key(pin: Any) -> str:
    s = str(pin).upper()
    return "GPIO" + s if s.isdigit() else s.replace("BCM", "GPIO")


def _http_url(text: str) -> bool:
    """An http(s) URL with a host (credentials before the host are fine)."""
    if not re.match(r"^https?://[^/\s]+", text) or any(c.isspace() for c in text):
        return False
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return False
    return bool(parts.hostname)


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


# --------------------------------------------------------------------------- entry points

def load_config(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Config:
    """Load and validate a config file; raises ConfigError listing every problem."""
    env = dict(os.environ if environ is None else environ)
    name = str(path)
    try:
        located, problems = read_yaml(path, env)
    except YamlProblems as exc:
        raise ConfigError(exc.problems) from None
    checker = _Checker()
    checker.problems.extend(problems)
    if not isinstance(located.value, dict):
        raise ConfigError([*checker.problems, f"{located.mark}: the config must be a mapping"])
    raw = checker.check(S.ROOT, located, ())
    if raw is None:
        raise ConfigError(checker.problems)
    builder = _Builder(checker, env, Path(path).parent)
    cfg = builder.build(raw, name)
    if checker.problems:
        raise ConfigError(_sorted_problems(checker.problems))
    return cfg


def _sorted_problems(problems: list[str]) -> list[str]:
    def key(p: str) -> tuple[int, int]:
        m = re.match(r"^.*?:(\d+):(\d+): ", p)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    seen: list[str] = []
    for p in sorted(problems, key=key):
        if p not in seen:
            seen.append(p)
    return seen


def default_config_path(environ: dict[str, str] | None = None) -> str:
    """`$EDGEHOOK_CONFIG`, else /etc/edgehook/edgehook.yaml."""
    env = os.environ if environ is None else environ
    return env.get("EDGEHOOK_CONFIG") or DEFAULT_CONFIG


def state_path(cfg: Config, name: str) -> Path:
    """A file inside the state directory."""
    return Path(cfg.state_dir) / name
