"""Outbox + sender benchmark: accept rate, delivered/s and press-to-arrival latency.

Each edgehook figure is printed beside a baseline measured in the same run against
the same receiver: a bare loop posting with one ``requests.Session`` (no outbox, no
signing, no durability). The receiver is a stdlib ``ThreadingHTTPServer`` speaking
HTTP/1.1 keep-alive in a *subprocess*, so it does not compete for our GIL; it
stamps each request's arrival with CLOCK_MONOTONIC (system-wide on Linux) and
reports it on stdout.

    .venv/bin/python bench/bench_outbox.py [--n 1000] [--samples 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from edgehook.config import Signing, WebhookConfig
from edgehook.delivery import Sender
from edgehook.events import make_event
from edgehook.outbox import NewDelivery, Outbox
from edgehook.templates import Static
from stamp_receiver import start_receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the spec's example secret


def body_of(i: int) -> bytes:
    ev = make_event("input.pressed", "doorbell", {"n": i})
    return json.dumps(ev.to_wire({"id": "bench", "name": "Bench"})).encode()


def delivery(url: str, i: int) -> NewDelivery:
    return NewDelivery(target="t", event_id=f"ev{i}", url=url, method="POST", headers={},
                       body=body_of(i), content_type="application/json", max_attempts=12,
                       max_age=900.0)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def bench_accept(tmp: Path, url: str, n: int, batch: int) -> float:
    box = Outbox(tmp / f"accept-{batch}" / "outbox.db")
    items = [delivery(url, i) for i in range(n)]
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        box.add(items[i:i + batch])
    elapsed = time.perf_counter() - t0
    box.close()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    n, samples = args.n, args.samples

    proc, url, arrivals = start_receiver()
    tmp = Path(tempfile.mkdtemp(prefix="edgehook-bench-"))
    rows: list[tuple[str, str, str, str]] = []
    try:
        # (a) accept rate into the outbox
        batched = bench_accept(tmp, url, n, 50)
        single = bench_accept(tmp, url, n, 1)
        rows.append(("accept rows/s, add() batches of 50", f"{batched:,.0f}", "", ""))
        rows.append(("accept rows/s, one per transaction", f"{single:,.0f}", "", ""))

        # (b) throughput: baseline first
        session = requests.Session()
        payloads = [body_of(i) for i in range(n)]
        headers = {"Content-Type": "application/json"}
        for i in range(50):
            session.post(url, data=payloads[i], headers=headers)
        arrivals.wait(50)
        c0, t0 = time.process_time(), time.perf_counter()
        for p in payloads:
            session.post(url, data=p, headers=headers).raise_for_status()
        base_elapsed = time.perf_counter() - t0
        base_cpu = (time.process_time() - c0) / n * 1000
        base_rate = n / base_elapsed
        arrivals.wait(50 + n)
        seen = 50 + n

        box = Outbox(tmp / "deliver" / "outbox.db")
        cfg = WebhookConfig(name="t", url=Static(url), timeout=10.0,
                            signing=Signing("standard", (SECRET,)))
        sender = Sender(box, {"t": cfg})
        sender.start()
        warm = [delivery(url, i) for i in range(50)]
        box.add(warm)  # as the daemon does: an fsynced commit, then wake the sender
        sender.wake(["t"])
        arrivals.wait(seen + 50)
        while box.counts()["delivered"] < 50:
            time.sleep(0.001)
        items = [delivery(url, i) for i in range(n)]
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(0, n, 50):  # as the dispatcher would: a group commit per burst slice
            box.add(items[i:i + 50])
            sender.wake(["t"])
        while box.counts()["delivered"] < 50 + n:
            time.sleep(0.0005)
        eh_elapsed = time.perf_counter() - t0
        eh_cpu = (time.process_time() - c0) / n * 1000
        eh_rate = n / eh_elapsed
        rows.append(("delivered/s (1,000 burst, add+send)", f"{eh_rate:,.0f}", f"{base_rate:,.0f}",
                     f"{eh_rate / base_rate:.2f}x"))
        rows.append(("CPU ms per delivery (this process)", f"{eh_cpu:.3f}", f"{base_cpu:.3f}",
                     f"{eh_cpu / base_cpu:.2f}x"))

        # (c) single press -> arrival latency, interleaved with single bare POSTs
        base_lat: list[float] = []
        eh_lat: list[float] = []
        delivered = box.counts()["delivered"]
        for i in range(samples):
            before = arrivals.count
            t0_ns = time.monotonic_ns()
            session.post(url, data=payloads[i % n], headers=headers)
            base_lat.append((arrivals.wait(before + 1) - t0_ns) / 1e6)

            before = arrivals.count
            one = delivery(url, i)
            t0_ns = time.monotonic_ns()
            box.add([one])
            sender.wake(["t"])
            eh_lat.append((arrivals.wait(before + 1) - t0_ns) / 1e6)
            delivered += 1
            while box.counts()["delivered"] < delivered:  # let the mark commit settle
                time.sleep(0.0002)
            time.sleep(0.002)
        for label, p in (("p50", 50), ("p99", 99)):
            e, b = pct(eh_lat, p), pct(base_lat, p)
            rows.append((f"press->arrival latency {label} (ms)", f"{e:.3f}", f"{b:.3f}",
                         f"{e / b:.2f}x"))
        rows.append(("press->arrival latency mean (ms)", f"{statistics.mean(eh_lat):.3f}",
                     f"{statistics.mean(base_lat):.3f}",
                     f"{statistics.mean(eh_lat) / statistics.mean(base_lat):.2f}x"))
        sender.stop(2)
        box.close()
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"edgehook outbox benchmark: n={n}, latency samples={samples}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, python {sys.version.split()[0]}")
    print("edgehook: WAL synchronous=FULL (fsync per commit), Standard Webhooks signing,"
          " urllib3 keep-alive")
    print("baseline: bare loop, one requests.Session, no outbox, no signing")
    w = max(len(r[0]) for r in rows)
    print(f"{'figure':<{w}}  {'edgehook':>10}  {'baseline':>10}  {'ratio':>7}")
    for name, e, b, r in rows:
        print(f"{name:<{w}}  {e:>10}  {b:>10}  {r:>7}")


if __name__ == "__main__":
    main()
