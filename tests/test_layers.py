"""The supernode's layering, read from the source: no import cycles between its modules,
and no import from a lower sub-package into a higher one.

    supernode (app, cli, config, state, metrics, gc, auth)
      -> api -> scheduling -> cdn -> store -> common

Imports under `if TYPE_CHECKING:` count: a type named across layers is a dependency a
reader has to follow just the same. The one way up allowed is `api` importing the typed
application state (`supernode.state`), whose own imports of the components are
TYPE_CHECKING-only (checked below). `supernode.tasks` (the owners of background tasks)
imports nothing of the supernode and sits at the bottom with `common`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"common": 0, "supernode.tasks": 0, "supernode.store": 1, "supernode.cdn": 2, "supernode.scheduling": 3, "supernode.api": 4}
TOP = 5  # the modules directly under supernode/
ALLOWED_UP = {("supernode.api", "supernode.state")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(*packages: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                ids.update(id(n) for n in ast.walk(child))
    return ids


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, bool]:
    """The known modules `name` imports -> whether only under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    guarded = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, bool] = {}

    def add(target: str, node: ast.AST) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out[target] = out.get(target, True) and id(node) in guarded

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import module` imports the module
                full = f"{target}.{alias.name}"
                add(full if full in known else target, node)
    return out


def graph() -> dict[str, dict[str, bool]]:
    known = modules("supernode", "common")
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(name: str) -> tuple[str, int]:
    for prefix, rank in sorted(RANK.items(), key=lambda kv: -len(kv[0])):
        if name == prefix or name.startswith(prefix + "."):
            return prefix, rank
    return "supernode", TOP


def cycles(g: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_no_upward_imports() -> None:
    bad = []
    for name, targets in graph().items():
        here, rank = layer(name)
        for target in targets:
            there, their_rank = layer(target)
            if there == "supernode" and target == "supernode":
                continue  # the package itself: its __init__ only re-exports common's version
            if their_rank > rank and (here, target) not in ALLOWED_UP:
                bad.append(f"{name} -> {target}")
    assert bad == []


def test_state_names_components_only_for_type_checking() -> None:
    runtime = [t for t, only_typing in graph()["supernode.state"].items()
               if t.startswith("supernode") and not only_typing]
    assert runtime == []


def test_common_has_no_asyncio_and_no_daemon() -> None:
    """`common` is wire formats and pure maths, shared by every package: no event loop, and
    nothing of the packages that use it."""
    bad = []
    for name, path in modules("common").items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bad += [f"{name} -> {n}" for n in names if n.split(".")[0] in ("asyncio", "supernode", "dfget")]
    assert bad == []


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    g = {"a": {"b": False}, "b": {"a": True}, "c": {}}
    assert cycles(g) == [["a", "b"]]
    assert layer("supernode.store.repo") == ("supernode.store", 1)
    assert layer("supernode.api.ui")[1] > layer("supernode.scheduling.policy")[1]
    assert layer("supernode.app") == ("supernode", TOP)
