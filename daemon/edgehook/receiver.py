"""`edgehook receive`: a debug webhook receiver that prints what arrives and checks signatures.

What a user runs on a laptop to see exactly what edgehook (or anything else) sends:
method, path, the headers that matter, the body as pretty JSON (or text), and one of

    signature: valid (standard)          every Standard Webhooks / GitHub check passed
    signature: INVALID (standard: ...)   with the reason: this is the user's own tool, so
                                         unlike a hook it may say which part was wrong
    signature: unsigned                  no signature headers at all
    signature: not checked (...)         signed, but no --secret to check it with

It answers every request 200 `{"ok": true}`. It never prints the secret or the MAC
it expected. A client that goes away (mid-body, or before the answer) is one line in
the block, never a traceback.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

from .signing import TOLERANCE, verify_github, verify_standard

MAX_BODY = 10 * 1024 * 1024  # bytes read from one request; the rest is not read
TIMEOUT = 30.0
_INTERESTING = ("content-type", "content-length", "user-agent", "webhook-id",
                "webhook-timestamp", "webhook-signature", "x-hub-signature-256",
                "x-github-event", "x-github-delivery", "x-edgehook-event")


def signature_verdict(headers: Any, body: bytes, secrets: list[str],
                      now: float | None = None) -> str:
    """The `signature:` line for one request (standard and github schemes)."""
    now = time.time() if now is None else now
    std_sig = headers.get("webhook-signature")
    gh_sig = headers.get("X-Hub-Signature-256")
    if std_sig is None and gh_sig is None:
        return "unsigned"
    scheme = "standard" if std_sig is not None else "github"
    if not secrets:
        return f"not checked ({scheme}; give --secret to verify)"
    try:
        if scheme == "github":
            ok = verify_github(secrets, gh_sig, body)
            return "valid (github)" if ok else "INVALID (github: no secret matches)"
        msg_id = headers.get("webhook-id")
        ts = headers.get("webhook-timestamp")
        if verify_standard(secrets, msg_id, ts, std_sig, body, now):
            return "valid (standard)"
        if not msg_id or not ts:
            return "INVALID (standard: webhook-id or webhook-timestamp missing)"
        ts_text = ts.strip()
        if not (ts_text.isascii() and ts_text.isdigit()):
            return "INVALID (standard: webhook-timestamp is not a Unix time)"
        skew = now - int(ts_text)
        if abs(skew) > TOLERANCE:
            # Tell apart "right signature, stale time" from "wrong signature".
            mac_ok = verify_standard(secrets, msg_id, ts_text, std_sig, body, int(ts_text))
            what = "signature matches but " if mac_ok else ""
            when = f"{skew:.0f} s old" if skew > 0 else f"{-skew:.0f} s in the future"
            return f"INVALID (standard: {what}timestamp {when}, more than {TOLERANCE} s)"
        return "INVALID (standard: no secret matches)"
    except (ValueError, UnicodeError) as exc:  # a whsec_ secret that is not base64...
        return f"INVALID ({scheme}: {exc})"


def format_request(method: str, path: str, headers: Any, body: bytes, client: str,
                   secrets: list[str], now: float | None = None) -> str:
    """The block printed for one request."""
    stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    lines = [f"--- {stamp}Z {method} {path} from {client}"]
    for name in _INTERESTING:
        value = headers.get(name)
        if value is not None:
            lines.append(f"  {name}: {value}")
    for name, value in headers.items():  # extra X- headers a target may have configured
        low = name.lower()
        if low.startswith("x-") and low not in _INTERESTING:
            lines.append(f"  {low}: {value}")
    if body:
        try:
            text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            text = body.decode("utf-8", "replace")
        lines.extend("  " + ln for ln in text.splitlines())
    else:
        lines.append("  (no body)")
    lines.append(f"  signature: {signature_verdict(headers, body, secrets, now)}")
    return "\n".join(lines)


def make_server(host: str, port: int, secrets: list[str], out: TextIO = sys.stdout
                ) -> ThreadingHTTPServer:
    """A receiver bound to host:port (not yet serving); port 0 picks a free one."""
    lock = threading.Lock()

    def say(text: str) -> None:
        """One whole block or line at a time: requests are handled on many threads."""
        with lock:
            print(text, file=out, flush=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "edgehook-receive"
        sys_version = ""
        timeout = TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def _any(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            wanted = min(max(length, 0), MAX_BODY)
            try:
                body = self.rfile.read(wanted) if wanted else b""
            except OSError:  # reset or timed out mid-body: show what there is
                body = b""
            if length > MAX_BODY:
                self.close_connection = True
            text = format_request(self.command, self.path, self.headers, body,
                                  self.client_address[0], secrets)
            if len(body) < wanted:
                self.close_connection = True
                say(f"{text}\n  (the client went away after {len(body)} of {length} "
                    "body bytes; no answer sent)")
                return
            say(text)
            data = b'{"ok":true}\n'
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            except OSError:
                self.close_connection = True
                say("  (the client went away before the answer)")

        do_POST = do_PUT = do_PATCH = do_GET = do_DELETE = do_HEAD = _any  # noqa: N815

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            """A connection that failed outside a request (reset, timeout): one line."""
            exc = sys.exc_info()[1]
            if not isinstance(exc, OSError):
                super().handle_error(request, client_address)
                return
            say(f"  (connection from {client_address[0]} ended: {exc})")

    cls: type[ThreadingHTTPServer] = Server
    if ":" in host:
        import socket

        cls = type("V6", (Server,), {"address_family": socket.AF_INET6})
    server = cls((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(host: str, port: int, secrets: list[str]) -> int:
    """Run the receiver until Ctrl-C; the exit status for the CLI."""
    try:
        server = make_server(host, port, list(secrets))
    except OSError as exc:
        print(f"edgehook: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    h, p = server.server_address[:2]
    shown = f"[{h}]" if ":" in str(h) else h
    n = len(secrets)
    checking = f"checking signatures with {n} secret{'' if n == 1 else 's'}" if n else \
        "no --secret: signatures are shown, not checked"
    print(f"edgehook receive: listening on http://{shown}:{p}/ ({checking}); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("", flush=True)
    finally:
        server.server_close()
    return 0
