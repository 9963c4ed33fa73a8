"""The Event type and its ids: time-prefixed, sortable, unique (ULID-like)."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0

EVENT_TYPES = (
    "input.pressed", "input.released", "input.held", "input.click", "input.double_click",
    "input.long_press", "input.silent", "input.resumed", "mqtt.message", "mqtt.silent",
    "mqtt.resumed", "hook.received", "output.changed", "timer.fired", "daemon.started",
)


# Compact JSON with one encoder made once: json.dumps with `separators` builds a new
# JSONEncoder on every call, and this runs per event (rules, the outbox's INSERT) and
# per HTTP answer
compact_json = json.JSONEncoder(separators=(",", ":")).encode

# Crockford's base32 from the standard library's RFC 4648 one: one C call per id
# instead of a Python loop per character (10 us of the 60 us a pin edge costs)
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())
# Random bits drawn from the OS a pool at a time: os.urandom is a system call (18 us
# here), it was two of them per press on the press -> webhook path, and each one let
# another thread take the GIL mid-event. The pool is the same CSPRNG output.
_POOL_SIZE = 4096
_pool = b""
_pool_at = 0


def _forget_pool() -> None:
    global _pool, _pool_at
    _pool, _pool_at = b"", 0


os.register_at_fork(after_in_child=_forget_pool)  # a child draws its own bits


def _crockford(value: int) -> str:
    """`value` (at most 130 bits) as 26 Crockford base32 characters."""
    # 130 bits in the top of 20 bytes: 32 characters, the last 6 of them padding zeros
    return base64.b32encode((value << 30).to_bytes(20, "big"))[:26] \
        .translate(_FROM_RFC4648).decode("ascii")


def new_id(now: float | None = None) -> str:
    """A 26-character ULID: 48-bit milliseconds + 80 random bits, monotonic within a ms.

    Ids made in one process sort in the order they were made, which is what the
    outbox and the event log rely on.
    """
    global _last_ms, _last_rand, _pool, _pool_at
    ms = int((time.time() if now is None else now) * 1000)
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _last_rand = (_last_rand + 1) & ((1 << 80) - 1)
        else:
            if _pool_at + 10 > len(_pool):
                _pool, _pool_at = os.urandom(_POOL_SIZE), 0
            fresh = int.from_bytes(_pool[_pool_at:_pool_at + 10], "big")
            _pool_at += 10
            _last_ms = ms
            _last_rand = fresh & ~(1 << 79)  # room to count
        rand = _last_rand
    return _crockford((ms & ((1 << 48) - 1)) << 80 | rand)


_second: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with milliseconds and a Z: 2026-11-28T06:00:00.123Z."""
    global _second
    whole = int(ts // 1)
    us = round((ts - whole) * 1e6)  # rounded to the microsecond as datetime does
    if us >= 1_000_000:
        whole, us = whole + 1, us - 1_000_000
    ms = us // 1000
    cached = _second  # one tuple: read and replaced whole, so threads cannot tear it
    if cached[0] != whole:  # strftime once per second, not once per event
        cached = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
        _second = cached
    return f"{cached[1]}{ms:03d}Z"


def seconds_since(stamp: str | None, fallback: float) -> float:
    """Seconds since an RFC 3339 time (or since `fallback`, a Unix time, when there is
    none or it does not parse)."""
    try:
        then = datetime.fromisoformat(stamp).timestamp() if stamp else fallback
    except ValueError:
        then = fallback
    return max(0.0, time.time() - then)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened: an edge, a message, a hook call, a timer."""

    id: str
    type: str
    source: str
    ts: float
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def time(self) -> str:
        """RFC 3339 UTC time of the event."""
        return rfc3339(self.ts)

    def to_wire(self, device: dict[str, str]) -> dict[str, Any]:
        """The JSON shape posted by a webhook action with no body (SPEC.md)."""
        return {"id": self.id, "type": self.type, "time": self.time, "device": device,
                "source": self.source, "data": self.data}


def make_event(type_: str, source: str, data: dict[str, Any] | None = None,
               ts: float | None = None) -> Event:
    """Build an event stamped now (or at `ts`)."""
    now = time.time() if ts is None else ts
    return Event(id=new_id(now), type=type_, source=source, ts=now, data=data or {})
