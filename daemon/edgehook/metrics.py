"""Prometheus text exposition (format 0.0.4), written by hand; and a small histogram.

Why not `prometheus_client`: it would be a seventh runtime dependency for ~100 lines of
string formatting, and its model (global registry, metric objects mutated from every
module) is the opposite of ours: edgehook's counters already live in one place
(app.py's Counter, the outbox's status counts, the HTTP server's stats) and /metrics
is a pure function of a snapshot of them. What we would lose (process_* collectors,
OpenMetrics negotiation) node_exporter already covers on a Pi. The format rules that
matter are all here: HELP/TYPE once per family, label values escaped (backslash,
quote, newline), cumulative `le` buckets ending in +Inf with `_sum` and `_count`,
floats as Go's strconv prints them (+Inf, -Inf, NaN).

Label values come only from the config (rule, target, hook, output names) or from a
closed set (outcome, status, code class), never from a request path, so a client
cannot grow the series count.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = Mapping[str, str]


def escape_label(value: str) -> str:
    """A label value as the text format wants it: \\ \" and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    """Integers without a decimal point, +Inf/-Inf/NaN spelled as Prometheus wants."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items()) + "}"


@dataclass
class Family:
    """One metric family: a name, a type, help, and its samples."""

    name: str
    type: str  # counter | gauge | histogram | untyped
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, labels: Labels | None = None, suffix: str = "") -> Family:
        self.samples.append((self.name + suffix, dict(labels or {}), value))
        return self


def counter(name: str, help: str, values: Mapping[tuple[str, ...], float] | float,
            label_names: Sequence[str] = ()) -> Family:
    """A counter family from {label-tuple: value} (or one unlabelled value)."""
    return _family(name, "counter", help, values, label_names)


def gauge(name: str, help: str, values: Mapping[tuple[str, ...], float] | float,
          label_names: Sequence[str] = ()) -> Family:
    """A gauge family from {label-tuple: value} (or one unlabelled value)."""
    return _family(name, "gauge", help, values, label_names)


def _family(name: str, type_: str, help: str,
            values: Mapping[tuple[str, ...], float] | float,
            label_names: Sequence[str]) -> Family:
    fam = Family(name, type_, help)
    if isinstance(values, Mapping):
        for key in sorted(values):
            fam.add(values[key], dict(zip(label_names, key, strict=True)))
    else:
        fam.add(values)
    return fam


def render(families: Iterable[Family]) -> str:
    """The exposition text: HELP and TYPE once per family, then its samples."""
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        for name, labels, value in fam.samples:
            out.append(f"{name}{_labels(labels)} {format_value(value)}")
    return "\n".join(out) + "\n"


class Histogram:
    """Fixed-bucket histogram per label value (e.g. target); thread-safe.

    app.py's delivery callback calls `observe(target, seconds)`; /metrics renders a
    `snapshot()`. Memory: one list of len(buckets)+1 ints per target.
    """

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._data: dict[str, tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, key: str, value: float) -> None:
        """Count one observation (a value on a bucket's bound falls in that bucket)."""
        i = bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[i] += 1
            total[0] += value

    def snapshot(self) -> dict[str, tuple[list[int], float]]:
        """key -> (per-bucket counts, the last one above every bound; sum)."""
        with self._lock:
            return {k: (list(c), t[0]) for k, (c, t) in self._data.items()}

    def family(self, name: str, help: str, label: str) -> Family:
        """The histogram as a family: cumulative `_bucket{le}`, `_sum`, `_count`."""
        fam = Family(name, "histogram", help)
        for key, (counts, total) in sorted(self.snapshot().items()):
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                fam.add(running, {label: key, "le": format_value(float(bound))}, "_bucket")
            fam.add(total, {label: key}, "_sum")
            fam.add(running, {label: key}, "_count")
        return fam


def split_counters(counters: Mapping[str, int], prefix: str, parts: int
                   ) -> dict[tuple[str, ...], int]:
    """app.py keeps "events:input.pressed" / "delivery:discord:dead" keys in one Counter:
    pick those with `prefix` and split the rest into `parts` label values."""
    out: dict[tuple[str, ...], int] = {}
    for key, n in counters.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        values = tuple(rest.rsplit(":", parts - 1)) if parts > 1 else (rest,)
        if len(values) == parts:
            out[values] = out.get(values, 0) + n
    return out


def daemon_families(snap: Mapping[str, object]) -> list[Family]:
    """The daemon's families from app.py's `metrics()` snapshot.

    Snapshot keys (all optional): counters (the app Counter), outbox {status: n},
    mqtt (status dict or None), dropped, queued, store_failures, latency (a Histogram),
    inputs/outputs ({name: {"state": "on"|"off"}}), version, started_at.
    """
    counters = snap.get("counters") or {}
    assert isinstance(counters, Mapping)
    fams = [
        gauge("edgehook_build_info", "edgehook version", {(str(snap.get("version", "")),): 1},
              ("version",)),
    ]
    if snap.get("started_at") is not None:
        fams.append(gauge("edgehook_start_time_seconds", "daemon start, Unix time",
                          float(snap["started_at"])))  # type: ignore[arg-type]
    fams += [
        counter("edgehook_events_total", "events handled by the dispatcher, by type",
                split_counters(counters, "events:", 1), ("type",)),
        counter("edgehook_rule_firings_total", "rules fired, by rule",
                split_counters(counters, "rule:", 1), ("rule",)),
        counter("edgehook_deliveries_total", "delivery attempts by target and outcome "
                "(delivered, retry, dead)", split_counters(counters, "delivery:", 2),
                ("target", "outcome")),
    ]
    latency = snap.get("latency")
    if isinstance(latency, Histogram):
        fams.append(latency.family("edgehook_delivery_latency_seconds",
                                   "time of one delivery attempt, by target", "target"))
    outbox = snap.get("outbox") or {}
    assert isinstance(outbox, Mapping)
    depth = {(s,): int(outbox.get(s, 0)) for s in ("pending", "dead", "delivered")}
    fams += [
        gauge("edgehook_outbox_deliveries", "deliveries in the outbox, by status", depth,
              ("status",)),
        counter("edgehook_outbox_store_failures_total", "webhook actions that could not be "
                "written to the outbox", int(snap.get("store_failures") or 0)),  # type: ignore
        counter("edgehook_events_dropped_total", "events dropped because the event queue "
                "was full", int(snap.get("dropped") or 0)),  # type: ignore[call-overload]
        gauge("edgehook_event_queue_length", "events waiting for the dispatcher",
              int(snap.get("queued") or 0)),  # type: ignore[call-overload]
    ]
    mqtt = snap.get("mqtt")
    if isinstance(mqtt, Mapping):
        fams += [
            gauge("edgehook_mqtt_connected", "1 while connected to the MQTT broker",
                  1 if mqtt.get("connected") else 0),
            gauge("edgehook_mqtt_queued_messages", "messages waiting for the broker",
                  int(mqtt.get("queued") or 0)),
            counter("edgehook_mqtt_dropped_total", "messages dropped while disconnected",
                    int(mqtt.get("dropped") or 0)),
        ]
    for kind, word in (("inputs", "input"), ("outputs", "output")):
        states = snap.get(kind)
        if isinstance(states, Mapping) and states:
            fams.append(gauge(f"edgehook_{word}_on", f"1 while the {word} is on",
                              {(n,): 1 if v.get("state") == "on" else 0
                               for n, v in states.items()}, (word,)))
    return fams


class HttpStats:
    """The HTTP server's counters: requests by handler kind and status, hook requests by
    hook and status, refused connections, cut-off requests. One instance lives as long
    as the listener (a reload hands it to the new routes), so counters never go back."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.hooks: Counter[tuple[str, str]] = Counter()
        self.rejected_connections = 0
        self.timeouts = 0
        self._lock = threading.Lock()

    def bump(self, what: str) -> None:
        """Count one refused connection ("rejected_connections") or timeout ("timeouts")."""
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def count(self, kind: str, status: int, hook: str | None = None) -> None:
        """Count one answered request (`kind` from a closed set, never the path)."""
        with self._lock:
            self.requests[(kind, str(status))] += 1
            if hook is not None:
                self.hooks[(hook, str(status))] += 1

    def families(self) -> list[Family]:
        """The HTTP side of /metrics."""
        with self._lock:
            reqs, hooks = dict(self.requests), dict(self.hooks)
            rejected, timeouts = self.rejected_connections, self.timeouts
        return [
            counter("edgehook_http_requests_total", "HTTP requests answered, by handler and "
                    "status code", reqs, ("handler", "code")),
            counter("edgehook_hook_requests_total", "requests to configured hooks, by hook "
                    "and status code", hooks, ("hook", "code")),
            counter("edgehook_http_connections_rejected_total", "connections refused with 503 "
                    "because http.max_connections were busy", rejected),
            counter("edgehook_http_request_timeouts_total", "requests cut off by http.timeout",
                    timeouts),
        ]
