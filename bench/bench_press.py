"""Simulated press -> webhook arrival latency, beside a bare single POST in the same run.

edgehook runs in this process exactly as `edgehook run` builds it (``app.Daemon``,
mock pin factory, the outbox on a temporary state directory, durability as
shipped). A press is a MockPin edge (``pin.drive_low()`` on a pulled-up input), so
the measured path is everything after the wire: gpiozero's callback (on the
pressing thread, as MockPin calls it), the input logic, the rules (on that same
thread when the dispatcher is idle, else on the dispatcher after the bus), the
outbox's hand-over and the POST (written by the storing thread itself when the
sender thread is idle on an open connection, see ``delivery._Early``), with the
INSERT and COMMIT beside it. The receiver is a
stdlib HTTP/1.1 keep-alive server in a *subprocess* (it does not compete for our
GIL) that stamps each request with CLOCK_MONOTONIC (system-wide on Linux) as soon
as the body is read.

The references, interleaved with the presses so that both see the same machine:

- ``http.client`` keep-alive: one POST of the same body on an open connection, the
  cheapest request Python can make (and the transport edgehook's sender uses);
- ``requests.Session``: the same with the floor stack of the peer harness;
- ``requests.post``: a one-off POST (new connection), what a bare script run per
  press would do.

Latency of a reference = its call (request built, written) -> arrival; of a press =
edge -> arrival.
Target: press p99 at most 1.5x the bare single POST's p99.

    .venv/bin/python bench/bench_press.py [--samples 2000] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from edgehook.app import Daemon
from edgehook.config import load_config
from stamp_receiver import start_receiver

CONFIG = """\
device: {{id: bench, name: Bench}}
state_dir: {state}
gpio:
  backend: mock
  inputs: {{doorbell: {{pin: GPIO17, pull: up, class: doorbell}}}}
http: {{listen: "127.0.0.1:{port}"}}
webhooks:
  sink: {{url: "{url}"}}
rules:
  - name: ring
    when: {{input: doorbell, event: pressed}}
    do:
      - webhook: sink
"""


def pct(values: list[float], p: float) -> float:
    """Percentile with linear interpolation (as the peer harness computes it)."""
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(values, 50), "p95_ms": pct(values, 95), "p99_ms": pct(values, 99),
            "mean_ms": statistics.fmean(values), "max_ms": max(values)}


def measure(samples: int, gap: float) -> dict[str, object]:
    proc, url, arrivals = start_receiver()
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    tmp = Path(tempfile.mkdtemp(prefix="edgehook-press-"))
    daemon = None
    try:
        cfg_path = tmp / "press.yaml"
        cfg_path.write_text(CONFIG.format(state=tmp / "state", port=free_port(), url=url))
        daemon = Daemon(load_config(cfg_path))
        daemon.start()
        pin = daemon.gpio.inputs["doorbell"][0].pin
        seen = arrivals.count
        # the event's body is what a reference POST sends too (same size on the wire)
        body = json.dumps({"id": "01JDX0000000000000000000000", "type": "input.pressed",
                           "time": "2026-11-28T06:00:00.000Z",
                           "device": {"id": "bench", "name": "Bench"}, "source": "doorbell",
                           "data": {}}, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "edgehook/bench",
                   "webhook-id": "msg_01JDX0000000000000000000000"}
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = requests.Session()

        def hc_post() -> None:
            conn.request("POST", "/hook", body, headers)
            conn.getresponse().read()

        def rq_post() -> None:
            session.post(url, data=body, headers=headers).close()

        def rq_once() -> None:
            requests.post(url, data=body, headers=headers).close()

        def press() -> None:
            pin.drive_low()

        press_lat: list[float] = []
        hc_lat: list[float] = []
        rq_lat: list[float] = []
        once_lat: list[float] = []
        kinds = (("press", press, press_lat), ("http.client", hc_post, hc_lat),
                 ("requests", rq_post, rq_lat), ("requests.post", rq_once, once_lat))
        warm = 20
        for i in range(samples + warm):
            for name, fn, out in kinds[i % 4:] + kinds[:i % 4]:
                before = arrivals.count
                t0 = time.monotonic_ns()
                fn()
                arrived = arrivals.wait(before + 1)
                if i >= warm:
                    out.append((arrived - t0) / 1e6)
                if name == "press":
                    pin.drive_high()  # the release fires no rule
                    # let the sender's "delivered" commit land before the next sample
                    want = i + 1
                    deadline = time.monotonic() + 5
                    while daemon.outbox.counts()["delivered"] < want and \
                            time.monotonic() < deadline:
                        time.sleep(0.0002)
                time.sleep(gap)
        seen = arrivals.count - seen
        session.close()
        conn.close()
    finally:
        if daemon is not None:
            daemon.request_stop()
            daemon.stop()
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    press_s, hc_s, rq_s = summary(press_lat), summary(hc_lat), summary(rq_lat)
    once_s = summary(once_lat)
    return {"samples": samples, "requests_seen": seen, "press": press_s,
            "bare_http_client": hc_s, "bare_requests": rq_s, "bare_requests_once": once_s,
            "ratio_p99_vs_requests_once": press_s["p99_ms"] / once_s["p99_ms"],
            "ratio_p50_vs_http_client": press_s["p50_ms"] / hc_s["p50_ms"],
            "ratio_p99_vs_http_client": press_s["p99_ms"] / hc_s["p99_ms"],
            "ratio_p99_vs_requests": press_s["p99_ms"] / rq_s["p99_ms"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000,
                    help="presses (and POSTs of each reference); the p99 is the 1%% tail")
    ap.add_argument("--gap-ms", type=float, default=3.0, help="pause between samples")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # the daemon's own log lines, as `edgehook run` writes them (INFO), to /dev/null
    logging.basicConfig(level=logging.INFO, stream=open("/dev/null", "w"),  # noqa: SIM115
                        format="%(levelname)s %(name)s: %(message)s")
    res = measure(args.samples, args.gap_ms / 1000)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"press -> webhook arrival, {args.samples} samples each, interleaved "
          f"({time.strftime('%Y-%m-%d %H:%M')}, python {sys.version.split()[0]})")
    print(f"{'':28} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for label, key in (("edgehook press->arrival", "press"),
                       ("bare POST http.client", "bare_http_client"),
                       ("bare POST requests.Session", "bare_requests"),
                       ("bare POST requests.post", "bare_requests_once")):
        s = res[key]
        assert isinstance(s, dict)
        print(f"{label:28} {s['p50_ms']:8.3f} {s['p95_ms']:8.3f} {s['p99_ms']:8.3f} "
              f"{s['mean_ms']:8.3f}")
    print(f"press p99 / bare POST p99 (target <= 1.5x): http.client keep-alive "
          f"{res['ratio_p99_vs_http_client']:.2f}x, requests.Session "
          f"{res['ratio_p99_vs_requests']:.2f}x, one-off requests.post "
          f"{res['ratio_p99_vs_requests_once']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
