"""Pass 2 of loading: located YAML checked against `schema.ROOT` into plain values.

Types, choices, ranges, unknown keys (with a "did you mean") and required keys, each
problem with FILE:LINE:COL; defaults filled in. What needs two keys or a name defined
elsewhere is pass 3 (`checker.py`).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from . import schema as S
from .units import parse_duration, parse_onoff, parse_size
from .yamlload import Located, Mark

UNRESOLVED = "<unresolved>"  # stands in for a value whose !env/!file could not be read


class SchemaChecker:
    """Checks located YAML against schema nodes; returns plain values with defaults.

    A value whose tag could not be resolved (lenient loads only) is replaced by the
    key's default, or by a stand-in its type accepts, and its path is remembered in
    `unresolved`, so the rest of the config can still be used.
    """

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.marks: dict[tuple[Any, ...], Mark] = {}
        self.secrets: set[tuple[Any, ...]] = set()
        self.unresolved: dict[tuple[Any, ...], str] = {}
        self._current: tuple[Any, ...] = ()

    def err(self, mark: Mark, msg: str) -> None:
        self.problems.append(f"{mark}: {msg}")

    def check(self, node: S.Node, loc: Located, path: tuple[Any, ...]) -> Any:
        self.marks[path] = loc.mark
        if loc.secret:
            self.secrets.add(path)
        if loc.reported:  # reading it already said what is wrong
            return None
        if loc.unresolved is not None:
            self.unresolved[path] = loc.unresolved
            return _stand_in(node)
        if isinstance(node, S.Scalar):
            return self.scalar(node, loc, path)
        if isinstance(node, S.Obj):
            return self.obj(node, loc, path)
        if isinstance(node, S.NamedMap):
            return self.named_map(node, loc, path)
        if isinstance(node, S.ListOf):
            return self.list_of(node, loc, path)
        if isinstance(node, S.Union):
            return self.union(node, loc, path)
        if isinstance(node, S.BoolOr):
            if isinstance(loc.value, bool):
                return loc.value
            return self.obj(node.obj, loc, path)
        raise AssertionError(node)

    def _name(self, path: tuple[Any, ...]) -> str:
        parts = [p if isinstance(p, str) else f"[{p}]" for p in path]
        return ".".join(parts).replace(".[", "[") or "config"

    def _plain(self, v: Any, path: tuple[Any, ...]) -> Any:
        """A free-form value as plain data; tagged leaves inside it stay marked secret."""
        if isinstance(v, Located):
            if v.secret:
                self.secrets.add(path)
            v = v.value
        if isinstance(v, dict):
            return {str(k): self._plain(x, (*path, str(k))) for k, x in v.items()}
        if isinstance(v, list):
            return [self._plain(x, (*path, i)) for i, x in enumerate(v)]
        return v

    def scalar(self, node: S.Scalar, loc: Located, path: tuple[Any, ...]) -> Any:
        self._current = path
        v = loc.value
        where = self._name(path)
        if v is None:
            self.err(loc.mark, f"{where}: a value is required")
            return None
        if isinstance(v, (dict, list)) and node.kind != S.ANY:
            self.err(loc.mark, f"{where}: expected a {node.kind}, got a "
                               f"{'mapping' if isinstance(v, dict) else 'list'}")
            return None
        try:
            out = self._convert(node, v, loc.secret)
        except ValueError as exc:
            self.err(loc.mark, f"{where}: {exc}")
            return None
        if node.choices and out not in node.choices:
            hint = suggest(str(out), [str(c) for c in node.choices])
            self.err(loc.mark, f"{where}: {out!r} is not one of "
                               f"{', '.join(map(str, node.choices))}{hint}")
            return None
        if node.positive and out <= 0:
            self.err(loc.mark, f"{where}: must be more than 0, got {v}")
            return None
        if node.minimum is not None and out < node.minimum:
            self.err(loc.mark, f"{where}: {out} is below the minimum {node.minimum:g}")
            return None
        if node.maximum is not None and out > node.maximum:
            self.err(loc.mark, f"{where}: {out} is above the maximum {node.maximum:g}")
            return None
        if node.pattern and not re.match(node.pattern, str(out)):
            self.err(loc.mark, f"{where}: {out!r} does not match {node.pattern}")
            return None
        return out

    def _convert(self, node: S.Scalar, v: Any, from_tag: bool) -> Any:
        kind = node.kind
        if kind == S.ANY:
            return self._plain(v, self._current)
        if kind == S.DURATION:
            return parse_duration(v)
        if kind == S.SIZE:
            return parse_size(v)
        if kind == S.ONOFF:
            return parse_onoff(v)
        if kind == S.BOOL:
            if isinstance(v, bool):
                return v
            if from_tag and str(v).lower() in ("true", "false", "yes", "no", "on", "off"):
                return str(v).lower() in ("true", "yes", "on")
            raise ValueError(f"expected true or false, got {v!r}")
        if kind == S.INT:
            if isinstance(v, bool) or not isinstance(v, int):
                if from_tag and re.fullmatch(r"-?\d+", str(v).strip()):
                    return int(v)
                raise ValueError(f"expected a whole number, got {v!r}")
            return v
        if kind == S.PIN:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ValueError(f"expected a pin like 17 or GPIO17, got {v!r}")
            return v
        if isinstance(v, bool):
            if kind == S.TEMPLATE or (node.choices and _onoff_word(v) in node.choices):
                return _onoff_word(v)  # `on_stop: off` parses as a YAML boolean
            raise ValueError(f"expected text, got {str(v).lower()} (quote it)")
        if isinstance(v, float) and node.choices and str(v) in node.choices:
            return str(v)  # protocol: 3.1 or 5
        if isinstance(v, int) and node.choices and str(v) in node.choices:
            return str(v)
        return str(v)

    def obj(self, node: S.Obj, loc: Located, path: tuple[Any, ...]) -> dict[str, Any] | None:
        where = self._name(path)
        if loc.value is None:
            loc = Located({}, loc.mark)
        if not isinstance(loc.value, dict):
            self.err(loc.mark, f"{where}: expected a mapping with keys "
                               f"{', '.join(node.keys)}")
            return None
        out: dict[str, Any] = {}
        given: dict[str, Located] = loc.value
        for key, value in given.items():
            if key not in node.keys:
                self.err(_key_mark(key, value, loc),
                         f"{where}: unknown key {key!r}{suggest(key, list(node.keys))}")
        for key, spec in node.keys.items():
            if key in given and given[key].unresolved is not None \
                    and spec.default is not None:
                self.check(spec.node, given[key], (*path, key))  # remembers it
                out[key] = _copy_default(spec)
            elif key in given:
                out[key] = self.check(spec.node, given[key], (*path, key))
            elif spec.required:
                self.err(loc.mark, f"{where}: missing required key {key!r}")
            else:
                out[key] = _copy_default(spec)
        return out

    def named_map(self, node: S.NamedMap, loc: Located, path: tuple[Any, ...]) -> dict[str, Any]:
        where = self._name(path)
        if loc.value is None:
            return {}
        if not isinstance(loc.value, dict):
            self.err(loc.mark, f"{where}: expected a mapping of names")
            return {}
        out = {}
        for name, value in loc.value.items():
            if not re.match(node.name_pattern, name):
                self.err(value.mark, f"{where}: name {name!r} may only use letters, digits, "
                                     "_ and -")
                continue
            out[name] = self.check(node.value, value, (*path, name))
        return out

    def list_of(self, node: S.ListOf, loc: Located, path: tuple[Any, ...]) -> list[Any]:
        where = self._name(path)
        items = loc.value
        if items is None:
            items = []
        if not isinstance(items, list):
            if node.single_ok:
                items = [loc]
            else:
                self.err(loc.mark, f"{where}: expected a list")
                return []
        if len(items) < node.min_items:
            self.err(loc.mark, f"{where}: needs at least {node.min_items} item(s)")
        return [self.check(node.item, item, (*path, i)) for i, item in enumerate(items)]

    def union(self, node: S.Union, loc: Located, path: tuple[Any, ...]) -> Any:
        where = self._name(path)
        v = loc.value
        if isinstance(v, str) and v in node.words:
            return v
        if not isinstance(v, dict):
            words = ", ".join(f"the word {w!r}" for w in node.words)
            self.err(loc.mark, f"{where}: expected a mapping with one of "
                               f"{', '.join(node.variants)}" + (f" or {words}" if words else ""))
            return None
        present = [k for k in node.variants if k in v]
        if len(present) != 1:
            if present:
                self.err(loc.mark, f"{where}: use only one of {', '.join(present)}")
            else:
                keys = list(v)
                hint = suggest(keys[0], list(node.variants)) if keys else ""
                self.err(loc.mark, f"{where}: needs one of {', '.join(node.variants)}{hint}")
            return None
        out = self.obj(node.variants[present[0]], loc, path)
        if out is not None:
            out["__kind__"] = present[0]
        return out


def _stand_in(node: S.Node) -> Any:
    """A value of the node's type for a tag that could not be resolved."""
    if isinstance(node, S.ListOf):
        item = _stand_in(node.item)
        return [] if item is None else [item]
    if not isinstance(node, S.Scalar):
        return None
    if node.choices:
        return node.choices[0]
    stand_ins: dict[str, Any] = {S.INT: int(node.minimum or 0), S.BOOL: False,
                                 S.DURATION: 0.0, S.SIZE: 0, S.ONOFF: "off"}
    value = stand_ins.get(node.kind, UNRESOLVED)
    if node.pattern and not re.match(node.pattern, str(value)):
        return None
    return value


def _onoff_word(v: bool) -> str:
    return "on" if v else "off"


def _key_mark(key: str, value: Located, parent: Located) -> Mark:
    """Where a key was written (falls back to its value's position)."""
    return (parent.keys or {}).get(key, value.mark)


def _copy_default(spec: S.Key) -> Any:
    d = spec.default
    if isinstance(d, dict):
        return dict(d)
    if isinstance(d, list):
        return list(d)
    return d


def suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
