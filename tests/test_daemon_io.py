"""Inputs and outputs through a real `edgehook run --simulate` subprocess and its HTTP API:
max_on on time, on_stop on SIGTERM, a double_click rule from two simulated clicks, and
`backend: auto` without GPIO."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from broker import free_port, wait_until
from daemon_proc import EDGEHOOK

pytestmark = pytest.mark.slow

CONFIG = """\
device: {{id: io-test, name: IO test}}
state_dir: {state}
gpio:
  backend: {backend}
  inputs:
    doorbell:
      pin: GPIO17
      pull: up
      class: doorbell
      filters: {{delayed_on: 20ms, delayed_off: 20ms}}
      gestures: {{double_click: 400ms, long_press: 1s}}
  outputs:
    porch_light: {{pin: GPIO27, class: light, max_on: 700ms, on_stop: on}}
    chime: {{pin: GPIO22, on_stop: off, min_interval: 5s}}
    heater: {{pin: GPIO23, on_stop: keep}}
http:
  listen: 127.0.0.1:{port}
rules:
  - name: twice
    when: {{input: doorbell, event: double_click}}
    do:
      - output: chime
        set: on
"""


def state(d, kind: str, name: str) -> str:  # type: ignore[no-untyped-def]
    return d.api("GET", "/api/v1/state").json()[kind][name]["state"]


def test_outputs_gestures_and_on_stop(tmp_path: Path, write_config, daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "state", port=port, backend="mock"))
    d = daemon(cfg, port=port)
    d.wait_ready()

    # max_on: on through the API, off 700 ms later with nobody asking
    t0 = time.monotonic()
    r = d.api("PUT", "/api/v1/outputs/porch_light", json={"state": "on"})
    assert r.status_code == 200 and r.json()["state"] == "on"
    assert r.json()["until"] is not None
    wait_until(lambda: state(d, "outputs", "porch_light") == "off", timeout=3,
               interval=0.02, what="max_on switch-off")
    elapsed = time.monotonic() - t0
    assert 0.7 <= elapsed <= 1.5, elapsed     # tolerance: HTTP polling + a loaded runner
    d.wait_log("output porch_light -> off (max_on 0.7 s)")

    # a double_click rule from two `click` simulations sent back to back
    for _ in range(2):
        r = d.api("POST", "/api/v1/inputs/doorbell/simulate", json={"action": "click"})
        assert r.status_code == 200, r.text
    d.wait_log("input.double_click from doorbell: rules twice")
    wait_until(lambda: state(d, "outputs", "chime") == "on", timeout=3, what="chime on")
    time.sleep(0.6)                           # past the 400 ms window: no stray click
    assert "input.click from doorbell" not in d.log

    # min_interval: the chime changed < 5 s ago, so a second change is refused (409)
    r = d.api("PUT", "/api/v1/outputs/chime", json={"state": "off"})
    assert r.status_code == 409 and "min_interval" in r.json()["detail"]
    d.wait_log("output chime: off refused")

    # heater on (kept on stop), light on again (on_stop: on), chime on (on_stop: off)
    assert d.api("PUT", "/api/v1/outputs/heater", json={"state": "on"}).status_code == 200
    assert d.api("PUT", "/api/v1/outputs/porch_light",
                 json={"state": "on", "for": "10s"}).status_code == 200
    n = len(d.lines)
    assert d.stop() == 0                      # SIGTERM, exit status 0
    log = "\n".join(d.lines[n:])
    assert "output porch_light -> on (on_stop: on)" in log
    assert "output chime -> off (on_stop: off)" in log
    assert "output heater stays on (on_stop: keep)" in log
    assert "Traceback" not in d.log


def test_auto_backend_without_gpio_exits_2_in_one_line(tmp_path: Path, write_config) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "state", port=port, backend="auto"))
    out = subprocess.run([EDGEHOOK, "run", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert "no GPIO found" in lines[0] and "--simulate" in lines[0]
    assert "Traceback" not in out.stderr
