"""Templates: compile once at load, render per event in Jinja2's sandbox.

Strings without `{{` or `{%` never touch Jinja2, and Jinja2 itself is imported only
when a config has a real template, which keeps a simple daemon's memory small.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

from .errors import EdgehookError

_ENV: Any = None
_ENV_LOCK = threading.Lock()

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"", "false", "no", "off", "0", "none", "null"})


class TemplateError(EdgehookError, ValueError):
    """A template failed to compile or to render."""


class Template(Protocol):
    """Something that renders to a string from a context mapping."""

    source: str

    def render(self, ctx: dict[str, Any]) -> str: ...


class _BySource:
    """Equal when the kind and the source are: a reload can tell what really changed."""

    __slots__ = ()
    source: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.source == self.source  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.source))


class Static(_BySource):
    """A string with no template syntax: rendering returns it unchanged."""

    __slots__ = ("source",)
    is_static = True

    def __init__(self, source: str) -> None:
        self.source = source

    def render(self, ctx: dict[str, Any]) -> str:
        return self.source


class Jinja(_BySource):
    """A compiled sandboxed Jinja2 template with StrictUndefined."""

    __slots__ = ("source", "_tpl")
    is_static = False

    def __init__(self, source: str) -> None:
        self.source = source
        env = _environment()
        try:
            self._tpl = env.from_string(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise TemplateError(f"template error: {exc}") from None

    def render(self, ctx: dict[str, Any]) -> str:
        try:
            return self._tpl.render(ctx)
        except Exception as exc:  # UndefinedError, SecurityError, TypeError from user code
            raise TemplateError(f"{type(exc).__name__}: {exc}") from None


def _environment() -> Any:
    global _ENV
    with _ENV_LOCK:
        if _ENV is None:
            from jinja2 import StrictUndefined
            from jinja2.sandbox import SandboxedEnvironment

            env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                                       keep_trailing_newline=False)
            env.filters["tojson"] = lambda v: json.dumps(v, separators=(",", ":"))
            _ENV = env
        return _ENV


def is_template(text: str) -> bool:
    """True when the string contains Jinja2 syntax."""
    return "{{" in text or "{%" in text or "{#" in text


def compile_template(text: str) -> Template:
    """Compile a string; raises TemplateError on a syntax error."""
    return Jinja(text) if is_template(text) else Static(text)


def compile_tree(value: Any) -> Any:
    """Compile every string leaf of a YAML value (mapping keys stay plain)."""
    if isinstance(value, str):
        return compile_template(value)
    if isinstance(value, dict):
        return {str(k): compile_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compile_tree(v) for v in value]
    return value


def render_tree(tree: Any, ctx: dict[str, Any]) -> Any:
    """Render a compiled tree into plain JSON-able values."""
    if isinstance(tree, (Static, Jinja)):
        return tree.render(ctx)
    if isinstance(tree, dict):
        return {k: render_tree(v, ctx) for k, v in tree.items()}
    if isinstance(tree, list):
        return [render_tree(v, ctx) for v in tree]
    return tree


def is_truthy(text: str) -> bool:
    """Decide an `if:` result: words like false/no/off/0/empty are false, the rest true."""
    return text.strip().lower() not in FALSE_WORDS


def tree_is_static(tree: Any) -> bool:
    """True when rendering the tree needs no context (lets callers render it once)."""
    if isinstance(tree, Jinja):
        return False
    if isinstance(tree, dict):
        return all(tree_is_static(v) for v in tree.values())
    if isinstance(tree, list):
        return all(tree_is_static(v) for v in tree)
    return True
