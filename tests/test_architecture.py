"""The package's shape: data flows one way, functions stay short, library code does not print.

Every check is a static walk over the source (``ast``), so it sees imports inside functions and
under ``if TYPE_CHECKING:`` as well as module-level ones, and it runs without importing hfsoup.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hfsoup"

# The layers, lowest first. A module may import modules of its own layer or of a lower one,
# never of a higher one. Each entry is a module or a package (which covers its submodules).
LAYERS: list[tuple[str, ...]] = [
    ("hfsoup.errors", "hfsoup._version", "hfsoup.units", "hfsoup.dtypes", "hfsoup.ingredients"),
    ("hfsoup.io",),
    ("hfsoup.check",),
    ("hfsoup.compute",),
    ("hfsoup.tasks",),
    ("hfsoup.recipe", "hfsoup.untrusted", "hfsoup.registry"),
    ("hfsoup.report",),
    ("hfsoup.methods",),
    ("hfsoup", "hfsoup.api", "hfsoup.pipeline"),
    (
        "hfsoup.cli",
        "hfsoup.__main__",
        "hfsoup.demo",
        "hfsoup.reproduce",
        "hfsoup.sweep",
        "hfsoup.serve",
    ),
]

MAX_FUNCTION_LINES = 80
# The command-line entry points, which may print: the whole CLI module, and in the local Hub
# the functions of ``hfsoup hub serve`` / ``python -m hfsoup.serve.hubserver`` (``serve`` prints
# the address it bound, ``main`` errors, and the stderr handler ``main`` installs, ``emit``).
PRINT_ALLOWED: dict[str, set[str] | None] = {
    "hfsoup.cli": None,
    "hfsoup.serve.hubserver": {"serve", "main", "emit"},
}


def _modules() -> dict[str, Path]:
    """Every module of hfsoup by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute module an ``from X import ...`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _type_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:`` (imports that never run)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
            "TYPE_CHECKING"
        ):
            found.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return found


def imports(module: str, *, type_only: bool = True) -> set[str]:
    """The hfsoup modules ``module`` imports anywhere in its source (``from pkg import mod``
    counts as importing ``pkg.mod``); without ``type_only``, not those under
    ``if TYPE_CHECKING:``."""
    path = MODULES[module]
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if type_only else _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "hfsoup")
        elif isinstance(node, ast.ImportFrom):
            target = _target(node, module, path)
            if target.split(".")[0] != "hfsoup":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    out.discard(module)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _layer(module: str) -> int | None:
    """The index in :data:`LAYERS` of the longest entry that is ``module`` or a package of it."""
    best, depth = None, -1
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and entry.count(".") > depth:
                best, depth = i, entry.count(".")
    return best


def test_the_import_walk_sees_imports_inside_functions():
    # compute.placement imports accelerate and a sibling inside functions only.
    assert "hfsoup.errors" in imports("hfsoup.compute.placement")
    assert "hfsoup.registry" in imports("hfsoup.methods")


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def test_no_import_cycles():
    # Imports that run. A module's own packages are always imported before it (Python runs
    # ``hfsoup/__init__`` and ``hfsoup/methods/__init__`` first), so naming one adds no edge: a
    # package that imports its submodules (a registry filling itself) is not a cycle; nor is a
    # type named under ``if TYPE_CHECKING:``, which never runs. The layering test below counts
    # both: a lower layer may not even name a higher one's types.
    graph = {m: {t for t in imports(m, type_only=False) if not _is_ancestor(t, m)} for m in MODULES}
    cycles = _cycles(graph)
    detail = [
        " <-> ".join(c)
        + ": "
        + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in cycles
    ]
    assert not cycles, "import cycles among hfsoup's modules:\n" + "\n".join(detail)


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if _layer(m) is None)
    assert not missing, f"modules in no layer of LAYERS (add them where they belong): {missing}"


def test_no_lower_layer_imports_a_higher_one():
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m in sorted(MODULES)
        for t in sorted(imports(m))
        if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)
    ]
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_is_longer_than_80_lines():
    paths = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "space_app").rglob("*.py")])
    long = [
        f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for p in paths
        for f in _functions(ast.parse(p.read_text(encoding="utf-8")))
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _prints(module: str) -> Iterator[str]:
    """``file:line in function`` for each call of ``print`` in ``module`` outside the
    functions :data:`PRINT_ALLOWED` lets it print in."""
    allowed = PRINT_ALLOWED.get(module, set())
    if allowed is None:  # the whole module is an entry point
        return
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    owners: dict[int, str] = {}
    for f in _functions(tree):  # outer functions first: an inner one overwrites its nodes
        for node in ast.walk(f):
            owners[id(node)] = f.name
    for node in ast.walk(tree):
        is_print = (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "print"
        )
        if is_print and owners.get(id(node)) not in allowed:
            yield f"{path.relative_to(ROOT)}:{node.lineno} in {owners.get(id(node), '<module>')}"


def test_library_code_does_not_print():
    found = [hit for m in sorted(MODULES) for hit in _prints(m)]
    assert not found, (
        "print() in library code (log through logging.getLogger('hfsoup')):\n" + "\n".join(found)
    )
