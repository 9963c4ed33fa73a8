"""`edgehook receive`: prints every webhook with a signature verdict, answers 200."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from edgehook.receiver import make_server, signature_verdict
from edgehook.signing import sign_github, standard_headers

SECRET = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM="


@pytest.fixture
def receiver() -> Iterator[tuple[str, io.StringIO]]:
    out = io.StringIO()
    srv = make_server("127.0.0.1", 0, [SECRET], out)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", out
    srv.shutdown()
    srv.server_close()


def _post(url: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(url + "/hook/path?x=1", data=body, timeout=5,
                         headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("headers, verdict", [
    (lambda b: standard_headers([SECRET], "msg_1", int(time.time()), b), "valid (standard)"),
    (lambda b: standard_headers(["whsec_AAAA", SECRET], "msg_1", int(time.time()), b),
     "valid (standard)"),
    (lambda b: standard_headers(["whsec_AAAA"], "msg_1", int(time.time()), b),
     "INVALID (standard: no secret matches)"),
    (lambda b: standard_headers([SECRET], "msg_1", int(time.time()) - 600, b),
     "INVALID (standard: signature matches but timestamp 60"),  # 600 or 601 s old
    (lambda b: standard_headers(["whsec_AAAA"], "msg_1", int(time.time()) + 900, b),
     "INVALID (standard: timestamp "),  # in the future, and no "signature matches"
    (lambda b: {"X-Hub-Signature-256": sign_github(SECRET, b)}, "valid (github)"),
    (lambda b: {"X-Hub-Signature-256": sign_github("nope", b)},
     "INVALID (github: no secret matches)"),
    (lambda b: {}, "unsigned"),
])
def test_receiver_prints_and_verifies(receiver: tuple[str, io.StringIO], headers, verdict: str
                                      ) -> None:
    url, out = receiver
    body = b'{"id":"01ABC","type":"input.pressed","data":{"n":1}}'
    r = _post(url, body, headers(body))
    assert r.status_code == 200 and r.json() == {"ok": True}
    text = out.getvalue()
    assert "POST /hook/path?x=1" in text
    assert '"type": "input.pressed"' in text          # pretty-printed JSON
    assert f"signature: {verdict}" in text
    assert "c2VjcmV0" not in text                     # never the secret


def test_verdict_without_secret_and_odd_input() -> None:
    h = {"webhook-signature": "v1,AAAA", "webhook-id": "x", "webhook-timestamp": "²"}
    assert signature_verdict(h, b"", []).startswith("not checked (standard")
    assert signature_verdict(h, b"", [SECRET]).startswith("INVALID (standard")
    assert signature_verdict({"webhook-signature": "v1,AAAA"}, b"", [SECRET]) == \
        "INVALID (standard: webhook-id or webhook-timestamp missing)"
    assert signature_verdict({"X-Hub-Signature-256": "x"}, b"", ["whsec_!!"]).startswith(
        "INVALID (github")


def test_receive_command(tmp_path: Path) -> None:
    """The CLI wiring: `edgehook receive --port N --secret S` prints and answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "edgehook"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgehook"]
    proc = subprocess.Popen([*cmd, "receive", "--port", str(port), "--secret", SECRET],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()
        assert f"listening on http://127.0.0.1:{port}/" in first
        body = b'{"hello":"world"}'
        r = _post(f"http://127.0.0.1:{port}", body,
                  standard_headers([SECRET], "msg_cli", int(time.time()), body))
        assert r.status_code == 200
        lines: list[str] = []
        while not any(ln.strip().startswith("signature:") for ln in lines) and len(lines) < 40:
            lines.append(proc.stdout.readline())  # the block ends with the verdict
        assert "signature: valid (standard)" in lines[-1], lines
        assert any('"hello": "world"' in ln for ln in lines)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def _receive(*args: str) -> subprocess.Popen[str]:
    exe = Path(sys.executable).parent / "edgehook"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgehook"]
    return subprocess.Popen([*cmd, "receive", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    proc = _receive("--port", port)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and out == ""
    assert err.splitlines()[-1] == (f"edgehook receive: error: argument --port: {port!r} is "
                                    "not a port (1-65535, or 0 for any free one)")


def test_a_client_that_goes_away_mid_body_is_one_line_not_a_traceback() -> None:
    import socket

    proc = _receive("--port", "0")
    try:
        first = proc.stdout.readline()
        port = int(first.split("http://127.0.0.1:")[1].split("/")[0])
        for _ in range(3):  # the answer to a gone client fails at once or at its 2nd write
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /big HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 99999999999\r\n\r\n{\"partial\":")
        r = requests.post(f"http://127.0.0.1:{port}/after", data=b"{}", timeout=5)
        assert r.status_code == 200, "the receiver still answers"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Traceback" not in err and "Exception" not in err, err
    assert err == ""
    notes = [ln for ln in out.splitlines() if "went away" in ln]
    assert notes == ["  (the client went away after 11 of 99999999999 body bytes; "
                     "no answer sent)"] * 3, out
    assert "POST /after" in out
