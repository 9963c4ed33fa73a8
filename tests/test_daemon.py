"""The daemon as a subprocess: API, `edgehook sim`, SIGHUP reloads, SIGTERM exits 0."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from broker import free_port, wait_until
from daemon_proc import EDGEHOOK

CONFIG = """\
device: {{id: test-door, name: Test door}}
state_dir: {state}
gpio:
  backend: mock
  inputs:
    doorbell: {{pin: GPIO17, class: doorbell, hold: 300ms}}
  outputs:
    porch_light: {{pin: GPIO27, class: light}}
http:
  listen: 127.0.0.1:{port}
rules:
  - name: ring
    when: {{input: doorbell}}
    do:
      - output: porch_light
        set: on
        for: {duration}
"""


def test_run_sim_reload_and_stop(tmp_path: Path, write_config, daemon) -> None:
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "state", port=port, duration="600ms"))
    d = daemon(cfg, port=port)
    d.wait_ready()
    state = d.api("GET", "/api/v1/state").json()
    assert state["backend"] == "mock"
    assert state["outputs"]["porch_light"]["state"] == "off"
    assert state["inputs"]["doorbell"] == {"state": "off", "class": "doorbell"}

    # edgehook sim press -> the rule switches the light on, then it reverts
    out = subprocess.run([EDGEHOOK, "sim", "press", "doorbell", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: d.api("GET", "/api/v1/state").json()["outputs"]["porch_light"]["state"]
               == "on", what="light on after press")
    line = d.wait_log("input.pressed from doorbell: rules ring")
    event_id = line.split("event ")[1].split()[0]
    d.wait_log(f"event {event_id}: rule ring: output porch_light on for 0.6 s")
    d.wait_log("input.held from doorbell")
    wait_until(lambda: d.api("GET", "/api/v1/state").json()["outputs"]["porch_light"]["state"]
               == "off", timeout=5, what="revert after for:")
    subprocess.run([EDGEHOOK, "sim", "release", "doorbell", "-c", str(cfg)], check=True,
                   capture_output=True, timeout=20)

    # PUT an output through the API
    r = d.api("PUT", "/api/v1/outputs/porch_light", json={"state": "on", "for": "30s"})
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "porch_light" and body["state"] == "on" and body["until"]
    assert d.api("PUT", "/api/v1/outputs/nope", json={"state": "on"}).status_code == 404
    assert d.api("PUT", "/api/v1/outputs/porch_light", json={"state": "blue"}).status_code == 400

    # SIGHUP with a broken config: logged, the old config keeps running
    good = cfg.read_text()
    cfg.write_text(good + "  - when: {input: nosuch}\n    do: [{output: porch_light, set: on}]\n")
    n = len(d.lines)
    d.signal(signal.SIGHUP)
    d.wait_log("reload refused: keeping the running config", after=n)
    assert "no input named 'nosuch'" in d.log
    assert d.api("GET", "/healthz").status_code == 200

    # SIGHUP with a good new config: swapped in (a new output appears)
    cfg.write_text(good.replace(
        "    porch_light: {pin: GPIO27, class: light}",
        "    porch_light: {pin: GPIO27, class: light}\n    siren: {pin: GPIO22}"))
    n = len(d.lines)
    d.signal(signal.SIGHUP)
    d.wait_log("reloaded", after=n)
    assert "siren" in d.api("GET", "/api/v1/state").json()["outputs"]

    assert d.stop() == 0
    assert "stopped" in d.log
    assert "Traceback" not in d.log


def test_sim_refused_unless_mock(tmp_path: Path, write_config) -> None:
    """`auto` on a machine without GPIO: exit 2 with one clear line, no traceback."""
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "s", port=port, duration="1s")
                       .replace("backend: mock", "backend: auto"))
    out = subprocess.run([EDGEHOOK, "run", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "no GPIO found" in out.stderr and "--simulate" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_error_at_run_exits_2_and_starts_nothing(tmp_path: Path, write_config) -> None:
    port = free_port()
    cfg = write_config(f"http: {{listen: '127.0.0.1:{port}'}}\ngpio: {{backend: nope}}\n")
    out = subprocess.run([EDGEHOOK, "run", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    assert out.returncode == 2
    assert f"{cfg}:2:" in out.stderr and "'nope' is not one of auto, mock" in out.stderr
    assert not (tmp_path / "state").exists()


def test_check_summary_and_version(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([EDGEHOOK, "check", "-c", str(root / "config" / "demo.yaml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.strip().startswith("config OK: 1 input, 1 output, 2 rules")
    ver = subprocess.run([EDGEHOOK, "--version"], capture_output=True, text=True, timeout=30)
    from edgehook import __version__
    assert ver.stdout.strip() == f"edgehook {__version__}"


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send a signal to one thread of another process (glibc's tgkill)."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def test_sigterm_that_lands_on_a_worker_thread_still_stops_the_daemon(
        tmp_path: Path, write_config, daemon) -> None:
    """The kernel may hand a process signal to any thread. Python runs the handler on
    the main thread only once that wakes up: a main thread asleep in a read never
    did, and the daemon ignored SIGTERM until systemd's SIGKILL."""
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "state", port=port, duration="1s"))
    d = daemon(cfg, port=port)
    d.wait_ready()
    pid = d.proc.pid
    workers = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()
                     if int(t.name) != pid)
    assert workers, "the daemon runs worker threads"
    for tid in workers:  # the first worker that still exists (short-lived ones come and go)
        try:
            _tgkill(pid, tid, signal.SIGTERM)
            break
        except ProcessLookupError:
            continue
    else:
        raise AssertionError("no worker thread to signal")
    assert d.proc.wait(10) == 0
    assert "stopped" in d.log
