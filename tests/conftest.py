"""Shared fixtures: a real mosquitto (broker.py), a daemon subprocess, config files."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import *  # noqa: F403  (the mosquitto fixture, MqttProbe, free_port, wait_until)
from daemon_proc import DaemonProc


@pytest.fixture()
def write_config(tmp_path: Path):
    """Write a dedented YAML config into tmp_path and return its path."""
    def write(text: str, name: str = "edgehook.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p
    return write


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[type[DaemonProc]]:
    """Start `edgehook run` subprocesses; every one still running is killed at the end."""
    started: list[DaemonProc] = []

    class Tracked(DaemonProc):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            kwargs.setdefault("cwd", tmp_path)
            super().__init__(*args, **kwargs)
            started.append(self)

    yield Tracked
    for proc in started:
        proc.kill()
