"""The README's module map lists exactly the package's modules, and the package's imports point down:
no cycles, and only the CLI imports the report (the top of the house)."""

import pkgutil
import re
from pathlib import Path

import sequnlearn

README = Path(__file__).parents[1] / "README.md"


def _documented() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"^\| `([a-z_.]+)` \|", section, flags=re.M))
    for line in section.splitlines():  # the toyworld row names its modules in its text
        if line.startswith("| `toyworld` |"):
            names |= {f"toyworld.{m}" for m in re.findall(r"`([a-z_]+)`", line.split("|")[2])}
    return names


def _modules() -> set[str]:
    found = set()
    root = Path(sequnlearn.__file__).parent
    for info in pkgutil.walk_packages(sequnlearn.__path__, prefix="sequnlearn."):
        name = info.name.removeprefix("sequnlearn.")
        init = root.joinpath(*name.split("."), "__init__.py")
        if name == "__main__" or (info.ispkg and not init.read_text(encoding="utf-8").strip()):
            continue  # an empty package marker is no module to describe
        found.add(name)
    return found


def test_readme_module_map_matches_the_package():
    documented, actual = _documented(), _modules()
    assert actual - documented == set(), f"modules missing from the README's map: {sorted(actual - documented)}"
    assert documented - actual == set(), f"README lists modules that do not exist: {sorted(documented - actual)}"


def _module_files() -> dict[str, Path]:
    """``sequnlearn.X`` → its source file, for every module and package ``__init__`` of the package."""
    root = Path(sequnlearn.__file__).parent
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(("sequnlearn", *(parts[:-1] if parts[-1] == "__init__" else parts)))
        files[name] = path
    return files


def _import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports, at module level or inside a function (``ast``, not run).

    ``from sequnlearn.pkg import name`` counts as importing ``sequnlearn.pkg.name`` when that is a module,
    else ``sequnlearn.pkg``; relative imports are resolved against the importing module.
    """
    import ast

    files = _module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # ``import sequnlearn.x.y`` of a name: its module
                    target = target.rpartition(".")[0]
                if target.startswith("sequnlearn") and target not in ("sequnlearn", name):
                    edges.add(target)
        if path.name == "__init__.py" and "def __getattr__(" in path.read_text(encoding="utf-8"):
            edges |= {m for m in files if m.startswith(name + ".")}  # names loaded on first use (tamper)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: one path per strongly connected component of more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_import_graph_has_no_cycles():
    cycles = _cycles(_import_graph())
    assert cycles == [], f"modules that import each other (directly or through others): {cycles}"


def test_only_the_cli_imports_the_report():
    importers = sorted(m for m, edges in _import_graph().items() if "sequnlearn.report" in edges)
    assert importers == ["sequnlearn.cli"], f"sequnlearn.report is the top of the house; imported by {importers}"


def test_the_import_graph_sees_function_local_imports():
    graph = _import_graph()
    assert "sequnlearn.report" in graph["sequnlearn.cli"]  # imported inside a function, to keep --help fast
    assert {"sequnlearn.tamper.result", "sequnlearn.training"} <= graph["sequnlearn.tamper.attacks"]
    assert "sequnlearn.tamper.attacks" in graph["sequnlearn.tamper"]  # loaded by name in its __getattr__
