"""Pass 3 of loading: checked plain values -> frozen dataclasses, and cross-checks.

What the schema cannot say: names that refer to nothing, keys that need another key,
templates that do not compile, pins gpiozero would refuse or that two devices share,
files that cannot be read, and a LAN listener without a real token.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Any

from .checker_rules import RuleChecks
from .model import (
    Config,
    Device,
    Filters,
    Gestures,
    GpioConfig,
    HookAuth,
    HookConfig,
    HttpConfig,
    InputConfig,
    MqttConfig,
    OutputConfig,
    Signing,
    TlsConfig,
    WebhookConfig,
    WebhookTls,
)
from .pins import canonical_pin
from .signing import secret_key
from .units import is_http_url, is_loopback, parse_listen, redact_url

# A value still holding an example's placeholder (`change-me`, `CHANGE-ME`, `changeme`).
PLACEHOLDER = re.compile(r"change[-_]?me", re.I)
# Keys whose values are credentials or carry them (URLs with a token in the path).
_SECRET_KEYS = frozenset({"password", "secret", "token", "api_token", "url"})


class Builder(RuleChecks):
    """Turns checked plain values into dataclasses and checks cross-references (the
    rules section's in :class:`checker_rules.RuleChecks`)."""

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
        self.rule_names(raw.get("rules") or [])
        return Config(path=path, device=device, state_dir=state_dir, gpio=gpio, mqtt=mqtt,
                      http=http, webhooks=webhooks, hooks=hooks, rules=rules, raw=raw,
                      secret_paths=frozenset(self.c.secrets), marks=dict(self.c.marks),
                      warnings=tuple(self.placeholders(raw)),
                      unresolved=dict(self.c.unresolved))

    def placeholders(self, value: Any, path: tuple[Any, ...] = ()) -> list[str]:
        """Warnings for secrets and URLs that still hold an example's placeholder."""
        if isinstance(value, dict):
            return [w for k, v in value.items() if k != "__kind__"
                    for w in self.placeholders(v, (*path, k))]
        if isinstance(value, list):
            return [w for i, v in enumerate(value) for w in self.placeholders(v, (*path, i))]
        if not isinstance(value, str) or not PLACEHOLDER.search(value):
            return []
        named = [k for k in path if isinstance(k, str)]
        if path not in self.c.secrets and not (set(named[-1:]) & _SECRET_KEYS) \
                and "headers" not in named:
            return []
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
        return [f"{self.mark(*path)}: warning: {where} is still a placeholder (it contains "
                f"{PLACEHOLDER.search(value).group(0)!r}): set the real value before you "
                "rely on it"]

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
        """The pin as gpiozero names it on a 40-pin header, used by one device only."""
        device = ".".join(path[:-1])
        if self.lenient:
            key = _pin_key(pin)
        else:
            try:
                key = canonical_pin(pin)
            except ValueError as exc:
                self.err(path, f"{device}.pin: {exc}")
                return
        if key in pins:
            other = pins[key]
            same = f"pin {pin}" if str(pin) == key else f"pin {pin} ({key})"
            self.err(path, f"{device}: {same} is already used by "
                           f"{'.'.join(other[:-1])} (line {self.mark(*other).line})")
        else:
            pins[key] = path

    def mqtt(self, m: dict[str, Any], device: Device) -> MqttConfig:
        tls = m.get("tls")
        tls_cfg = None
        if tls is True:
            tls_cfg = TlsConfig()
        elif isinstance(tls, dict):
            files = self.readable_files(tls, ("mqtt", "tls"))
            tls_cfg = TlsConfig(**files, insecure=bool(tls.get("insecure")))
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
        if ("http", "api_token") in self.c.unresolved:
            token = None  # the CLI tries without it (and says how to give it)
        elif token is not None and not self.token(
                token, ("http", "api_token"), "; leave the key out to run the API without "
                                              "a token"):
            pass  # said why; the listener check below would only repeat it
        elif not is_loopback(host) and not token:
            self.err(("http", "listen"), f"http.listen: {host} is reachable from the network, "
                                         "so http.api_token is required")
        elif not is_loopback(host) and PLACEHOLDER.search(token):
            self.err(("http", "api_token"), f"http.api_token: still the example's placeholder "
                     f"while http.listen ({host}) is reachable from the network: anyone who "
                     "read the example could use the API; set a real token (e.g. `openssl "
                     "rand -hex 32`)")
        return HttpConfig(host=host, port=port, api_token=token,
                          max_body=h.get("max_body") or 65536, timeout=h.get("timeout") or 5.0,
                          max_connections=h.get("max_connections") or 32,
                          trusted_proxies=self.networks(h.get("trusted_proxies"),
                                                        ("http", "trusted_proxies")))

    def token(self, token: str, path: tuple[Any, ...], empty_hint: str = "") -> bool:
        """A bearer token a client can send: not empty, no whitespace, no control
        characters (the message never shows the token)."""
        if path in self.c.unresolved:
            return True
        where = ".".join(map(str, path))
        if not token:
            self.err(path, f"{where}: is empty (an !env variable set to \"\" or an empty "
                           f"file?), so no request could ever match it{empty_hint}")
            return False
        if any(c.isspace() or not c.isprintable() for c in token):
            self.err(path, f"{where}: contains whitespace or a control character (a "
                           "trailing newline?), which no Authorization: Bearer header "
                           "can carry; use letters, digits and punctuation, e.g. "
                           "`openssl rand -hex 32`")
            return False
        return True

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
        """A target's TLS files, each readable now, not at the first delivery."""
        if not t:
            return None
        files = self.readable_files(t, path)
        if files["key_file"] and not files["cert_file"]:
            self.err((*path, "key_file"), f"{'.'.join(map(str, path))}.key_file: needs "
                                          "cert_file (the client certificate the key "
                                          "belongs to)")
        return WebhookTls(**files)

    def readable_files(self, t: dict[str, Any], path: tuple[Any, ...]) -> dict[str, str | None]:
        """ca_file, cert_file and key_file made absolute (relative to the config file),
        each one readable now (lenient loads take them as written)."""
        if self.lenient:
            return {k: t.get(k) for k in ("ca_file", "cert_file", "key_file")}
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
        return files

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
        if url is not None and getattr(url, "is_static", False) and not is_http_url(url.source) \
                and (*p, "url") not in self.c.unresolved:
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
            if a["token"] is not None:
                self.token(a["token"], (*p, "auth", "token"))
        elif isinstance(a, dict) and a.get("__kind__") == "hmac":
            auth = HookAuth("hmac", signing=self.signing(a["hmac"], (*p, "auth", "hmac")))
        else:
            auth = HookAuth("none")
        nets = self.networks(h.get("allow_from"), (*p, "allow_from"))
        rl = h.get("rate_limit") or {"requests": 30, "per": 60.0}
        return HookConfig(name=name, auth=auth, allow_from=nets, respond=h["respond"],
                          rate_requests=rl["requests"], rate_per=rl["per"] or 60.0)

def _pin_key(pin: Any) -> str:
    s = str(pin).upper()
    return "GPIO" + s if s.isdigit() else s.replace("BCM", "GPIO")
