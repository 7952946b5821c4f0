"""Layers point one way (DESIGN.md): checked on the source, import by import.

Front ends (``service.api``, ``service.commands``) -> use cases (``service.usecases``)
-> pipeline / gallery -> registry / config; never back.  Every ``import`` /
``from ... import`` statement of every module under ``service/`` and ``training/`` is
read with :mod:`ast` (relative imports resolved), wherever it sits: at the top, in a
function, under ``TYPE_CHECKING``.  A module may not import from the layers
above it; the module-level imports (those that run at import time) form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("service", "training")

#: (modules, the packages/modules they must never import).
RULES: list[tuple[str, tuple[str, ...]]] = [
    (
        "service.pipeline",
        (
            "service.api",
            "service.commands",
            "service.cli",
            "service.app",
            "service.convert",
            "service.reenrol",
            "service.gallery",
            "service.usecases",
        ),
    ),
    (
        "service.gallery",
        (
            "service.api",
            "service.commands",
            "service.cli",
            "service.app",
            "service.reenrol",
            "service.usecases",
        ),
    ),
    # one atomic-write helper under every layer
    (
        "service.files",
        (
            "service.api",
            "service.commands",
            "service.cli",
            "service.app",
            "service.usecases",
            "service.pipeline",
            "service.gallery",
            "service.registry",
            "service.config",
        ),
    ),
    # the typed records are shared by the store, the API and the client: they import no layer
    (
        "service.records",
        (
            "service.api",
            "service.commands",
            "service.cli",
            "service.app",
            "service.usecases",
            "service.pipeline",
            "service.gallery",
            "service.registry",
            "service.config",
        ),
    ),
    # the client's typed answers: the records only, no layer
    (
        "service.answers",
        (
            "service.api",
            "service.commands",
            "service.cli",
            "service.app",
            "service.usecases",
            "service.pipeline",
            "service.gallery",
            "service.registry",
            "service.config",
        ),
    ),
    # the client speaks HTTP only: the records, never the service's own layers
    (
        "service.client",
        (
            "service.api",
            "service.commands",
            "service.app",
            "service.usecases",
            "service.pipeline",
            "service.gallery",
        ),
    ),
    # the use cases know no front end: routes and commands call them, never the reverse
    ("service.usecases", ("service.api", "service.commands", "service.cli", "service.app")),
    # the store interface knows no backend (they import it): no cycle, even a lazy one
    (
        "service.gallery.store",
        (
            "service.gallery.sql",
            "service.gallery.sqlite",
            "service.gallery.postgres",
            "service.gallery.backends",
        ),
    ),
    # the audit log names the store's part it needs (a Protocol): no cycle, even a typed one
    (
        "service.gallery.audit",
        ("service.gallery.store", "service.gallery.sql", "service.gallery.backends"),
    ),
    # the index reads and writes its files through snapshot_files, which knows no index:
    # no cycle, even a typed one (snapshots, the per-store set, imports the index)
    ("service.gallery.snapshot_files", ("service.gallery.index", "service.gallery.snapshots")),
    ("service.reenrol", ("service.api", "service.commands", "service.cli", "service.app")),
    (
        "service.batching",
        ("service.api", "service.commands", "service.cli", "service.app", "service.usecases"),
    ),
    (
        "service.registry",
        (
            "service.api",
            "service.commands",
            "service.pipeline",
            "service.gallery",
            "service.usecases",
        ),
    ),
    (
        "service.config",
        (
            "service.api",
            "service.commands",
            "service.pipeline",
            "service.gallery",
            "service.usecases",
        ),
    ),
    (
        "training",
        ("service.commands", "service.api", "service.cli", "service.app", "service.usecases"),
    ),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {
        module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, *, at_import_time: bool = False) -> set[str]:
    """The modules ``name`` imports (``from a import b`` counts as ``a`` and ``a.b``).

    ``at_import_time``: only the statements that run when the module is imported (not
    in functions, classes' methods or ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if at_import_time and isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            ):
                continue
            if at_import_time and isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_import_reader_sees_every_kind_of_import():
    """The checker itself: absolute, relative, in-function and TYPE_CHECKING imports."""
    probe = REPO / "service" / "pipeline" / "pipeline.py"
    everything = imports("service.pipeline.pipeline", probe)
    assert {
        "service.registry",
        "service.pipeline.faces",
        "service.pipeline.faces.Faces",
        "service.config",
        "numpy",
    } <= everything
    now = imports("service.pipeline.pipeline", probe, at_import_time=True)
    assert "service.config" not in now and "service.pipeline.faces" in now
    cli = imports("service.commands.verify", REPO / "service" / "commands" / "verify.py")
    assert "service.usecases.verify" in cli  # imported inside run()


@pytest.mark.parametrize(("layer", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_no_upward_imports(layer, forbidden):
    found = modules()
    checked = [name for name in found if _within(name, layer)]
    assert checked, f"no module under {layer}"
    wrong = sorted(
        f"{name} imports {target}"
        for name in checked
        for target in imports(name, found[name])
        if any(_within(target, up) for up in forbidden)
    )
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_have_no_cycle():
    found = modules()
    graph = {
        name: sorted(
            t for t in imports(name, path, at_import_time=True) if t in found and t != name
        )
        for name, path in found.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = walk(name)
            assert cycle is None, " -> ".join(cycle)


def test_the_client_imports_only_records_and_answers():
    """The client and its answers speak HTTP and JSON: of the service, only the records and
    the answers."""
    found = modules()
    allowed = ("service.records", "service.answers")
    wrong = sorted(
        f"{name} imports {target}"
        for name in ("service.client", "service.answers")
        for target in imports(name, found[name])
        if _within(target, "service") and not any(_within(target, ok) for ok in allowed)
    )
    assert not wrong, "\n".join(wrong)
