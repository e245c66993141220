"""The layering rule (docs/architecture.md): ``curate`` and ``align`` never import each other, and the shared
layer ``tether`` imports neither. Every import statement counts, including the lazy ones inside functions and
``importlib.import_module("...")`` calls with a literal name. And no module of the tree imports itself back
through others (no import circles, lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"curate": {"align"}, "align": {"curate"}, "tether": {"curate", "align"}}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_packages(path):
            if module.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_do_not_import_each_other(package):
    assert violations(package) == []


def test_checker_sees_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from align.model import X\n    import importlib\n"
                   "    importlib.import_module('curate.match')\n")
    assert [m for _, m in imported_packages(src)] == ["align.model", "importlib", "curate.match"]


def module_graph(root: Path = ROOT, packages=("curate", "align", "tether")) -> dict[str, set[str]]:
    """module → the tree's modules it imports (absolute, relative and literal ``import_module`` names; an imported
    name that is a submodule counts as that submodule)."""
    mods = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        package = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])
                                ) if node.level else (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
                  == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]
            for n in names:
                r = resolve(n)
                if r and r != m:
                    graph[m].add(r)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circles_in_the_tree():
    assert import_cycles(module_graph()) == []


def test_cycle_checker_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "curate"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from curate.c import g\n")
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('curate.a')\n")
    (pkg / "d.py").write_text("from curate import a\n")
    g = module_graph(tmp_path, ("curate",))
    assert g["curate.d"] == {"curate", "curate.a"}  # the package runs too
    assert import_cycles(g) == [["curate.a", "curate.b", "curate.c"]]


# curate's own layers, bottom first (docs/architecture.md): a module may import its own layer and the ones below,
# never one above — the stage modules do not reach the runner, the runner not the programs. Every module of
# curate must be listed, so a new one takes its place explicitly.
CURATE_LAYERS = [
    ("leaves", {"curate", "curate.stages", "curate.reasons", "curate.urlpolicy", "curate.langid", "curate.wordnet",
                "curate.report", "curate.match.semantic", "curate.serve.common", "curate.serve.render"}),
    ("storage", {"curate.catalog", "curate.fetch", "curate.imagestore"}),
    ("plan", {"curate.plan", "curate.judge", "curate.i2d", "curate.hfdataset"}),
    ("stages", {"curate.sources", "curate.filters", "curate.dedup", "curate.concepts", "curate.match",
                "curate.match.lexical", "curate.balance", "curate.selection", "curate.download", "curate.imagededup",
                "curate.agreement", "curate.shards", "curate.card"}),
    ("media plan", {"curate.media"}),
    ("recipe", {"curate.config"}),
    ("build", {"curate.pipeline"}),
    ("programs", {"curate.cli", "curate.__main__", "curate.serve", "curate.serve.app", "curate.serve.cli",
                  "curate.serve.explorer", "curate.serve.models", "curate.serve.summary"}),
]


def upward_imports(graph: dict[str, set[str]], layers=CURATE_LAYERS) -> list[str]:
    rank = {m: i for i, (_, mods) in enumerate(layers) for m in mods}
    bad = [f"{m}: not in a layer" for m in sorted(graph) if m.split(".")[0] == "curate" and m not in rank]
    for m in sorted(rank):
        for dep in sorted(graph.get(m, ())):
            if dep in rank and rank[dep] > rank[m]:
                bad.append(f"{m} ({layers[rank[m]][0]}) imports {dep} ({layers[rank[dep]][0]})")
    return bad


def test_curate_has_no_upward_import():
    assert upward_imports(module_graph()) == []


def test_upward_checker_sees_an_upward_and_an_unlisted_module():
    graph = {"curate.catalog": {"curate.pipeline"}, "curate.pipeline": {"curate.catalog"}, "curate.new": set()}
    layers = [("low", {"curate.catalog"}), ("high", {"curate.pipeline"})]
    assert upward_imports(graph, layers) == ["curate.new: not in a layer",
                                             "curate.catalog (low) imports curate.pipeline (high)"]
