"""The outbox through the whole daemon: kill -9 mid-burst loses nothing; dead rows are
listed by the CLI and the API and a retry delivers them with the same webhook-id."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from broker import free_port, wait_until
from daemon_proc import EDGEHOOK
from receiver import Receiver, Reply

pytestmark = pytest.mark.slow

CONFIG = """\
device: {{id: box, name: Box}}
state_dir: {state}
gpio:
  backend: mock
  inputs: {{doorbell: {{pin: 17}}}}
http: {{listen: "127.0.0.1:{port}"}}
webhooks:
  sink:
    url: "{sink}/hook"
    retry: {{max_attempts: {attempts}, max_age: 15m}}
rules:
  - when: {{input: doorbell}}
    do: [{{webhook: sink}}]
"""


def outbox(d) -> dict[str, int]:
    return d.api("GET", "/api/v1/state").json()["outbox"]


def press(d, n: int) -> None:
    for _ in range(n):
        assert d.api("POST", "/api/v1/inputs/doorbell/simulate",
                     json={"action": "press"}).status_code == 200
        assert d.api("POST", "/api/v1/inputs/doorbell/simulate",
                     json={"action": "release"}).status_code == 200


def test_kill_9_mid_burst_loses_nothing(tmp_path: Path, write_config, daemon) -> None:
    sink = Receiver(free_port())  # not listening yet: connections are refused
    port = free_port()
    cfg = write_config(CONFIG.format(state=tmp_path / "state", port=port, sink=sink.url,
                                     attempts=50))
    d = daemon(cfg, port=port)
    d.wait_ready()
    press(d, 200)
    wait_until(lambda: outbox(d)["pending"] == 200, timeout=20, what="200 rows pending")

    sink.default = Reply(200, delay=0.01)  # slow enough to kill it part-way through
    sink.start()
    try:
        wait_until(lambda: len(sink.requests) >= 30, timeout=30, what="delivery under way")
        d.signal(signal.SIGKILL)
        d.proc.wait(10)
        got_before = len(sink.requests)
        assert got_before < 200, "the burst finished before the kill; make the sink slower"

        d2 = daemon(cfg, port=port)
        d2.wait_ready()

        def ids() -> set[str]:
            return {json.loads(r.body)["id"] for r in sink.requests}

        wait_until(lambda: len(ids()) == 200, timeout=60, what="all 200 events delivered")
        by_event: dict[str, set[str]] = {}
        for r in sink.requests:
            by_event.setdefault(json.loads(r.body)["id"], set()).add(r.headers["webhook-id"])
        assert all(len(w) == 1 for w in by_event.values()), "a duplicate changed webhook-id"
        wait_until(lambda: outbox(d2)["pending"] == 0, what="outbox drained")
        assert outbox(d2)["delivered"] == 200
        assert d2.stop() == 0
    finally:
        sink.stop()


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEHOOK, "outbox", *args, "-c", str(cfg)], capture_output=True,
                          text=True, timeout=30)


def test_dead_rows_listed_and_retried(tmp_path: Path, write_config, daemon) -> None:
    sink = Receiver().start()
    try:
        port = free_port()
        cfg = write_config(CONFIG.format(state=tmp_path / "state", port=port, sink=sink.url,
                                         attempts=3))
        sink.script(400)  # final: dead after one attempt
        d = daemon(cfg, port=port)
        d.wait_ready()
        press(d, 1)
        wait_until(lambda: outbox(d)["dead"] == 1, what="400 -> dead")
        assert len(sink.requests) == 1

        items = d.api("GET", "/api/v1/outbox", params={"status": "dead"}).json()["items"]
        assert len(items) == 1
        item = items[0]
        assert item["attempts"] == 1 and item["target"] == "sink" and "400" in (
            str(item.get("last_status")) + str(item["last_error"]))
        listed = cli(cfg, "list", "--status", "dead", "--json")
        assert listed.returncode == 0
        assert [i["id"] for i in json.loads(listed.stdout)] == [item["id"]]
        assert "dead" in cli(cfg, "list").stdout

        # the CLI retry goes through the running daemon: delivered, same webhook-id
        out = cli(cfg, "retry", str(item["id"]))
        assert out.returncode == 0, out.stderr
        sink.wait_for(2)
        assert sink.requests[1].headers["webhook-id"] == sink.requests[0].headers["webhook-id"]
        wait_until(lambda: outbox(d)["delivered"] == 1, what="retried row delivered")
        assert cli(cfg, "retry", "999999").returncode == 1

        # max_attempts: 503 three times -> dead after exactly three attempts
        sink.script(503, 503, 503)
        press(d, 1)
        wait_until(lambda: outbox(d)["dead"] == 1, timeout=40, what="503 x3 -> dead")
        assert len(sink.requests) == 5
        assert d.api("POST", f"/api/v1/outbox/{item['id']}/retry").status_code == 409
        # 410: final, and the target is flagged as gone in the API
        sink.script(410)
        press(d, 1)
        wait_until(lambda: d.api("GET", "/api/v1/state").json()["webhooks"]["sink"]["gone"],
                   what="410 marks the target gone")
        wait_until(lambda: outbox(d)["dead"] == 2, what="410 -> dead")

        # --all-dead and purge go through the running daemon too: its senders do not
        # poll the file, so a change behind their back would wait for a restart
        sink.script(200, 200)
        out = cli(cfg, "retry", "--all-dead")
        assert out.returncode == 0 and out.stdout.startswith("2 dead"), out.stderr
        wait_until(lambda: outbox(d)["delivered"] == 3, what="both dead rows delivered")
        assert len(sink.requests) == 8
        sink.script(400)
        press(d, 1)
        wait_until(lambda: outbox(d)["dead"] == 1, what="400 -> dead")
        out = cli(cfg, "purge", "--dead")
        assert out.returncode == 0 and out.stdout.startswith("1 dead"), out.stderr
        assert outbox(d)["dead"] == 0  # the daemon's own counters saw it
        sink.script(400, 400)
        press(d, 2)
        wait_until(lambda: outbox(d)["dead"] == 2, what="two more dead")
        assert d.stop() == 0
        # purge works on the file with the daemon stopped
        out = cli(cfg, "purge", "--dead")
        assert out.returncode == 0 and out.stdout.startswith("2 dead")
        assert json.loads(cli(cfg, "list", "--status", "dead", "--json").stdout) == []
    finally:
        sink.stop()


def test_cli_change_behind_a_daemon_without_api_says_how_it_lands(tmp_path: Path,
                                                                  write_config) -> None:
    """The state dir is held (as by a daemon) but nothing answers on its HTTP port: the
    CLI still makes the change in the file and says when the daemon will see it."""
    from edgehook.outbox import Outbox

    state = tmp_path / "state"
    cfg = write_config(CONFIG.format(state=state, port=free_port(), sink="http://127.0.0.1:9",
                                     attempts=3))
    held = Outbox(state / "outbox.db")  # holds the one-daemon lock
    try:
        out = cli(cfg, "retry", "--all-dead")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("0 dead")
        assert "next reload" in out.stderr
    finally:
        held.close()
    out = cli(cfg, "purge", "--dead")
    assert out.returncode == 0 and "reload" not in out.stderr  # nobody to tell
