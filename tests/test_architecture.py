"""The shape of the package itself: no import cycles between nnxprune modules, no module over
450 lines and no function over 80 lines.

The import graph is read from the source with `ast`, so imports hidden inside functions count
as much as module-level ones: a cycle that only works because one side imports lazily is still a
cycle. Modules are nodes (`nnxprune.graph` is `nnxprune/graph/__init__.py`); an import of
`nnxprune.a.b` is an edge to `nnxprune.a.b` and to the packages it runs on the way
(`nnxprune.a`), except the importer's own enclosing packages, which are already importing. So a
package whose `__init__` imports its submodules, and a submodule importing a sibling
(`from nnxprune.graph.groups import ...` in `nnxprune/graph/surgery.py`), are not cycles, while a
submodule importing a name from its own package (`from nnxprune.graph import x`, which needs
`__init__` to have run) is one when that `__init__` imports the submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "nnxprune"
PACKAGE = "nnxprune"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


def _ancestors(name: str) -> list[str]:
    """`a.b.c` -> `["a", "a.b"]`."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, modules: dict[str, Path],
               package: str = PACKAGE) -> list[tuple[str, int]]:
    """`(imported module, line)` for every import of a `package` module anywhere in the file."""
    is_package = path.name == "__init__.py"
    inside = set(_ancestors(module)) | {module}  # packages already importing when `module` runs
    edges: list[tuple[str, int]] = []

    def add(target: str, line: int, *, named: bool = True) -> None:
        if named and target in modules:
            edges.append((target, line))
        for parent in _ancestors(target):  # packages the import runs on the way
            if parent in modules and parent not in inside:
                edges.append((parent, line))

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(module, is_package, node.level, node.module)
                      if node.level else node.module or "")
            if source != package and not source.startswith(package + "."):
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in modules]
            for sub in submodules:
                add(sub, node.lineno)
            # Names that are not submodules are read from `source` itself, which must have run
            # (a package importing its own submodules, `from nnxprune import graph` in
            # nnxprune/__init__.py, is not a self-import).
            needs_source = len(submodules) < len(names) or not submodules
            add(source, node.lineno, named=needs_source and source != module)
    return edges


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, list[int]]]:
    """module -> {imported module -> lines}, over every module under `root`."""
    modules = module_files(root, package)
    graph: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    for module, path in modules.items():
        for target, line in imports_of(module, path, modules, package):
            graph[module].setdefault(target, []).append(line)
    return graph


def strongly_connected(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycles(graph: dict[str, dict[str, list[int]]]) -> list[str]:
    """One line per cycle: the modules of each strongly connected component with more than one
    module (or importing itself), and the imports between them (`a:12 -> b`)."""
    found = []
    for component in strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        edges = [f"{a}:{','.join(map(str, lines))} -> {b}" for a in component
                 for b, lines in sorted(graph[a].items()) if b in members]
        found.append(f"{', '.join(component)}  [{'; '.join(edges)}]")
    return found


def size_offenders(root: Path = ROOT, package: str = PACKAGE) -> tuple[list[str], list[str]]:
    """Modules over MAX_MODULE_LINES and functions / methods over MAX_FUNCTION_LINES."""
    long_modules, long_functions = [], []
    for module, path in module_files(root, package).items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(root.parent)}: {lines} lines")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(root.parent)}:{node.lineno} "
                                          f"{node.name}: {length} lines")
    return long_modules, long_functions


# -- the rules on nnxprune itself -----------------------------------------------------------------
def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles inside nnxprune/:\n  " + "\n  ".join(found)


def test_runner_is_imported_only_by_the_cli_and_the_package():
    importers = sorted(m for m, targets in import_graph().items() if "nnxprune.runner" in targets)
    assert importers == ["nnxprune", "nnxprune.cli"]


def test_module_lengths():
    long_modules, _ = size_offenders()
    assert not long_modules, (f"modules over {MAX_MODULE_LINES} lines:\n  "
                              + "\n  ".join(long_modules))


def test_function_lengths():
    _, long_functions = size_offenders()
    assert not long_functions, (f"functions over {MAX_FUNCTION_LINES} lines:\n  "
                                + "\n  ".join(long_functions))


# -- the checker itself, on a small package written here -------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files", [
    {"a/__init__.py": "from pkg.a.x import f\nfrom pkg.a import y\n",  # package -> its modules
     "a/x.py": "from pkg.a.y import g\n", "a/y.py": "def g(): pass\n"},  # sibling import
    {"__init__.py": "from pkg import a\n", "a.py": "def f():\n    from pkg.b import g\n",
     "b.py": "import pkg.c\n", "c.py": ""},
])
def test_no_cycle_found_where_there_is_none(tmp_path, files):
    assert cycles(import_graph(_package(tmp_path, files), "pkg")) == []


@pytest.mark.parametrize("files, members", [
    ({"a.py": "from pkg.b import f\n", "b.py": "def f():\n    from pkg.a import g\n"},
     "pkg.a, pkg.b"),  # hidden in a function: still a cycle
    ({"a.py": "import pkg.b.x\n", "b/__init__.py": "from pkg.b.x import f\n",
      "b/x.py": "def f():\n    import pkg.a\n"}, "pkg.a, pkg.b, pkg.b.x"),
    ({"g/__init__.py": "from pkg.g.s import f\nh = 1\n", "g/s.py": "from pkg.g import h\n"},
     "pkg.g, pkg.g.s"),  # a submodule reading its own package's __init__
    ({"a.py": "from pkg import b\n", "b.py": "from pkg import a\n"}, "pkg.a, pkg.b"),
    ({"a.py": "def f():\n    import pkg.a\n"}, "pkg.a"),  # a self-import
])
def test_cycles_are_found_and_named(tmp_path, files, members):
    found = cycles(import_graph(_package(tmp_path, files), "pkg"))
    assert len(found) == 1 and found[0].startswith(members + "  ["), found


def test_sizes_are_measured(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    root = _package(tmp_path, {"m.py": f"def long():\n{body}\n\ndef short():\n    pass\n",
                               "big.py": "x = 1\n" * (MAX_MODULE_LINES + 1)})
    long_modules, long_functions = size_offenders(root, "pkg")
    assert long_modules == [f"pkg/big.py: {MAX_MODULE_LINES + 1} lines"]
    assert long_functions == [f"pkg/m.py:1 long: {MAX_FUNCTION_LINES + 1} lines"]
