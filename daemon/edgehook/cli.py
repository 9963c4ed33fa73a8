"""Command line: arguments, logging, exit codes. The only place that exits.

Exit status: 0 fine, 1 a runtime failure (daemon unreachable, ...), 2 the config is
wrong (or no GPIO was found) and nothing started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Any

from . import __version__
from .config import Config, default_config_path, load_config
from .errors import ConfigError, EdgehookError, NoGpioError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgehook", description="GPIO and MQTT events to "
                                "webhooks that are never lost, and webhooks to GPIO.")
    p.add_argument("--version", action="version", version=f"edgehook {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("-c", "--config", default=None,
                        help="config file (default $EDGEHOOK_CONFIG, else "
                             "/etc/edgehook/edgehook.yaml)")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        return sp

    run = cmd("run", "run the daemon in the foreground (what systemd runs)")
    run.add_argument("--simulate", action="store_true",
                     help="simulated pins (forces gpio.backend: mock)")
    check = cmd("check", "validate the config; exit 0 with a summary, or 2")
    check.add_argument("--explain", action="store_true",
                       help="print the effective config (defaults applied, secrets masked)")
    sim = cmd("sim", "drive a simulated input of a running daemon")
    sim.add_argument("action", choices=["press", "release", "click", "hold"])
    sim.add_argument("input")
    ob = cmd("outbox", "inspect the durable outbox")
    ob_sub = ob.add_subparsers(dest="outbox_command", required=True)
    # -c/-v also after the sub-subcommand (`edgehook outbox list -c FILE`)
    nested = argparse.ArgumentParser(add_help=False)
    nested.add_argument("-c", "--config", default=argparse.SUPPRESS, help="config file")
    nested.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    ls = ob_sub.add_parser("list", help="list deliveries", parents=[nested])
    ls.add_argument("--status", choices=["pending", "dead", "delivered"], default=None)
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true", help="print JSON")
    rt = ob_sub.add_parser("retry", help="send a dead delivery again (same webhook-id)",
                           parents=[nested])
    rt.add_argument("id", nargs="?", type=int)
    rt.add_argument("--all-dead", action="store_true")
    pg = ob_sub.add_parser("purge", help="delete dead deliveries", parents=[nested])
    pg.add_argument("--dead", action="store_true", default=True)
    rc = cmd("receive", "debug receiver: print webhooks and check their signatures")
    rc.add_argument("--port", type=int, required=True)
    rc.add_argument("--host", default="127.0.0.1")
    rc.add_argument("--secret", action="append", default=[],
                    help="signing secret to verify with (repeat for several)")
    sc = cmd("schema", "print the config's JSON Schema")
    sc.add_argument("--markdown", action="store_true", help="print the reference docs instead")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if sys.stderr.isatty()
        or not os.environ.get("INVOCATION_ID") else "%(levelname)s %(name)s: %(message)s")
    for noisy in ("gpiozero", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(path: str | None) -> Config:
    return load_config(path or default_config_path())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgehook` console script."""
    args = _parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    if args.command in ("receive", "schema"):
        return _no_config_commands(args)
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"edgehook: {len(exc.problems)} problem(s) in the config; nothing started",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "check":
            if args.explain:
                from .explain import explain

                print(explain(cfg))
            print(cfg.summary())
            return EXIT_OK
        if args.command == "run":
            return _run(cfg, args.simulate)
        if args.command == "sim":
            return _sim(cfg, args.action, args.input)
        if args.command == "outbox":
            return _outbox(cfg, args)
    except NoGpioError as exc:
        print(f"edgehook: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EdgehookError as exc:
        print(f"edgehook: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_FAIL


def _no_config_commands(args: argparse.Namespace) -> int:
    if args.command == "receive":
        from .receiver import serve

        return serve(args.host, args.port, args.secret)
    from .schema_export import json_schema, markdown

    print(markdown() if args.markdown else json.dumps(json_schema(), indent=2))
    return EXIT_OK


def _run(cfg: Config, simulate: bool) -> int:
    if simulate and cfg.gpio.backend != "mock":
        cfg = replace(cfg, gpio=replace(cfg.gpio, backend="mock"))
    from .app import Daemon

    try:
        daemon = Daemon(cfg)
    except OSError as exc:
        print(f"edgehook: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        return daemon.run()
    except OSError as exc:  # e.g. the HTTP port is taken
        print(f"edgehook: cannot start: {exc}", file=sys.stderr)
        daemon.stop()
        return EXIT_FAIL


def _api_call(cfg: Config, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import requests

    host = cfg.http.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    headers = {}
    if cfg.http.api_token:
        headers["Authorization"] = f"Bearer {cfg.http.api_token}"
    url = f"http://{host}:{cfg.http.port}{path}"
    try:
        r = requests.request(method, url, json=body, headers=headers, timeout=10)
    except requests.RequestException as exc:
        raise EdgehookError(f"cannot reach the daemon at {url}: {exc}") from None
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def _sim(cfg: Config, action: str, name: str) -> int:
    status, body = _api_call(cfg, "POST", f"/api/v1/inputs/{name}/simulate",
                             {"action": action})
    if status == 200:
        print(f"{name}: {action}")
        return EXIT_OK
    detail = body.get("detail") if isinstance(body, dict) else body
    print(f"edgehook: {status}: {detail}", file=sys.stderr)
    return EXIT_FAIL


def _outbox(cfg: Config, args: argparse.Namespace) -> int:
    """List from the SQLite file (works while the daemon is down). Changes go through
    the running daemon's API, so its senders and counters see them at once (they do
    not poll the file); with no daemon they are made in the file, sent at next start."""
    from pathlib import Path

    from .outbox import Outbox, daemon_holds

    path = Path(cfg.state_dir) / "outbox.db"
    if not path.exists():
        print(f"edgehook: no outbox at {path}", file=sys.stderr)
        return EXIT_FAIL
    if args.outbox_command == "retry" and args.id is None and not args.all_dead:
        print("edgehook: give an ID or --all-dead", file=sys.stderr)
        return EXIT_FAIL
    if args.outbox_command != "list":
        done = _outbox_via_api(cfg, args)
        if done is not None:
            return done
    box = Outbox(path, exclusive=False)
    try:
        if args.outbox_command == "list":
            items = box.list(args.status, args.limit)
            if args.json:
                print(json.dumps(items, indent=2))
            else:
                _print_table(items)
            return EXIT_OK
        if args.outbox_command == "retry":
            now = time.time()
            if args.all_dead:
                print(f"{box.retry_all_dead(now)} dead deliveries queued again")
            else:
                if not box.retry(args.id, now):
                    print(f"edgehook: no dead delivery with id {args.id}", file=sys.stderr)
                    return EXIT_FAIL
                print(f"delivery {args.id} queued again")
        else:
            print(f"{box.purge('dead')} dead deliveries purged")
        if daemon_holds(path):  # a daemon runs, and its API did not answer
            print("edgehook: the daemon's API did not answer: it picks this change up at its "
                  "next reload (systemctl reload edgehook) or restart", file=sys.stderr)
        return EXIT_OK
    finally:
        box.close()


def _outbox_via_api(cfg: Config, args: argparse.Namespace) -> int | None:
    """`outbox retry|purge` through the daemon's API; None when it does not answer."""
    single = args.outbox_command == "retry" and not args.all_dead
    if single:
        call = ("POST", f"/api/v1/outbox/{args.id}/retry")
    elif args.outbox_command == "retry":
        call = ("POST", "/api/v1/outbox/retry")
    else:
        call = ("DELETE", "/api/v1/outbox?status=dead")
    try:
        status, body = _api_call(cfg, *call)
    except EdgehookError:
        return None  # not running (or not reachable): change the file
    if status == 200 and isinstance(body, dict):
        if "retried" in body:
            print(f"{body['retried']} dead deliveries queued again")
        elif "purged" in body:
            print(f"{body['purged']} dead deliveries purged")
        else:
            print(f"delivery {args.id} queued again")
        return EXIT_OK
    if status == 404 and single:
        print(f"edgehook: no dead delivery with id {args.id}", file=sys.stderr)
        return EXIT_FAIL
    detail = body.get("detail") if isinstance(body, dict) else body
    print(f"edgehook: the daemon answered {status}: {detail}", file=sys.stderr)
    return EXIT_FAIL


def _print_table(items: list[dict[str, Any]]) -> None:
    if not items:
        print("(no deliveries)")
        return
    print(f"{'ID':>6}  {'STATUS':9} {'TARGET':16} {'ATT':>3}  {'NEXT ATTEMPT':24} LAST ERROR")
    for it in items:
        print(f"{it['id']:>6}  {it['status']:9} {it['target'][:16]:16} {it['attempts']:>3}  "
              f"{(it.get('next_attempt_at') or '-'):24} {it.get('last_error') or ''}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
