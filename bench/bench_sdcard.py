"""SD card wear: bytes written, fsyncs and log lines per event, measured from outside.

`edgehook run --simulate` runs as a subprocess with a state directory on a real disk
(not tmpfs, where nothing reaches a block device), one doorbell input, one webhook
target at a receiver in this process (it answers 204) and the rule doorbell ->
webhook. Presses go through the HTTP API (`POST /api/v1/inputs/doorbell/simulate`).

- per event: after start-up has settled, N presses `--gap` s apart; the window ends
  3 s after the N-th webhook arrived (delivered marks may wait up to 2 s to share a
  commit). Bytes = the daemon's `write_bytes` in /proc/PID/io, which counts what the
  process sends towards the block layer (charged when it dirties the page cache,
  written back later): what wears the card. fsyncs/fdatasyncs are counted with strace
  when it is installed, log lines on the daemon's stderr (what journald would store).
- idle: the same counters over `--idle` s with no events.
- baseline, same run, same disk: a plain SQLite writer in a subprocess of its own
  doing the job the naive way (INSERT of a ~600-byte row, then an UPDATE marking it
  delivered, each its own transaction; WAL, synchronous=FULL, 4096-byte pages).

    .venv/bin/python bench/bench_sdcard.py [--n 30] [--gap 1] [--idle 60] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EDGEHOOK = ROOT / ".venv" / "bin" / "edgehook"

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
  - when: {{input: doorbell}}
    do:
      - webhook: sink
"""

BASELINE = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA page_size=4096")
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, event_id TEXT, url TEXT, "
           "body BLOB, status TEXT, created REAL, delivered REAL)")
n, gap = int(sys.argv[2]), float(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
for i in range(n):
    time.sleep(max(0.0, t0 + i * gap - time.monotonic()))
    cur = db.execute("INSERT INTO outbox (event_id, url, body, status, created) "
                     "VALUES (?, ?, ?, 'pending', ?)",
                     (f"ev{i:020d}", "http://127.0.0.1/hook", b"x" * 540, time.time()))
    db.execute("UPDATE outbox SET status='delivered', delivered=? WHERE id=?",
               (time.time(), cur.lastrowid))
print("done", flush=True)
sys.stdin.readline()
"""

FSYNC = re.compile(r"^\d+\s+(\d+\.\d+)\s+(?:fsync|fdatasync)\(")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def wait_quiet(pid: int, still: float = 3.0, limit: float = 30.0) -> None:
    """Until the process has written nothing for `still` seconds (or `limit` passed)."""
    deadline = time.monotonic() + limit
    last, since = write_bytes(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < still:
        time.sleep(0.25)
        now = write_bytes(pid)
        if now != last:
            last, since = now, time.monotonic()


def fs_type(path: Path) -> str:
    """The file system type under `path`: findmnt names ext4 as such, where `stat -f`
    (a fallback) says "ext2/ext3" for all three (they share one magic number)."""
    for cmd in (["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
                ["stat", "-f", "-c", "%T", str(path)]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            continue
        if out:
            return out
    return "?"


def disk_dir() -> Path:
    """A directory on a real disk (tmpfs never reaches a block device)."""
    for d in (Path("/var/tmp"), Path(tempfile.gettempdir()), ROOT / ".venv"):
        if d.is_dir() and fs_type(d) not in ("tmpfs", "ramfs"):
            return d
    return Path("/var/tmp")


class Receiver:
    """Webhook receiver in a thread: counts POSTs, answers 204, writes nothing."""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response_only(204)
                self.end_headers()
                with outer.cond:
                    outer.count += 1
                    outer.cond.notify_all()

            def log_message(self, *a: object) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/hook"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.count} of {n} webhooks arrived")
                self.cond.wait(left)

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


class Traced:
    """A command, under strace (fsync, fdatasync) when strace is installed."""

    def __init__(self, cmd: list[str], trace: Path, **kw: object) -> None:
        self.trace = trace if shutil.which("strace") else None
        if self.trace is not None:
            cmd = ["strace", "-f", "-qq", "-ttt", "-e", "trace=fsync,fdatasync",
                   "-e", "signal=none", "-o", str(self.trace), *cmd]
        self.proc = subprocess.Popen(cmd, **kw)  # type: ignore[call-overload]
        self.pid = self.proc.pid
        if self.trace is not None:  # the traced process is strace's child
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                kids = children.read_text().split()
                if kids:
                    self.pid = int(kids[0])
                    break
                time.sleep(0.01)
            else:
                raise RuntimeError("strace started no child")

    def fsyncs(self, t0: float, t1: float) -> int | None:
        """fsync + fdatasync calls started between wall-clock times t0 and t1."""
        if self.trace is None:
            return None
        n = 0
        for line in self.trace.read_text().splitlines():
            m = FSYNC.match(line)
            if m and t0 <= float(m.group(1)) < t1:
                n += 1
        return n

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()  # noqa: S310
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def press(port: int) -> None:
    req = urllib.request.Request(  # noqa: S310
        f"http://127.0.0.1:{port}/api/v1/inputs/doorbell/simulate",
        data=b'{"action": "click"}', headers={"Content-Type": "application/json"},
        method="POST")
    urllib.request.urlopen(req, timeout=10).close()  # noqa: S310


def measure_edgehook(tmp: Path, n: int, gap: float, idle: float) -> dict[str, object]:
    rx = Receiver()
    port = free_port()
    cfg = tmp / "edgehook.yaml"
    cfg.write_text(CONFIG.format(state=tmp / "state", port=port, url=rx.url))
    lines = [0]
    tail: list[str] = []

    def read_log(stream: object) -> None:
        for raw in stream:  # type: ignore[attr-defined]
            lines[0] += 1
            tail[:] = [*tail[-20:], raw.decode(errors="replace").rstrip()]

    d = Traced([str(EDGEHOOK), "run", "-c", str(cfg), "--simulate"], tmp / "edgehook.strace",
               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp)
    reader = threading.Thread(target=read_log, args=(d.proc.stderr,), daemon=True)
    reader.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        wait_quiet(d.pid)
        w0, l0, t0 = write_bytes(d.pid), lines[0], time.time()
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i * gap - time.monotonic()))
            press(port)
        rx.wait(n)
        time.sleep(3.0)
        w1, l1, t1 = write_bytes(d.pid), lines[0], time.time()
        time.sleep(idle)
        w2, l2, t2 = write_bytes(d.pid), lines[0], time.time()
        arrived = rx.count
    except Exception:
        sys.stderr.write("bench_sdcard: the daemon's last log lines:\n" + "\n".join(tail) + "\n")
        raise
    finally:
        d.stop()
        reader.join(5)
        rx.close()
    fs_ev, fs_idle = d.fsyncs(t0, t1), d.fsyncs(t1, t2)
    return {"events": n, "webhooks": arrived, "bytes": w1 - w0, "fsyncs": fs_ev,
            "log_lines": l1 - l0, "idle_s": t2 - t1, "idle_bytes": w2 - w1,
            "idle_fsyncs": fs_idle, "idle_log_lines": l2 - l1}


def measure_baseline(tmp: Path, n: int, gap: float) -> dict[str, object]:
    b = Traced([sys.executable, "-c", BASELINE, str(tmp / "naive.db"), str(n), str(gap)],
               tmp / "naive.strace", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert b.proc.stdout is not None and b.proc.stdin is not None
        if b.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the baseline writer did not start")
        wait_quiet(b.pid, still=1.0)
        w0, t0 = write_bytes(b.pid), time.time()
        b.proc.stdin.write("go\n")
        b.proc.stdin.flush()
        if b.proc.stdout.readline().strip() != "done":
            raise RuntimeError("the baseline writer failed")
        time.sleep(3.0)  # the same tail as edgehook's window
        w1, t1 = write_bytes(b.pid), time.time()
        b.proc.stdin.write("bye\n")
        b.proc.stdin.flush()
        b.proc.wait(10)
    finally:
        b.stop()
    return {"events": n, "bytes": w1 - w0, "fsyncs": b.fsyncs(t0, t1), "log_lines": 0}


def per(v: object, n: int, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v / n / scale)  # type: ignore[operator]


def report(r: dict[str, object]) -> str:
    e, b, m = r["edgehook"], r["baseline"], r["machine"]
    assert isinstance(e, dict) and isinstance(b, dict) and isinstance(m, dict)
    n, nb = e["events"], b["events"]
    out = [f"SD card writes per event ({m['arch']}, {m['cores']} cores, state dir on "
           f"{m['fs']}; {n} presses {r['gap']:g} s apart, webhook answered 204)", "",
           "| what | KiB/event | fsyncs/event | journal lines/event |", "|---|---|---|---|",
           f"| edgehook (`run --simulate`, doorbell -> webhook) | "
           f"{per(e['bytes'], n, 1024)} | {per(e['fsyncs'], n)} | {per(e['log_lines'], n)} |",
           f"| naive SQLite writer (INSERT + UPDATE, own transactions, WAL, "
           f"synchronous=FULL) | {per(b['bytes'], nb, 1024)} | {per(b['fsyncs'], nb)} | - |",
           f"| edgehook idle, {e['idle_s']:.0f} s (totals) | {e['idle_bytes'] / 1024:.2f} KiB "
           f"({e['idle_bytes']} bytes) | {'n/a' if e['idle_fsyncs'] is None else e['idle_fsyncs']}"
           f" | {e['idle_log_lines']} |", "",
           "Bytes: the process's write_bytes in /proc/PID/io, what it sends towards the block "
           "layer (page-cache writeback), which is what wears the card; fsyncs: fsync + "
           "fdatasync calls seen by strace; journal lines: the daemon's stderr lines."]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 events 0.2 s apart, 10 s idle")
    ap.add_argument("--n", type=int, default=None, help="events (default 30)")
    ap.add_argument("--gap", type=float, default=None, help="seconds between events (1)")
    ap.add_argument("--idle", type=float, default=None, help="idle window (60 s)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    a = ap.parse_args()
    n = a.n or (10 if a.quick else 30)
    gap = a.gap if a.gap is not None else (0.2 if a.quick else 1.0)
    idle = a.idle if a.idle is not None else (10.0 if a.quick else 60.0)
    tmp = Path(tempfile.mkdtemp(prefix="edgehook-sdcard-", dir=disk_dir()))
    try:
        r: dict[str, object] = {
            "machine": {"arch": os.uname().machine, "cores": len(os.sched_getaffinity(0)),
                        "fs": fs_type(tmp), "dir": str(tmp.parent)},
            "gap": gap, "edgehook": measure_edgehook(tmp, n, gap, idle),
            "baseline": measure_baseline(tmp, n, gap)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(r))
    if a.json:
        print()
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
