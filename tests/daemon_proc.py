"""Run `edgehook run` as a subprocess for tests about signals, crashes and restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

EDGEHOOK = str(Path(sys.executable).with_name("edgehook"))


class DaemonProc:
    """One daemon process; its stderr log is collected line by line."""

    def __init__(self, config: Path, *, port: int | None = None, simulate: bool = True,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 extra: list[str] | None = None) -> None:
        args = [EDGEHOOK, "run", "-c", str(config), *(extra or [])]
        if simulate:
            args.append("--simulate")
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "EDGEHOOK_CONFIG")}
        full_env.update(env or {})
        self.port = port
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=full_env, cwd=cwd)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        """Wait until a log line (from index `after`) contains `text`; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"no log line with {text!r} within {timeout} s; "
                                         f"log:\n{self.log_unlocked()}")
                self._cond.wait(min(left, 0.2))

    def log_unlocked(self) -> str:
        return "\n".join(self.lines)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the HTTP API answers /healthz."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log}")
            try:
                requests.get(self.url("/healthz"), timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log}")

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(method, self.url(path), timeout=5, **kw)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self._reader.join(5)
            tail = "\n".join(self.lines[-80:])
            raise AssertionError(
                f"daemon did not stop within {timeout} s; its log:\n{tail}") from None
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
