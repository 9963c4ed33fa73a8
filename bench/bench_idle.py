"""Idle cost and start-up: RSS after start, CPU over an idle minute, start -> READY.

Baselines measured in the same run: a bare `python -c "import <our dependencies>"`
(the import floor: time and RSS), so the figures are ratios on whatever machine runs
this. READY is observed the way systemd sees it, on a real NOTIFY_SOCKET.

    .venv/bin/python bench/bench_idle.py [--idle 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")
DEPS = "import paho.mqtt.client, gpiozero, requests, yaml, sdnotify, jinja2.sandbox"

CONFIG = """\
device: {{id: bench, name: Bench}}
state_dir: {state}
gpio:
  backend: mock
  inputs: {{doorbell: {{pin: 17, class: doorbell}}}}
  outputs: {{porch_light: {{pin: 27, class: light}}}}
http: {{listen: "127.0.0.1:{port}"}}
{mqtt}
webhooks:
  sink: {{url: "http://127.0.0.1:9/hook"}}
rules:
  - when: {{input: doorbell}}
    do:
      - webhook: sink
        body: {{text: "ring at {{{{ device.name }}}}"}}
      - output: porch_light
        set: on
        for: 30s
{mqtt_rule}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def import_floor() -> tuple[float, float]:
    """Median wall time and RSS (MB) of a process that only imports our dependencies."""
    times, rss = [], []
    code = DEPS + "; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    for _ in range(5):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        times.append(time.perf_counter() - t0)
        rss.append(int(out.stdout.strip()) / 1024)
    return sorted(times)[2], sorted(rss)[2]


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes] | None, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(exe, os.X_OK):
        return None, 0
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.02)
    return proc, port


def run_daemon(tmp: Path, with_mqtt: bool, broker_port: int, idle: float) -> dict[str, float]:
    port = free_port()
    mqtt = f"mqtt: {{host: 127.0.0.1, port: {broker_port}}}" if with_mqtt else ""
    mqtt_rule = ('  - when: {mqtt: "bench/in"}\n    do: [{webhook: sink}]'
                 if with_mqtt else "")
    cfg = tmp / f"bench-{'mqtt' if with_mqtt else 'plain'}.yaml"
    cfg.write_text(CONFIG.format(state=tmp / f"state-{with_mqtt}", port=port, mqtt=mqtt,
                                 mqtt_rule=mqtt_rule))
    sock_path = tmp / f"notify-{with_mqtt}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "edgehook"), "run", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            msg = sock.recv(4096).decode()
            if "READY=1" in msg.split("\n"):
                ready = time.perf_counter() - t0
                break
        time.sleep(1.0)  # let start-up work (discovery, first status) finish
        rss_start = rss_kb(proc.pid) / 1024
        c0 = cpu_s(proc.pid)
        time.sleep(idle)
        idle_cpu = cpu_s(proc.pid) - c0
        rss_idle = rss_kb(proc.pid) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        sock.close()
    return {"ready_s": ready, "rss_start_mb": rss_start, "rss_after_idle_mb": rss_idle,
            "idle_cpu_ms": idle_cpu * 1000, "idle_s": idle}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--idle", type=float, default=60.0, help="idle seconds to measure")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    floor_t, floor_rss = import_floor()
    results: dict[str, object] = {"import_floor_s": floor_t, "import_floor_rss_mb": floor_rss}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker, bport = start_broker(tmp)
        try:
            results["plain"] = run_daemon(tmp, False, 0, args.idle)
            if broker is not None:
                results["mqtt"] = run_daemon(tmp, True, bport, args.idle)
        finally:
            if broker is not None:
                broker.terminate()
                broker.wait(5)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"import floor of the dependencies: {floor_t * 1000:.0f} ms, "
          f"{floor_rss:.1f} MB RSS (baseline)")
    print(f"{'config':8} {'start->READY':>13} {'x floor':>8} {'RSS start':>10} "
          f"{'RSS idle':>9} {'CPU idle':>14}")
    for name in ("plain", "mqtt"):
        r = results.get(name)
        if not isinstance(r, dict):
            continue
        print(f"{name:8} {r['ready_s'] * 1000:10.0f} ms {r['ready_s'] / floor_t:7.2f}x "
              f"{r['rss_start_mb']:7.1f} MB {r['rss_after_idle_mb']:6.1f} MB "
              f"{r['idle_cpu_ms']:6.1f} ms/{r['idle_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
