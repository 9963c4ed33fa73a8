"""Config loading: good configs load; every bad one names FILE:LINE:COL, all at once."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest

from edgehook.config import (
    load_config,
    parse_duration,
    parse_listen,
    parse_onoff,
    parse_size,
)
from edgehook.errors import ConfigError

BASE = """\
device: {id: front-door, name: Front door}
gpio:
  backend: mock
  inputs:
    doorbell: {pin: GPIO17, class: doorbell, hold: 2s}
  outputs:
    porch_light: {pin: GPIO27, class: light}
webhooks:
  discord: {url: "http://127.0.0.1:9/hook"}
hooks:
  porch: {auth: {token: abc}}
rules:
  - name: ring
    when: {input: doorbell}
    do:
      - webhook: discord
      - output: porch_light
        set: on
        for: 30s
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ=env or {})
    return exc.value.problems


def test_base_config_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), environ={})
    assert cfg.summary() == "config OK: 1 input, 1 output, 1 rule, 1 webhook, 1 hook"
    assert cfg.device.id == "front-door"
    assert cfg.gpio.inputs["doorbell"].hold == 2.0
    assert cfg.rules[0].actions[1].duration == 30.0


# Each case: YAML text, expected line, and a regex the message must match.
BAD = [
    ("unknown key with suggestion", "gpio:\n  backend: mock\n  inptus: {}\n", 3,
     r"unknown key 'inptus' \(did you mean 'inputs'\?\)"),
    ("bad enum", "gpio:\n  backend: lgpio\n", 2, r"'lgpio' is not one of auto, mock"),
    ("bad duration", "gpio:\n  inputs:\n    b: {pin: 17, hold: 2 seconds}\n", 3,
     r"not a duration"),
    ("missing pin", "gpio:\n  inputs:\n    b: {pull: up}\n", 3, r"missing required key 'pin'"),
    ("rule names missing input", "gpio: {inputs: {b: {pin: 17}}}\nrules:\n"
     "  - when: {input: bell}\n    do: [{publish: x}]\n", 3,
     r"no input named 'bell'"),
    ("rule names missing output", "gpio: {outputs: {light: {pin: 17}}}\nrules:\n"
     "  - when: {start: true}\n    do:\n      - output: lihgt\n        set: on\n", 5,
     r"no output named 'lihgt' \(did you mean 'light'\?\)"),
    ("rule names missing webhook", "rules:\n  - when: {start: true}\n"
     "    do: [{webhook: nowhere}]\n", 3, r"no webhook named 'nowhere'"),
    ("rule names missing hook", "rules:\n  - when: {hook: door}\n    do: [{webhook: x}]\n",
     2, r"no hook named 'door'"),
    ("missing env var", "http:\n  api_token: !env EDGEHOOK_TEST_UNSET_VAR\n", 2,
     r"environment variable EDGEHOOK_TEST_UNSET_VAR is not set"),
    ("duplicate key", "gpio:\n  backend: mock\n  backend: auto\n", 3,
     r"duplicate key 'backend' \(first at line 2\)"),
    ("python tag", "device: !!python/object/apply:os.system ['true']\n", 1,
     r"unsupported tag"),
    ("two triggers", "gpio: {inputs: {b: {pin: 17}}}\nrules:\n"
     "  - when: {input: b, hook: x}\n    do: [{output: o, set: on}]\n", 3,
     r"use only one of input, hook"),
    ("no trigger", "rules:\n  - when: {}\n    do: [{webhook: x}]\n", 2, r"needs one of"),
    ("empty do", "gpio: {inputs: {b: {pin: 17}}}\nrules:\n  - when: {input: b}\n    do: []\n",
     4, r"needs at least 1"),
    ("bad set word", "gpio: {outputs: {o: {pin: 17}}}\nrules:\n  - when: {start: true}\n"
     "    do:\n      - output: o\n        set: maybe\n", 6, r"'maybe' is not on, off or toggle"),
    ("template syntax", "gpio: {outputs: {o: {pin: 17}}}\nrules:\n  - when: {start: true}\n"
     "    if: '{{ event.type == }}'\n    do: [{output: o, set: on}]\n", 4, r"template error"),
    ("LAN listener without token", "http:\n  listen: 0.0.0.0:8080\n", 2,
     r"api_token is required"),
    ("hook without auth", "hooks:\n  porch: {respond: sync}\n", 2,
     r"missing required key 'auth'"),
    ("auth word typo", "hooks:\n  porch: {auth: nnone}\n", 2, r"or the word 'none'"),
    ("pin used twice", "gpio:\n  inputs: {a: {pin: 17}}\n  outputs: {b: {pin: GPIO17}}\n", 3,
     r"pin GPIO17 is already used by gpio.inputs.a"),
    ("pull none needs active", "gpio:\n  inputs:\n    a: {pin: 17, pull: none}\n", 3,
     r"pull: none needs active"),
    ("held needs hold", "gpio: {inputs: {a: {pin: 17}}}\nrules:\n"
     "  - when: {input: a, event: held}\n    do: [{publish: t}]\n", 3,
     r"event held needs gpio.inputs.a.hold"),
    ("mqtt trigger without mqtt", "rules:\n  - when: {mqtt: a/b}\n    do: [{webhook: x}]\n", 2,
     r"an mqtt trigger needs an mqtt: section"),
    ("bad mqtt filter", "mqtt: {host: localhost}\nrules:\n  - when: {mqtt: 'a/#/b'}\n"
     "    do: [{publish: x}]\n", 3, r"not a valid MQTT topic filter"),
    ("bad port type", "mqtt: {host: localhost, port: eighty}\n", 1, r"expected a whole number"),
    ("port range", "mqtt: {host: localhost, port: 70000}\n", 1, r"above the maximum 65535"),
    ("bad device id", "device: {id: Front Door}\n", 1, r"does not match"),
    ("bad url", "webhooks:\n  x: {url: 'ftp://example'}\n", 2, r"is not an http\(s\) URL"),
    ("not a mapping", "- just\n- a list\n", 1, r"the config must be a mapping"),
    ("yaml syntax", "gpio:\n  backend: [mock\n", 3, r"YAML syntax error"),
    ("bad cidr", "hooks:\n  h:\n    auth: none\n    allow_from: [300.1.1.0/24]\n", 4,
     r"not an address or CIDR range"),
    ("bad whsec secret", "webhooks:\n  w:\n    url: http://127.0.0.1:1/x\n"
     "    signing: {scheme: standard, secret: whsec_not-base64!}\n", 4, r"must be base64"),
    ("interlock on_stop on twice", "gpio:\n  outputs:\n    up: {pin: 5, interlock: door, "
     "on_stop: on}\n    down: {pin: 6, interlock: door, on_stop: on}\n", 4,
     r"on_stop: on conflicts with up in interlock group 'door'"),
    ("bad at time", "rules:\n  - when: {at: '25:00'}\n    do: [{webhook: x}]\n", 2,
     r"does not match"),
]


@pytest.mark.parametrize("text,line,pattern", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_names_file_line_and_problem(tmp_path: Path, text: str, line: int,
                                                pattern: str) -> None:
    found = problems(tmp_path, text)
    path = str(tmp_path / "c.yaml")
    matching = [p for p in found if re.search(pattern, p)]
    assert matching, f"no problem matches {pattern!r} in {found}"
    assert matching[0].startswith(f"{path}:{line}:"), matching[0]
    assert re.match(rf"^{re.escape(path)}:\d+:\d+: ", matching[0])


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        gpio:
          backend: lgpio
          inputs:
            a: {pin: 17, hold: forever}
        mqtt: {host: x, port: nope}
        rules:
          - when: {input: missing}
            do: [{webhook: nowhere}]
        """)
    assert len(found) >= 5, found
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines), "problems come in file order"


def test_env_and_file_tags(tmp_path: Path) -> None:
    secret = tmp_path / "token.txt"
    secret.write_text("s3cret\n")
    cfg = load_config(write(tmp_path, f"""\
        http:
          api_token: !file {secret}
        mqtt:
          host: !env BROKER localhost
          port: !env BROKER_PORT
          password: !file ${{CREDENTIALS_DIRECTORY}}/token.txt
        """), environ={"BROKER_PORT": "1884", "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert cfg.http.api_token == "s3cret"
    assert cfg.mqtt is not None
    assert cfg.mqtt.host == "localhost"
    assert cfg.mqtt.port == 1884
    assert cfg.mqtt.password == "s3cret"
    assert cfg.mqtt.topic_prefix == f"edgehook/{cfg.device.id}"


def test_missing_file_tag_names_path(tmp_path: Path) -> None:
    found = problems(tmp_path, "http:\n  api_token: !file /nonexistent/edgehook-token\n")
    assert "/nonexistent/edgehook-token" in found[0] and ":2:" in found[0]


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    prev = "a"
    for name in "bcdefghij":
        bomb += f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, " \
                f"*{prev}, *{prev}, *{prev}]\n"
        prev = name
    t0 = time.monotonic()
    found = problems(tmp_path, bomb)
    assert time.monotonic() - t0 < 2.0
    assert any("too many YAML nodes" in p for p in found)


def test_file_size_cap(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    p.write_text("# " + "x" * (1024 * 1024 + 10) + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ={})
    assert "more than the" in exc.value.problems[0]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml", environ={})
    assert exc.value.problems[0].endswith("no such file")


def test_yaml_booleans_for_on_off_words(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """\
        gpio:
          outputs:
            o: {pin: 17, initial: on, on_stop: off}
        """), environ={})
    assert cfg.gpio.outputs["o"].initial == "on"
    assert cfg.gpio.outputs["o"].on_stop == "off"


def test_signing_secret_never_in_repr(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """\
        webhooks:
          w:
            url: http://127.0.0.1:1/x
            signing: {scheme: standard, secret: [whsec_AAAA, topsecretvalue]}
        """), environ={})
    assert "topsecretvalue" not in repr(cfg.webhooks["w"])
    assert cfg.webhooks["w"].signing is not None
    assert cfg.webhooks["w"].signing.secrets == ("whsec_AAAA", "topsecretvalue")


@pytest.mark.parametrize("text,seconds", [
    ("250ms", 0.25), ("10s", 10), ("5m", 300), ("1h", 3600), ("1h30m", 5400), (3, 3.0),
    ("1.5s", 1.5), ("2", 2.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "10 parsecs", "-1s", "5m x", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_sizes_listen_onoff() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size("1MiB") == 1048576
    assert parse_size(100) == 100
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_onoff(True) == "on" and parse_onoff("OFF") == "off"
    with pytest.raises(ValueError):
        parse_listen("localhost")


def test_secrets_inside_free_form_values_are_masked(tmp_path: Path) -> None:
    from edgehook.explain import explain

    cfg = load_config(write(tmp_path, """\
        mqtt: {host: localhost}
        rules:
          - when: {start: true}
            do:
              - publish: t
                payload: {auth: !env SOME_KEY nested-secret-value, plain: visible}
        """), environ={})
    assert ("rules", 0, "do", 0, "payload", "auth") in cfg.secret_paths
    text = explain(cfg)
    assert "nested-secret-value" not in text and "visible" in text


# --------------------------------------------------------------------------- proxies, TLS, URLs

def test_trusted_proxies_become_networks(tmp_path: Path) -> None:
    import ipaddress

    cfg = load_config(write(tmp_path, """\
        http:
          trusted_proxies: [127.0.0.1/32, "10.0.0.0/8", "::1", 192.168.1.7]
        """), environ={})
    assert cfg.http.trusted_proxies == (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"), ipaddress.ip_network("192.168.1.7/32"))
    assert load_config(write(tmp_path, "http: {}\n"), environ={}).http.trusted_proxies == ()


def test_bad_trusted_proxy_names_its_line(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        http:
          trusted_proxies:
            - 127.0.0.1/32
            - 10.0.0.0/33
        """)
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'c.yaml'}:4:7: "), found
    assert "'10.0.0.0/33' is not an address or CIDR range" in found[0]


def test_webhook_tls_files(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.crt", "client.key"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    cfg = load_config(write(tmp_path, f"""\
        webhooks:
          w:
            url: https://127.0.0.1:9/x
            tls: {{ca_file: {tmp_path / 'ca.pem'}, cert_file: client.crt, key_file: client.key}}
          plain: {{url: "https://127.0.0.1:9/y"}}
        """), environ={})
    tls = cfg.webhooks["w"].tls
    assert tls is not None
    assert tls.ca_file == str(tmp_path / "ca.pem")
    assert tls.cert_file == str(tmp_path / "client.crt"), "relative to the config file"
    assert tls.key_file == str(tmp_path / "client.key")
    assert cfg.webhooks["plain"].tls is None


def test_webhook_tls_problems_name_file_line_col(tmp_path: Path) -> None:
    (tmp_path / "client.key").write_text("key\n")
    found = problems(tmp_path, """\
        webhooks:
          w:
            url: https://127.0.0.1:9/x
            tls:
              ca_file: /nonexistent/ca.pem
              key_file: client.key
        """)
    path = str(tmp_path / "c.yaml")
    assert any(p.startswith(f"{path}:5:") and "cannot read /nonexistent/ca.pem" in p
               and "No such file" in p for p in found), found
    assert any(p.startswith(f"{path}:6:") and "key_file: needs cert_file" in p
               for p in found), found


def test_unreadable_tls_file_is_reported(tmp_path: Path) -> None:
    import os

    key = tmp_path / "client.key"
    key.write_text("key\n")
    key.chmod(0)
    if os.access(key, os.R_OK):
        pytest.skip("running as root: every file is readable")
    found = problems(tmp_path, f"webhooks:\n  w:\n    url: https://a.b/\n"
                               f"    tls: {{cert_file: {key}, key_file: {key}}}\n")
    assert any(":4:" in p and "Permission denied" in p for p in found), found


def test_url_credentials_are_accepted_and_never_printed(tmp_path: Path) -> None:
    from edgehook.explain import explain

    cfg = load_config(write(tmp_path, """\
        webhooks:
          w: {url: "https://alice:pa55word-xyz@example.com/hook"}
        """), environ={})
    assert cfg.webhooks["w"].url.source == "https://alice:pa55word-xyz@example.com/hook"
    assert "pa55word-xyz" not in cfg.summary()
    shown = explain(cfg)
    assert "pa55word-xyz" not in shown and "alice:********@example.com" in shown
    found = problems(tmp_path, 'webhooks:\n  w: {url: "https://alice:pa55word-xyz@"}\n')
    assert found and all("pa55word-xyz" not in p for p in found), found
    assert "is not an http(s) URL" in found[0]


# --------------------------------------------------------------------------- what run refuses

@pytest.mark.parametrize("pin,canonical", [
    (17, "GPIO17"), ("17", "GPIO17"), ("GPIO17", "GPIO17"), ("BCM17", "GPIO17"),
    ("BOARD11", "GPIO17"), ("J8:11", "GPIO17"), ("WPI0", "GPIO17"), (2, "GPIO2"),
    ("GPIO27", "GPIO27")])
def test_pin_names_gpiozero_reads(pin: object, canonical: str) -> None:
    from edgehook.pins import canonical_pin

    assert canonical_pin(pin) == canonical


@pytest.mark.parametrize("pin,message", [
    ("seventeen", "is not a pin name gpiozero reads"),
    ("GPIO99", "GPIO99 is not on the 40-pin header (GPIO0 to GPIO27)"),
    (99, "99 is not a GPIO number of the 40-pin header"),
    ("GPIO 17", "(did you mean 'GPIO17'?)"), ("gpio17", "(did you mean 'GPIO17'?)"),
    ("pin11", "(did you mean 'BOARD11' (physical pin 11, GPIO17)?)"),
    ("BOARD1", "physical pin 1, which is 3V3, not a GPIO"),
    ("J8:39", "physical pin 39, which is GND, not a GPIO")])
def test_pin_names_gpiozero_refuses(pin: object, message: str) -> None:
    from edgehook.pins import canonical_pin

    with pytest.raises(ValueError) as exc:
        canonical_pin(pin)
    assert message in str(exc.value)


def test_pins_are_checked_against_gpiozero_itself() -> None:
    """Every name our check accepts, gpiozero's own board data resolves to the same pin."""
    from gpiozero.pins.pi import PiBoardInfo

    from edgehook.pins import BOARD_REVISION, canonical_pin

    board = PiBoardInfo.from_revision(BOARD_REVISION)
    for name in [*range(28), "GPIO4", "BCM4", "BOARD7", "J8:7", "WPI7", "BOARD40"]:
        assert canonical_pin(name) == board.to_gpio(name)


def test_duplicate_rule_names_name_both_lines(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        gpio: {inputs: {b: {pin: 17}}, outputs: {o: {pin: 27}}}
        rules:
          - name: ring
            when: {input: b}
            do: [{output: o, set: on}]
          - name: ring
            when: {input: b, event: released}
            do: [{output: o, set: off}]
        """)
    assert found == [f"{tmp_path / 'c.yaml'}:6:11: rules[1].name: 'ring' is already the name "
                     "of rules[0] (line 3)"]


@pytest.mark.parametrize("text", ["", "   \n", "# comments only\n# nothing else\n"])
def test_empty_file_is_an_error(tmp_path: Path, text: str) -> None:
    assert problems(tmp_path, text) == [f"{tmp_path / 'c.yaml'}:1:1: the file is empty (it "
                                        "holds no settings; config/example.yaml shows every "
                                        "key)"]


@pytest.mark.parametrize("depth", [60, 300, 500, 3000])
def test_deep_nesting_is_a_config_error(tmp_path: Path, depth: int) -> None:
    """Below PyYAML's recursion limit our walker refuses it; above, the composer's
    RecursionError is turned into the same message, at the same place."""
    found = problems(tmp_path, "rules:\n  - " + "[" * depth + "]" * depth + "\n")
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'c.yaml'}:2:"), found
    assert "nested more than 50 levels deep" in found[0]


@pytest.mark.parametrize("data", [
    b"\xff\xfe\x00garbage", b"a: \x00\n", b"key: [1, 2\n", b"- a\n- b\n", b"a: *nope\n",
    b"? [a, b]\n: c\n", b"{" * 20000, b"gpio: !!binary aGVsbG8=\n", b"&a [*a]\n"])
def test_load_config_raises_config_error_and_nothing_else(tmp_path: Path,
                                                          data: bytes) -> None:
    """What a SIGHUP reload calls: any file is either a Config or a ConfigError."""
    p = tmp_path / "c.yaml"
    p.write_bytes(data)
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ={})
    assert exc.value.problems and all(
        re.match(rf"^{re.escape(str(p))}:\d+:\d+: ", x) for x in exc.value.problems)


def test_placeholders_are_warnings_with_their_place(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """\
        mqtt: {host: localhost, password: !env MQTT_PASSWORD change-me-mqtt}
        webhooks:
          w: {url: "https://hooks.example.com/changeme", headers: {X-Key: CHANGE-ME}}
        hooks:
          h: {auth: {token: change_me}}
        rules:
          - when: {hook: h}
            do: [{webhook: w, body: {text: "please change me"}}]
        """), environ={})
    path = tmp_path / "c.yaml"
    assert [w.split(": warning: ")[0] for w in cfg.warnings] == [
        f"{path}:1:35", f"{path}:3:12", f"{path}:3:67", f"{path}:5:21"]
    assert all("mqtt" not in w.split("warning: ")[1] or "change-me-mqtt" not in w
               for w in cfg.warnings), "the value itself is not repeated"
    assert load_config(write(tmp_path, BASE), environ={}).warnings == ()


def test_lenient_load_leaves_out_what_it_cannot_read(tmp_path: Path) -> None:
    text = """\
        state_dir: /var/lib/edgehook
        http:
          listen: 127.0.0.1:8099
          api_token: !file ${CREDENTIALS_DIRECTORY}/api_token
        mqtt: {host: !env BROKER, port: !env BROKER_PORT}
        webhooks:
          w:
            url: !env ONLY_THE_SERVICE
            signing: {scheme: standard, secret: !file /nonexistent/secret}
        hooks:
          h: {auth: {token: !env HOOK_TOKEN}}
        rules:
          - when: {hook: h}
            do: [{webhook: w}]
        """
    strict = problems(tmp_path, text)
    assert len(strict) == 6, "a strict load needs every one, each reported once"
    cfg = load_config(write(tmp_path, text), environ={}, lenient=True)
    assert (cfg.http.host, cfg.http.port, cfg.state_dir) == ("127.0.0.1", 8099,
                                                             "/var/lib/edgehook")
    assert cfg.http.api_token is None
    assert cfg.mqtt is not None and cfg.mqtt.port == 1883
    assert set(cfg.webhooks) == {"w"} and set(cfg.hooks) == {"h"} and len(cfg.rules) == 1
    assert cfg.unresolved == {
        ("http", "api_token"): "!file ${CREDENTIALS_DIRECTORY}/api_token "
                               "(CREDENTIALS_DIRECTORY is not set here)",
        ("mqtt", "host"): "!env BROKER (not set here)",
        ("mqtt", "port"): "!env BROKER_PORT (not set here)",
        ("webhooks", "w", "url"): "!env ONLY_THE_SERVICE (not set here)",
        ("webhooks", "w", "signing", "secret"): "!file /nonexistent/secret (No such file or "
                                                "directory)",
        ("hooks", "h", "auth", "token"): "!env HOOK_TOKEN (not set here)"}
    # a real problem is still one
    bad = text.replace("state_dir: /var/lib/edgehook", "state_dir: [x]")
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, bad), environ={}, lenient=True)


def test_config_where_points_at_the_value(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), environ={})
    path = tmp_path / "c.yaml"
    assert cfg.where("gpio", "inputs", "doorbell", "pin") == f"{path}:5:21"
    assert cfg.where("gpio", "inputs", "doorbell", "nothing") == f"{path}:5:15"


# --------------------------------------------------------------------------- what run refuses

def test_mqtt_tls_files_must_be_readable_at_load(tmp_path: Path) -> None:
    """`run` would stop at connect with a bare errno; check names the file and key."""
    text = """\
        mqtt:
          host: 127.0.0.1
          tls: {ca_file: /nonexistent/ca.pem, cert_file: client.crt, key_file: client.key}
        """
    found = problems(tmp_path, text)
    path = tmp_path / "c.yaml"
    assert found == [
        f"{path}:3:18: mqtt.tls.ca_file: cannot read /nonexistent/ca.pem: No such file or "
        "directory",
        f"{path}:3:50: mqtt.tls.cert_file: cannot read {tmp_path / 'client.crt'}: No such "
        "file or directory",
        f"{path}:3:72: mqtt.tls.key_file: cannot read {tmp_path / 'client.key'}: No such "
        "file or directory"]
    # relative names are relative to the config file, as the daemon then uses them
    (tmp_path / "ca.pem").write_text("x")
    cfg = load_config(write(tmp_path, "mqtt: {host: h, tls: {ca_file: ca.pem}}\n"),
                      environ={})
    assert cfg.mqtt is not None and cfg.mqtt.tls is not None
    assert cfg.mqtt.tls.ca_file == str(tmp_path / "ca.pem")


@pytest.mark.parametrize("text,line,message", [pytest.param(*case, id=case[2].split(":")[0])
                                               for case in [
    ("http: {max_body: -1}\n", 1, "http.max_body: a size cannot be negative"),
    ("http: {max_body: 0}\n", 1, "http.max_body: must be more than 0, got 0"),
    ("http: {max_body: 0KiB}\n", 1, "http.max_body: must be more than 0, got 0KiB"),
    ("http: {timeout: 0s}\n", 1, "http.timeout: must be more than 0, got 0s"),
    ("mqtt: {host: h, max_payload: 0}\n", 1, "mqtt.max_payload: must be more than 0"),
    ("mqtt: {host: h, keepalive: 0}\n", 1, "mqtt.keepalive: must be more than 0"),
    ("webhooks:\n  w: {url: 'http://a', timeout: 0ms}\n", 2,
     "webhooks.w.timeout: must be more than 0"),
    ("webhooks:\n  w: {url: 'http://a', retry: {max_age: 0}}\n", 2,
     "webhooks.w.retry.max_age: must be more than 0"),
    ("hooks:\n  h: {auth: none, rate_limit: {per: 0s}}\n", 2,
     "hooks.h.rate_limit.per: must be more than 0"),
    ("gpio:\n  inputs:\n    b: {pin: 17, hold: 0s}\n", 3,
     "gpio.inputs.b.hold: must be more than 0"),
    ("gpio:\n  inputs:\n    b: {pin: 17, expect_every: 0}\n", 3,
     "gpio.inputs.b.expect_every: must be more than 0"),
    ("gpio:\n  inputs:\n    b: {pin: 17, gestures: {long_press: 0s}}\n", 3,
     "gpio.inputs.b.gestures.long_press: must be more than 0"),
    ("gpio:\n  outputs:\n    o: {pin: 17, max_on: 0s}\n", 3,
     "gpio.outputs.o.max_on: must be more than 0"),
]])
def test_sizes_and_durations_that_must_be_positive(tmp_path: Path, text: str, line: int,
                                                   message: str) -> None:
    found = problems(tmp_path, text)
    assert len(found) == 1 and f"c.yaml:{line}:" in found[0] and message in found[0], found


def test_zero_still_means_none_where_it_makes_sense(tmp_path: Path) -> None:
    text = """\
        gpio:
          backend: mock
          inputs: {b: {pin: 17, bounce: 0, filters: {delayed_on: 0s}}}
          outputs: {o: {pin: 27, min_interval: 0s}}
        rules:
          - when: {input: b}
            cooldown: 0s
            do: {output: o, set: on, for: 0s}
        """
    load_config(write(tmp_path, text), environ={})


def test_publish_topic_must_name_one_topic(tmp_path: Path) -> None:
    text = """\
        mqtt: {host: h}
        rules:
          - when: {start: true}
            do:
              - publish: "x/+/y"
              - publish: ""
              - publish: "alarm/{{ event.type }}/#"
              - publish: "a/{{ 'b+c' }}/{# # #}d"
              - publish: "home/{{ event.source }}/state"
        """
    found = problems(tmp_path, text)
    assert [p.split(": ", 1)[0].rsplit(":", 2)[1:] for p in found] == \
        [["5", "18"], ["6", "18"], ["7", "18"]]
    assert "publish: 'x/+/y' has the wildcard +" in found[0]
    assert "publish: the topic is empty" in found[1]
    assert "has the wildcard #" in found[2]


@pytest.mark.parametrize("token,why", [
    ('""', "is empty"),
    ("!env HOOK_TOKEN \"\"", "is empty"),
    ('"two words"', "contains whitespace or a control character"),
    ('"abc\\n"', "contains whitespace or a control character"),
    ('"abc\\tdef"', "contains whitespace or a control character"),
    ('"abc\\x07"', "contains whitespace or a control character"),
])
def test_bearer_tokens_a_client_cannot_send_are_refused(tmp_path: Path, token: str,
                                                        why: str) -> None:
    found = problems(tmp_path, f"hooks:\n  h:\n    auth: {{token: {token}}}\n"
                               f"http:\n  api_token: {token}\n")
    assert len(found) == 2, found
    assert f"c.yaml:3:19: hooks.h.auth.token: {why}" in found[0]
    assert f"c.yaml:5:14: http.api_token: {why}" in found[1]
    assert "abc" not in "".join(found) and "two words" not in "".join(found)


def test_env_mistakes_are_each_reported_once(tmp_path: Path) -> None:
    text = """\
        mqtt:
          host: !env
          password: !env [a, b]
          username: !file
          client_id: !env {a: b}
          topic_prefix: !foo x
        http:
          api_token: !env
        """
    found = problems(tmp_path, text)
    assert [int(re.search(r"c\.yaml:(\d+):", p).group(1)) for p in found] == \
        [2, 3, 4, 5, 6, 8], found
    assert "!env needs a variable name: !env NAME or !env NAME DEFAULT" in found[0]
    assert "!env takes one line of text, not a list: !env NAME or !env NAME DEFAULT" \
        in found[1]
    assert "!file needs a path: !file PATH" in found[2]
    assert "!env takes one line of text, not a mapping" in found[3]
    assert "unsupported tag '!foo' (only !env NAME [DEFAULT] and !file PATH are allowed)" \
        in found[4]


def test_env_default_in_quotes(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """\
        mqtt: {host: h, username: !env U "", password: !env P 'two words'}
        """), environ={})
    assert cfg.mqtt is not None
    assert (cfg.mqtt.username, cfg.mqtt.password) == ("", "two words")
