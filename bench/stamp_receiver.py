"""A webhook receiver in its own process that prints each arrival's monotonic time.

Shared by bench_press.py and bench_outbox.py: a separate process so the receiver
does not share the GIL with what is measured; CLOCK_MONOTONIC is system-wide, so
its stamps compare directly with the benchmark's own.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

RECEIVER = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        t = time.monotonic_ns()
        self.send_response_only(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        sys.stdout.write(f"{t}\n")
        sys.stdout.flush()
    def log_message(self, *a):
        pass

class S(ThreadingHTTPServer):
    daemon_threads = True

srv = S(("127.0.0.1", 0), H)
sys.stdout.write(f"port {srv.server_address[1]}\n")
sys.stdout.flush()
srv.serve_forever()
"""


class Arrivals:
    """Reads the receiver's arrival stamps (ns, CLOCK_MONOTONIC) in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.stamps: list[int] = []
        self.cond = threading.Condition()
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.stamps.append(int(line))
                self.cond.notify_all()

    def wait(self, n: int, timeout: float = 30.0) -> int:
        """Block until `n` requests arrived in total; return the n-th stamp."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.stamps) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.stamps)} of {n} requests arrived")
                self.cond.wait(left)
            return self.stamps[n - 1]

    @property
    def count(self) -> int:
        with self.cond:
            return len(self.stamps)


def start_receiver() -> tuple[subprocess.Popen[str], str, Arrivals]:
    """Start the receiver; returns the process, its URL and its arrival stamps."""
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    return proc, f"http://127.0.0.1:{port}/hook", Arrivals(proc)
