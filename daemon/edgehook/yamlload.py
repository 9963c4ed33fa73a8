"""Hostile-safe YAML reading: a node tree with marks, custom tags, and no surprises.

We compose (never construct) with PyYAML's SafeLoader, then walk the nodes ourselves
so that every value keeps its FILE:LINE:COL, duplicate keys are errors, alias
expansion is capped (a "billion laughs" file is refused), nesting is capped (a file
of 500 nested lists is refused with its position instead of overflowing the stack),
and only `!env` and `!file` are accepted as custom tags.

A lenient read (for CLI commands that run outside the service and never need the
secrets) turns a `!env`/`!file` it cannot resolve into a value marked `unresolved`
instead of a problem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000  # nodes visited while walking, aliases counted each time they expand
MAX_DEPTH = 50  # nested mappings/lists; real configs use fewer than 10
PERMISSION_HINT = "run as root or a member of the edgehook group (sudo edgehook ...)"
# The only custom tags, and the form each takes.
_TAG_FORMS = {"!env": "!env NAME or !env NAME DEFAULT", "!file": "!file PATH"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Mark:
    """A position in a config file, printed as FILE:LINE:COL (1-based)."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(slots=True)
class Located:
    """A YAML value with where it came from; mappings hold Located keys and values."""

    value: Any
    mark: Mark
    secret: bool = False  # came from !env or !file: mask it when printed
    keys: dict[str, Mark] | None = None  # for mappings: where each key was written
    unresolved: str | None = None  # lenient reads: the tag that could not be resolved
    reported: bool = False  # its problem is already listed: later passes stay quiet


class YamlProblems(Exception):
    """Raised with every problem found while reading (marks included)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Walker:
    def __init__(self, filename: str, environ: dict[str, str], base: Path,
                 lenient: bool = False) -> None:
        self.filename = filename
        self.environ = environ
        self.base = base
        self.lenient = lenient
        self.problems: list[str] = []
        self.count = 0
        self._scalar = yaml.SafeLoader("")  # only used for its scalar constructors

    def mark(self, node: yaml.Node) -> Mark:
        m = node.start_mark
        return Mark(self.filename, m.line + 1, m.column + 1)

    def error(self, node: yaml.Node, msg: str) -> None:
        self.problems.append(f"{self.mark(node)}: {msg}")

    def unresolvable(self, node: yaml.Node, mark: Mark, msg: str, what: str) -> Located:
        """A tag that cannot be resolved: a problem (not in a lenient read), and a value
        marked so that later passes neither use it nor report it missing again."""
        if not self.lenient:
            self.error(node, msg)
        return Located(None, mark, secret=True, unresolved=what)

    def walk(self, node: yaml.Node, depth: int = 0) -> Located:
        self.count += 1
        if self.count > MAX_NODES:
            raise YamlProblems([f"{self.mark(node)}: too many YAML nodes (more than {MAX_NODES} "
                                "after expanding aliases); refusing to read further"])
        mark = self.mark(node)
        if depth > MAX_DEPTH:
            raise YamlProblems([_too_deep_message(mark)])
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, mark, depth)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                return self._bad_tag(node, mark, "a list")
            return Located([self.walk(item, depth + 1) for item in node.value], mark)
        return self._scalar_node(node, mark)

    def _mapping(self, node: yaml.MappingNode, mark: Mark, depth: int) -> Located:
        if node.tag != "tag:yaml.org,2002:map":
            return self._bad_tag(node, mark, "a mapping")
        out: dict[str, Located] = {}
        keys: dict[str, Located] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.error(key_node, "merge keys (<<) are not supported; repeat the keys")
                continue
            key = self.walk(key_node, depth + 1)
            if key.reported:
                continue
            if isinstance(key.value, (dict, list)) or key.value is None:
                self.error(key_node, "a mapping key must be a plain value")
                continue
            name = str(key.value) if not isinstance(key.value, bool) else _yaml_bool(key_node)
            if name in out:
                self.error(key_node, f"duplicate key {name!r} (first at line "
                                     f"{keys[name].mark.line})")
                continue
            keys[name] = key
            out[name] = self.walk(value_node, depth + 1)
        return Located(out, mark, keys={k: v.mark for k, v in keys.items()})

    def _scalar_node(self, node: yaml.ScalarNode, mark: Mark) -> Located:
        tag = node.tag
        if tag == "!env":
            return self._env(node, mark)
        if tag == "!file":
            return self._file(node, mark)
        constructor = yaml.SafeLoader.yaml_constructors.get(tag)
        if tag.startswith("!") or constructor is None or tag in (
            "tag:yaml.org,2002:binary", "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:set",
            "tag:yaml.org,2002:omap", "tag:yaml.org,2002:pairs",
        ):
            if tag == "tag:yaml.org,2002:timestamp":  # a bare date: keep the text
                return Located(node.value, mark)
            return self._bad_tag(node, mark, "")
        return Located(constructor(self._scalar, node), mark)

    def _bad_tag(self, node: yaml.Node, mark: Mark, shape: str) -> Located:
        """A tag we do not take, or !env/!file on a list or mapping: one problem."""
        if node.tag in _TAG_FORMS:
            self.error(node, f"{node.tag} takes one line of text, not {shape}: "
                             f"{_TAG_FORMS[node.tag]}")
        else:
            self.error(node, f"unsupported tag {node.tag!r} (only !env NAME [DEFAULT] and "
                             "!file PATH are allowed)")
        return Located(None, mark, reported=True)

    def _env(self, node: yaml.ScalarNode, mark: Mark) -> Located:
        parts = str(node.value).split(None, 1)
        if not parts:
            self.error(node, f"!env needs a variable name: {_TAG_FORMS['!env']}")
            return Located(None, mark, reported=True)
        name = parts[0]
        if name in self.environ:
            return Located(self.environ[name], mark, secret=True)
        if len(parts) == 2:
            default = parts[1]
            if len(default) >= 2 and default[0] == default[-1] and default[0] in "\"'":
                default = default[1:-1]  # `!env NAME ""` is the empty string, not two quotes
            return Located(default, mark, secret=True)
        return self.unresolvable(node, mark, f"environment variable {name} is not set (write "
                                             f"!env {name} DEFAULT to give a default)",
                                 f"!env {name} (not set here)")

    def _file(self, node: yaml.ScalarNode, mark: Mark) -> Located:
        raw = str(node.value).strip()
        if not raw:
            self.error(node, f"!file needs a path: {_TAG_FORMS['!file']}")
            return Located(None, mark, reported=True)
        missing: list[str] = []

        def sub(m: re.Match[str]) -> str:
            var = m.group(1) or m.group(2)
            if var not in self.environ:
                missing.append(var)
                return ""
            return self.environ[var]

        expanded = _VAR.sub(sub, raw)
        if missing:
            return self.unresolvable(node, mark, f"!file {raw}: environment variable "
                                                 f"{missing[0]} is not set",
                                     f"!file {raw} ({missing[0]} is not set here)")
        path = Path(expanded)
        if not path.is_absolute():
            path = self.base / path
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                self.error(node, f"!file {path}: larger than {MAX_FILE_BYTES} bytes")
                return Located(None, mark, reported=True)
            return Located(path.read_text(encoding="utf-8").strip(), mark, secret=True)
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            return self.unresolvable(node, mark, f"!file {path}: cannot read ({reason})",
                                     f"!file {path} ({reason})")


def _yaml_bool(node: yaml.Node) -> str:
    """Keep `on:`/`off:` keys as the words written, not True/False."""
    return str(node.value)


class _Loader(yaml.SafeLoader):
    """SafeLoader that lets our own tags through to the node tree untouched."""


def read_yaml(path: str | os.PathLike[str], environ: dict[str, str] | None = None, *,
              lenient: bool = False) -> tuple[Located, list[str]]:
    """Read a config file into Located values plus the problems found on the way.

    Raises YamlProblems only when nothing useful could be read (no file, bad syntax).
    """
    p = Path(path)
    name = str(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise YamlProblems([f"{name}:1:1: file is {size} bytes, more than the "
                                f"{MAX_FILE_BYTES} allowed"])
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlProblems([f"{name}:1:1: no such file"]) from None
    except PermissionError:
        raise YamlProblems([f"{name}:1:1: permission denied (an installed config is readable "
                            f"only by root and the edgehook group): {PERMISSION_HINT}"]) from None
    except IsADirectoryError:
        raise YamlProblems([f"{name}:1:1: is a directory, not a config file"]) from None
    except UnicodeDecodeError as exc:
        raise YamlProblems([f"{name}:1:1: not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start})"]) from None
    except OSError as exc:
        raise YamlProblems([f"{name}:1:1: cannot read ({exc.strerror or exc})"]) from None
    return parse_yaml(text, name, environ, base=p.parent, lenient=lenient)


def parse_yaml(text: str, name: str = "<string>", environ: dict[str, str] | None = None,
               base: Path | None = None, *, lenient: bool = False,
               ) -> tuple[Located, list[str]]:
    """Parse YAML text into Located values plus problems (bad tags, unset variables...)."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        m = exc.problem_mark or exc.context_mark
        where = f"{name}:{m.line + 1}:{m.column + 1}" if m else f"{name}:1:1"
        raise YamlProblems([f"{where}: YAML syntax error: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise YamlProblems([f"{name}:1:1: YAML error: {exc}"]) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise YamlProblems([_too_deep_message(_deepest(text, name))]) from None
    if root is None:
        raise YamlProblems([f"{name}:1:1: the file is empty (it holds no settings; "
                            "config/example.yaml shows every key)"])
    walker = _Walker(name, dict(os.environ if environ is None else environ),
                     base or Path.cwd(), lenient)
    return walker.walk(root), walker.problems


def _too_deep_message(mark: Mark) -> str:
    return (f"{mark}: nested more than {MAX_DEPTH} levels deep; a config never needs that "
            "many, so the file is refused")


def _deepest(text: str, name: str) -> Mark:
    """Where nesting first goes past MAX_DEPTH, found with PyYAML's parser (no recursion)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH + 1:
                    m = event.start_mark
                    return Mark(name, m.line + 1, m.column + 1)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        pass
    return Mark(name, 1, 1)
