"""YAML -> validated, frozen dataclasses; every error with FILE:LINE:COL, all at once.

Three passes: read the YAML into located values (`yamlload`), check it against the
declarative schema into plain values with defaults (`schemacheck`), then build the
frozen dataclasses of `model` and check what the schema cannot say (`checker`).

`load_config` raises ConfigError and nothing else, whatever the file holds (a stack
of 500 nested lists, a file too big for memory, a bug of ours tripped by odd input):
the daemon calls it on SIGHUP and must keep running on the old config. The types
and value parsers are re-exported here, so `from edgehook.config import ...` is the
one import the rest of the package needs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

from . import schema as S
from .checker import PLACEHOLDER, Builder
from .errors import ConfigError, EdgehookError
from .model import (
    Action,
    Config,
    Device,
    Filters,
    Gestures,
    GpioConfig,
    HookAuth,
    HookConfig,
    HttpConfig,
    InputConfig,
    MqttConfig,
    OutputAction,
    OutputConfig,
    PublishAction,
    Rule,
    Signing,
    TlsConfig,
    Trigger,
    WebhookAction,
    WebhookConfig,
    WebhookTls,
)
from .schemacheck import SchemaChecker
from .units import (
    is_http_url,
    is_loopback,
    parse_duration,
    parse_listen,
    parse_onoff,
    parse_size,
    redact_url,
)
from .yamlload import YamlProblems, read_yaml

__all__ = [
    "DEFAULT_CONFIG", "PLACEHOLDER", "Action", "Config", "ConfigError", "Device", "Filters",
    "Gestures", "GpioConfig", "HookAuth", "HookConfig", "HttpConfig", "InputConfig",
    "MqttConfig", "OutputAction", "OutputConfig", "PublishAction", "Rule", "Signing",
    "TlsConfig", "Trigger", "WebhookAction", "WebhookConfig", "WebhookTls",
    "default_config_path", "is_http_url", "is_loopback", "load_config", "parse_duration",
    "parse_listen", "parse_onoff", "parse_size", "redact_url", "state_path",
]

_LOG = logging.getLogger(__name__)
DEFAULT_CONFIG = "/etc/edgehook/edgehook.yaml"


def load_config(path: str | os.PathLike[str], environ: dict[str, str] | None = None, *,
                lenient: bool = False) -> Config:
    """Load and validate a config file; raises ConfigError listing every problem.

    Never raises anything else. `lenient` is for commands run outside the service
    (`outbox`, `sim`, `hook`): a `!env`/`!file` that cannot be resolved there becomes
    a stand-in listed in `Config.unresolved` instead of a problem, and the checks that
    need the daemon's machine (pin data, TLS files) are skipped.
    """
    name = str(path)
    try:
        return _load(path, dict(os.environ if environ is None else environ), lenient)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError([f"{name}:1:1: nested too deeply to read"]) from None
    except MemoryError:
        raise ConfigError([f"{name}:1:1: too large to read into memory"]) from None
    except Exception as exc:  # odd input tripping a bug of ours: still "the config is bad"
        _LOG.debug("loading %s failed", name, exc_info=True)
        raise ConfigError([f"{name}:1:1: could not be loaded ({type(exc).__name__}: {exc}); "
                           "this is a bug in edgehook, please report it with the file"]
                          ) from None


def _load(path: str | os.PathLike[str], env: dict[str, str], lenient: bool) -> Config:
    name = str(path)
    try:
        located, problems = read_yaml(path, env, lenient=lenient)
    except YamlProblems as exc:
        raise ConfigError(exc.problems) from None
    checker = SchemaChecker()
    checker.problems.extend(problems)
    if not isinstance(located.value, dict):
        raise ConfigError([*checker.problems, f"{located.mark}: the config must be a mapping"])
    raw = checker.check(S.ROOT, located, ())
    if raw is None:
        raise ConfigError(checker.problems)
    builder = Builder(checker, env, Path(path).parent, lenient=lenient)
    cfg = builder.build(raw, name)
    if lenient:  # a stand-in may fail a check its real value would pass
        stand_ins = {str(checker.marks[p]) + ":" for p in checker.unresolved}
        checker.problems[:] = [p for p in checker.problems
                               if not any(p.startswith(m) for m in stand_ins)]
    if checker.problems:
        raise ConfigError(_sorted_problems(checker.problems))
    return cfg


def _sorted_problems(problems: list[str]) -> list[str]:
    def key(p: str) -> tuple[int, int]:
        m = re.match(r"^.*?:(\d+):(\d+): ", p)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    seen: list[str] = []
    for p in sorted(problems, key=key):
        if p not in seen:
            seen.append(p)
    return seen


def default_config_path(environ: dict[str, str] | None = None) -> str:
    """`$EDGEHOOK_CONFIG`, else /etc/edgehook/edgehook.yaml."""
    env = os.environ if environ is None else environ
    return env.get("EDGEHOOK_CONFIG") or DEFAULT_CONFIG


def state_path(cfg: Config, name: str) -> Path:
    """A file inside the state directory."""
    return Path(cfg.state_dir) / name


_BIND_ERRORS = {
    errno.EADDRINUSE: "the address is already in use (another program, or another "
                      "edgehook, listens there)",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
    errno.EACCES: "permission denied (a port below 1024 needs CAP_NET_BIND_SERVICE)",
}


def setting_error(cfg: Config, key: tuple[str, ...], value: str,
                  exc: OSError) -> EdgehookError:
    """A start-up OSError as the setting at fault: `state_dir X (FILE:L:C): why`."""
    if key == ("state_dir",):
        path = Path(value)
        why = ("it is not a directory" if path.exists() and not path.is_dir() else
               f"cannot {'use' if path.is_dir() else 'create'} it: {exc.strerror or exc}")
    else:
        why = _BIND_ERRORS.get(exc.errno or 0) or exc.strerror or str(exc)
    return EdgehookError(f"{'.'.join(key)} {value} ({cfg.where(*key)}): {why}")
