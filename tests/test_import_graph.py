"""tfdpfair's imports run in one direction (STYLE.md section 3 item 3, issue 21).

The graph: one node per module of the tfdpfair package (a package is its ``__init__``); an edge
A -> B for every ``import``/``from ... import`` statement in A that loads B, wherever it stands
(module level, inside a function, under ``try``), since a function-level import only hides a
cycle, it does not remove it. Resolution:

* relative imports are made absolute against A's package;
* ``import a.b.c`` is an edge to ``a.b.c`` (the deepest tfdpfair module it names);
* ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``;
* ``importlib.import_module("literal")`` counts like ``import literal``.

Not edges: the parent packages that Python initialises on the way to a submodule (otherwise
every package ``__init__`` that re-exports its submodules would form a cycle with each of them),
imports under ``if TYPE_CHECKING:`` (never executed), and module names held as strings in lazy
tables (``tfdpfair/__init__._LAZY``, ``_keras_registration.REGISTERED_CLASSES``): those modules
load on attribute access or at ``load_model`` time, after every import has finished, which is
the point of the tables (``import tfdpfair`` must not load TensorFlow). Package ``__init__``
files that import their submodules eagerly (``tfdpfair/models/__init__.py``) are ordinary nodes.

Any cycle fails the test and is printed as a path. Runs in well under a second: nothing is
imported, the files are only parsed.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "tfdpfair"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_files() -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else (
                test.attr if isinstance(test, ast.Attribute) else None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imported_names(module: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) for everything ``module`` imports; ``from pkg import name``
    gives ``pkg.name`` (resolved to a module or to ``pkg`` by the caller)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = module if _is_package(path) else module.rpartition(".")[0]
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.extend((f"{stem}.{alias.name}", node.lineno) for alias in node.names
                         if alias.name != "*")
            if any(alias.name == "*" for alias in node.names):
                names.append((stem, node.lineno))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name)
                       and node.func.id in ("import_module", "__import__")))):
            names.append((node.args[0].value, node.lineno))
    return names


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The deepest module of ``modules`` that ``name`` (or a prefix of it) names, or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, list[tuple[str, int]]]]:
    """(edges: importer -> {imported: line}, every raw imported name per module)."""
    modules = _module_files()
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    raw: dict[str, list[tuple[str, int]]] = {}
    for module, path in modules.items():
        raw[module] = _imported_names(module, path)
        for name, line in raw[module]:
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            target = _resolve(name, modules)
            if target is not None and target != module:
                edges[module].setdefault(target, line)
    return edges, raw


def strongly_connected_components(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); only components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(edges[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _a_cycle(component: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """One cycle through the component's first module (breadth-first, so a shortest one)."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(edges[node]):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if succ in members and succ not in parent:
                    parent[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle found in {component}")


def _describe(cycle: list[str], edges: dict[str, dict[str, int]]) -> str:
    hops = [f"{a} (line {edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(hops + [cycle[-1]])


def test_graph_sees_known_edges():
    """The walker resolves the kinds of import the package uses (guards against a test that
    passes because it sees nothing)."""
    edges, _ = import_graph()
    assert "tfdpfair.privacy.calibration" in edges["tfdpfair.privacy.accounting"]  # from-import
    assert "tfdpfair.models.nfnet" in edges["tfdpfair.models.pretrained"]  # from pkg import mod
    assert "tfdpfair.models.nfnet" in edges["tfdpfair.models.registry"]  # function-level
    assert "tfdpfair.models.finetune" in edges["tfdpfair.models"]  # package __init__
    assert "tfdpfair._keras_registration" in edges["tfdpfair"]
    assert sum(map(len, edges.values())) > 100


def test_no_import_cycles():
    edges, _ = import_graph()
    cycles = [_describe(_a_cycle(c, edges), edges) for c in strongly_connected_components(edges)]
    assert not cycles, (
        "import cycles in tfdpfair (move the shared names into a module both sides import; "
        "a function-level import does not break a cycle):\n  " + "\n  ".join(cycles))


def test_library_never_imports_experiments():
    _, raw = import_graph()
    offenders = [f"{module} (line {line}): {name}" for module, names in sorted(raw.items())
                 for name, line in names
                 if name == "experiments" or name.startswith("experiments.")]
    assert not offenders, "tfdpfair imports the binaries:\n  " + "\n  ".join(offenders)
