"""The validated config as frozen dataclasses: what every other module reads.

Built by `config.load_config`; nothing here parses or checks. Frozen, so a reload
builds a new `Config` beside the running one and swaps one reference.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from .templates import Template
from .yamlload import Mark


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
    """One loaded config file; `raw` and the located extras serve `check` and the CLI."""

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
    # where each value was written, for messages that come after loading
    marks: dict[tuple[Any, ...], Mark] = field(default_factory=dict, compare=False, repr=False)
    # problems that do not stop the daemon (placeholder secrets), FILE:LINE:COL each
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # lenient loads only: values whose !env/!file could not be read -> what they said
    unresolved: dict[tuple[Any, ...], str] = field(default_factory=dict, compare=False,
                                                   repr=False)

    def summary(self) -> str:
        """The one line `edgehook check` prints."""
        def n(count: int, word: str) -> str:
            return f"{count} {word}" + ("" if count == 1 else "s")
        return ("config OK: " + ", ".join([
            n(len(self.gpio.inputs), "input"), n(len(self.gpio.outputs), "output"),
            n(len(self.rules), "rule"), n(len(self.webhooks), "webhook"),
            n(len(self.hooks), "hook")]))

    def where(self, *path: Any) -> str:
        """FILE:LINE:COL of a value (or of the nearest enclosing one that was written)."""
        while path and path not in self.marks:
            path = path[:-1]
        return str(self.marks.get(path, Mark(self.path, 1, 1)))
