"""The one timer thread: order, cancel, a failing job, and no pile-up of cancelled jobs."""

from __future__ import annotations

import threading
import time

from edgehook import scheduler
from edgehook.scheduler import Scheduler


def test_jobs_run_in_deadline_order_and_cancel_works() -> None:
    s = Scheduler()
    s.start()
    try:
        ran: list[str] = []
        done = threading.Event()
        s.call_later(0.06, lambda: (ran.append("c"), done.set()))
        s.call_later(0.02, lambda: ran.append("a"))
        s.call_later(0.04, lambda: ran.append("b")).cancel()
        s.call_later(0.03, lambda: 1 / 0)            # logged, the thread lives on
        t0 = time.monotonic()
        assert done.wait(2.0)
        assert ran == ["a", "c"]
        assert 0.06 <= time.monotonic() - t0 <= 0.5
    finally:
        s.stop()


def test_cancelled_jobs_do_not_pile_up(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(scheduler, "COMPACT_MIN", 16)
    s = Scheduler()                                   # not started: nothing runs
    keep = s.call_later(3600, lambda: None)
    for _ in range(1000):                             # a silence watchdog re-armed per edge
        s.call_later(12 * 3600, lambda: None).cancel()
    assert s.pending() == 1
    assert len(s._heap) < 40
    keep.cancel()
    keep.cancel()                                     # twice is fine
    assert s.pending() == 0
