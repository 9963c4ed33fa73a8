"""Who may use the API and the status page: the api_token, a session cookie, browser guards.

When `http.api_token` is set, `/api/*`, `/metrics` and `/` take `Authorization: Bearer
<api_token>` or the status page's session cookie. `GET /` without either shows a login
form; `POST /login` with the token sets an HttpOnly, SameSite=Strict cookie holding an
expiry and an HMAC of it keyed by the token: stateless, valid 30 days, void once the
token changes, and the token itself never stored in the browser.

Browser guards: a state-changing request whose `Origin` names another host is 403 (a
cookie alone must not let another site press buttons), and without an api_token the
API answers only to a loopback `Host` (a DNS-rebinding guard).

Pure apart from the clock: no sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

from .config import is_loopback
from .hooks import TokenBucket, token_matches
from .routing import HttpError, Request, Response

_LOG = logging.getLogger(__name__)

SESSION_COOKIE = "edgehook_session"
SESSION_TTL = 30 * 86400
LOGIN_ATTEMPTS = 10          # token guesses per LOGIN_PER seconds, for everyone together
LOGIN_PER = 60.0
LOGIN_ERRORS = {"failed": "Wrong token.", "wait": "Too many attempts; wait a minute."}


class WebAuth:
    """The api_token checks and the login/logout handlers for one config snapshot."""

    def __init__(self, api_token: str | None, login_bucket: TokenBucket | None = None
                 ) -> None:
        self.api_token = api_token or None
        self.login_bucket = login_bucket or TokenBucket(LOGIN_ATTEMPTS, LOGIN_PER)

    # -------------------------------------------------------------- checks
    def _session_value(self, expiry: int) -> str:
        assert self.api_token is not None
        mac = hmac.new(self.api_token.encode(), f"edgehook-session:{expiry}".encode(),
                       hashlib.sha256).hexdigest()
        return f"{expiry}.{mac}"

    def _session_ok(self, req: Request) -> bool:
        raw = req.headers.get("Cookie")
        if not raw or not self.api_token:
            return False
        try:
            jar: SimpleCookie = SimpleCookie()
            jar.load(raw)
        except (CookieError, ValueError, TypeError):
            return False
        morsel = jar.get(SESSION_COOKIE)
        if morsel is None:
            return False
        expiry_text, _, _ = morsel.value.partition(".")
        if not expiry_text.isascii() or not expiry_text.isdigit() or len(expiry_text) > 12:
            return False
        expiry = int(expiry_text)
        if expiry < time.time():
            return False
        return token_matches(morsel.value, self._session_value(expiry))

    def authorized(self, req: Request) -> bool:
        """True with no api_token, or with the bearer token, or with a session cookie."""
        if not self.api_token:
            return True
        got = req.headers.get("Authorization") or ""
        if got[:7].lower() == "bearer " and token_matches(got[7:].strip(), self.api_token):
            return True
        return self._session_ok(req)

    def require(self, req: Request) -> None:
        """Raise 403/401 unless the request passes the browser guards and the token check."""
        self.check_origin(req)
        if not self.authorized(req):
            raise HttpError(401, "unauthorized", "missing or wrong bearer token",
                            {"WWW-Authenticate": 'Bearer realm="edgehook"'})

    def check_origin(self, req: Request) -> None:
        """Browser guards: same-origin for state changes; a loopback Host without a token."""
        host = req.headers.get("Host")
        if not self.api_token and host is not None and not local_host(host):
            raise HttpError(403, "forbidden", "without http.api_token the API answers only "
                                              "to a loopback Host")
        if req.method not in ("GET", "HEAD"):
            origin = req.headers.get("Origin")
            if origin is not None:
                try:
                    netloc = urlsplit(origin).netloc
                except ValueError:
                    netloc = ""
                if not netloc or netloc.lower() != (host or "").lower():
                    raise HttpError(403, "forbidden", "cross-origin request refused")

    # -------------------------------------------------------------- handlers
    def login(self, req: Request) -> Response:
        """POST /login (form: token): sets the session cookie and goes back to /.

        Post/redirect/get: a wrong token or too many attempts also redirect, to
        `/?login=failed|wait`, whose form says so (so every 4xx stays JSON).
        """
        self.check_origin(req)
        if not self.api_token:
            return _see_other("/")
        if self.login_bucket.take(time.monotonic()) > 0:
            return _see_other("/?login=wait")
        body = req.load_body()
        try:
            fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:
            fields = {}
        given = (fields.get("token") or [""])[0]
        if not token_matches(given, self.api_token):
            _LOG.warning("status page: wrong token from %s", req.client)
            return _see_other("/?login=failed")
        expiry = int(time.time()) + SESSION_TTL
        cookie = (f"{SESSION_COOKIE}={self._session_value(expiry)}; Path=/; HttpOnly; "
                  f"SameSite=Strict; Max-Age={SESSION_TTL}")
        _LOG.info("status page: signed in from %s", req.client)
        return _see_other("/", cookie)

    def logout(self, req: Request) -> Response:
        """POST /logout: forget the session cookie."""
        self.check_origin(req)
        return _see_other("/", f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; "
                               "Max-Age=0")


def _see_other(location: str, cookie: str | None = None) -> Response:
    headers = {"Location": location}
    if cookie is not None:
        headers["Set-Cookie"] = cookie
    return Response(303, b"", headers=headers)


def local_host(host: str) -> bool:
    """True when a Host header names a loopback address or localhost."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)
