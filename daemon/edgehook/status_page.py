"""The status page and sign-in form as HTML strings: pure, no sockets, no state.

Server-rendered so it works on a Pi with no internet (no CDN, no build step); the
inline script (static/status.js) only polls /api/v1/state to keep it fresh. Every
value is escaped; styles and script carry the response's CSP nonce.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Any

from . import __version__


def _load_static(name: str) -> str:
    try:
        return resources.files("edgehook").joinpath("static", name).read_text("utf-8")
    except (OSError, ModuleNotFoundError):  # pragma: no cover - broken install
        return ""


_CSS = _load_static("status.css")
_JS = _load_static("status.js")
_e = html.escape


def event_summary(ev: dict[str, Any]) -> str:
    """What the rules did for one event, in a line: `ring: porch_light on; webhook discord`."""
    parts = []
    for r in ev.get("results") or []:
        if "output" in r:
            until = f" until {r['until'][11:19]}Z" if r.get("until") else ""
            parts.append(f"{r['output']} {r.get('state', '?')}{until}")
        elif "webhook" in r:
            parts.append(f"webhook {r['webhook']} queued")
        elif "publish" in r:
            parts.append(f"published {r['publish']}")
    rules = ", ".join(ev.get("rules") or [])
    text = f"{rules}: {'; '.join(parts) or 'no action'}" if rules else "no rule"
    errors = ev.get("errors") or []
    if errors:
        text += " — ERROR: " + "; ".join(str(e) for e in errors)
    return text


def _head(title: str, nonce: str) -> str:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta name=\"color-scheme\" content=\"light dark\">"
            f"<title>{_e(title)}</title><link rel=\"icon\" href=\"data:,\">"
            f"<style nonce=\"{nonce}\">{_CSS}</style></head>")


def login_page(error: str | None) -> str:
    """The sign-in form shown at / when an api_token is set."""
    err = f"<p class=\"error\" role=\"alert\">{_e(error)}</p>" if error else ""
    return (_head("edgehook: sign in", "login") +
            "<body><main class=\"login\"><h1>edgehook</h1>"
            "<form method=\"post\" action=\"/login\"><label for=\"token\">API token</label>"
            "<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\""
            " required autofocus><button type=\"submit\">Sign in</button></form>"
            f"{err}<p class=\"hint\">The value of <code>http.api_token</code> in the config."
            "</p></main></body></html>")


def _pill(state: str) -> str:
    cls = "on" if state == "on" else "off"
    return f"<span class=\"pill {cls}\" data-state>{_e(state)}</span>"


def status_page(state: dict[str, Any], events: list[dict[str, Any]],
                dead: list[dict[str, Any]], nonce: str, logout: bool) -> str:
    """The server-rendered status page; status.js keeps it fresh."""
    dev = state.get("device") or {}
    mock = state.get("backend") == "mock"
    mqtt = state.get("mqtt")
    if mqtt is None:
        mqtt_html = "<span class=\"pill off\" id=\"mqtt\">MQTT not configured</span>"
    else:
        up = bool(mqtt.get("connected"))
        mqtt_html = (f"<span class=\"pill {'on' if up else 'bad'}\" id=\"mqtt\">MQTT "
                     f"{'connected' if up else 'disconnected'}</span>")
    out = [_head(f"{dev.get('name') or 'edgehook'} · edgehook", nonce),
           f"<body data-mock=\"{'1' if mock else '0'}\"><header><div><h1>"
           f"{_e(str(dev.get('name') or dev.get('id') or 'edgehook'))}</h1>"
           f"<p class=\"meta\">edgehook {_e(str(state.get('version', __version__)))} · "
           f"{_e(str(dev.get('id', '')))} · pins: {_e(str(state.get('backend', '?')))}</p>"
           f"</div><div class=\"links\">{mqtt_html}"
           "<span class=\"pill off\" id=\"stale\" hidden>offline</span>"]
    if logout:
        out.append("<form method=\"post\" action=\"/logout\"><button type=\"submit\" "
                   "class=\"link\">Sign out</button></form>")
    out.append("</div></header><main>")
    # outputs
    out.append("<section id=\"outputs\"><h2>Outputs</h2><ul class=\"cards\">")
    for name, o in (state.get("outputs") or {}).items():
        until = o.get("until")
        out.append(
            f"<li class=\"card\" data-output=\"{_e(name)}\"><div class=\"what\">"
            f"<span class=\"name\">{_e(name)}</span><span class=\"cls\">"
            f"{_e(str(o.get('class') or ''))}</span></div><div class=\"do\">"
            f"{_pill(str(o.get('state')))}<span class=\"until\" data-until>"
            f"{_e('until ' + until[11:19] + 'Z') if until else ''}</span>"
            f"<button type=\"button\" data-toggle=\"{_e(name)}\">Toggle</button></div></li>")
    if not state.get("outputs"):
        out.append("<li class=\"empty\">No outputs configured.</li>")
    out.append("</ul></section>")
    # inputs
    out.append("<section id=\"inputs\"><h2>Inputs</h2><ul class=\"cards\">")
    for name, i in (state.get("inputs") or {}).items():
        buttons = ""
        if mock:
            buttons = (f"<button type=\"button\" data-sim=\"click\" data-input=\"{_e(name)}\">"
                       f"Press</button><button type=\"button\" data-sim=\"hold\" "
                       f"data-input=\"{_e(name)}\" class=\"secondary\">Hold</button>")
        out.append(
            f"<li class=\"card\" data-input-row=\"{_e(name)}\"><div class=\"what\">"
            f"<span class=\"name\">{_e(name)}</span><span class=\"cls\">"
            f"{_e(str(i.get('class') or ''))}</span></div><div class=\"do\">"
            f"{_pill(str(i.get('state')))}{buttons}</div></li>")
    if not state.get("inputs"):
        out.append("<li class=\"empty\">No inputs configured.</li>")
    out.append("</ul></section>")
    # outbox
    counts = state.get("outbox") or {}
    out.append("<section id=\"outbox\"><h2>Outbox</h2><p class=\"counts\">")
    for key in ("pending", "dead", "delivered"):
        out.append(f"<span class=\"count {key}\"><b data-count=\"{key}\">"
                   f"{int(counts.get(key, 0))}</b> {key}</span>")
    out.append("</p><ul class=\"dead\" id=\"dead\">")
    for d in dead:
        out.append(_dead_row(d))
    out.append("</ul></section>")
    # events
    out.append("<section id=\"events\"><h2>Recent events</h2><ol class=\"events\" "
               "id=\"event-list\">")
    for ev in events:
        out.append(_event_row(ev))
    if not events:
        out.append("<li class=\"empty\">No events yet.</li>")
    out.append("</ol></section></main><p id=\"msg\" role=\"status\" hidden></p>"
               f"<script nonce=\"{nonce}\">{_JS}</script></body></html>")
    return "".join(out)


def _dead_row(d: dict[str, Any]) -> str:
    return (f"<li><span class=\"name\">#{int(d.get('id', 0))} {_e(str(d.get('target')))}"
            f"</span> <span class=\"meta\">{_attempts(int(d.get('attempts') or 0))}</span> "
            f"<span class=\"error\">{_e(str(d.get('last_error') or ''))}</span> "
            f"<button type=\"button\" class=\"secondary\" data-retry=\"{int(d.get('id', 0))}\">"
            "Retry</button></li>")


def _attempts(n: int) -> str:
    return f"{n} attempt" + ("" if n == 1 else "s")


def _event_row(ev: dict[str, Any]) -> str:
    cls = " class=\"failed\"" if ev.get("errors") else ""
    t = str(ev.get("time", ""))
    return (f"<li{cls}><time datetime=\"{_e(t)}\">{_e(t[11:19])}</time> "
            f"<span class=\"type\">{_e(str(ev.get('type')))}</span> "
            f"<span class=\"source\">{_e(str(ev.get('source')))}</span>"
            f"<div class=\"summary\">{_e(str(ev.get('summary', '')))}</div></li>")
