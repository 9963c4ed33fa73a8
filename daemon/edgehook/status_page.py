"""The status page and sign-in form as HTML strings: pure, no sockets, no state.

Server-rendered so it works on a Pi with no internet (no CDN, no build step) and
without JavaScript; the inline script (static/status.js) polls the API to keep it
fresh and shows every time in the browser's time zone (the server only knows UTC,
so without the script times read "12:00:03 UTC"). Every value is escaped; styles
and script carry the response's CSP nonce.
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


def skipped_rules(ev: dict[str, Any]) -> list[tuple[str, str]]:
    """(rule, reason) for each rule that matched the event but did not fire."""
    out = []
    for s in ev.get("skipped") or []:
        if isinstance(s, dict):
            out.append((str(s.get("rule", "?")), str(s.get("reason", ""))))
        elif isinstance(s, (list, tuple)) and len(s) == 2:
            out.append((str(s[0]), str(s[1])))
    return out


def event_summary(ev: dict[str, Any]) -> str:
    """What the rules did for one event, in a line: `ring: porch_light on; webhook discord`.

    Rules that matched but did not fire are named with why, so an event no rule
    acted on never reads as if no rule had matched it.
    """
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
    skipped = skipped_rules(ev)
    if rules:
        text = f"{rules}: {'; '.join(parts) or 'no action'}"
    else:
        text = "no rule fired" if skipped else "no rule"
    if skipped:
        text += " — skipped " + "; ".join(f"{rule} ({why})" for rule, why in skipped)
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


def _time(iso: Any, date: bool = False) -> str:
    """A `<time>` in UTC, which status.js rewrites in the browser's time zone."""
    t = str(iso or "")
    text = f"{t[:10]} {t[11:19]} UTC" if date else f"{t[11:19]} UTC"
    return f"<time datetime=\"{_e(t)}\" title=\"{_e(t)}\">{_e(text)}</time>"


def target_health(w: dict[str, Any]) -> tuple[str, str]:
    """(word, pill class) for a webhook target: gone, failing, sending, ok or idle.

    Failing means the last attempt's error is newer than the last success; the
    timestamps are RFC 3339 UTC of one format, so they compare as strings.
    """
    success, error_at = w.get("last_success"), w.get("last_error_at")
    if w.get("gone"):
        return "gone", "bad"
    if w.get("last_error") and (not success or (error_at and error_at > success)):
        return "failing", "bad"
    if w.get("pending"):
        return "sending", "off"
    if success:
        return "ok", "on"
    return "no deliveries yet", "off"


def status_page(state: dict[str, Any], events: list[dict[str, Any]],
                dead: list[dict[str, Any]], nonce: str, logout: bool,
                pending: list[dict[str, Any]] | None = None) -> str:
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
            f"{'until ' + _time(until) if until else ''}</span>"
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
    # webhooks: each target's health, then the outbox's counts and undelivered rows
    by_id = {str(ev.get("id")): ev for ev in events}
    out.append("<section id=\"outbox\"><h2>Webhooks</h2><ul class=\"cards\" id=\"targets\">")
    for name, w in (state.get("webhooks") or {}).items():
        out.append(_target_card(name, w if isinstance(w, dict) else {}))
    out.append("</ul><p class=\"counts\">")
    counts = state.get("outbox") or {}
    for key in ("pending", "dead", "delivered"):
        out.append(f"<span class=\"count {key}\"><b data-count=\"{key}\">"
                   f"{int(counts.get(key, 0))}</b> {key}</span>")
    out.append("</p>")
    for status, rows in (("dead", dead), ("pending", pending or [])):
        out.append(f"<ul class=\"rows\" id=\"{status}\">")
        out.extend(_outbox_row(d, status, by_id) for d in rows)
        more = int(counts.get(status, 0)) - len(rows)
        if rows and more > 0:
            out.append(f"<li class=\"more\">{more} more {status} (edgehook outbox list)</li>")
        out.append("</ul>")
    out.append("</section>")
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


def _target_card(name: str, w: dict[str, Any]) -> str:
    word, cls = target_health(w)
    lines = []
    if w.get("last_success"):
        lines.append(f"last success {_time(w['last_success'], date=True)}")
    if "pending" in w:
        lines.append(f"{int(w.get('pending') or 0)} pending")
    detail = f"<div class=\"detail\">{' · '.join(lines)}</div>" if lines else ""
    if w.get("last_error"):
        at = f" {_time(w['last_error_at'], date=True)}" if w.get("last_error_at") else ""
        detail += (f"<div class=\"detail error\">last error{at}: "
                   f"{_e(str(w['last_error']))}</div>")
    return (f"<li class=\"card\" data-target=\"{_e(name)}\"><div class=\"what\">"
            f"<span class=\"name\">{_e(name)}</span></div><div class=\"do\">"
            f"<span class=\"pill {cls}\" data-health>{_e(word)}</span></div>{detail}</li>")


def _outbox_row(d: dict[str, Any], status: str, events: dict[str, dict[str, Any]]) -> str:
    """One undelivered delivery: what, where it stands, the event it came from, why."""
    row_id = int(d.get("id", 0))
    attempts = int(d.get("attempts") or 0)
    meta = f"{status} · {_attempts(attempts)}"
    if status == "pending" and d.get("next_attempt_at"):
        meta += f" · next try {_time(d['next_attempt_at'])}"
    parts = [f"<li class=\"{status}\" data-row=\"{row_id}\"><span class=\"name\">#{row_id} "
             f"{_e(str(d.get('target')))}</span> <span class=\"meta\">{meta}</span>"]
    event_id = d.get("event_id")
    if event_id:
        ev = events.get(str(event_id))
        if ev is not None:
            what = (f"<a href=\"#ev-{_e(str(event_id))}\">{_e(str(ev.get('type')))} "
                    f"{_e(str(ev.get('source')))}</a> at {_time(ev.get('time'))}")
        else:
            what = f"event <code>{_e(str(event_id))}</code>"
        parts.append(f" <span class=\"meta from\">from {what}</span>")
    if d.get("waiting_behind") is not None:
        parts.append(f" <span class=\"meta behind\">waiting behind "
                     f"#{_e(str(d['waiting_behind']))}</span>")
    if d.get("last_error"):
        parts.append(f" <span class=\"error\">{_e(str(d['last_error']))}</span>")
    if status == "dead":
        parts.append(f" <button type=\"button\" class=\"secondary\" data-retry=\"{row_id}\">"
                     "Retry</button>")
    parts.append("</li>")
    return "".join(parts)


def _attempts(n: int) -> str:
    return f"{n} attempt" + ("" if n == 1 else "s")


def _event_row(ev: dict[str, Any]) -> str:
    """One event: when, what, which rules fired and did what, which skipped and why."""
    errors = ev.get("errors") or []
    cls = " class=\"failed\"" if errors else ""
    parts = []
    for r in ev.get("results") or []:
        if "output" in r:
            until = f" until {_time(r['until'])}" if r.get("until") else ""
            parts.append(f"{_e(str(r['output']))} {_e(str(r.get('state', '?')))}{until}")
        elif "webhook" in r:
            parts.append(f"webhook {_e(str(r['webhook']))} queued")
        elif "publish" in r:
            parts.append(f"published {_e(str(r['publish']))}")
    rules = ", ".join(str(r) for r in ev.get("rules") or [])
    skipped = skipped_rules(ev)
    if rules:
        summary = f"{_e(rules)}: {'; '.join(parts) or 'no action'}"
    else:
        summary = "no rule fired" if skipped else "no rule"
    lines = [f"<div class=\"summary\">{summary}</div>"]
    lines.extend(f"<div class=\"skipped\">skipped {_e(rule)}: {_e(why)}</div>"
                 for rule, why in skipped)
    lines.extend(f"<div class=\"error\">error: {_e(str(e))}</div>" for e in errors)
    return (f"<li id=\"ev-{_e(str(ev.get('id', '')))}\"{cls}>{_time(ev.get('time'))} "
            f"<span class=\"type\">{_e(str(ev.get('type')))}</span> "
            f"<span class=\"source\">{_e(str(ev.get('source')))}</span>{''.join(lines)}</li>")
