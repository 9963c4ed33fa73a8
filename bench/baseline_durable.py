#!/usr/bin/env python3
"""The durable floor: the bare paho + requests loop that first puts each message on disk.

The bare loop of the peer benchmark acknowledges a message and posts it with nothing
stored, so a power cut loses whatever it had taken. This is the same loop made
power-safe in the smallest way there is: ``on_message`` writes the payload and waits
for the disk (so paho's PUBACK, sent when the callback returns, follows the flush),
then hands it to the posting thread. Nothing else: no retries, no outbox, no rules.
It measures what durability itself costs on this machine's disk, which no durable
forwarder can go below; edgehook's latency is to be read beside it.

``BENCH_DURABLE`` picks the write:
  file    append one line to a file, then ``fdatasync`` (the cheapest honest flush)
  sqlite  one INSERT in its own transaction, WAL, ``synchronous=FULL`` (a plain
          SQLite writer, what a first durable version would do)

Environment as for the harness's other systems: BENCH_MQTT_HOST, BENCH_MQTT_PORT,
BENCH_TOPIC, BENCH_HOOK_URL, and BENCH_STATE (the directory the writes go to).
"""
from __future__ import annotations

import os
import queue
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import requests


def file_writer(state: Path) -> Callable[[bytes], None]:
    fd = os.open(state / "messages.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(payload: bytes) -> None:
        os.write(fd, payload + b"\n")
        os.fdatasync(fd)

    return write


def sqlite_writer(state: Path) -> Callable[[bytes], None]:
    db = sqlite3.connect(state / "messages.db", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE IF NOT EXISTS message (id INTEGER PRIMARY KEY, payload BLOB)")

    def write(payload: bytes) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO message (payload) VALUES (?)", (payload,))
        db.execute("COMMIT")

    return write


def main() -> None:
    env = os.environ
    state = Path(env.get("BENCH_STATE", "/var/tmp/edgehook-durable-floor"))
    state.mkdir(parents=True, exist_ok=True)
    write = {"file": file_writer, "sqlite": sqlite_writer}[env.get("BENCH_DURABLE", "file")](state)
    topic, url = env["BENCH_TOPIC"], env["BENCH_HOOK_URL"]
    posts: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def on_connect(client: mqtt.Client, userdata: object, flags: object, reason: object,
                   properties: object) -> None:
        client.subscribe(topic, qos=1)

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        write(msg.payload)  # on disk before the callback returns, so before the PUBACK
        posts.put(msg.payload)

    signal.signal(signal.SIGTERM, lambda *_: posts.put(None))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"durable-floor-{os.getpid()}")
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(env["BENCH_MQTT_HOST"], int(env["BENCH_MQTT_PORT"]), keepalive=60)
    client.loop_start()
    session = requests.Session()
    headers = {"Content-Type": "application/json"}
    while (body := posts.get()) is not None:
        try:
            session.post(url, data=body, headers=headers, timeout=10).close()
        except requests.RequestException as exc:
            print(f"POST failed: {exc}", file=sys.stderr, flush=True)
    client.loop_stop()
    client.disconnect()


if __name__ == "__main__":
    main()
