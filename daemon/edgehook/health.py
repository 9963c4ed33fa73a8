"""Pure health verdicts for /healthz, the watchdog and the systemd status line.

The app gathers a :class:`Snapshot` from its parts; the functions here decide what is
unhealthy (the service cannot do its job: it must restart or someone must look),
what is only degraded (MQTT away for a while), and how to say it in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MQTT_DEGRADED_AFTER = 60.0  # seconds disconnected before /healthz says degraded
SENDER_STALE_AFTER = 120.0  # seconds without a sender heartbeat before "unhealthy"
STORE_FAILURE_HOLD = 60.0   # seconds a failed store stays a problem (hooks got 503s)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the parts report at one moment (gathered by app.py)."""

    dispatcher_alive: bool
    stalled_for: float
    outbox_ok: bool
    outbox_why: str
    outbox_counts: dict[str, int]
    sender_age: float
    mqtt: dict[str, Any] | None = None      # the link's status, None without MQTT
    mqtt_down_for: float = 0.0
    unstored: int = 0                        # events whose webhooks wait in memory
    store_failures: int = 0
    store_failed_ago: float | None = None    # seconds since the last failed store
    last_store_error: str | None = None
    corrupt_moved: int = 0                   # corrupt outbox files moved aside
    extra: dict[str, Any] = field(default_factory=dict)


def verdict(s: Snapshot) -> tuple[bool, dict[str, Any]]:
    """(ok, detail) for /healthz: `problems` name what is down; MQTT only degrades."""
    problems: list[str] = []
    degraded: list[str] = []
    checks: dict[str, str] = {}
    if not s.dispatcher_alive:
        checks["dispatcher"] = "thread not running"
    elif s.stalled_for:
        checks["dispatcher"] = f"stalled for {s.stalled_for:.0f} s"
    else:
        checks["dispatcher"] = "ok"
    if checks["dispatcher"] != "ok":
        problems.append(f"dispatcher {checks['dispatcher']}")
    checks["outbox"] = "ok" if s.outbox_ok else s.outbox_why
    if not s.outbox_ok:
        problems.append(f"outbox: {s.outbox_why}")
    if s.unstored:
        why = f"{s.unstored} event(s) not stored yet ({s.last_store_error or 'outbox refused'})"
    elif s.store_failed_ago is not None and s.store_failed_ago < STORE_FAILURE_HOLD:
        why = (f"webhooks could not be stored {s.store_failed_ago:.0f} s ago "
               f"({s.last_store_error or 'outbox refused'})")
    else:
        why = ""
    checks["storage"] = why or "ok"
    if why:
        problems.append(f"storage: {why}")
    stale = s.sender_age >= SENDER_STALE_AFTER
    checks["sender"] = f"no heartbeat for {s.sender_age:.0f} s" if stale else "ok"
    if stale:
        problems.append(f"sender: no heartbeat for {s.sender_age:.0f} s")
    if s.mqtt is not None:
        if s.mqtt.get("connected"):
            checks["mqtt"] = "connected"
        else:
            checks["mqtt"] = f"disconnected for {s.mqtt_down_for:.0f} s"
            if s.mqtt_down_for >= MQTT_DEGRADED_AFTER:
                degraded.append(f"mqtt disconnected for {s.mqtt_down_for:.0f} s")
    if s.corrupt_moved:
        degraded.append(f"outbox: {s.corrupt_moved} corrupt file(s) moved aside "
                        "(outbox.db.corrupt-*); a fresh outbox was started")
    detail: dict[str, Any] = {
        "status": "unhealthy" if problems else "degraded" if degraded else "ok",
        "checks": checks, "outbox": dict(s.outbox_counts),
        "store_failures": s.store_failures, "outbox_corrupt": s.corrupt_moved, **s.extra}
    if problems:
        detail["problems"] = problems
    if degraded:
        detail["degraded"] = degraded
    return not problems, detail


def status_line(s: Snapshot, last_event: str | None) -> str:
    """The systemd STATUS= line: MQTT, the outbox, what is wrong, the last event."""
    counts = s.outbox_counts
    parts = []
    if s.mqtt is not None:
        parts.append("mqtt " + ("connected" if s.mqtt.get("connected") else "DISCONNECTED"))
    parts.append(f"outbox {counts.get('pending', 0)} pending, {counts.get('dead', 0)} dead")
    if not s.outbox_ok:
        parts.append(f"OUTBOX {s.outbox_why}")
    if s.unstored:
        parts.append(f"NOT STORED {s.unstored} event(s)")
    if s.store_failures:
        parts.append(f"{s.store_failures} store failure(s)")
    if last_event:
        parts.append(last_event)
    return "; ".join(parts)
