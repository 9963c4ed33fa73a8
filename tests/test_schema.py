"""The JSON Schema, the reference docs and the loader come from one place and agree.

* The committed `config/edgehook.schema.json` and `docs/configuration.md` are exactly
  what `make schema` (tools/schema_export.py) generates now.
* Every example config, every bad config of `test_config.py` and the corpora below go
  through both the loader (`load_config`) and the JSON Schema (`jsonschema`, reading the
  YAML the way an editor does: `!env`/`!file` are plain strings) with the same verdict.
  What JSON Schema cannot express (cross-references, checks that need two keys, template
  syntax, the environment) is listed explicitly as loader-only, each with its reason.
* `edgehook check --explain` shows defaults and never shows a secret.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from edgehook import schema as S
from edgehook.cli import main
from edgehook.config import load_config
from edgehook.errors import ConfigError
from edgehook.explain import MASK, explain
from test_config import BAD as CONFIG_TEST_BAD
from test_config import BASE

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ROOT / "tools" / "schema_export.py"
_spec = importlib.util.spec_from_file_location("schema_export", EXPORT)
assert _spec is not None and _spec.loader is not None
schema_export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(schema_export)
json_schema = schema_export.json_schema
markdown = schema_export.markdown
SCHEMA_FILE = ROOT / "config" / "edgehook.schema.json"
DOCS_FILE = ROOT / "docs" / "configuration.md"
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema=edgehook.schema.json"


# --------------------------------------------------------------------------- helpers

class EditorLoader(yaml.SafeLoader):
    """YAML as an editor's schema validator sees it: custom tags are just strings."""


EditorLoader.add_constructor("!env", lambda loader, node: loader.construct_scalar(node))
EditorLoader.add_constructor("!file", lambda loader, node: loader.construct_scalar(node))
# edgehook's loader keeps a bare date as text; so does this one.
EditorLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _json_keys(value: Any) -> Any:
    """Mapping keys as strings, as the loader (and JSON) has them."""
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_keys(v) for v in value]
    return value


VALIDATOR = jsonschema.Draft202012Validator(json_schema())


def schema_errors(text: str) -> list[str]:
    """Why the JSON Schema rejects `text` (empty when it accepts it)."""
    try:
        data = yaml.load(text, Loader=EditorLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        return [f"YAML: {exc}"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATOR.iter_errors(_json_keys(data))]


def loader_errors(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """Why `load_config` rejects `text` (empty when it accepts it)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load_config(path, environ=env or {})
    except ConfigError as exc:
        return exc.problems
    return []


# --------------------------------------------------------------------------- generated files

def test_committed_files_are_what_make_schema_writes(tmp_path: Path) -> None:
    """`make schema` runs tools/schema_export.py, which writes both files."""
    (tmp_path / "config").mkdir()
    (tmp_path / "docs").mkdir()
    subprocess.run([sys.executable, str(EXPORT), "--root", str(tmp_path)], check=True,
                   timeout=60)
    for rel in ("config/edgehook.schema.json", "docs/configuration.md"):
        assert (ROOT / rel).exists(), f"{rel} is missing: run `make schema`"
        assert (ROOT / rel).read_text() == (tmp_path / rel).read_text(), \
            f"{rel} is stale: run `make schema` and commit it"
    printed = subprocess.run([sys.executable, str(EXPORT), "--print", "json"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    assert json.loads(printed) == json_schema()


def test_the_schema_tool_is_not_part_of_the_daemon() -> None:
    assert not (ROOT / "daemon" / "edgehook" / "schema_export.py").exists()
    assert "schema" not in main.__globals__["_parser"]()._subparsers._group_actions[0].choices


def test_schema_is_valid_draft_2020_12() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"]
    assert schema["additionalProperties"] is False
    assert json.loads(json.dumps(schema)) == schema  # plain JSON, nothing Python-only


def _all_keys(node: S.Node, path: str = "") -> list[tuple[str, S.Key]]:
    out: list[tuple[str, S.Key]] = []
    if isinstance(node, S.BoolOr):
        node = node.obj
    if isinstance(node, S.Obj):
        for name, key in node.keys.items():
            out.append((f"{path}.{name}".lstrip("."), key))
            out += _all_keys(key.node, f"{path}.{name}")
    elif isinstance(node, S.NamedMap):
        out += _all_keys(node.value, f"{path}.<name>")
    elif isinstance(node, S.ListOf):
        out += _all_keys(node.item, f"{path}[]")
    elif isinstance(node, S.Union):
        for variant in node.variants.values():
            out += _all_keys(variant, path)
    return out


def test_every_key_is_described_and_documented() -> None:
    docs = markdown()
    schema_text = json.dumps(json_schema())
    for path, key in _all_keys(S.ROOT):
        assert key.desc.strip(), f"{path} has no description in schema.py"
        assert f"| `{path.rsplit('.', 1)[-1]}` |" in docs, f"{path} missing from the docs"
        assert json.dumps(key.desc) in schema_text, f"{path}: description not in the schema"


def test_schema_carries_defaults_enums_and_required_keys() -> None:
    schema = json_schema()
    inputs = schema["properties"]["gpio"]["properties"]["inputs"]
    inp = inputs["additionalProperties"]
    assert inp["required"] == ["pin"]
    assert inp["additionalProperties"] is False
    assert inp["properties"]["pull"]["default"] == "up"
    assert "sideways" not in inp["properties"]["pull"]["enum"]
    assert set(S.INPUT_CLASSES) <= set(inp["properties"]["class"]["enum"])
    retry = schema["properties"]["webhooks"]["additionalProperties"]["properties"]["retry"]
    assert retry["properties"]["max_age"]["default"] == "15m"
    assert schema["properties"]["http"]["properties"]["max_body"]["default"] == "64KiB"


# --------------------------------------------------------------------------- example configs

def test_there_are_example_configs() -> None:
    assert any(p.name == "demo.yaml" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_starts_with_schema_modeline(path: Path) -> None:
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    assert first == MODELINE, f"{path.name} must begin with `{MODELINE}`"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_passes_loader_and_schema(path: Path) -> None:
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        pytest.fail(f"{path.name} fails `edgehook check`:\n" + "\n".join(exc.problems))
    assert schema_errors(path.read_text()) == [], f"{path.name} fails the JSON Schema"


# --------------------------------------------------------------------------- corpora

def case(text: str) -> str:
    return textwrap.dedent(text)


# Valid configs: both must accept every one.
GOOD: dict[str, str] = {
    "base of test_config": BASE,
    "empty sections": "gpio:\nwebhooks:\nhooks:\nrules:\ndevice:\n",
    "on/off as YAML booleans": case("""\
        gpio:
          outputs:
            o: {pin: 17, initial: on, on_stop: off}
        rules:
          - when: {output: o, state: off}
            do: {output: o, set: on}
        """),
    "on/off words": case("""\
        gpio:
          outputs:
            o: {pin: BOARD11, initial: high, active: low, on_stop: keep}
            p: {pin: GPIO5, initial: "0"}
        rules:
          - when: {start: yes}
            do: [{output: o, set: toggle}, {output: p, set: "{{ event.type }}"}]
        """),
    "durations in every form": case("""\
        gpio:
          inputs:
            b:
              pin: 17
              bounce: 0.03
              hold: 1h30m
              expect_every: 1d
              filters: {delayed_on: 50ms, delayed_off: "2", invert: true}
              gestures: {double_click: 400 ms, long_press: 1.5s}
        webhooks:
          w: {url: "http://127.0.0.1:9/x", timeout: 10, retry: {max_age: 2h, max_attempts: 3}}
        rules:
          - when: {every: 90}
            cooldown: "1.5s"
            do: {webhook: w}
          - when: {input: b, event: silent}
            do: {webhook: w}
        """),
    "sizes": "http: {max_body: 1MiB}\nmqtt: {host: h, max_payload: 1000}\n",
    "tags on typed keys": case("""\
        mqtt:
          host: !env BROKER localhost
          port: !env MQTT_PORT 1884
          password: !env MQTT_PASSWORD hunter2
          keepalive: !env KEEPALIVE 30s
          tls: {insecure: !env TLS_INSECURE false}
        http:
          api_token: !file token.txt
        """),
    "mqtt everything": case("""\
        mqtt:
          host: broker.local
          username: 1234
          tls: true
          protocol: 5
          qos: 2
          homeassistant: {discovery: false, prefix: ha}
        rules:
          - when: {mqtt: "alarm/+/state", retained: yes, qos: 0}
            if: "{{ event.payload.state == 'triggered' }}"
            do:
              - publish: home/porch/light
                payload: {state: on, n: 1}
                retain: true
        """),
    "tls mapping": "mqtt:\n  host: h\n  protocol: '3.1.1'\n  tls: {ca_file: token.txt}\n",
    "hooks, every auth": case("""\
        hooks:
          a: {auth: none, allow_from: 192.168.1.0/24}
          b: {auth: {token: abc}, respond: sync, rate_limit: {requests: 5, per: 10s}}
          c: {auth: {hmac: {scheme: github, secret: [new, old]}}}
        """),
    "webhook everything": case("""\
        webhooks:
          w:
            url: "https://example.com/{{ event.type }}"
            method: PUT
            headers: {X-Extra: value, Authorization: "Bearer {{ event.id }}"}
            signing: {scheme: standard, secret: whsec_AAAA}
        """),
    "numeric names and ids": "device: {id: 123, name: 456}\nstate_dir: /tmp/x\n",
    "at times": case("""\
        gpio: {outputs: {o: {pin: 4}}}
        rules:
          - {name: morning, when: {at: "7:30"}, do: {output: o, set: on, for: 5m}}
          - {name: 2, when: {at: "23:00"}, do: {output: o, set: false}}
        """),
}

# Invalid configs the JSON Schema can recognise: both must reject every one.
BAD_BOTH: dict[str, str] = {
    "unknown top-level key": "gpoi: {backend: mock}\n",
    "unknown nested key": "gpio:\n  inptus: {}\n",
    "unknown action key": "webhooks: {w: {url: 'http://a.b'}}\n"
                          "rules: [{when: {start: true}, do: {webhook: w, sett: on}}]\n",
    "wrong type: list for port": "mqtt: {host: h, port: [1883]}\n",
    "wrong type: float for port": "mqtt: {host: h, port: 1.5}\n",
    "wrong type: word for port": "mqtt: {host: h, port: eighty}\n",
    "wrong type: text for boolean": "gpio: {inputs: {b: {pin: 17, filters: {invert: maybe}}}}\n",
    "wrong type: mapping for string": "mqtt: {host: {name: h}}\n",
    "wrong type: boolean for pin": "gpio: {inputs: {b: {pin: true}}}\n",
    "rules not a list": "rules: {name: x}\n",
    "config not a mapping": "- just\n- a list\n",
    "qos out of range": "mqtt: {host: h, qos: 3}\n",
    "max_attempts below minimum": "webhooks: {w: {url: 'http://a.b', retry: {max_attempts: 0}}}\n",
    "bad enum: pull": "gpio: {inputs: {b: {pin: 17, pull: sideways}}}\n",
    "bad enum: backend": "gpio: {backend: lgpio}\n",
    "bad enum: method GET": "webhooks: {w: {url: 'http://a.b', method: GET}}\n",
    "bad enum: protocol": "mqtt: {host: h, protocol: 4}\n",
    "bad on/off word": "gpio: {outputs: {o: {pin: 17, initial: maybe}}}\n",
    "missing required: pin": "gpio: {inputs: {b: {pull: up}}}\n",
    "missing required: mqtt host": "mqtt: {port: 1883}\n",
    "missing required: empty mqtt": "mqtt:\n",
    "missing required: webhook url": "webhooks: {w: {method: POST}}\n",
    "missing required: do": "rules: [{when: {start: true}}]\n",
    "missing required: signing secret": "webhooks: {w: {url: 'http://a', signing: "
                                        "{scheme: github}}}\n",
    "no value for a duration": "gpio: {inputs: {b: {pin: 17, hold: }}}\n",
    "bad duration: unit": "gpio: {inputs: {b: {pin: 17, hold: 2 seconds}}}\n",
    "bad duration: trailing text": "gpio: {inputs: {b: {pin: 17, bounce: 5m x}}}\n",
    "bad duration: negative": "gpio: {inputs: {b: {pin: 17, bounce: -1}}}\n",
    "bad duration: boolean": "webhooks: {w: {url: 'http://a', timeout: true}}\n",
    "bad size": "http: {max_body: lots}\n",
    "negative size": "http: {max_body: -1}\n",
    "zero size that must be positive": "mqtt: {host: h, max_payload: 0KiB}\n",
    "zero duration that must be positive": "http: {timeout: 0s}\n",
    "zero number of seconds that must be positive": "webhooks: {w: {url: 'http://a', "
                                                    "timeout: 0}}\n",
    "bad auth word": "hooks: {h: {auth: open}}\n",
    "auth word typo": "hooks: {h: {auth: nnone}}\n",
    "auth both token and hmac": "hooks: {h: {auth: {token: a, hmac: {scheme: github, "
                                "secret: s}}}}\n",
    "two trigger kinds": "gpio: {inputs: {b: {pin: 17}}}\nhooks: {x: {auth: none}}\n"
                         "rules: [{when: {input: b, hook: x}, do: {publish: t}}]\n",
    "no trigger kind": "rules: [{when: {event: pressed}, do: {publish: t}}]\n",
    "empty do": "gpio: {inputs: {b: {pin: 17}}}\n"
                "rules: [{when: {input: b}, do: []}]\n",
    "two action kinds": "mqtt: {host: h}\ngpio: {outputs: {o: {pin: 4}}}\n"
                        "rules: [{when: {start: true}, do: {publish: t, output: o, set: on}}]\n",
    "empty secret list": "webhooks: {w: {url: 'http://a', signing: {scheme: github, "
                         "secret: []}}}\n",
    "bad name in a map": "gpio:\n  inputs:\n    front door: {pin: 17}\n",
    "bad device id": "device: {id: Front Door}\n",
    "bad at time": "rules: [{when: {at: '25:00'}, do: {publish: t}}]\nmqtt: {host: h}\n",
    "bad tls word": "mqtt: {host: h, tls: yes please}\n",
    "bad event": "gpio: {inputs: {b: {pin: 17}}}\n"
                 "rules: [{when: {input: b, event: pushed}, do: {publish: t}}]\n",
    "yaml syntax": "gpio:\n  backend: [mock\n",
    "python tag": "device: !!python/object/apply:os.system ['true']\n",
}

# Invalid configs only the loader can recognise: JSON Schema validates one value at a
# time against its own type, so it cannot see that a name refers to nothing, that one
# key's value requires another key, what a template means, or what the environment
# holds. Each is excluded from the "same verdict" rule here, with its reason, and must
# still be accepted by the schema (so an editor never flags a valid config).
LOADER_ONLY: dict[str, tuple[str, str]] = {
    "rule names a missing input": (
        "cross-reference", "rules: [{when: {input: bell}, do: {publish: t}}]\n"
                           "mqtt: {host: h}\n"),
    "rule names a missing webhook": (
        "cross-reference", "rules: [{when: {start: true}, do: {webhook: nowhere}}]\n"),
    "rule names a missing output": (
        "cross-reference", "rules: [{when: {output: o}, do: {webhook: w}}]\n"
                           "webhooks: {w: {url: 'http://a'}}\n"),
    "rule names a missing hook": (
        "cross-reference", "rules: [{when: {hook: door}, do: {webhook: w}}]\n"
                           "webhooks: {w: {url: 'http://a'}}\n"),
    "publish without mqtt": ("cross-reference", "rules: [{when: {start: true}, "
                                                "do: {publish: t}}]\n"),
    "pin used twice": ("cross-reference", "gpio:\n  inputs: {a: {pin: 17}}\n"
                                          "  outputs: {b: {pin: GPIO17}}\n"),
    "pull none without active": ("two keys", "gpio: {inputs: {a: {pin: 17, pull: none}}}\n"),
    "held without hold": ("two keys", "gpio: {inputs: {a: {pin: 17}}}\nmqtt: {host: h}\n"
                                      "rules: [{when: {input: a, event: held}, "
                                      "do: {publish: t}}]\n"),
    "LAN listener without token": ("two keys", "http: {listen: 0.0.0.0:8080}\n"),
    "static set word": ("template meaning", "gpio: {outputs: {o: {pin: 4}}}\n"
                                            "rules: [{when: {start: true}, "
                                            "do: {output: o, set: maybe}}]\n"),
    "template syntax": ("template meaning", "mqtt: {host: h}\n"
                                            "rules: [{when: {start: true}, "
                                            "if: '{{ x == }}', do: {publish: t}}]\n"),
    "non-http url": ("text format", "webhooks: {w: {url: 'ftp://example'}}\n"),
    "bad CIDR": ("text format", "hooks: {h: {auth: none, allow_from: [300.1.1.0/24]}}\n"),
    "bad listen address": ("text format", "http: {listen: localhost}\n"),
    "bad mqtt filter": ("text format", "mqtt: {host: h}\n"
                                       "rules: [{when: {mqtt: 'a/#/b'}, do: {publish: t}}]\n"),
    "unset environment variable": ("environment", "http: {api_token: !env EDGEHOOK_UNSET_X}\n"),
    "unreadable !file": ("environment", "http: {api_token: !file /nonexistent/edgehook}\n"),
    "unreadable mqtt TLS file": ("environment", "mqtt: {host: h, tls: {ca_file: /nonexistent/"
                                                "ca.pem}}\n"),
    "empty hook token": ("text format", "hooks: {h: {auth: {token: ''}}}\n"),
    "api_token with a newline": ("text format", "http: {api_token: \"abc\\n\"}\n"),
    "publish to a wildcard": ("template meaning", "mqtt: {host: h}\n"
                                                  "rules: [{when: {start: true}, "
                                                  "do: {publish: 'a/+/b'}}]\n"),
    "tag value of the wrong type": ("environment", "mqtt: {host: h, port: !env PORT eighty}\n"),
    "duplicate key": ("YAML reading", "gpio:\n  backend: mock\n  backend: auto\n"),
    "merge key": ("YAML reading", "gpio:\n  <<: {backend: mock}\n"),
}

# test_config.py's bad configs the schema cannot see (see LOADER_ONLY for the reasons).
CONFIG_TEST_LOADER_ONLY = {
    "rule names missing input", "rule names missing output", "rule names missing webhook",
    "rule names missing hook", "missing env var", "duplicate key", "bad set word",
    "template syntax", "LAN listener without token", "pin used twice",
    "pull none needs active", "held needs hold", "mqtt trigger without mqtt",
    "bad mqtt filter", "bad url", "bad cidr", "bad whsec secret", "interlock on_stop on twice",
}


def test_corpora_are_big_enough() -> None:
    assert len(BAD_BOTH) >= 15 and len(GOOD) >= 10 and len(LOADER_ONLY) >= 10


@pytest.mark.parametrize("text", GOOD.values(), ids=GOOD.keys())
def test_good_config_accepted_by_both(tmp_path: Path, text: str) -> None:
    (tmp_path / "token.txt").write_text("s3cret\n")
    assert loader_errors(tmp_path, text) == []
    assert schema_errors(text) == []


@pytest.mark.parametrize("text", [pytest.param(text, id=name)
                                  for name, text in BAD_BOTH.items()])
def test_bad_config_rejected_by_both(tmp_path: Path, text: str) -> None:
    assert loader_errors(tmp_path, text), "the loader accepts it"
    assert schema_errors(text), "the JSON Schema accepts it"


@pytest.mark.parametrize("reason,text", LOADER_ONLY.values(), ids=LOADER_ONLY.keys())
def test_loader_only_problems(tmp_path: Path, reason: str, text: str) -> None:
    """JSON Schema cannot express these ({reason}); the loader must catch them."""
    assert loader_errors(tmp_path, text), f"the loader accepts it ({reason})"
    assert schema_errors(text) == [], "the schema now rejects it: move it to BAD_BOTH"


@pytest.mark.parametrize("text", [c[1] for c in CONFIG_TEST_BAD],
                         ids=[c[0] for c in CONFIG_TEST_BAD])
def test_config_test_bad_configs_same_verdict(request: pytest.FixtureRequest,
                                              tmp_path: Path, text: str) -> None:
    name = request.node.callspec.id
    assert loader_errors(tmp_path, text), "the loader accepts it"
    if name in CONFIG_TEST_LOADER_ONLY:
        assert schema_errors(text) == [], \
            "the schema now rejects it: drop it from CONFIG_TEST_LOADER_ONLY"
    else:
        assert schema_errors(text), (
            "the JSON Schema accepts a config the loader rejects: tighten the schema, or "
            "if JSON Schema cannot express it add it to CONFIG_TEST_LOADER_ONLY with a "
            "reason in LOADER_ONLY")


# --------------------------------------------------------------------------- explain

EXPLAIN = """\
device: {name: Porch}
mqtt:
  host: localhost
  password: !env MQTT_PASSWORD hunter2-from-env
  username: !env MQTT_USER edgehook
http:
  api_token: literal-api-token-value
webhooks:
  w:
    url: !env HOOK_URL https://example.com/secret-path-abc
    headers: {Authorization: "Bearer literal-header-token", X-Extra: shown-header}
    signing: {scheme: standard, secret: [literal-new-secret, literal-old-secret]}
hooks:
  h: {auth: {token: literal-hook-token}}
gpio:
  inputs:
    b: {pin: 17, bounce: 30ms}
rules:
  - when: {hook: h}
    do: {webhook: w}
  - when: {mqtt: a/b}
    do: {publish: x, payload: {token: literal-body-token, shown: yes}}
"""
SECRETS = ("hunter2-from-env", "secret-path-abc", "literal-api-token-value",
           "literal-header-token", "literal-new-secret", "literal-old-secret",
           "literal-hook-token", "literal-body-token")


def test_explain_masks_secrets_and_shows_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(EXPLAIN)
    cfg = load_config(path, environ={"MQTT_PASSWORD": "hunter2-from-env"})
    out = explain(cfg)
    for secret in SECRETS:
        assert secret not in out, f"{secret} leaked into --explain"
    assert "edgehook" not in out.split("username:")[1].splitlines()[0], \
        "values from !env are masked, whatever their key"
    data = yaml.safe_load(out)
    assert data["mqtt"]["password"] == MASK
    assert data["webhooks"]["w"]["signing"]["secret"] == [MASK, MASK]
    assert data["webhooks"]["w"]["headers"]["X-Extra"] == "shown-header"
    # defaults, including the ones the builder derives
    assert data["device"] == {"id": cfg.device.id, "name": "Porch"}
    assert data["state_dir"] == cfg.state_dir
    assert data["mqtt"]["port"] == 1883
    assert data["mqtt"]["topic_prefix"] == f"edgehook/{cfg.device.id}"
    assert data["mqtt"]["client_id"] == f"edgehook-{cfg.device.id}"
    assert data["mqtt"]["homeassistant"] == {"discovery": True, "prefix": "homeassistant"}
    assert data["http"]["listen"] == "127.0.0.1:8080"
    assert data["http"]["max_body"] == "64KiB"
    assert data["gpio"]["inputs"]["b"]["pull"] == "up"
    assert data["gpio"]["inputs"]["b"]["bounce"] == "30ms"
    assert data["webhooks"]["w"]["retry"] == {"max_attempts": 12, "max_age": "15m"}
    assert data["hooks"]["h"]["rate_limit"] == {"requests": 30, "per": "1m"}
    assert data["rules"][0]["name"] == "rule-1"
    assert data["rules"][1]["when"]["qos"] == 1
    assert "__kind__" not in out


def test_explained_config_is_valid_yaml_for_the_schema(tmp_path: Path) -> None:
    """Without secrets, --explain prints a config the loader and the schema accept."""
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    out = explain(load_config(path, environ={}))
    assert schema_errors(out) == []
    assert loader_errors(tmp_path, out) == []


def test_check_explain_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--explain", "-c", str(ROOT / "config" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "backend: mock" in out and "config OK" in out
