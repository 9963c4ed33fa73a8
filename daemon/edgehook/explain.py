"""`edgehook check --explain`: the effective config, as YAML, with secrets masked.

Starts from `cfg.raw` (the checked values with the schema's defaults), adds what the
builder derives (device id from the hostname, MQTT topic prefix and client id, state
directory, rule names, retry and rate-limit policies, QoS inherited from `mqtt.qos`),
and walks the result along `schema.ROOT` so durations and sizes read as written
(`30s`, `64KiB`) and keys keep the schema's order.

Masked: every value that came from `!env` or `!file` (`cfg.secret_paths`), every
value under a key named password, secret, token or api_token, header values
whose name says they carry a credential, and the password in a `user:password@` URL.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from . import schema as S
from .config import Config
from .units import MASK, format_duration, format_size, redact_url

SECRET_KEYS = frozenset({"password", "secret", "token", "api_token"})
_SECRET_NAME = re.compile(r"auth|token|secret|password|signature|api[-_]?key", re.I)


def explain(cfg: Config) -> str:
    """The effective config of `cfg` as YAML text (no trailing newline)."""
    raw = copy.deepcopy(cfg.raw) if isinstance(cfg.raw, dict) else {}
    _add_derived(raw, cfg)
    body = _render(S.ROOT, raw, (), cfg.secret_paths, False)
    text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True, default_flow_style=False,
                          width=100)
    head = (f"# effective config of {cfg.path}: defaults applied; values from !env/!file and "
            f"secrets shown as {MASK}\n")
    return (head + text).rstrip("\n")


# --------------------------------------------------------------------------- derived values

def _add_derived(raw: dict[str, Any], cfg: Config) -> None:
    raw["device"] = {**(raw.get("device") or {}), "id": cfg.device.id, "name": cfg.device.name}
    raw["state_dir"] = cfg.state_dir
    if cfg.mqtt is not None and isinstance(raw.get("mqtt"), dict):
        m = raw["mqtt"]
        m["topic_prefix"] = cfg.mqtt.topic_prefix
        m["client_id"] = cfg.mqtt.client_id
        m["homeassistant"] = {"discovery": cfg.mqtt.ha_discovery, "prefix": cfg.mqtt.ha_prefix}
    gpio = raw.get("gpio")
    if isinstance(gpio, dict):
        for name, inp in (gpio.get("inputs") or {}).items():
            built = cfg.gpio.inputs.get(name)
            if isinstance(inp, dict) and built is not None and inp.get("filters") is None:
                inp["filters"] = {"delayed_on": built.filters.delayed_on,
                                  "delayed_off": built.filters.delayed_off,
                                  "invert": built.filters.invert}
    for name, w in (raw.get("webhooks") or {}).items():
        built_w = cfg.webhooks.get(name)
        if isinstance(w, dict) and built_w is not None and w.get("retry") is None:
            w["retry"] = {"max_attempts": built_w.max_attempts, "max_age": built_w.max_age}
    for name, h in (raw.get("hooks") or {}).items():
        built_h = cfg.hooks.get(name)
        if isinstance(h, dict) and built_h is not None and h.get("rate_limit") is None:
            h["rate_limit"] = {"requests": built_h.rate_requests, "per": built_h.rate_per}
    rules = raw.get("rules") or []
    for i, r in enumerate(rules):
        if isinstance(r, dict) and not r.get("name"):
            r["name"] = f"rule-{i + 1}"
    if len(rules) != len(cfg.rules):
        return  # a rule was dropped: do not guess which built rule is which
    for r, rule in zip(rules, cfg.rules, strict=True):
        if not isinstance(r, dict):
            continue
        when = r.get("when")
        if isinstance(when, dict) and when.get("__kind__") == "mqtt" and when.get("qos") is None:
            when["qos"] = rule.when.qos
        actions = r.get("do") or []
        if len(actions) != len(rule.actions):
            continue
        for a, act in zip(actions, rule.actions, strict=True):
            if isinstance(a, dict) and a.get("__kind__") == "publish" and a.get("qos") is None:
                a["qos"] = getattr(act, "qos", None)


# --------------------------------------------------------------------------- rendering

def _masked(value: Any) -> Any:
    if isinstance(value, list):
        return [MASK for _ in value]
    return MASK


def _render(node: S.Node, value: Any, path: tuple[Any, ...],
            secrets: frozenset[tuple[Any, ...]], masked: bool) -> Any:
    if value is None:
        return None
    if masked or path in secrets:
        return _masked(value)
    if isinstance(node, S.Scalar) and node.kind == S.ANY:
        return _plain(value, path, secrets)
    if isinstance(node, S.Scalar):
        return _scalar(node, value)
    if isinstance(node, S.BoolOr):
        if isinstance(value, bool):
            return value
        return _render(node.obj, value, path, secrets, masked)
    if isinstance(node, S.Union):
        if not isinstance(value, dict):
            return value  # a bare word such as `auth: none`
        variant = node.variants.get(value.get("__kind__", ""))
        if variant is None:
            return _plain(value)
        return _render(variant, value, path, secrets, masked)
    if isinstance(node, S.Obj):
        out: dict[str, Any] = {}
        for key in node.keys:
            if key in value and value[key] is not None:
                rendered = _render(node.keys[key].node, value[key], (*path, key), secrets,
                                   key in SECRET_KEYS)
                if rendered is not None and rendered != {} and rendered != []:
                    out[key] = rendered
        return out
    if isinstance(node, S.NamedMap):
        scalar_values = isinstance(node.value, S.Scalar)
        return {name: _render(node.value, v, (*path, name), secrets,
                              scalar_values and bool(_SECRET_NAME.search(name)))
                for name, v in value.items()}
    if isinstance(node, S.ListOf):
        return [_render(node.item, v, (*path, i), secrets, masked)
                for i, v in enumerate(value)]
    return _plain(value)


def _scalar(node: S.Scalar, value: Any) -> Any:
    if node.kind == S.DURATION and isinstance(value, (int, float)):
        return format_duration(float(value))
    if node.kind == S.SIZE and isinstance(value, int):
        return format_size(value)
    if isinstance(value, str) and "://" in value:
        return redact_url(value)  # https://user:password@host/: the password is a secret
    return value


def _plain(value: Any, path: tuple[Any, ...] = (),
           secrets: frozenset[tuple[Any, ...]] = frozenset()) -> Any:
    """Free-form values (bodies, payloads): tagged leaves and secret-named keys masked."""
    if path in secrets:
        return _masked(value)
    if isinstance(value, dict):
        return {k: _masked(v) if str(k).lower() in SECRET_KEYS else
                _plain(v, (*path, k), secrets)
                for k, v in value.items() if k != "__kind__"}
    if isinstance(value, list):
        return [_plain(v, (*path, i), secrets) for i, v in enumerate(value)]
    return value
