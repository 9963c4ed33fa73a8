"""The `edgehook` command as an admin types it on the Pi: the real entry point as a
subprocess, real config files, a real outbox file and a real daemon.

* `check` refuses what `run` would refuse (pins, nesting, empty files, placeholders),
  and both exit 2 with FILE:LINE:COL; a pin gpiozero refuses at start is exit 2 too.
* `sim`, `outbox` and `hook` work outside the service: secrets the service alone can
  read are not needed, and a 401 says how to give the API token.
* `outbox drop`, `outbox retry` of a target that is gone, `hook NAME`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from gpiozero.exc import PinInvalidPin
from gpiozero.pins.mock import MockFactory

from broker import free_port, wait_until
from daemon_proc import EDGEHOOK
from edgehook import cli
from edgehook.config import load_config
from edgehook.outbox import NewDelivery, Outbox

# An admin's shell: none of the service's variables, no config chosen by the environment.
BASE_ENV = {k: v for k, v in os.environ.items()
            if k not in ("EDGEHOOK_CONFIG", "EDGEHOOK_API_TOKEN", "CREDENTIALS_DIRECTORY",
                         "STATE_DIRECTORY", "HOOK_TOKEN", "SINK_URL", "NOTIFY_SOCKET")}
API_TOKEN = "api-token-only-the-service-reads"
HOOK_TOKEN = "hook-token-in-the-service-environment"


def edgehook(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             user: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `edgehook` script; `user` runs it as that uid (setpriv)."""
    cmd = [EDGEHOOK, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**BASE_ENV, **(env or {})}, cwd=cwd)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- check and run

def test_check_ok_prints_one_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "gpio: {backend: mock, inputs: {doorbell: {pin: 17}}}\n")
    out = edgehook("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "config OK: 1 input, 0 outputs, 0 rules, 0 webhooks, 0 hooks\n"
    assert out.stderr == ""


def test_check_problems_say_what_to_do(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", """\
        gpio:
          backend: lgpio
          inputs: {doorbell: {pin: 17, hold: forever}}
        """)
    out = edgehook("check", "-c", str(cfg))
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert lines[0].startswith(f"{cfg}:2:") and lines[1].startswith(f"{cfg}:3:"), lines
    assert lines[-1] == (f"edgehook: 2 problems in {cfg}; fix them and run "
                         f"`edgehook check -c {cfg}` again")
    assert "nothing started" not in out.stderr and out.stdout == ""


BAD_PINS = [
    ("seventeen", r"'seventeen' is not a pin name gpiozero reads"),
    ("GPIO99", "GPIO99 is not on the 40-pin header"),
    ('"GPIO 17"', "(did you mean 'GPIO17'?)"),
    ("pin11", "(did you mean 'BOARD11' (physical pin 11, GPIO17)?)"),
    ("BOARD6", "BOARD6 is physical pin 6, which is GND, not a GPIO"),
]


@pytest.mark.parametrize("pin,message", BAD_PINS, ids=[p[0] for p in BAD_PINS])
def test_a_pin_run_refuses_fails_check_and_run_with_exit_2(tmp_path: Path, pin: str,
                                                           message: str) -> None:
    cfg = write(tmp_path / "c.yaml", f"""\
        state_dir: {tmp_path / 'state'}
        gpio:
          backend: mock
          inputs:
            doorbell: {{pin: {pin}}}
        http: {{listen: "127.0.0.1:{free_port()}"}}
        """)
    for args in (["check"], ["run", "--simulate"]):
        out = edgehook(*args, "-c", str(cfg))
        assert out.returncode == 2, (args, out.stderr)
        first = out.stderr.splitlines()[0]
        assert first.startswith(f"{cfg}:5:21: gpio.inputs.doorbell.pin: "), first
        assert message in first
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "state").exists(), "run started nothing"


def test_every_pin_name_gpiozero_reads_passes_check(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", """\
        gpio:
          backend: mock
          inputs:
            a: {pin: 17}
            b: {pin: "4"}
            c: {pin: GPIO12}
            d: {pin: BCM13}
            e: {pin: BOARD29}
            f: {pin: "J8:31"}
            g: {pin: WPI29}
        """)
    out = edgehook("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr


def test_two_devices_on_one_pin_whatever_its_name(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", """\
        gpio:
          backend: mock
          inputs: {bell: {pin: BOARD11}}
          outputs: {light: {pin: GPIO17}}
        """)
    out = edgehook("check", "-c", str(cfg))
    assert out.returncode == 2
    assert out.stderr.startswith(f"{cfg}:4:26: gpio.outputs.light: pin GPIO17 is already "
                                 "used by gpio.inputs.bell (line 3)")


class _RefusingFactory(MockFactory):
    """gpiozero's mock pins, except that GPIO17 is refused as a real board may do."""

    def pin(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(name) in ("17", "GPIO17"):
            raise PinInvalidPin(f"{name} cannot be used on this board")
        return super().pin(name, *args, **kwargs)


def test_a_pin_gpiozero_refuses_at_start_is_exit_2_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = write(tmp_path / "c.yaml", f"""\
        state_dir: {tmp_path / 'state'}
        gpio:
          inputs:
            doorbell: {{pin: GPIO17}}
          outputs:
            light: {{pin: 27}}
        http: {{listen: "127.0.0.1:{free_port()}"}}
        """)
    cfg = load_config(cfg_path, environ={})
    assert cli._run(cfg, simulate=False, pin_factory=_RefusingFactory()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{cfg_path}:4:21: gpio.inputs.doorbell: GPIO setup failed: "), err
    assert "GPIO17 cannot be used on this board" in err


def test_nested_500_deep_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rules: " + "[" * 500 + "]" * 500 + "\n")
    for args in (["check"], ["run"]):
        out = edgehook(*args, "-c", str(cfg))
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"{cfg}:1:"), out.stderr
        assert "nested more than 50 levels deep" in out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_file_is_an_error(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = edgehook("check", "-c", str(cfg))
    assert out.returncode == 2
    assert out.stderr.startswith(f"{cfg}:1:1: the file is empty")


def test_placeholders_warn_and_a_lan_api_with_one_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", """\
        http:
          listen: 127.0.0.1:8080
          api_token: !env EDGEHOOK_API_TOKEN change-me-api-token
        webhooks:
          w: {url: "https://example.com/hooks/CHANGEME"}
        """)
    out = edgehook("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(" (2 warnings on stderr)\n")
    assert out.stderr.splitlines() == [
        f"{cfg}:3:14: warning: http.api_token is still a placeholder (it contains "
        "'change-me'): set the real value before you rely on it",
        f"{cfg}:5:12: warning: webhooks.w.url is still a placeholder (it contains "
        "'CHANGEME'): set the real value before you rely on it"]
    out = edgehook("check", "-c", str(cfg), env={"EDGEHOOK_API_TOKEN": "a-real-one"})
    assert out.returncode == 0 and "api_token" not in out.stderr

    cfg.write_text(cfg.read_text().replace("127.0.0.1:8080", "0.0.0.0:8080"))
    out = edgehook("check", "-c", str(cfg))
    assert out.returncode == 2
    assert out.stderr.startswith(f"{cfg}:3:14: http.api_token: still the example's "
                                 "placeholder while http.listen (0.0.0.0) is reachable")
    assert edgehook("check", "-c", str(cfg),
                    env={"EDGEHOOK_API_TOKEN": "a-real-one"}).returncode == 0


def test_a_password_in_a_webhook_url_is_accepted_and_never_shown(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", """\
        webhooks:
          w: {url: "https://alice:s3cr3t-pw@example.com/hook"}
          v: {url: "https://bob:changeme-pw@example.com:99999/"}
        """)
    out = edgehook("check", "--explain", "-c", str(cfg))
    assert out.returncode == 2  # the port of `v`
    assert "changeme-pw" not in out.stderr and "bob:********@example.com:99999" in out.stderr
    cfg.write_text(cfg.read_text().replace(":99999", ""))
    out = edgehook("check", "--explain", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "s3cr3t-pw" not in out.stdout + out.stderr
    assert "changeme-pw" not in out.stdout + out.stderr
    assert "alice:********@example.com" in out.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to run the command as another user")
def test_a_config_the_user_cannot_read_says_how_to_run(tmp_path: Path) -> None:
    home = Path(f"/tmp/edgehook-cli-{os.getpid()}")  # pytest's tmp_path is root's only
    home.mkdir(mode=0o755)
    try:
        cfg = home / "edgehook.yaml"
        cfg.write_text("gpio: {backend: mock}\n")
        cfg.chmod(0o640)
        for args in (["check"], ["outbox", "list"]):
            out = edgehook(*args, "-c", str(cfg), user=65534)
            assert out.returncode == 2, out.stderr
            assert out.stderr.strip().endswith("permission denied (an installed config is "
                                               "readable only by root and the edgehook "
                                               "group): run as root or a member of the "
                                               "edgehook group (sudo edgehook ...)")
    finally:
        shutil.rmtree(home)


def test_no_config_found_hints_at_c_and_the_variable(tmp_path: Path) -> None:
    if Path("/etc/edgehook/edgehook.yaml").exists():
        pytest.skip("this machine has a config at the default path")
    out = edgehook("sim", "press", "doorbell", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == ("edgehook: no config at /etc/edgehook/edgehook.yaml: give one "
                          "with -c FILE or set EDGEHOOK_CONFIG\n")
    out = edgehook("sim", "press", "doorbell", env={"EDGEHOOK_CONFIG": str(tmp_path / "x")})
    assert out.returncode == 2
    assert out.stderr == (f"edgehook: no config at {tmp_path / 'x'} (from $EDGEHOOK_CONFIG): "
                          "give one with -c FILE or correct EDGEHOOK_CONFIG\n")
    out = edgehook("sim", "press", "doorbell", "-c", str(tmp_path / "x"))
    assert out.returncode == 2 and out.stderr.startswith(f"{tmp_path / 'x'}:1:1: no such file")


def test_hook_help_says_it_needs_the_secret() -> None:
    out = edgehook("hook", "--help")
    assert out.returncode == 0
    assert "needs that hook's token or secret" in " ".join(out.stdout.split())


# --------------------------------------------------------------------------- outside the service

SERVICE = """\
    device: {{id: porch}}
    state_dir: {state}
    gpio:
      backend: mock
      inputs: {{doorbell: {{pin: 17}}}}
      outputs: {{light: {{pin: 27}}}}
    http:
      listen: "127.0.0.1:{port}"
      api_token: !file ${{CREDENTIALS_DIRECTORY}}/api_token
    webhooks:
      sink:
        url: !env SINK_URL
        retry: {{max_attempts: 50, max_age: 1h}}
    hooks:
      tok: {{auth: {{token: !env HOOK_TOKEN}}}}
      std: {{auth: {{hmac: {{scheme: standard, secret: whsec_c2VjcmV0LXN0YW5kYXJk}}}}}}
      gh: {{auth: {{hmac: {{scheme: github, secret: secret-github}}}}}}
    rules:
      - when: {{input: doorbell}}
        do: [{{webhook: sink}}]
      - name: light from a hook
        when: {{hook: tok}}
        do: [{{output: light, set: "{{{{ event.body.state }}}}"}}]
      - when: {{hook: std}}
        do: [{{output: light, set: on}}]
      - when: {{hook: gh}}
        do: [{{output: light, set: off}}]
    """


def _seed(state: Path, target: str, n: int, dead: bool = False) -> list[int]:
    """Rows in a real outbox file, as a daemon that ran before would have left them."""
    box = Outbox(state / "outbox.db")
    try:
        ids = box.add([NewDelivery(target, f"ev{i}", "http://127.0.0.1:9/x", "POST", {},
                                   b"{}", "application/json", 5, 3600.0) for i in range(n)])
        if dead:
            for i in ids:
                box.mark_dead(i, time.time(), "gave up", 500)
        return ids
    finally:
        box.close()


@pytest.fixture()
def service(tmp_path: Path, daemon):  # type: ignore[no-untyped-def]
    """A daemon run as the service runs it: credentials and variables only it has."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "api_token").write_text(API_TOKEN + "\n")
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    gone = _seed(state, "old-target", 1, dead=True)[0]
    cfg = write(tmp_path / "edgehook.yaml", SERVICE.format(state=state, port=port))
    d = daemon(cfg, port=port, env={"CREDENTIALS_DIRECTORY": str(creds), "HOOK_TOKEN":
                                    HOOK_TOKEN, "SINK_URL": f"http://127.0.0.1:{free_port()}/"})
    d.wait_ready()
    d.cfg, d.creds, d.gone = cfg, creds, gone
    return d


def _api(d, method: str, path: str, **kw):  # type: ignore[no-untyped-def]
    return d.api(method, path, headers={"Authorization": f"Bearer {API_TOKEN}"}, **kw)


def _pending(d) -> list[dict]:  # type: ignore[no-untyped-def]
    return _api(d, "GET", "/api/v1/outbox?status=pending").json()["items"]


@pytest.mark.slow
def test_commands_outside_the_service_need_no_secrets(service) -> None:  # type: ignore[no-untyped-def]
    d, cfg = service, str(service.cfg)
    assert edgehook("check", "-c", cfg).returncode == 2, "check still needs every secret"

    out = edgehook("sim", "press", "doorbell", "-c", cfg)
    assert out.returncode == 1
    assert out.stderr == (
        "edgehook: the daemon wants its API token (401), and http.api_token (!file "
        "${CREDENTIALS_DIRECTORY}/api_token (CREDENTIALS_DIRECTORY is not set here)) cannot "
        "be read here: run `EDGEHOOK_API_TOKEN=... edgehook sim press doorbell -c "
        f"{cfg}` or `sudo CREDENTIALS_DIRECTORY=/run/credentials/edgehook.service edgehook "
        f"sim press doorbell -c {cfg}` (while the service runs)\n")

    out = edgehook("sim", "press", "doorbell", "-c", cfg, env={"EDGEHOOK_API_TOKEN": "wrong"})
    assert out.returncode == 1
    assert "refused the API token from $EDGEHOOK_API_TOKEN (401)" in out.stderr

    for env in ({"EDGEHOOK_API_TOKEN": API_TOKEN}, {"CREDENTIALS_DIRECTORY": str(d.creds)}):
        out = edgehook("sim", "click", "doorbell", "-c", cfg, env=env)
        assert (out.returncode, out.stdout) == (0, "doorbell: click\n"), out.stderr
    wait_until(lambda: len(_pending(d)) == 2, timeout=10, what="two deliveries pending")

    out = edgehook("sim", "click", "dorbell", "-c", cfg)
    assert out.returncode == 1
    assert out.stderr == (f"edgehook: no input named 'dorbell' in {cfg} (did you mean "
                          "'doorbell'?); inputs: doorbell\n")


@pytest.mark.slow
def test_outbox_through_a_running_daemon(service) -> None:  # type: ignore[no-untyped-def]
    d, cfg = service, str(service.cfg)
    token = {"EDGEHOOK_API_TOKEN": API_TOKEN}
    for _ in range(3):
        assert _api(d, "POST", "/api/v1/inputs/doorbell/simulate",
                    json={"action": "click"}).status_code == 200
    wait_until(lambda: len(_pending(d)) == 3, timeout=10, what="three deliveries pending")
    first, second, third = sorted(r["id"] for r in _pending(d))

    out = edgehook("outbox", "list", "-c", cfg)  # from the file: no token needed
    assert out.returncode == 0, out.stderr
    rows = {int(line.split()[0]): line for line in out.stdout.splitlines()[1:]}
    assert "waiting behind" not in rows[first]
    assert f"waiting behind #{first}" in rows[second]
    assert f"waiting behind #{first}" in rows[third]

    out = edgehook("outbox", "drop", str(second), "-c", cfg, env=token)
    assert (out.returncode, out.stdout) == (0, f"delivery {second} dropped\n"), out.stderr
    assert sorted(r["id"] for r in _pending(d)) == [first, third]
    out = edgehook("outbox", "drop", str(second), "-c", cfg, env=token)
    assert out.returncode == 1 and f"no pending or dead delivery with id {second}" in out.stderr

    out = edgehook("outbox", "retry", str(third), "-c", cfg, env=token)
    assert (out.returncode, out.stdout) == (
        0, f"delivery {third} is already pending; it is due now\n"), out.stderr

    out = edgehook("outbox", "retry", str(d.gone), "-c", cfg, env=token)
    assert out.returncode == 1
    assert "its target is no longer in" in out.stderr and "queued again" not in out.stdout
    assert f"`edgehook outbox drop {d.gone}`" in out.stderr

    out = edgehook("outbox", "drop", "--target", "sink", "-c", cfg, env=token)
    assert (out.returncode, out.stdout) == (0, "2 deliveries to sink dropped\n"), out.stderr
    assert _pending(d) == []
    out = edgehook("outbox", "drop", "--target", "snik", "-c", cfg, env=token)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (f"edgehook: no deliveries to 'snik', and no webhook named 'snik' "
                          f"in {cfg} (did you mean 'sink'?)\n")
    out = edgehook("outbox", "purge", "-c", cfg, env=token)
    assert (out.returncode, out.stdout) == (0, "1 dead delivery purged\n"), out.stderr


@pytest.mark.slow
def test_hook_sends_as_the_config_says(service) -> None:  # type: ignore[no-untyped-def]
    d, cfg = service, str(service.cfg)

    def light() -> str:
        return _api(d, "GET", "/api/v1/state").json()["outputs"]["light"]["state"]

    out = edgehook("hook", "tok", "--data", '{"state": "on"}', "-c", cfg)
    assert out.returncode == 1
    assert out.stderr == ("edgehook: hooks.tok authenticates with !env HOOK_TOKEN (not set "
                          f"here), which cannot be read here: run `HOOK_TOKEN=... edgehook "
                          f"hook tok --data '{{\"state\": \"on\"}}' -c {cfg}`\n")

    out = edgehook("hook", "tok", "--data", '{"state": "on"}', "-c", cfg,
                   env={"HOOK_TOKEN": HOOK_TOKEN})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("202 Accepted\n")
    assert "event_id" in json.loads(out.stdout.split("\n", 1)[1])
    wait_until(lambda: light() == "on", timeout=10, what="the token hook's rule ran")

    out = edgehook("hook", "gh", "-c", cfg)
    assert out.returncode == 0 and out.stdout.startswith("202 "), out.stdout + out.stderr
    wait_until(lambda: light() == "off", timeout=10, what="the GitHub-signed hook's rule ran")
    out = edgehook("hook", "std", "-c", cfg)
    assert out.returncode == 0 and out.stdout.startswith("202 "), out.stdout + out.stderr
    wait_until(lambda: light() == "on", timeout=10, what="the Standard-signed hook's rule ran")

    out = edgehook("hook", "tok", "-c", cfg, env={"HOOK_TOKEN": "not-the-token"})
    assert out.returncode == 1 and out.stdout.startswith("401 "), out.stdout
    out = edgehook("hook", "tk", "-c", cfg)
    assert out.returncode == 1 and "(did you mean 'tok'?)" in out.stderr
    out = edgehook("hook", "gh", "--data", "{not json", "-c", cfg)
    assert out.returncode == 1 and "--data is not JSON" in out.stderr


def test_outbox_without_a_daemon_changes_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    a, b, c = _seed(state, "sink", 3)
    gone = _seed(state, "old-target", 1, dead=True)[0]
    cfg = write(tmp_path / "c.yaml", f"""\
        state_dir: {state}
        http: {{listen: "127.0.0.1:{free_port()}", api_token: !env ONLY_THE_SERVICE}}
        webhooks: {{sink: {{url: !env SINK_URL}}}}
        """)
    out = edgehook("outbox", "list", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    rows = {int(line.split()[0]): line for line in out.stdout.splitlines()[1:]}
    assert f"waiting behind #{a}" in rows[b] and "waiting behind" not in rows[a]

    out = edgehook("outbox", "retry", str(gone), "-c", str(cfg))
    assert out.returncode == 1 and "queued again" not in out.stdout
    assert "its target is no longer in" in out.stderr and "(webhooks: sink)" in out.stderr

    out = edgehook("outbox", "drop", str(b), "-c", str(cfg))
    assert (out.returncode, out.stdout) == (0, f"delivery {b} dropped\n"), out.stderr
    assert "did not answer" not in out.stderr, "no daemon holds the state directory"
    out = edgehook("outbox", "drop", "--target", "sink", "-c", str(cfg))
    assert out.stdout == "2 deliveries to sink dropped\n", out.stderr
    for args in (["drop"], ["drop", str(a), "--target", "sink"], ["retry"],
                 ["retry", str(a), "--all-dead"], ["list", "--limit", "0"]):
        out = edgehook("outbox", *args, "-c", str(cfg))
        assert out.returncode == 2, (args, out.stderr)  # as every other usage error
        assert out.stderr.startswith(f"usage: edgehook outbox {args[0]} "), out.stderr
        assert "Traceback" not in out.stderr
    out = edgehook("outbox", "drop", "--target", "nosuch", "-c", str(cfg))
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (f"edgehook: no deliveries to 'nosuch', and no webhook named "
                          f"'nosuch' in {cfg}\n")

    box = Outbox(state / "outbox.db", exclusive=False)
    try:
        assert {r["id"] for r in box.list()} == {gone}
        assert box.get(c) is None
    finally:
        box.close()


def test_no_daemon_is_said_plainly(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path / "c.yaml", f"""\
        gpio: {{backend: mock, inputs: {{doorbell: {{pin: 17}}}}}}
        http: {{listen: "127.0.0.1:{port}"}}
        """)
    out = edgehook("sim", "press", "doorbell", "-c", str(cfg))
    assert out.returncode == 1
    assert out.stderr == (f"edgehook: cannot reach the daemon at http://127.0.0.1:{port} "
                          "(connection refused): is it running? (systemctl status edgehook)\n")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to run the command as another user")
def test_a_user_who_cannot_read_the_state_lists_through_the_api(daemon) -> None:  # type: ignore[no-untyped-def]
    """The state directory and the token file are root's; the config is readable."""
    home = Path(f"/tmp/edgehook-cli-{os.getpid()}-api")
    home.mkdir(mode=0o755)
    try:
        (home / "state").mkdir(mode=0o700)
        (home / "creds").mkdir(mode=0o700)
        (home / "creds" / "api_token").write_text(API_TOKEN)
        gone = _seed(home / "state", "old-target", 1, dead=True)[0]
        port = free_port()
        cfg = write(home / "edgehook.yaml", f"""\
            state_dir: {home / 'state'}
            gpio: {{backend: mock}}
            http: {{listen: "127.0.0.1:{port}", api_token: !file {home}/creds/api_token}}
            """)
        cfg.chmod(0o644)
        d = daemon(cfg, port=port)
        d.wait_ready()

        out = edgehook("outbox", "list", "-c", str(cfg), user=65534)
        assert out.returncode == 1
        assert out.stderr == (
            f"edgehook: the daemon wants its API token (401), and http.api_token (!file "
            f"{home}/creds/api_token (Permission denied)) cannot be read here: run "
            f"`EDGEHOOK_API_TOKEN=... edgehook outbox list -c {cfg}` or `sudo edgehook "
            f"outbox list -c {cfg}`\n")

        out = edgehook("outbox", "list", "--status", "dead", "-c", str(cfg), user=65534,
                       env={"EDGEHOOK_API_TOKEN": API_TOKEN})
        assert out.returncode == 0, out.stderr
        assert [int(line.split()[0]) for line in out.stdout.splitlines()[1:]] == [gone]
        assert edgehook("outbox", "list", "-c", str(cfg)).returncode == 0, "root reads the file"
    finally:
        shutil.rmtree(home)


def test_outbox_counts_and_a_retry_of_a_pending_row_without_a_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (pending,) = _seed(state, "sink", 1)
    _seed(state, "sink", 1, dead=True)
    cfg = write(tmp_path / "c.yaml", f"""\
        state_dir: {state}
        http: {{listen: "127.0.0.1:{free_port()}"}}
        webhooks: {{sink: {{url: "http://127.0.0.1:9/x"}}}}
        """)
    out = edgehook("outbox", "retry", str(pending), "-c", str(cfg))
    assert (out.returncode, out.stdout) == (
        0, f"delivery {pending} is already pending; it is due now\n"), \
        out.stderr
    out = edgehook("outbox", "retry", "--all-dead", "-c", str(cfg))
    assert (out.returncode, out.stdout) == (0, "1 dead delivery queued again\n"), out.stderr
    out = edgehook("outbox", "retry", "--all-dead", "-c", str(cfg))
    assert (out.returncode, out.stdout) == (0, "0 dead deliveries queued again\n"), out.stderr
    out = edgehook("outbox", "purge", "-c", str(cfg))
    assert (out.returncode, out.stdout) == (0, "0 dead deliveries purged\n"), out.stderr


@pytest.mark.slow
def test_outbox_list_while_the_daemon_runs_shows_what_it_delivered(tmp_path: Path,
                                                                   daemon) -> None:  # type: ignore[no-untyped-def]
    """The daemon writes delivered marks to the file up to MARK_LAG s late; the list
    asks the daemon, so a delivery it made is `delivered` at once."""
    from receiver import Receiver

    port = free_port()
    with Receiver() as sink:
        cfg = write(tmp_path / "c.yaml", f"""\
            state_dir: {tmp_path / 'state'}
            gpio: {{backend: mock, inputs: {{doorbell: {{pin: 17}}}}}}
            http: {{listen: "127.0.0.1:{port}"}}
            webhooks: {{sink: {{url: "{sink.url}/hook"}}}}
            rules: [{{when: {{input: doorbell}}, do: [{{webhook: sink}}]}}]
            """)
        d = daemon(cfg, port=port)
        d.wait_ready()

        def delivered() -> int:  # the counters: they do not write the waiting marks
            return d.api("GET", "/api/v1/state").json()["outbox"]["delivered"]

        for n in (1, 2, 3):
            out = edgehook("sim", "click", "doorbell", "-c", str(cfg))
            assert out.returncode == 0, out.stderr
            sink.wait_for(n)
            wait_until(lambda n=n: delivered() == n, timeout=10, what=f"{n} delivered")
        out = edgehook("outbox", "list", "--json", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        live = json.loads(out.stdout)
        assert [(r["status"], r["attempts"]) for r in live] == [("delivered", 1)] * 3, live
        out = edgehook("outbox", "list", "-c", str(cfg))
        assert [ln.split()[1] for ln in out.stdout.splitlines()[1:]] == ["delivered"] * 3
        out = edgehook("outbox", "list", "--status", "pending", "-c", str(cfg))
        assert (out.returncode, out.stdout) == (0, "(no deliveries)\n"), out.stderr
        out = edgehook("outbox", "list", "--json", "--limit", "2", "-c", str(cfg))
        assert [r["id"] for r in json.loads(out.stdout)] == [r["id"] for r in live[:2]]
        assert d.stop() == 0

    out = edgehook("outbox", "list", "--json", "-c", str(cfg))  # from the file now
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == live, "the same rows, in the same shape"


@pytest.mark.slow
def test_start_errors_name_the_setting(tmp_path: Path) -> None:
    import socket

    def run(listen: str, state_dir: str | Path) -> subprocess.CompletedProcess[str]:
        cfg = write(tmp_path / "c.yaml", f"""\
            state_dir: {state_dir}
            gpio: {{backend: mock}}
            http: {{listen: "{listen}", api_token: a-real-token-for-this-test-0123}}
            """)
        out = edgehook("run", "-c", str(cfg))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.splitlines()) == 1, out.stderr
        return out

    cfg = tmp_path / "c.yaml"
    port = free_port()
    out = run(f"192.0.2.1:{port}", tmp_path / "s1")  # TEST-NET: on no interface here
    assert out.stderr == (f"edgehook: cannot start: http.listen 192.0.2.1:{port} ({cfg}:3:16): "
                          "no interface of this machine has that address\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = run(f"127.0.0.1:{port}", tmp_path / "s2")
    assert out.stderr == (f"edgehook: cannot start: http.listen 127.0.0.1:{port} ({cfg}:3:16): "
                          "the address is already in use (another program, or another "
                          "edgehook, listens there)\n")
    out = run(f"127.0.0.1:{port}", "/proc/nope")
    assert out.stderr == (f"edgehook: cannot start: state_dir /proc/nope ({cfg}:1:12): "
                          "cannot create it: No such file or directory\n")
    (tmp_path / "a-file").write_text("")
    out = run(f"127.0.0.1:{port}", tmp_path / "a-file")
    assert out.stderr == (f"edgehook: cannot start: state_dir {tmp_path / 'a-file'} "
                          f"({cfg}:1:12): it is not a directory\n")
