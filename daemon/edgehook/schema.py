"""The config's one source of truth: structure, types, defaults, choices and descriptions.

The validator (`schemacheck.py`) reads the node tree below, and `make schema` writes
the JSON Schema (`config/edgehook.schema.json`) and the reference docs
(`docs/configuration.md`) from it, so the three cannot drift apart. Nothing here reads
files or touches the world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Scalar kinds understood by the validator and the schema generator.
STR, INT, BOOL, DURATION, SIZE, TEMPLATE, PIN, ANY, ONOFF = (
    "str", "int", "bool", "duration", "size", "template", "pin", "any", "onoff",
)

INPUT_EVENTS = (
    "pressed", "released", "held", "click", "double_click", "long_press", "silent", "resumed",
)
INPUT_CLASSES = (
    "doorbell", "button", "motion", "occupancy", "presence", "door", "garage_door", "window",
    "opening", "lock", "moisture", "smoke", "gas", "vibration", "sound", "tamper", "safety",
    "problem", "power", "plug", "none",
)


@dataclass(frozen=True)
class Scalar:
    """A leaf value of one kind, optionally restricted to `choices` or a range.

    `positive`: a duration or size where zero means nothing sensible (a timeout, a
    body limit), so it must be more than 0.
    """

    kind: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    pattern: str | None = None
    secret: bool = False


@dataclass(frozen=True)
class Key:
    """One key of a mapping: its node, whether it is required, its default and description."""

    node: Node
    desc: str
    required: bool = False
    default: Any = None
    example: str | None = None


@dataclass(frozen=True)
class Obj:
    """A mapping with fixed keys; unknown keys are errors."""

    keys: dict[str, Key]
    desc: str = ""


@dataclass(frozen=True)
class NamedMap:
    """A mapping from user-chosen names to values of one node type."""

    value: Node
    desc: str = ""
    name_pattern: str = r"^[A-Za-z0-9_-]+$"


@dataclass(frozen=True)
class ListOf:
    """A sequence of one node type (a single value is also accepted where `single_ok`)."""

    item: Node
    single_ok: bool = False
    min_items: int = 0


@dataclass(frozen=True)
class Union:
    """One of several mappings told apart by which discriminator key is present."""

    variants: dict[str, Obj]
    words: dict[str, str] = field(default_factory=dict)  # bare strings accepted, with meaning
    desc: str = ""


@dataclass(frozen=True)
class BoolOr:
    """`false`/`true` or a mapping (e.g. `tls: false` or `tls: {ca_file: ...}`)."""

    obj: Obj


Node = Scalar | Obj | NamedMap | ListOf | Union | BoolOr


def _s(kind: str, **kw: Any) -> Scalar:
    return Scalar(kind, **kw)


def _enum(*choices: Any) -> Scalar:
    return Scalar(STR, choices=tuple(choices))


DURATION_NODE = _s(DURATION)
POSITIVE_DURATION = _s(DURATION, positive=True)
POSITIVE_SIZE = _s(SIZE, positive=True)

FILTERS = Obj({
    "delayed_on": Key(DURATION_NODE, "a change to active counts only after the level held that "
                      "long (glitch filter, same on every pin factory)", default=0.0,
                      example="50ms"),
    "delayed_off": Key(DURATION_NODE, "a change to inactive counts only after the level held "
                       "that long", default=0.0, example="50ms"),
    "invert": Key(_s(BOOL), "swap active and inactive after reading the pin", default=False),
}, "software filters applied to edges before rules see them")

GESTURES = Obj({
    "double_click": Key(POSITIVE_DURATION, "a second press starting within this long after the "
                        "first release is a double_click (no click is reported)",
                        default=0.4, example="400ms"),
    "long_press": Key(POSITIVE_DURATION, "pressed at least this long is a long_press, not a click",
                      default=1.0, example="1s"),
}, "emit click, double_click and long_press events")

INPUT = Obj({
    "pin": Key(_s(PIN), "any pin name gpiozero accepts: 17, GPIO17, BOARD11", required=True,
               example="GPIO17"),
    "pull": Key(_enum("up", "down", "none"), "internal pull resistor; none needs `active`",
                default="up"),
    "active": Key(_enum("high", "low"), "the level that means pressed (only with pull: none)"),
    "bounce": Key(DURATION_NODE, "debounce time handed to the pin driver (real pins only)",
                  example="30ms"),
    "hold": Key(POSITIVE_DURATION, "emit `held` after the input stayed pressed this long",
                example="2s"),
    "class": Key(_enum(*INPUT_CLASSES), "what is wired: sets the Home Assistant device class",
                 default="button"),
    "filters": Key(FILTERS, "software filters, the same on every pin factory"),
    "gestures": Key(GESTURES, "click / double_click / long_press detection"),
    "expect_every": Key(POSITIVE_DURATION, "emit `silent` once when the input did not change for "
                        "this long, `resumed` when it does again", example="12h"),
}, "a GPIO input (button, doorbell, PIR, reed contact)")

OUTPUT = Obj({
    "pin": Key(_s(PIN), "any pin name gpiozero accepts", required=True, example="GPIO27"),
    "active": Key(_enum("high", "low"), "the level that means on", default="high"),
    "initial": Key(_s(ONOFF), "state set at start", default="off"),
    "class": Key(_enum("light", "switch"), "Home Assistant entity kind", default="switch"),
    "max_on": Key(POSITIVE_DURATION, "switched off after this long on, whatever else happens",
                  example="10m"),
    "on_stop": Key(_enum("off", "on", "keep"), "state left on a clean shutdown", default="off"),
    "min_interval": Key(DURATION_NODE, "changes faster than this are refused (protects relays)",
                        example="1s"),
    "interlock": Key(_s(STR), "group name: outputs of one group are never on together",
                     example="garage"),
}, "a GPIO output (relay, LED, buzzer)")

GPIO = Obj({
    "backend": Key(_enum("auto", "mock"), "auto = gpiozero's pin factory (lgpio on a Pi); "
                   "mock = simulated pins", default="auto"),
    "inputs": Key(NamedMap(INPUT, "inputs by name"), "GPIO inputs by name", default={}),
    "outputs": Key(NamedMap(OUTPUT, "outputs by name"), "GPIO outputs by name", default={}),
}, "GPIO pins")

TLS = Obj({
    "ca_file": Key(_s(STR), "CA bundle to verify the broker (default: system CAs)",
                   example="/etc/edgehook/ca.pem"),
    "cert_file": Key(_s(STR), "client certificate (mutual TLS)",
                     example="/etc/edgehook/client.crt"),
    "key_file": Key(_s(STR), "client key (mutual TLS)", example="/etc/edgehook/client.key"),
    "insecure": Key(_s(BOOL), "skip hostname verification (testing only)", default=False),
}, "TLS to the broker; each file must be readable when the config is loaded (a relative "
   "path is relative to the config file)")

MQTT = Obj({
    "host": Key(_s(STR), "broker host name or address", required=True, example="192.168.1.10"),
    "port": Key(_s(INT, minimum=1, maximum=65535), "broker port", default=1883),
    "username": Key(_s(STR), "user name", example="edgehook"),
    "password": Key(_s(STR, secret=True), "password (use !env or !file)",
                     example="!env MQTT_PASSWORD"),
    "tls": Key(BoolOr(TLS), "false, true (system CAs) or {ca_file, cert_file, key_file}",
               default=False),
    "topic_prefix": Key(_s(STR), "prefix of the device topics (default edgehook/<device.id>)",
                         example="edgehook/front-door"),
    "client_id": Key(_s(STR), "MQTT client id, fixed so the session persists "
                     "(default edgehook-<device.id>)", example="edgehook-front-door"),
    "keepalive": Key(POSITIVE_DURATION, "MQTT keepalive", default=60.0),
    "protocol": Key(_enum("3.1.1", "5"), "MQTT protocol version", default="3.1.1"),
    "qos": Key(_s(INT, minimum=0, maximum=2), "QoS for subscriptions, events and commands",
               default=1),
    "max_payload": Key(POSITIVE_SIZE, "larger inbound payloads are logged and dropped",
                       default=262144, example="256KiB"),
    "queue_size": Key(_s(INT, minimum=1), "publishes kept while disconnected", default=1000),
    "homeassistant": Key(Obj({
        "discovery": Key(_s(BOOL), "announce entities to Home Assistant", default=True),
        "prefix": Key(_s(STR), "Home Assistant discovery prefix", default="homeassistant"),
    }), "Home Assistant MQTT discovery"),
}, "MQTT broker connection (no section, no MQTT)")

HTTP = Obj({
    "listen": Key(_s(STR), "address:port of the HTTP API and hooks; a non-loopback address "
                  "needs api_token", default="127.0.0.1:8080"),
    "api_token": Key(_s(STR, secret=True), "bearer token required on /api/* and the status "
                     "page; not empty, no spaces or control characters",
                     example="!env EDGEHOOK_API_TOKEN"),
    "max_body": Key(POSITIVE_SIZE, "larger request bodies get 413", default=65536, example="64KiB"),
    "timeout": Key(POSITIVE_DURATION, "a client must send its whole request within this time",
                   default=5.0),
    "max_connections": Key(_s(INT, minimum=1), "concurrent connections served", default=32),
    "trusted_proxies": Key(ListOf(_s(STR), single_ok=True),
                           "addresses or CIDR ranges of reverse proxies (nginx, Caddy) whose "
                           "X-Forwarded-For names the client that allow_from and rate limits "
                           "judge", default=[], example="[127.0.0.1/32]"),
}, "HTTP listener")

WEBHOOK_TLS = Obj({
    "ca_file": Key(_s(STR), "CA bundle to verify the target with (a private CA; default: "
                   "the system CAs)", example="/etc/edgehook/ca.pem"),
    "cert_file": Key(_s(STR), "client certificate (mutual TLS)",
                     example="/etc/edgehook/client.crt"),
    "key_file": Key(_s(STR), "client key; needs cert_file (default: the key is in cert_file)",
                    example="/etc/edgehook/client.key"),
}, "TLS settings for one target")

SIGNING = Obj({
    "scheme": Key(_enum("standard", "github"), "Standard Webhooks or GitHub's "
                  "X-Hub-Signature-256", required=True),
    "secret": Key(ListOf(_s(STR, secret=True), single_ok=True, min_items=1),
                  "secret, or a list [new, old] to sign with both while rotating",
                  required=True, example="!env SIGNING_SECRET"),
})

WEBHOOK = Obj({
    "url": Key(_s(TEMPLATE), "target URL (template); user:password@ in it is sent as HTTP "
               "Basic auth", required=True,
               example="!env DISCORD_WEBHOOK_URL"),
    "method": Key(_enum("POST", "PUT", "PATCH"), "HTTP method", default="POST"),
    "headers": Key(NamedMap(_s(TEMPLATE), name_pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"),
                   "extra headers (values are templates)", default={},
                   example="{X-Extra: value}"),
    "timeout": Key(POSITIVE_DURATION, "per-attempt timeout", default=10.0),
    "signing": Key(SIGNING, "sign each delivery"),
    "retry": Key(Obj({
        "max_attempts": Key(_s(INT, minimum=1), "attempts in all, the first included",
                            default=12),
        "max_age": Key(POSITIVE_DURATION, "give up (dead) this long after the event", default=900.0,
                       example="15m"),
    }), "retry policy"),
    "tls": Key(WEBHOOK_TLS, "private CA and client certificate for https:// targets"),
}, "an outbound webhook target")

HOOK_AUTH = Union({
    "token": Obj({"token": Key(_s(STR, secret=True), "Authorization: Bearer <token> or "
                               "X-Edgehook-Token; not empty, no spaces or control "
                               "characters", required=True, example="!env HOOK_TOKEN")}),
    "hmac": Obj({"hmac": Key(SIGNING, "HMAC signature check", required=True)}),
}, words={"none": "no authentication (must be written to be allowed)"},
    desc="token, hmac or the word none")

HOOK = Obj({
    "auth": Key(HOOK_AUTH, "how callers prove who they are", required=True),
    "allow_from": Key(ListOf(_s(STR), single_ok=True), "CIDR ranges allowed to call",
                      example="[192.168.1.0/24]"),
    "respond": Key(_enum("async", "sync"), "async: 202 once queued; sync: 200 with the "
                   "actions' results", default="async"),
    "rate_limit": Key(Obj({
        "requests": Key(_s(INT, minimum=1), "requests allowed per period (burst)", default=30),
        "per": Key(POSITIVE_DURATION, "the period", default=60.0),
    }), "token bucket per hook; excess gets 429"),
}, "an inbound endpoint: POST /hooks/<name>")

WHEN = Union({
    "input": Obj({
        "input": Key(_s(STR), "input name", required=True, example="doorbell"),
        "event": Key(_enum(*INPUT_EVENTS), "which input event", default="pressed"),
    }),
    "mqtt": Obj({
        "mqtt": Key(_s(STR), "topic filter, + and # allowed", required=True,
                     example="alarm/+/state"),
        "qos": Key(_s(INT, minimum=0, maximum=2), "subscription QoS (default mqtt.qos)"),
        "retained": Key(_s(BOOL), "also fire on retained messages", default=False),
        "expect_every": Key(POSITIVE_DURATION, "emit mqtt.silent once when nothing arrived for "
                            "this long"),
        "event": Key(_enum("message", "silent", "resumed"), "which MQTT event",
                     default="message"),
    }),
    "hook": Obj({"hook": Key(_s(STR), "hook name", required=True, example="porch-light")}),
    "output": Obj({
        "output": Key(_s(STR), "output name", required=True, example="porch_light"),
        "state": Key(_s(ONOFF), "only changes to this state"),
    }),
    "start": Obj({"start": Key(_s(BOOL), "fire once when the daemon starts", required=True)}),
    "at": Obj({"at": Key(_s(STR, pattern=r"^([01]?\d|2[0-3]):[0-5]\d$"),
                         "local time HH:MM, daily", required=True, example='"23:00"')}),
    "every": Obj({"every": Key(DURATION_NODE, "fire periodically", required=True,
                               example="5m")}),
}, desc="the trigger: exactly one of input, mqtt, hook, output, start, at, every")

ACTION = Union({
    "webhook": Obj({
        "webhook": Key(_s(STR), "webhook target name", required=True, example="discord"),
        "body": Key(_s(ANY), "body: a mapping/list becomes JSON, strings are templates; "
                    "default: the event",
                    example='{content: "Someone is at the {{ device.name }}"}'),
    }),
    "output": Obj({
        "output": Key(_s(STR), "output name", required=True, example="porch_light"),
        "set": Key(_s(TEMPLATE), "on | off | toggle (template)", required=True,
                   example='"{{ event.body.state }}"'),
        "for": Key(DURATION_NODE, "revert after this long", example="30s"),
    }),
    "publish": Obj({
        "publish": Key(_s(TEMPLATE), "MQTT topic (template) to publish to: one topic, "
                       "no + or # wildcards", required=True,
                       example="home/porch/light"),
        "payload": Key(_s(ANY), "payload: a mapping becomes JSON, strings are templates",
                       default="", example='"{{ event.body.state }}"'),
        "qos": Key(_s(INT, minimum=0, maximum=2), "QoS (default mqtt.qos)"),
        "retain": Key(_s(BOOL), "retain the message", default=False),
    }),
}, desc="one of webhook, output, publish")

RULE = Obj({
    "name": Key(_s(STR), "name used in logs (default rule-<n>)", example="ring"),
    "when": Key(WHEN, "the trigger", required=True),
    "if": Key(_s(TEMPLATE), "template that must render truthy",
              example="\"{{ event.payload.state == 'triggered' }}\""),
    "cooldown": Key(DURATION_NODE, "ignore further firings for this long", example="10s"),
    "do": Key(ListOf(ACTION, single_ok=True, min_items=1), "actions, in order", required=True),
}, "a rule: when, if, do")

ROOT = Obj({
    "device": Key(Obj({
        "id": Key(_s(STR, pattern=r"^[a-z0-9_-]+$"), "device id (default: the hostname)",
                  example="front-door"),
        "name": Key(_s(STR), "display name (default: id)", example="Front door"),
    }), "this device"),
    "state_dir": Key(_s(STR), "where the outbox lives (default $STATE_DIRECTORY, else ./state)",
                     example="/var/lib/edgehook"),
    "gpio": Key(GPIO, "GPIO inputs and outputs"),
    "mqtt": Key(MQTT, "MQTT broker (optional)"),
    "http": Key(HTTP, "HTTP API and hooks"),
    "webhooks": Key(NamedMap(WEBHOOK), "outbound webhook targets by name", default={}),
    "hooks": Key(NamedMap(HOOK), "inbound hooks by name", default={}),
    "rules": Key(ListOf(RULE), "rules", default=[]),
}, "edgehook configuration")
