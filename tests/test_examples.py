"""The configs in config/: each passes `edgehook check` as it stands, example.yaml shows
every key, the starter does nothing until edited and its steps work, `make run`'s demo
delivers a press to its receiver, and the GitHub-to-Slack one works end to end with a
recorded push payload."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from broker import free_port, wait_until
from daemon_proc import EDGEHOOK
from edgehook import schema as S
from edgehook.config import load_config
from receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
EXAMPLES = sorted(CONFIG_DIR.glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema=edgehook.schema.json"
DATA = Path(__file__).resolve().parent / "data"

# The variables the examples read with `!env NAME DEFAULT`: scrubbed, so the defaults
# are what is checked (a developer's own environment must not make a file pass).
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "SYSTEMROOT", "TMPDIR")}


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"example.yaml", "demo.yaml", "starter.yaml", "doorbell-discord.yaml",
            "doorbell-ntfy.yaml",
            "doorbell-homeassistant.yaml", "porch-light-rest-command.yaml",
            "motion-mqtt.yaml", "github-to-slack.yaml", "stock-to-teams.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_as_it_stands(path: Path) -> None:
    assert path.read_text().splitlines()[0] == MODELINE
    cfg = load_config(path, environ={})  # no variables at all: the marked defaults suffice
    if path.name != "starter.yaml":  # the starter has none until it is edited
        assert cfg.rules, f"{path.name} has no rules"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_edgehook_check(path: Path) -> None:
    out = subprocess.run([EDGEHOOK, "check", "-c", str(path)], capture_output=True, text=True,
                         timeout=30, env=CLEAN_ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("config OK: "), out.stdout


def _schema_keys(node: S.Node, seen: set[int] | None = None) -> set[str]:
    """Every key name that can appear anywhere in a config."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return set()
    seen.add(id(node))
    if isinstance(node, S.Obj):
        keys = set(node.keys)
        for k in node.keys.values():
            keys |= _schema_keys(k.node, seen)
        return keys
    if isinstance(node, S.NamedMap):
        return _schema_keys(node.value, seen)
    if isinstance(node, S.ListOf):
        return _schema_keys(node.item, seen)
    if isinstance(node, S.Union):
        keys = set()
        for variant in node.variants.values():
            keys |= _schema_keys(variant, seen)
        return keys
    if isinstance(node, S.BoolOr):
        return _schema_keys(node.obj, seen)
    return set()


def test_example_yaml_documents_every_key() -> None:
    text = (CONFIG_DIR / "example.yaml").read_text()
    missing = sorted(k for k in _schema_keys(S.ROOT)
                     if not re.search(rf"(?<![\w-]){re.escape(k)}:", text))
    assert not missing, f"config/example.yaml does not show these keys: {missing}"


def test_example_yaml_uses_every_kind_live() -> None:
    cfg = load_config(CONFIG_DIR / "example.yaml", environ={})
    assert {r.when.kind for r in cfg.rules} == set(S.WHEN.variants)
    kinds = {type(a).__name__ for r in cfg.rules for a in r.actions}
    assert kinds == {"WebhookAction", "OutputAction", "PublishAction"}
    events = {r.when.event for r in cfg.rules if r.when.kind == "input"}
    assert {"pressed", "held", "double_click"} <= events
    assert any(r.condition is not None and r.when.kind == "mqtt" for r in cfg.rules)
    assert {h.auth.kind for h in cfg.hooks.values()} == {"token", "hmac", "none"}
    assert {h.respond for h in cfg.hooks.values()} == {"sync", "async"}
    schemes = {w.signing.scheme for w in cfg.webhooks.values() if w.signing}
    schemes |= {h.auth.signing.scheme for h in cfg.hooks.values() if h.auth.signing}
    assert schemes == {"standard", "github"}
    assert cfg.webhooks["discord"].signing.scheme == "standard"
    assert cfg.mqtt is not None and cfg.mqtt.ha_discovery
    assert cfg.http.api_token == "change-me-api-token"
    assert set(cfg.gpio.inputs) == {"doorbell", "motion"}
    assert set(cfg.gpio.outputs) == {"porch_light", "chime"}


def test_documented_credentials_line_works(tmp_path: Path) -> None:
    """The `!file ${CREDENTIALS_DIRECTORY}/edgehook_mqtt_password` shown in a comment of
    example.yaml really loads the file systemd's LoadCredential=edgehook:<dir> provides."""
    text = (CONFIG_DIR / "example.yaml").read_text()
    line = "password: !file ${CREDENTIALS_DIRECTORY}/edgehook_mqtt_password"
    assert line in text and "LoadCredential=edgehook:/etc/edgehook/credentials" in text
    live = re.sub(r"(?m)^(\s*)password: !env MQTT_PASSWORD .*$", rf"\g<1>{line}", text, count=1)
    assert live != text
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "edgehook_mqtt_password").write_text("s3cret-from-systemd\n")
    cfg_path = tmp_path / "edgehook.yaml"
    cfg_path.write_text(live)
    cfg = load_config(cfg_path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.mqtt is not None and cfg.mqtt.password == "s3cret-from-systemd"


# ----------------------------------------------------------------------- the starter

STARTER = CONFIG_DIR / "starter.yaml"


def starter_with_every_step_done() -> str:
    """The starter as its steps say to edit it: the "# " before each indented line gone."""
    return re.sub(r"(?m)^( +)# ", r"\1", STARTER.read_text())


def test_starter_does_nothing_until_edited() -> None:
    """What install.sh puts on a Pi reads the doorbell and nothing else: no output pin is
    driven, no webhook (no placeholder URL) is sent, no broker or hook is involved."""
    cfg = load_config(STARTER, environ={})
    assert set(cfg.gpio.inputs) == {"doorbell"} and cfg.gpio.backend == "auto"
    assert cfg.gpio.outputs == {} and cfg.webhooks == {} and cfg.hooks == {}
    assert cfg.rules == () and cfg.mqtt is None
    assert cfg.http.host == "127.0.0.1"
    assert cfg.state_dir == "/var/lib/edgehook"  # where `sudo edgehook outbox` looks


def test_starter_steps_give_doorbell_to_discord_and_porch_light(
    tmp_path: Path, daemon
) -> None:
    """Done as written, the starter's steps give a doorbell that posts a Discord message
    (its URL read from the systemd credential the steps create) and lights the porch."""
    port = free_port()
    text = starter_with_every_step_done()
    assert text.count("\n  outputs:\n") == 1 and "\n  discord:\n" in text
    text = text.replace("listen: 127.0.0.1:8080", f"listen: 127.0.0.1:{port}")
    text = text.replace("state_dir: /var/lib/edgehook", f"state_dir: {tmp_path / 'state'}")
    cfg = tmp_path / "edgehook.yaml"
    cfg.write_text(text)
    creds = tmp_path / "credentials"  # what LoadCredential=edgehook:<dir> hands the service
    creds.mkdir()
    with Receiver() as discord:
        (creds / "edgehook_discord_url").write_text(f"{discord.url}/api/webhooks/1/abc\n")
        d = daemon(cfg, port=port, env={"CREDENTIALS_DIRECTORY": str(creds)})
        d.wait_ready()
        r = d.api("POST", "/api/v1/inputs/doorbell/simulate", json={"action": "click"})
        assert r.status_code == 200, r.text
        req = discord.wait_for(1, timeout=10)[0]
        assert req.path == "/api/webhooks/1/abc"
        assert json.loads(req.body) == {"content": "Someone is at the Front door"}
        state = d.api("GET", "/api/v1/state").json()
        assert state["outputs"]["porch_light"]["state"] == "on"
        assert state["outputs"]["porch_light"]["until"]  # for: 30s
        assert d.stop() == 0
    assert "Traceback" not in d.log


# ----------------------------------------------------------------------- the docs

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _doc_configs() -> list[tuple[str, str]]:
    """Every ```yaml block of the README and docs/ that is a whole config."""
    found = []
    for doc in DOCS:
        blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)
        found += [(f"{doc.name}#{i}", b) for i, b in enumerate(blocks)
                  if re.search(r"(?m)^gpio:", b) and re.search(r"(?m)^rules:", b)]
    return found


@pytest.mark.parametrize("name,text", _doc_configs(), ids=[n for n, _ in _doc_configs()])
def test_documented_config_passes_check(name: str, text: str, tmp_path: Path) -> None:
    """A config shown in the docs passes `edgehook check`, given the systemd credentials
    it reads (as the service sees them)."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    for file in re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/(\S+)", text):
        (creds / file).write_text("https://hooks.example.net/a-secret-value\n")
    cfg = tmp_path / "edgehook.yaml"
    cfg.write_text(text.replace("/var/lib/edgehook", str(tmp_path / "state")))
    out = subprocess.run([EDGEHOOK, "check", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=30, env={**CLEAN_ENV, "CREDENTIALS_DIRECTORY": str(creds)})
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr, out.stderr


def test_there_are_documented_configs() -> None:
    names = {n.split("#")[0] for n, _ in _doc_configs()}
    assert {"README.md", "install-raspberry-pi.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_links_point_at_files_that_exist(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


# ----------------------------------------------------------------------- make run

def test_make_run_delivers_a_press_to_its_receiver(tmp_path: Path) -> None:
    """`make run`: the debug receiver starts beside the daemon on simulated pins, a press
    of the demo's doorbell lights the porch and arrives at the receiver, and Ctrl-C stops
    both. Run on a copy of the demo with free ports, with the venv as it is."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    port, receiver_port = free_port(), free_port()
    text = (CONFIG_DIR / "demo.yaml").read_text()
    assert "url: http://127.0.0.1:8089/doorbell" in text
    assert re.search(r"(?m)^RECEIVER_PORT \?= 8089$", (ROOT / "Makefile").read_text())
    text = text.replace("listen: 127.0.0.1:8080", f"listen: 127.0.0.1:{port}")
    text = text.replace("127.0.0.1:8089", f"127.0.0.1:{receiver_port}")
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(text + f"\nstate_dir: {tmp_path / 'state'}\n")
    venv_bin = str(Path(EDGEHOOK).parent)
    # -o: take the venv as built (make test built it); never reinstall from a test
    proc = subprocess.Popen(
        [make, "--no-print-directory", "-o", f"{venv_bin}/edgehook", f"BIN={venv_bin}",
         f"CONFIG={cfg}", f"RECEIVER_PORT={receiver_port}", "run"],
        cwd=ROOT, env=CLEAN_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group, like a terminal's foreground job
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("edgehook receive: listening" in ln for ln in lines)
                   and any(" started: " in ln for ln in lines), timeout=30,
                   what="the receiver and the daemon to start")
        out = subprocess.run([EDGEHOOK, "sim", "click", "doorbell", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=30, env=CLEAN_ENV)
        assert out.returncode == 0, out.stderr
        wait_until(lambda: any("signature: unsigned" in ln for ln in lines), timeout=10,
                   what="the webhook at the receiver")
        text = "".join(lines)
        assert "POST /doorbell" in text and "Someone is at the Demo doorbell" in text
        assert "webhook-id: msg_" in text
        assert "output porch_light on for 30 s" in text
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        proc.wait(timeout=20)
        # Both stopped: nothing listens on either port any more.
        for p in (port, receiver_port):
            deadline = time.monotonic() + 5
            while _listening(p) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _listening(p), f"port {p} still open after Ctrl-C"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    assert "stopped" in "".join(lines)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _runnable_copy(src: Path, tmp_path: Path, port: int, **urls: str) -> Path:
    """A copy of an example that runs here: its own port and state_dir, placeholder
    example.com URLs pointed at a local receiver, the MQTT port at a closed one."""
    text = src.read_text()
    text, n = re.subn(r"(?m)^(  listen: ).+$", rf"\g<1>127.0.0.1:{port}", text)
    assert n == 1, f"{src.name}: expected one http.listen line"
    text = re.sub(r"(?m)^state_dir: .*$", "", text) + f"\nstate_dir: {tmp_path / 'state'}\n"
    mqtt_port = free_port()  # nothing listens there: the link retries, quietly
    text, n = re.subn(r"(?m)^(\s+port: )1883\b", rf"\g<1>{mqtt_port}", text)
    if not n:
        text = re.sub(r"(?m)^(\s+)(host: .*)$", rf"\g<1>\g<2>\n\g<1>port: {mqtt_port}", text)
    for old, new in urls.items():
        text = text.replace(old, new)
    dst = tmp_path / src.name
    dst.write_text(text)
    return dst


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path: Path, tmp_path: Path, daemon) -> None:
    """Each example starts on simulated pins (MQTT, where used, unreachable and retried),
    answers /healthz and stops with exit 0. Nothing leaves this machine: the only
    example with a rule that fires at start (example.yaml's archive) is redirected."""
    with Receiver() as archive:
        port = free_port()
        cfg = _runnable_copy(path, tmp_path, port, **{"https://example.com": archive.url})
        d = daemon(cfg, port=port, env={"MQTT_HOST": "127.0.0.1"})
        d.wait_ready()
        d.wait_log("started")
        if path.name == "example.yaml":
            req = archive.wait_for(1)[0]  # rule `started`: the event itself, GitHub-signed
            assert req.method == "PUT" and req.path == "/edgehook/front-door/events"
            assert json.loads(req.body)["type"] == "daemon.started"
            assert req.headers["x-hub-signature-256"] == github_signature(
                "change-me-archive-secret", req.body)
        assert d.stop() == 0
    assert "Traceback" not in d.log
    assert " ERROR " not in d.log, d.log


# ----------------------------------------------------------------------- GitHub end to end

GITHUB_SECRET = "It's a Secret to Everybody"  # the secret of GitHub's documented test vector
WRONG_SECRET = "not-the-secret"


def github_signature(secret: str, body: bytes) -> str:
    """X-Hub-Signature-256 as GitHub computes it (independent of edgehook's signing.py)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_github_signature_matches_githubs_documented_vector() -> None:
    # docs.github.com "Validating webhook deliveries": secret, payload, expected header
    assert github_signature(GITHUB_SECRET, b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")


def _copy_config(src: Path, tmp_path: Path, port: int) -> Path:
    text = src.read_text()
    listen = "  listen: 127.0.0.1:8080\n"
    assert listen in text
    text = text.replace(listen, f"  listen: 127.0.0.1:{port}\n")
    text += f"\nstate_dir: {tmp_path / 'state'}\n"
    dst = tmp_path / src.name
    dst.write_text(text)
    return dst


def _post(d, path: str, body: bytes, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    return d.api("POST", path, data=body, headers=headers)


def test_github_push_to_slack_end_to_end(tmp_path: Path, daemon) -> None:
    payload = (DATA / "github_push.json").read_bytes()
    push = json.loads(payload)
    head = push["head_commit"]
    port = free_port()
    cfg = _copy_config(CONFIG_DIR / "github-to-slack.yaml", tmp_path, port)
    with Receiver() as slack:
        slack_url = f"{slack.url}/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
        d = daemon(cfg, port=port, env={"SLACK_WEBHOOK_URL": slack_url,
                                        "GITHUB_WEBHOOK_SECRET": GITHUB_SECRET})
        d.wait_ready()
        gh = {"Content-Type": "application/json", "X-GitHub-Event": "push",
              "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
              "User-Agent": "GitHub-Hookshot/044aadd"}

        # Refused with 401, and nothing is queued: no signature, a wrong secret, a
        # tampered body under the original signature.
        good_sig = github_signature(GITHUB_SECRET, payload)
        tampered = payload.replace(b'"monalisa"', b'"mallory"', 1)
        assert tampered != payload
        for body, sig in [(payload, None),
                          (payload, github_signature(WRONG_SECRET, payload)),
                          (tampered, good_sig),
                          (payload, "sha256=" + "0" * 64)]:
            headers = dict(gh)
            if sig is not None:
                headers["X-Hub-Signature-256"] = sig
            r = _post(d, "/hooks/github", body, headers)
            assert r.status_code == 401, (sig, r.status_code, r.text)
            assert r.json()["error"]

        # GitHub's `ping` when the webhook is created: accepted, but the rule's `if`
        # (a head commit) does not match, so no message.
        ping = json.dumps({"zen": "Design for failure.", "hook_id": 1,
                           "repository": push["repository"]}).encode()
        r = _post(d, "/hooks/github", ping, {**gh, "X-GitHub-Event": "ping",
                                             "X-Hub-Signature-256":
                                                 github_signature(GITHUB_SECRET, ping)})
        assert r.status_code in (200, 202), r.text

        # The recorded push, correctly signed.
        r = _post(d, "/hooks/github", payload, {**gh, "X-Hub-Signature-256": good_sig})
        assert r.status_code in (200, 202), r.text
        event_id = r.json()["event_id"]

        req = slack.wait_for(1, timeout=10)[0]
        assert req.method == "POST"
        assert req.path == "/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
        assert req.headers["content-type"].startswith("application/json")
        text = json.loads(req.body)["text"]
        assert head["url"] in text
        assert push["repository"]["full_name"] in text
        assert push["pusher"]["name"] in text
        assert head["message"].splitlines()[0] in text

        # The light flashed: on, then off again 2 s later.
        on = d.wait_log("output light on for 2 s")  # the dispatcher's action line
        assert event_id in on
        d.wait_log("output light -> off", timeout=5, after=d.lines.index(on))

        # Exactly one delivery: the refused requests and the ping queued nothing.
        outbox = d.api("GET", "/api/v1/state").json()["outbox"]
        assert outbox["pending"] == 0 and outbox["dead"] == 0, outbox
        assert outbox["delivered"] == 1, outbox
        assert len(slack.requests) == 1
        assert d.stop() == 0
    assert "Traceback" not in d.log


def test_porch_light_rest_command_end_to_end(tmp_path: Path, daemon) -> None:
    """What Home Assistant's rest_command in porch-light-rest-command.yaml sends."""
    port = free_port()
    src = CONFIG_DIR / "porch-light-rest-command.yaml"
    text = src.read_text().replace("  listen: !env EDGEHOOK_LISTEN 127.0.0.1:8080\n",
                                   f"  listen: 127.0.0.1:{port}\n")
    cfg = tmp_path / src.name
    cfg.write_text(text + f"\nstate_dir: {tmp_path / 'state'}\n")
    d = daemon(cfg, port=port, env={"HOOK_TOKEN": "porch-token-123"})
    d.wait_ready()
    ha = {"Authorization": "Bearer porch-token-123", "Content-Type": "application/json"}

    def light() -> str:
        r = d.api("GET", "/api/v1/state",
                  headers={"Authorization": "Bearer change-me-api-token"})
        return r.json()["outputs"]["porch_light"]["state"]

    assert light() == "off"
    body = b'{"state": "toggle"}'
    r = _post(d, "/hooks/porch-light", body, {**ha, "Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = _post(d, "/hooks/porch-light", body, ha)
    assert r.status_code == 200, r.text  # respond: sync -> the light has switched
    assert light() == "on"
    # At once again: the output's min_interval (500ms, relay protection) refuses it, and
    # with respond: sync Home Assistant is told so (409 with the reason).
    r = _post(d, "/hooks/porch-light", body, ha)
    assert r.status_code == 409 and "min_interval" in r.text, r.text
    assert light() == "on"
    # After the interval the toggle goes through: no body at all also toggles.
    wait_until(lambda: _post(d, "/hooks/porch-light", b"", ha).status_code == 200,
               timeout=3, interval=0.15, what="a toggle after min_interval")
    assert light() == "off"
    assert d.stop() == 0
