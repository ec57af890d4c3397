"""The house's layers: every import points down, and no import circle exists.

The rules are the `Imports:` line of each package's docstring (pipelines/platform, data,
training, evaluation and cmd_model): a module may import its own package and the packages
named there, nothing else of this project. pipelines.demo and pipelines.retrain (workflows) may
import every sub-package; jobs/ may import anything; nothing imports jobs/. Function-level
imports count too: an import moved into a function still makes a circle.
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ["cmd_model", "pipelines.platform", "pipelines.data", "pipelines.training", "pipelines.evaluation"]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for top in ("pipelines", "cmd_model", "jobs") for p in (ROOT / top).rglob("*.py")}


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import sub` is an edge to pkg.sub when sub is a module)."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def package_of(module: str) -> str:
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    if module.startswith("jobs"):
        return "jobs"
    return "pipelines"  # the package itself and its workflows (demo, retrain)


def allowed_imports() -> dict[str, set[str]]:
    """Package -> the packages its docstring's `Imports:` line names (the package itself always)."""
    rules = {}
    for package in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text())) or ""
        line = re.search(r"^Imports:(.*)$", doc, re.M)
        assert line, f"{package}/__init__.py's docstring has no `Imports:` line"
        rules[package] = {package} | {p for p in re.findall(r"[\w.]+", line.group(1)) if p in PACKAGES}
    rules["pipelines"] = {"pipelines", *PACKAGES}
    rules["jobs"] = {"jobs", "pipelines", *PACKAGES}
    return rules


def upward_imports(graph: dict[str, set[str]], rules: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if package_of(target) not in rules[package_of(module)]
    )


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down():
    graph = import_graph(project_modules())
    assert upward_imports(graph, allowed_imports()) == []


def test_no_import_circle():
    assert circles(import_graph(project_modules())) == []


def test_the_checks_catch_an_upward_arrow_and_a_circle():
    """The ablation: add one bad edge to the real graph and each check must report it."""
    graph = import_graph(project_modules())
    rules = allowed_imports()
    graph["pipelines.platform.storage"] = graph["pipelines.platform.storage"] | {"pipelines.training.config"}
    assert upward_imports(graph, rules) == ["pipelines.platform.storage -> pipelines.training.config"]
    graph["pipelines.data.latent_encoder"] = graph["pipelines.data.latent_encoder"] | {"pipelines.data.precompute"}
    assert ["pipelines.data.latent_encoder", "pipelines.data.precompute"] in circles(graph)


def test_every_package_says_what_it_holds():
    for package in [*PACKAGES, "pipelines", "pipelines.data.video"]:
        doc = ast.get_docstring(ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text()))
        assert doc and len(doc.split()) > 10, f"{package} has no docstring saying what it holds"
