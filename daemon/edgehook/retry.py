"""Retry policy, pure: what an HTTP answer means, how long to wait, what a row sends now.

Nothing here touches the network, the outbox or a clock of its own (``now`` and the
random source come in as arguments), so every rule is a table test away. The sender
(``delivery.py``) applies these decisions; ``transport.py`` makes the requests.

Rows follow the target's *current* config at each attempt (SPEC: a user who fixes a
wrong URL and reloads must see the queued rows go to the new URL). A row stores what
was rendered for its event; the config says which of that is per-event (a template,
rendered once, kept) and which is a constant (taken from the config as it is now):
see :func:`plan`.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Literal, Protocol

from .config import WebhookConfig
from .templates import Template, is_template

BACKOFF_FIRST = (1.0, 5.0)  # the first retry comes within this window (seconds)
BACKOFF_CAP = 300.0         # no wait between attempts is longer than this
RETRY_STATUSES = frozenset({408, 429})       # 4xx that are worth another try
RETRY_AFTER_STATUSES = frozenset({429, 503})  # whose Retry-After replaces our backoff

Outcome = Literal["delivered", "retry", "dead"]


class StoredRow(Protocol):
    """What the policy reads from a stored outbox row."""

    url: str
    headers: dict[str, str]
    attempts: int
    created_at: float
    deadline: float


def next_delay(attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first attempt).

    Exponential backoff with jitter over the whole window: the first retry lands
    uniformly within ``BACKOFF_FIRST``, each later window doubles, and nothing
    exceeds ``BACKOFF_CAP``. A server's ``Retry-After`` replaces the computed wait
    (capped the same way), since the server knows better than our guess.
    """
    if retry_after is not None:
        return min(max(retry_after, 0.0), BACKOFF_CAP)
    factor = 2.0 ** min(max(attempt, 1) - 1, 32)
    high = min(BACKOFF_FIRST[1] * factor, BACKOFF_CAP)
    low = min(BACKOFF_FIRST[0] * factor, high)
    return low + (high - low) * rng.random()


def parse_retry_after(value: str | None, now: float) -> float | None:
    """A `Retry-After` header (delta seconds or an HTTP date) as seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def classify(status: int) -> Outcome:
    """What an HTTP status means for a delivery: delivered, retry, or dead (final).

    A 3xx is final: redirects are not followed (a webhook URL that moved is a config
    error to fix, and following one would re-send the body somewhere unreviewed).
    """
    if 200 <= status < 300:
        return "delivered"
    if status in RETRY_STATUSES or status >= 500:
        return "retry"
    return "dead"


# --------------------------------------------------------------------------- current config

def is_constant(value: Template) -> bool:
    """True when a config string renders the same for every event (no template syntax).

    ``templates.Static`` says so itself (``is_static``); any other template is judged
    by its source, so a hand-built one is never mistaken for a constant.
    """
    flag = getattr(value, "is_static", None)
    if flag is not None:
        return bool(flag)
    return not is_template(value.source)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one attempt at a row sends and the limits it runs under, per the current config."""

    url: str
    headers: dict[str, str]
    max_attempts: int
    deadline: float


def current_headers(stored: Mapping[str, str],
                    configured: Mapping[str, Template]) -> dict[str, str]:
    """The config's headers now: a constant is taken as configured, a template keeps the
    value rendered for the row's event (matched case-insensitively). A header the
    config no longer has is not sent; a template added since has no value for an old
    event, so it is left out too."""
    rendered = {name.lower(): value for name, value in stored.items()}
    out: dict[str, str] = {}
    for name, value in configured.items():
        if is_constant(value):
            out[name] = value.source
        else:
            kept = rendered.get(name.lower())
            if kept is not None:
                out[name] = kept
    return out


def current_deadline(row: StoredRow, max_age: float) -> float:
    """When the row's time runs out under the current ``max_age``.

    The window starts when the row was stored, or when ``edgehook outbox retry``
    re-armed it (the outbox then stores ``now + max_age`` as the deadline, keeping
    ``created_at``). A row that says how long its stored window was (``max_age``)
    gets its own start back exactly. One that does not (``outbox.Row`` today) cannot
    tell a re-armed window from a longer old ``max_age``, so it keeps the later of its
    stored deadline and ``created_at`` + the current ``max_age``: a longer
    ``max_age`` applies to queued rows at once, a shorter one to new rows, and a
    re-armed delivery is never declared expired before its new try.
    """
    stored_age = getattr(row, "max_age", None)
    if stored_age is not None:
        return row.deadline - float(stored_age) + max_age
    return max(row.deadline, row.created_at + max_age)


def plan(row: StoredRow, cfg: WebhookConfig) -> Plan:
    """What to send for `row` under the target's config `cfg` as it is now.

    The URL is the config's unless it is a per-event template (then the row's own,
    rendered for its event); headers per :func:`current_headers`; ``max_attempts``
    and ``max_age`` are the config's.
    """
    url = cfg.url.source if is_constant(cfg.url) else row.url
    return Plan(url=url, headers=current_headers(row.headers, cfg.headers),
                max_attempts=int(cfg.max_attempts),
                deadline=current_deadline(row, float(cfg.max_age)))


def expired(row: StoredRow, p: Plan, now: float) -> str | None:
    """Why `row` goes dead without another attempt, or None when it may be tried."""
    if now > p.deadline:
        return "max_age exceeded before the attempt"
    if row.attempts >= p.max_attempts:
        return f"max_attempts ({p.max_attempts}) reached"
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to record after an attempt: the outcome, when to retry, and the error text."""

    outcome: Outcome
    next_at: float | None = None
    error: str | None = None


def judge(status: int | None, error: str | None, final: bool, retry_after: str | None, *,
          attempt: int, p: Plan, now: float, rng: random.Random) -> Verdict:
    """The verdict on attempt number `attempt` (1 = the first) at a row planned as `p`.

    `status` is None when no HTTP answer came (`error` says why; `final` marks a
    request that can never succeed, such as an unusable URL). A retry that would
    come after the deadline, or beyond ``max_attempts``, is dead instead.
    """
    outcome: Outcome = classify(status) if status is not None else (
        "dead" if final else "retry")
    if outcome == "delivered":
        return Verdict("delivered")
    text = error or f"HTTP {status}"
    if outcome == "dead":
        return Verdict("dead", None, text)
    wait = None
    if status in RETRY_AFTER_STATUSES:
        wait = parse_retry_after(retry_after, now)
    next_at = now + next_delay(attempt, wait, rng)
    if attempt >= p.max_attempts:
        return Verdict("dead", None, f"max_attempts ({p.max_attempts}) reached: {text}")
    if next_at > p.deadline:
        return Verdict("dead", None, f"max_age exceeded: {text}")
    return Verdict("retry", next_at, text)
