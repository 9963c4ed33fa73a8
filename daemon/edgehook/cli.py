"""Command line: arguments, logging, exit codes. The only place that exits.

Exit status: 0 fine; 1 a runtime failure (daemon unreachable, a request refused,
a port in use); 2 the config or the command line is wrong and nothing started: every
config problem is printed on stderr as FILE:LINE:COL, including a pin gpiozero refuses
at start (the systemd unit's `RestartPreventExitStatus=2` keeps a bad config from
restarting forever); a command line problem as argparse's `usage:` and `error:` lines.

Secrets, and the commands an admin types on the Pi:

* `run` and `check` load the config strictly: every `!env` and `!file` must resolve.
* `sim`, `outbox` and `hook` run outside the service, where its systemd credentials
  (`!file ${CREDENTIALS_DIRECTORY}/...`) and its environment do not exist. They load
  the config leniently: a tag that cannot be resolved is left out, and they use only
  `http.listen`, `state_dir`, `device`, the names of inputs, webhooks and hooks, and
  `http.api_token`.
* The API token they send: the config's `http.api_token` when it resolves here,
  else `$EDGEHOOK_API_TOKEN`, else none. When the daemon then answers 401, the
  message says how to give it: `EDGEHOOK_API_TOKEN=... edgehook ...`, or
  `sudo edgehook ...` when the token is in a file only root can read, or
  `sudo CREDENTIALS_DIRECTORY=/run/credentials/edgehook.service edgehook ...` for a
  systemd credential.
* `hook NAME` signs as the hook's callers do, so it needs that hook's token or secret
  (and only that one); the message names the tag when it cannot be read here.

A config readable only by root and the edgehook group gets "run as root or a member
of the edgehook group (sudo edgehook ...)".
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import __version__
from .cli_client import DaemonApi, hook_command, outbox_command, sim_command
from .config import Config, default_config_path, load_config
from .errors import CommandError, ConfigError, EdgehookError, NoGpioError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
CONFIG_HINT = "give one with -c FILE or set EDGEHOOK_CONFIG"
_LENIENT = ("sim", "outbox", "hook")


def _whole(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (None: no limit)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return n
    return parse


_port = _whole(0, 65535, "a port (1-65535, or 0 for any free one)")
_positive = _whole(1, None, "a whole number of 1 or more")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgehook", description="GPIO and MQTT events to "
                                "webhooks that are never lost, and webhooks to GPIO.")
    p.add_argument("--version", action="version", version=f"edgehook {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=description or help_)
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
    ob = cmd("outbox", "inspect and change the durable outbox",
             "inspect and change the durable outbox: through the running daemon's API, "
             "or in the outbox file when no daemon runs")
    ob_sub = ob.add_subparsers(dest="outbox_command", required=True)
    # -c/-v also after the sub-subcommand (`edgehook outbox list -c FILE`)
    nested = argparse.ArgumentParser(add_help=False)
    nested.add_argument("-c", "--config", default=argparse.SUPPRESS, help="config file")
    nested.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    ls = ob_sub.add_parser("list", help="list deliveries", parents=[nested])
    ls.add_argument("--status", choices=["pending", "dead", "delivered"], default=None)
    ls.add_argument("--limit", type=_positive, default=100)
    ls.add_argument("--json", action="store_true", help="print JSON")
    rt = ob_sub.add_parser("retry", help="send a dead delivery again (same webhook-id)",
                           parents=[nested])
    rt.add_argument("id", nargs="?", type=int)
    rt.add_argument("--all-dead", action="store_true")
    rt.set_defaults(usage_error=rt.error)
    dr = ob_sub.add_parser("drop", help="delete a delivery, or every one of a target",
                           parents=[nested])
    dr.add_argument("id", nargs="?", type=int)
    dr.add_argument("--target", metavar="NAME", help="every delivery to this webhook target")
    dr.set_defaults(usage_error=dr.error)
    pg = ob_sub.add_parser("purge", help="delete dead deliveries", parents=[nested])
    pg.add_argument("--dead", action="store_true", default=True)
    hk = cmd("hook", "send a test request to a hook of the running daemon",
             "send a test request to POST /hooks/NAME of the running daemon, "
             "authenticated as the config's hook says (Bearer token, Standard Webhooks or "
             "GitHub signature). It needs that hook's token or secret: run it as an admin "
             "who can read them (e.g. sudo). Exit 0 on a 2xx answer, else 1.")
    hk.add_argument("name", metavar="NAME", help="the hook's name under hooks:")
    hk.add_argument("--data", default="{}", metavar="JSON",
                    help="the JSON body to send (default {})")
    rc = cmd("receive", "debug receiver: print webhooks and check their signatures")
    rc.add_argument("--port", type=_port, required=True,
                    help="the port to listen on (0: any free one)")
    rc.add_argument("--host", default="127.0.0.1")
    rc.add_argument("--secret", action="append", default=[],
                    help="signing secret to verify with (repeat for several)")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if sys.stderr.isatty()
        or not os.environ.get("INVOCATION_ID") else "%(levelname)s %(name)s: %(message)s")
    for noisy in ("gpiozero", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgehook` console script."""
    args = _parser().parse_args(argv)
    _check_usage(args)
    _setup_logging(getattr(args, "verbose", False))
    if args.command == "receive":
        from .receiver import serve

        return serve(args.host, args.port, args.secret)
    path = args.config or default_config_path()
    try:
        cfg = load_config(path, lenient=args.command in _LENIENT)
    except ConfigError as exc:
        return _config_problems(args, path, exc.problems)
    if args.command in ("check", "run"):  # not on every `sim` or `outbox list`
        for warning in cfg.warnings:
            print(warning, file=sys.stderr)
    try:
        if args.command == "check":
            return _check(cfg, args.explain)
        if args.command == "run":
            return _run(cfg, args.simulate)
        command = shlex.join(sys.argv[1:] if argv is None else argv)
        api = DaemonApi(cfg, command)
        if args.command == "sim":
            return sim_command(cfg, api, args.action, args.input)
        if args.command == "outbox":
            return outbox_command(cfg, api, args)
        if args.command == "hook":
            return hook_command(cfg, args.name, args.data, command)
    except EdgehookError as exc:  # the daemon unreachable or refusing, a file unreadable
        print(f"edgehook: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_FAIL


def _check_usage(args: argparse.Namespace) -> None:
    """What argparse cannot say alone: `retry` and `drop` take one of two (exit 2)."""
    cmd = getattr(args, "outbox_command", None)
    if cmd == "retry" and (args.id is None) == (not args.all_dead):
        args.usage_error("give an ID or --all-dead (one of them)")
    if cmd == "drop" and (args.id is None) == (args.target is None):
        args.usage_error("give an ID or --target NAME (one of them)")


def _config_problems(args: argparse.Namespace, path: str, problems: list[str]) -> int:
    """Every problem on stderr, then one plain line saying what to do."""
    if args.config is None and len(problems) == 1 and problems[0].endswith(": no such file"):
        if os.environ.get("EDGEHOOK_CONFIG"):
            print(f"edgehook: no config at {path} (from $EDGEHOOK_CONFIG): give one with "
                  "-c FILE or correct EDGEHOOK_CONFIG", file=sys.stderr)
        else:
            print(f"edgehook: no config at {path}: {CONFIG_HINT}", file=sys.stderr)
        return EXIT_CONFIG
    for problem in problems:
        print(problem, file=sys.stderr)
    if len(problems) == 1 and "permission denied" in problems[0]:
        return EXIT_CONFIG  # nothing to fix in the file
    n = len(problems)
    what = "1 problem" if n == 1 else f"{n} problems"
    tail = "; nothing started" if args.command == "run" else ""
    print(f"edgehook: {what} in {path}; fix {'it' if n == 1 else 'them'} and run "
          f"`edgehook check -c {path}` again{tail}", file=sys.stderr)
    return EXIT_CONFIG


def _check(cfg: Config, explain: bool) -> int:
    if explain:
        from .explain import explain as explained

        print(explained(cfg))
    n = len(cfg.warnings)
    print(cfg.summary() + (f" ({n} warning{'s' if n != 1 else ''} on stderr)" if n else ""))
    return EXIT_OK


def _run(cfg: Config, simulate: bool, pin_factory: Any = None) -> int:
    """The daemon in the foreground; a pin gpiozero refuses is a config problem (2)."""
    if simulate and cfg.gpio.backend != "mock":
        cfg = replace(cfg, gpio=replace(cfg.gpio, backend="mock"))
    from .app import Daemon

    try:
        daemon = Daemon(cfg, pin_factory=pin_factory)
    except NoGpioError as exc:
        print(f"{cfg.where('gpio', 'backend')}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (EdgehookError, OSError) as exc:  # the message names the setting (http.listen...)
        print(f"edgehook: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        return daemon.run()
    except CommandError as exc:
        if not str(exc).startswith("GPIO setup failed"):
            raise
        _stop_quietly(daemon)
        print(f"{_gpio_where(cfg, exc)}: {exc}", file=sys.stderr)
        print("edgehook: gpiozero refused a pin; nothing started", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. the HTTP port is taken
        print(f"edgehook: cannot start: {exc}", file=sys.stderr)
        _stop_quietly(daemon)
        return EXIT_FAIL


def _stop_quietly(daemon: Any) -> None:
    try:
        daemon.stop()
    except Exception as exc:  # half-started: what did not start cannot stop either
        logging.getLogger(__name__).debug("stop after a failed start: %s", exc)


def _gpio_where(cfg: Config, exc: Exception) -> str:
    """FILE:LINE:COL of the input or output whose pin gpiozero refused.

    Found by the device the error names (`gpio.inputs.NAME`), else by a pin name in
    gpiozero's message; else the gpio section itself.
    """
    path = getattr(exc, "path", None)
    if isinstance(path, tuple) and path:
        return f"{cfg.where(*path, 'pin')}: {'.'.join(map(str, path))}"
    text = str(exc)
    for kind, devices in (("inputs", cfg.gpio.inputs), ("outputs", cfg.gpio.outputs)):
        for name in devices:
            if f"gpio.{kind}.{name}" in text:
                return cfg.where("gpio", kind, name, "pin")
    from .pins import canonical_pin

    words = {w.strip("'\",.:()") for w in text.split()}
    for kind, devices in (("outputs", cfg.gpio.outputs), ("inputs", cfg.gpio.inputs)):
        for name, dev in devices.items():
            try:
                names = {str(dev.pin), canonical_pin(dev.pin)}
            except ValueError:
                names = {str(dev.pin)}
            if names & words:
                return f"{cfg.where('gpio', kind, name, 'pin')}: gpio.{kind}.{name}"
    return cfg.where("gpio")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
