"""Import direction (STYLE.md): edges never import each other or app; the core no edges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "daemon" / "edgehook"
EDGES = {"gpio", "mqtt", "outbox", "outbox_file", "outbox_sql", "outbox_admin", "outbox_marks",
         "delivery",
         "transport", "metered", "http_server", "deadlines", "notify"}
PURE = {"events", "errors", "config", "schema", "yamlload", "rules", "templates", "inputs",
        "signing", "homeassistant", "hooks", "metrics", "explain", "units", "model",
        "schemacheck", "checker", "checker_rules", "pins", "status_page", "retry", "health",
        "api", "routing", "webauth", "mqtt_messages"}
# the composition side: may import edges; nothing else imports it
ROOT = {"app", "cli", "cli_client", "receiver"}
# an edge's own lower layer, which only that edge uses (the sender threads send
# through the HTTP transport; the outbox is split into its file, its SQL and the
# user's operations on rows)
LAYERS = {"delivery": {"transport"}, "transport": {"metered"}, "http_server": {"deadlines"},
          "outbox": {"outbox_file", "outbox_sql", "outbox_admin", "outbox_marks"},
          "outbox_admin": {"outbox_sql"}, "outbox_marks": {"outbox_sql"},
          "outbox_file": {"outbox_sql"}}


def our_imports(path: Path) -> set[str]:
    """Modules of the edgehook package that a file imports (relative or absolute)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("edgehook."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("edgehook."):
                    found.add(a.name.split(".")[1])
    return found


MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
# the threads between sources and edges, and the entry point; neither edge nor pure
MIDDLE = {"dispatcher", "scheduler", "triggers", "__main__"}


def test_every_module_has_a_place() -> None:
    """A new module must be put in one of the sets above, or the checks skip it."""
    unplaced = set(MODULES) - EDGES - PURE - ROOT - MIDDLE
    assert not unplaced, f"modules in no layer: {sorted(unplaced)}"


@pytest.mark.parametrize("name", sorted(EDGES & set(MODULES)))
def test_edges_import_no_other_edge_nor_app(name: str) -> None:
    bad = our_imports(PKG / f"{name}.py") & (EDGES | ROOT) - {name} - LAYERS.get(name, set())
    assert not bad, f"edge module {name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(PURE & set(MODULES)))
def test_pure_core_imports_no_edges(name: str) -> None:
    bad = our_imports(PKG / f"{name}.py") & (EDGES | ROOT | {"dispatcher"})
    assert not bad, f"pure module {name} imports {sorted(bad)}"


def test_events_and_errors_import_nothing_of_ours() -> None:
    assert our_imports(PKG / "events.py") == set()
    assert our_imports(PKG / "errors.py") == set()


def test_the_checker_sees_imports() -> None:
    """Guard the guard: app.py does import edges, so the walker must find them."""
    assert {"gpio", "outbox"} <= our_imports(PKG / "app.py")
    assert our_imports(PKG / "http_server.py") >= {"api", "routing"}


def test_the_http_side_is_split_as_documented() -> None:
    """The listener is the only HTTP module with sockets; the routes never reach it."""
    assert "http_server" not in our_imports(PKG / "api.py")
    for name in ("api", "routing", "webauth", "hooks"):
        tree = ast.parse((PKG / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {n.module for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert not imported & {"socket", "socketserver", "http.server", "selectors"}, name
