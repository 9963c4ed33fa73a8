"""The Event type and its ids: time-prefixed, sortable, unique (ULID-like)."""

from __future__ import annotations

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


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(now: float | None = None) -> str:
    """A 26-character ULID: 48-bit milliseconds + 80 random bits, monotonic within a ms.

    Ids made in one process sort in the order they were made, which is what the
    outbox and the event log rely on.
    """
    global _last_ms, _last_rand
    ms = int((time.time() if now is None else now) * 1000)
    # drawn before the lock: os.urandom is a system call, which lets other threads run
    # while the lock is held (16 hook threads queued on it under load)
    fresh = int.from_bytes(os.urandom(10), "big") & ~(1 << 79)  # room to count
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _last_rand = (_last_rand + 1) & ((1 << 80) - 1)
        else:
            _last_ms = ms
            _last_rand = fresh
        rand = _last_rand
    return _b32(ms, 10) + _b32(rand, 16)


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
