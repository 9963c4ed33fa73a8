"""Values as users write them: durations, sizes, on/off words, listen addresses, URLs.

Parsing (config text -> value) and formatting (value -> the text a user would have
written) live together so `check --explain` and the reference docs print what the
loader reads. Nothing here knows about the config's structure.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
               "gb": 1000**3, "gib": 1024**3}
_ONOFF = {True: "on", False: "off", "on": "on", "off": "off", "true": "on", "false": "off",
          "high": "on", "low": "off", "1": "on", "0": "off"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MASK = "********"


def parse_duration(value: Any) -> float:
    """Parse `250ms`, `10s`, `5m`, `1h`, `1h30m` or a number of seconds; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 250ms, 10s, 5m, 1h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    text = str(value).strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos and text[pos:m.start()].strip():
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos == 0 or text[pos:].strip():
            raise ValueError(f"{value!r} is not a duration (use 250ms, 10s, 5m, 1h)") from None
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Parse `64KiB`, `1MiB`, `1000` bytes; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 64KiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size (use 64KiB, 1MiB or bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower() or None])


def parse_onoff(value: Any) -> str:
    """Normalise on/off words and YAML booleans to 'on' or 'off'; raises ValueError."""
    key = value.strip().lower() if isinstance(value, str) else value
    if key in _ONOFF:
        return _ONOFF[key]
    raise ValueError(f"{value!r} is not on or off")


def parse_listen(text: str) -> tuple[str, int]:
    """Split `host:port` / `[v6]:port` / `:port`; raises ValueError."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:8080 or [::1]:8080)")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(text: str) -> str:
    """The URL with the password of `user:password@` masked, for messages and summaries."""
    scheme = _SCHEME.match(text)
    if not scheme:
        return text
    rest = text[scheme.end():]
    end = min([i for i in (rest.find(c) for c in "/?#") if i != -1], default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" not in authority:
        return text
    userinfo, host = authority.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    masked = f"{user}:{MASK}" if ":" in userinfo else user
    return f"{scheme.group(0)}{masked}@{host}{tail}"


def is_http_url(text: str) -> bool:
    """An http(s) URL with a host (`user:password@` before the host is fine)."""
    if not re.match(r"^https?://[^/\s]+", text) or any(c.isspace() for c in text):
        return False
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return bool(parts.hostname)


def format_duration(seconds: float) -> str | float:
    """30.0 -> '30s', 0.4 -> '400ms', 5400 -> '1h30m' (a number when no unit fits)."""
    ms = round(seconds * 1000)
    if abs(ms - seconds * 1000) > 1e-6 or ms < 0:
        return seconds
    if ms == 0:
        return "0s"
    if ms % 1000:
        return f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"
    s = ms // 1000
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((h, "h"), (m, "m"), (s, "s")) if n)


def format_size(n: int) -> str | int:
    """65536 -> '64KiB', 1048576 -> '1MiB', 1000 -> 1000."""
    if n > 0 and n % 1024**2 == 0:
        return f"{n // 1024**2}MiB"
    if n > 0 and n % 1024 == 0:
        return f"{n // 1024}KiB"
    return n
