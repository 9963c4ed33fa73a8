"""The commands that act on a running daemon, or on its outbox file when none runs.

`sim`, `outbox` and `hook` run in an admin's shell on the Pi, outside the service,
with a config loaded leniently (see `cli.py` for what that means for secrets). Each
returns an exit status; messages go to stdout (results) and stderr (problems).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import EdgehookError
from .schemacheck import suggest
from .yamlload import PERMISSION_HINT

EXIT_OK, EXIT_FAIL = 0, 1
API_LIST_MAX = 100  # the most rows GET /api/v1/outbox answers with (the outbox's default)
TOKEN_VARIABLE = "EDGEHOOK_API_TOKEN"
CREDENTIALS = "/run/credentials/edgehook.service"  # the unit's $CREDENTIALS_DIRECTORY


class Unreachable(EdgehookError):
    """No daemon answered at the config's http.listen."""


def ways_to_give(tag: str, command: str, override: str | None = None) -> str:
    """How to run `command` so that a value the config reads with `tag` is there."""
    ways = []
    if override:
        ways.append(f"`{override}=... edgehook {command}`")
    m = re.match(r"!env (\S+)", tag)
    if m and m.group(1) != override:
        ways.append(f"`{m.group(1)}=... edgehook {command}`")
    if "CREDENTIALS_DIRECTORY" in tag:
        ways.append(f"`sudo CREDENTIALS_DIRECTORY={CREDENTIALS} edgehook {command}` (while "
                    "the service runs)")
    elif tag.startswith("!file"):
        ways.append(f"`sudo edgehook {command}`")
    return " or ".join(ways)


class DaemonApi:
    """The running daemon's HTTP API, at the address and with the token of the config."""

    def __init__(self, cfg: Config, command: str = "...",
                 environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        host = cfg.http.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        self.base = f"http://{host}:{cfg.http.port}"
        self.cfg = cfg
        self.command = command
        self.unresolved = cfg.unresolved.get(("http", "api_token"))
        self.token = cfg.http.api_token
        self.token_from = f"http.api_token of {cfg.path}"
        if not self.token and env.get(TOKEN_VARIABLE):
            self.token, self.token_from = env[TOKEN_VARIABLE], f"${TOKEN_VARIABLE}"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON answer or text); raises Unreachable, or EdgehookError on 401."""
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        url = self.base + path
        try:
            r = requests.request(method, url, json=body, headers=headers, timeout=10)
        except requests.RequestException as exc:
            raise Unreachable(f"cannot reach the daemon at {self.base} ({_reason(exc)}): is "
                              "it running? (systemctl status edgehook)") from None
        if r.status_code == 401:
            raise EdgehookError(self.refused())
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def refused(self) -> str:
        """What to do about a 401: which token was sent, and how to send the right one."""
        if self.token:
            return (f"the daemon refused the API token from {self.token_from} (401): it is "
                    "not the running daemon's http.api_token; give that one with "
                    f"`{TOKEN_VARIABLE}=... edgehook {self.command}`")
        if self.unresolved:
            return (f"the daemon wants its API token (401), and http.api_token "
                    f"({self.unresolved}) cannot be read here: run "
                    + ways_to_give(self.unresolved, self.command, TOKEN_VARIABLE))
        return (f"the daemon wants an API token (401) but {self.cfg.path} sets no "
                "http.api_token (does the daemon run with another config?): run "
                f"`{TOKEN_VARIABLE}=... edgehook {self.command}`")


def _reason(exc: Exception) -> str:
    text = str(exc)
    for known in ("Connection refused", "timed out", "Name or service not known"):
        if known in text:
            return known.lower()
    return type(exc).__name__


def _count(n: int, one: str, many: str) -> str:
    """`1 dead delivery`, `2 dead deliveries`."""
    return f"{n} {one if n == 1 else many}"


def _dead(n: int) -> str:
    return _count(n, "dead delivery", "dead deliveries")


def _retried(item: int, was: str) -> str:
    """What `outbox retry ID` did to a row that was dead or pending."""
    return (f"delivery {item} is already pending; it is due now" if was == "pending"
            else f"delivery {item} queued again")


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)
    return str(body).strip()[:300]


# --------------------------------------------------------------------------- sim

def sim_command(cfg: Config, api: DaemonApi, action: str, name: str) -> int:
    """Press, release, click or hold a simulated input of the running daemon."""
    if name not in cfg.gpio.inputs:
        known = sorted(cfg.gpio.inputs)
        print(f"edgehook: no input named {name!r} in {cfg.path}{suggest(name, known)}"
              + (f"; inputs: {', '.join(known)}" if known else "; it defines no inputs"),
              file=sys.stderr)
        return EXIT_FAIL
    status, body = api.call("POST", f"/api/v1/inputs/{name}/simulate", {"action": action})
    if status == 200:
        print(f"{name}: {action}")
        return EXIT_OK
    print(f"edgehook: the daemon answered {status}: {_detail(body)}", file=sys.stderr)
    return EXIT_FAIL


# --------------------------------------------------------------------------- outbox

def outbox_command(cfg: Config, api: DaemonApi, args: argparse.Namespace) -> int:
    """`outbox list|retry|drop|purge`: the daemon's API first, else the outbox file.

    Changes go through a running daemon so its senders and counters see them at once
    (they do not poll the file); with no daemon they are made in the file and take
    effect at the next start. A listing asks the daemon too: it writes delivered marks
    to the file up to a few seconds late (to spare the SD card), so the file alone
    would show a delivery it has made as still pending. (cli.py has already checked
    the arguments: `retry` has an ID or --all-dead, `drop` an ID or --target.)
    """
    if args.outbox_command == "list":
        return _list(cfg, api, args)
    try:
        return _change_via_api(cfg, api, args)
    except Unreachable:
        return _change_in_file(cfg, args)


def _list(cfg: Config, api: DaemonApi, args: argparse.Namespace) -> int:
    """From the running daemon (what it knows now); from the file when none answers.

    A daemon that refuses our API token (401) is listed from the file when this user
    can read it, with a note that the newest deliveries may show as pending there.
    """
    query = f"?status={args.status}" if args.status else ""
    try:
        status, body = api.call("GET", f"/api/v1/outbox{query}")
    except Unreachable:
        return _print_list(_list_file(cfg, args, None), args.json)
    except EdgehookError as exc:  # 401: the token is not ours to read here
        items = _list_file(cfg, args, str(exc))
        print("edgehook: the daemon wants an API token: listed from the outbox file "
              "instead, where deliveries of the last few seconds may still show as "
              "pending", file=sys.stderr)
        return _print_list(items, args.json)
    if status != 200 or not isinstance(body, dict):
        print(f"edgehook: the daemon answered {status}: {_detail(body)}", file=sys.stderr)
        return EXIT_FAIL
    items = body.get("items", [])
    if args.limit > len(items) >= API_LIST_MAX:
        print(f"edgehook: the daemon's API lists the newest {API_LIST_MAX} rows; stop the "
              f"daemon to list up to {args.limit} from the file", file=sys.stderr)
    return _print_list(items[:args.limit], args.json)


def _list_file(cfg: Config, args: argparse.Namespace, refused: str | None) -> list[Any]:
    """The rows as the file has them. When this user cannot read it either, the error
    is the daemon's refusal (`refused`: the token is what to fix), else the file's."""
    try:
        return _with_file(cfg, lambda box: box.list(args.status, args.limit))
    except _NoAccess as exc:
        raise EdgehookError(refused or str(exc)) from None


def _print_list(items: list[dict[str, Any]], as_json: bool) -> int:
    """The same table or JSON whether the rows came from the daemon or the file."""
    if as_json:
        print(json.dumps(items, indent=2))
    else:
        _print_table(items)
    return EXIT_OK


def _change_via_api(cfg: Config, api: DaemonApi, args: argparse.Namespace) -> int:
    """retry, drop or purge through the daemon's API; raises Unreachable without one."""
    cmd, item = args.outbox_command, getattr(args, "id", None)
    if cmd == "retry" and not args.all_dead:
        status, body = api.call("POST", f"/api/v1/outbox/{item}/retry")
        if status == 200:
            print(_retried(item, body.get("was", "dead") if isinstance(body, dict) else "dead"))
            return EXIT_OK
        if status == 409 and isinstance(body, dict) and body.get("error") == "target_gone":
            return _target_gone(cfg, item, _detail(body))
        if status == 404:
            print(f"edgehook: no delivery with id {item}", file=sys.stderr)
            return EXIT_FAIL
    elif cmd == "retry":
        status, body = api.call("POST", "/api/v1/outbox/retry")
        if status == 200 and isinstance(body, dict):
            n = int(body.get("retried", 0))
            print(f"{_dead(n)} queued again")
            return EXIT_OK
    elif cmd == "drop" and item is not None:
        status, body = api.call("DELETE", f"/api/v1/outbox/{item}")
        if status == 200:
            print(f"delivery {item} dropped")
            return EXIT_OK
        if status == 404:
            print(f"edgehook: no pending or dead delivery with id {item}", file=sys.stderr)
            return EXIT_FAIL
    elif cmd == "drop":
        status, body = api.call("DELETE", "/api/v1/outbox?target="
                                + _quote(args.target))
        if status == 200 and isinstance(body, dict):
            return _dropped_target(cfg, args.target, int(body.get("dropped", 0)))
    else:
        status, body = api.call("DELETE", "/api/v1/outbox?status=dead")
        if status == 200 and isinstance(body, dict):
            n = int(body.get("purged", 0))
            print(f"{_dead(n)} purged")
            return EXIT_OK
    print(f"edgehook: the daemon answered {status}: {_detail(body)}", file=sys.stderr)
    return EXIT_FAIL


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _change_in_file(cfg: Config, args: argparse.Namespace) -> int:
    """The same changes in the outbox file, for when no daemon answers."""
    from .outbox import daemon_holds

    cmd, item = args.outbox_command, getattr(args, "id", None)

    def change(box: Any) -> int:
        now = time.time()
        if cmd == "retry" and args.all_dead:
            n = box.retry_all_dead(now)
            print(f"{_dead(n)} queued again")
        elif cmd == "retry":
            row = box.get(item)
            if row is None:
                print(f"edgehook: no delivery with id {item}", file=sys.stderr)
                return EXIT_FAIL
            if row["target"] not in cfg.webhooks:
                return _target_gone(cfg, item, "")
            was = row["status"]
            if not box.retry(item, now):  # (a pending row is made due now)
                print(f"edgehook: delivery {item} was delivered already", file=sys.stderr)
                return EXIT_FAIL
            print(_retried(item, was))
        elif cmd == "drop" and item is not None:
            if not box.drop(item):
                print(f"edgehook: no pending or dead delivery with id {item}",
                      file=sys.stderr)
                return EXIT_FAIL
            print(f"delivery {item} dropped")
        elif cmd == "drop":
            return _dropped_target(cfg, args.target, box.drop_target(args.target))
        else:
            n = box.purge("dead")
            print(f"{_dead(n)} purged")
        return EXIT_OK

    try:
        done = _with_file(cfg, change)
    except _NoAccess as exc:
        raise EdgehookError(str(exc)) from None
    if done == EXIT_OK and daemon_holds(Path(cfg.state_dir) / "outbox.db"):
        print("edgehook: the daemon's API did not answer: it picks this change up at its "
              "next reload (systemctl reload edgehook) or restart", file=sys.stderr)
    return done


def _target_gone(cfg: Config, item: int, detail: str) -> int:
    known = ", ".join(sorted(cfg.webhooks)) or "none"
    print(f"edgehook: delivery {item} was not queued again: its target is no longer in "
          f"{cfg.path} (webhooks: {known}){': ' + detail if detail else ''}. Add the target "
          f"back, or drop the delivery with `edgehook outbox drop {item}`", file=sys.stderr)
    return EXIT_FAIL


def _dropped_target(cfg: Config, target: str, n: int) -> int:
    """`N deliveries to T dropped`; none to a target the config does not name is a
    mistyped name (exit 1), while the rows of a target removed from it are dropped."""
    if n == 0 and target not in cfg.webhooks:
        print(f"edgehook: no deliveries to {target!r}, and no webhook named {target!r} in "
              f"{cfg.path}{suggest(target, list(cfg.webhooks))}", file=sys.stderr)
        return EXIT_FAIL
    print(f"{_count(n, 'delivery', 'deliveries')} to {target} dropped")
    return EXIT_OK


class _NoAccess(EdgehookError):
    """The outbox file is missing or cannot be opened by this user."""


def _with_file(cfg: Config, use: Any) -> Any:
    """Open the outbox file beside a possibly running daemon, use it, close it."""
    from .outbox import Outbox

    path = Path(cfg.state_dir) / "outbox.db"
    try:
        exists = path.exists()
    except PermissionError:
        raise _NoAccess(f"cannot read {path.parent}: {PERMISSION_HINT}") from None
    if not exists:
        raise _NoAccess(f"no outbox at {path} (is state_dir right, and did the daemon "
                        "ever run?)")
    try:
        box = Outbox(path, exclusive=False)
    except (OSError, sqlite3.Error) as exc:
        denied = isinstance(exc, PermissionError) or not os.access(path, os.R_OK | os.W_OK)
        raise _NoAccess(f"cannot open the outbox {path} ({exc})"
                        + (f": {PERMISSION_HINT}" if denied else "")) from None
    try:
        return use(box)
    finally:
        box.close()


def _print_table(items: list[dict[str, Any]]) -> None:
    if not items:
        print("(no deliveries)")
        return
    print(f"{'ID':>6}  {'STATUS':9} {'TARGET':16} {'ATT':>3}  {'NEXT ATTEMPT':24} LAST ERROR")
    for it in items:
        behind = it.get("waiting_behind")
        note = f"waiting behind #{behind}" if behind is not None else ""
        last = "; ".join(x for x in (note, it.get("last_error") or "") if x)
        print(f"{it['id']:>6}  {it['status']:9} {it['target'][:16]:16} {it['attempts']:>3}  "
              f"{(it.get('next_attempt_at') or '-'):24} {last}")


# --------------------------------------------------------------------------- hook

def hook_command(cfg: Config, name: str, data: str, command: str = "") -> int:
    """POST a test request to /hooks/NAME, authenticated as the config's hook says."""
    import requests

    from .events import new_id
    from .signing import sign_github, standard_headers

    hook = cfg.hooks.get(name)
    if hook is None:
        known = sorted(cfg.hooks)
        print(f"edgehook: no hook named {name!r} in {cfg.path}{suggest(name, known)}"
              + (f"; hooks: {', '.join(known)}" if known else "; it defines no hooks"),
              file=sys.stderr)
        return EXIT_FAIL
    try:
        body = json.dumps(json.loads(data)).encode()
    except ValueError as exc:
        print(f"edgehook: --data is not JSON: {exc}", file=sys.stderr)
        return EXIT_FAIL
    secret_paths = [p for p in cfg.unresolved if p[:2] == ("hooks", name)]
    if secret_paths:
        tag = cfg.unresolved[secret_paths[0]]
        print(f"edgehook: hooks.{name} authenticates with {tag}, which cannot be read "
              f"here: run {ways_to_give(tag, command or f'hook {name}')}", file=sys.stderr)
        return EXIT_FAIL
    headers = {"Content-Type": "application/json"}
    auth = hook.auth
    if auth.kind == "token" and auth.token:
        headers["Authorization"] = f"Bearer {auth.token}"
    elif auth.kind == "hmac" and auth.signing is not None:
        secret = auth.signing.secrets[0]
        if auth.signing.scheme == "github":
            headers["X-Hub-Signature-256"] = sign_github(secret, body)
        else:
            headers.update(standard_headers([secret], f"msg_{new_id()}", int(time.time()),
                                            body))
    url = f"{DaemonApi(cfg).base}/hooks/{name}"
    try:
        r = requests.post(url, data=body, headers=headers, timeout=30)
    except requests.RequestException as exc:
        raise Unreachable(f"cannot reach the daemon at {url} ({_reason(exc)}): is it "
                          "running? (systemctl status edgehook)") from None
    print(f"{r.status_code} {r.reason}")
    try:
        print(json.dumps(r.json(), indent=2))
    except ValueError:
        if r.text.strip():
            print(r.text.strip())
    return EXIT_OK if 200 <= r.status_code < 300 else EXIT_FAIL
