"""The import graph of ``ldm/``: no cycles, no imports of a higher layer, and no private names borrowed across packages.

The graph is built statically: every ``ldm/**/*.py`` is parsed with ``ast``; nothing is imported.  Last,
scripts' usage errors run in subprocesses, which must not have imported a library that takes seconds to import (:data:`HEAVY`).

Rules, written once here:

- **Edges.** ``import ldm.a.b``, ``from ldm.a import b`` and relative imports (``from . import x``,
  ``from ..a import y``) that resolve to an ``ldm`` module, wherever they stand: at module level, inside functions,
  methods, ``try`` blocks and conditionals. A lazy import defers the cost, not the dependency, so it counts.
  Imports inside an ``if TYPE_CHECKING:`` block are ignored: they never run.
- **Targets.** ``from ldm.pkg import name`` points at the submodule ``ldm.pkg.name`` when that module exists, else at
  ``ldm.pkg`` (its ``__init__``). ``import ldm.a.b`` points at ``ldm.a.b`` only; the parent packages it also runs are
  not edges (a package ``__init__`` that re-exports its submodules would otherwise be a cycle with each of them).
- **Cycles** are the strongly connected components of more than one module, and modules that import themselves.
- **Layers.** A package imports only from its own layer or the layers below it (top to bottom): ``ldm.app``;
  ``ldm.refine``, ``ldm.eval``, ``ldm.train``, ``ldm.convert`` (``checkpoint_to_diffusers`` loads with
  ``load_expert``); ``ldm.models``; ``ldm.sampling``, ``ldm.modules``; ``ldm.data``, ``ldm.imageio``; ``ldm.util``,
  ``ldm.checkpoint``, ``ldm.windows``.  Packages of one layer may import each other where no cycle forms.  The other
  top-level modules (``ldm.cli``, ``ldm.untrusted``, ...) are not placed and not checked.
- **Private names.** A name starting with one underscore (dunders are public) may be imported only from a module in
  the importer's own top-level package: ``ldm.a.x`` may take ``_f`` from ``ldm.a.y`` or ``ldm.a.sub.z``, not from
  ``ldm.b.y``. Top-level modules (``ldm/util.py``) are each a package of their own. The same holds for private
  modules (``from ldm.b import _mod``) and for ``_f`` read as an attribute of an imported ``ldm`` module
  (``import ldm.b.y as y; y._f``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ldm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST):
    """Every node under ``node``, skipping the bodies of ``if TYPE_CHECKING:`` (their ``else`` still runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield stmt
                yield from _walk(stmt)
            continue
        yield child
        yield from _walk(child)


def _area(module: str) -> str:
    """The top-level package a module belongs to: ``ldm.refine.loading`` -> ``ldm.refine``; ``ldm.util`` -> itself."""
    return ".".join(module.split(".")[:2])


LAYERS = (  # top to bottom; see the module docstring
    ("ldm.app",),
    ("ldm.refine", "ldm.eval", "ldm.train", "ldm.convert"),
    ("ldm.models",),
    ("ldm.sampling", "ldm.modules"),
    ("ldm.data", "ldm.imageio"),
    ("ldm.util", "ldm.checkpoint", "ldm.windows"),
)
_DEPTH = {area: depth for depth, areas in enumerate(LAYERS) for area in areas}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Imports:
    """The ``ldm`` modules one module imports, with line numbers, and the private names it takes from them."""

    def __init__(self, module: str, path: Path, modules: dict[str, Path]):
        self.module = module
        self.modules = modules
        self.is_package = path.name == "__init__.py"
        self.edges: dict[str, int] = {}  # target module -> first line
        self.private: list[tuple[int, str, str]] = []  # (line, target module, name)
        aliases: dict[str, str] = {}  # local name bound to an ldm module -> that module
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = self._existing(alias.name)
                    if target is None:
                        continue
                    self._edge(target, node.lineno)
                    self._check_dotted(alias.name, node.lineno)
                    if alias.asname:
                        aliases[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                base = self._resolve_from(node)
                if base is None or not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                    continue
                self._check_dotted(base, node.lineno)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if alias.name != "*" and sub in modules:
                        self._edge(sub, node.lineno)
                        aliases[alias.asname or alias.name] = sub
                        if _is_private(alias.name):
                            self._note_private(node.lineno, base, alias.name)
                    else:
                        target = self._existing(base)
                        if target is None:
                            continue
                        self._edge(target, node.lineno)
                        if _is_private(alias.name):
                            self._note_private(node.lineno, target, alias.name)
        for node in _walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _is_private(node.attr)
            ):
                self._note_private(node.lineno, aliases[node.value.id], node.attr)

    def _existing(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is an ``ldm`` module (``ldm.a.b.func`` -> ``ldm.a.b``)."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.modules:
                return candidate
        return None

    def _resolve_from(self, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
        if node.level - 1 > len(package):
            return None
        base = package[: len(package) - (node.level - 1)]
        if node.module:
            base = [*base, *node.module.split(".")]
        return ".".join(base)

    def _edge(self, target: str, line: int) -> None:
        self.edges.setdefault(target, line)

    def _check_dotted(self, dotted: str, line: int) -> None:
        """``import ldm.b._mod`` / ``from ldm.b._mod import f``: a private module on the way."""
        parts = dotted.split(".")
        for i, part in enumerate(parts[1:], start=1):
            if _is_private(part):
                self._note_private(line, ".".join(parts[:i]), part)
                return

    def _note_private(self, line: int, target: str, name: str) -> None:
        if _area(target) != _area(self.module):
            self.private.append((line, target, name))


def _graph() -> tuple[dict[str, dict[str, int]], dict[str, _Imports]]:
    modules = _modules()
    imports = {name: _Imports(name, path, modules) for name, path in modules.items()}
    return {name: imp.edges for name, imp in imports.items()}, imports


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in a stable order, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
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
                components.append(sorted(component))
    return sorted(components)


def _cycle_in(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """One concrete cycle through the component's first module, found by breadth-first search."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    return [start, start]


def _describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        where = modules[a].relative_to(ROOT)
        steps.append(f"    {a} -> {b}  ({where}:{graph[a][b]})")
    return "\n".join(steps)


def import_cycles() -> list[str]:
    """A readable description of each cycle, empty when there is none."""
    graph, _ = _graph()
    modules = _modules()
    found = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            header = f"cycle among {len(component)} modules: {', '.join(component)}"
            found.append(f"{header}\n{_describe(_cycle_in(component, graph), graph, modules)}")
        elif component[0] in graph[component[0]]:
            name = component[0]
            found.append(f"{name} imports itself ({modules[name].relative_to(ROOT)}:{graph[name][name]})")
    return found


def private_imports() -> list[str]:
    """Each private name one top-level package takes from another."""
    _, imports = _graph()
    modules = _modules()
    found = []
    for name, imp in sorted(imports.items()):
        for line, target, private in imp.private:
            found.append(f"{modules[name].relative_to(ROOT)}:{line}: {name} uses {private} from {target}")
    return found


def upward_imports() -> list[str]:
    """Each import of a higher layer's module (a smaller depth in :data:`LAYERS`)."""
    graph, _ = _graph()
    modules = _modules()
    found = []
    for name, targets in sorted(graph.items()):
        own = _DEPTH.get(_area(name))
        for target, line in sorted(targets.items()):
            other = _DEPTH.get(_area(target))
            if own is not None and other is not None and other < own:
                found.append(f"{modules[name].relative_to(ROOT)}:{line}: {name} ({_area(name)}) imports {target}")
    return found


def test_the_graph_sees_the_package():
    graph, _ = _graph()
    assert len(graph) > 50, sorted(graph)
    # A known edge of each kind: absolute, and a lazy import inside a function.
    assert "ldm.sampling.loop" in graph["ldm.sampling"]
    assert any(target.startswith("ldm.") for target in graph["ldm.refine.refiner"])


def test_no_import_cycles_in_ldm():
    cycles = import_cycles()
    assert not cycles, "import cycles in ldm/ (break each by moving the shared piece to the lower layer):\n" + "\n".join(cycles)


def test_no_private_names_across_ldm_packages():
    found = private_imports()
    assert not found, "private names imported across ldm packages (make them public, or move them):\n" + "\n".join(found)


def test_lower_layers_do_not_import_higher_ones():
    found = upward_imports()
    assert not found, "imports of a higher layer (move the shared piece down; layers in tests/test_imports.py):\n" + (
        "\n".join(found)
    )


def test_the_checks_find_what_they_are_for(tmp_path, monkeypatch):
    """A planted cycle (lazy and relative), a self-import, a borrowed private name and an upward import are all
    reported; an import under ``if TYPE_CHECKING:`` is not."""
    package = tmp_path / PACKAGE
    (package / "a").mkdir(parents=True)
    (package / "b").mkdir()
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("from .x import f\n")
    (package / "a" / "x.py").write_text("def f():\n    from ldm.b import y\n    return y\n")
    (package / "a" / "z.py").write_text("from ldm.a import _helper\nimport ldm.a.z\n")
    (package / "b" / "__init__.py").write_text("")
    (package / "b" / "y.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..a import x\n"
        "from ldm.a.x import _g\n"
        "if TYPE_CHECKING:\n"
        "    from ldm.a.z import _typed\n"
    )
    (package / "models").mkdir()
    (package / "sampling").mkdir()
    (package / "models" / "__init__.py").write_text("import ldm.sampling.steps\n")
    (package / "sampling" / "__init__.py").write_text("")
    (package / "sampling" / "steps.py").write_text("def step():\n    from ldm.models import Model\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    cycles = import_cycles()
    private = private_imports()
    upward = upward_imports()
    assert any("ldm.a.x" in c and "ldm.b.y" in c for c in cycles), cycles
    assert any("ldm.a.z imports itself" in c for c in cycles), cycles
    assert private == ["ldm/b/y.py:3: ldm.b.y uses _g from ldm.a.x"], private
    assert upward == ["ldm/sampling/steps.py:2: ldm.sampling.steps (ldm.sampling) imports ldm.models"], upward
    assert any(c.startswith("cycle among 2 modules: ldm.models, ldm.sampling.steps") for c in cycles), cycles


# ---------------------------------------------------------------------------------------------------------------------
# what a usage error pays for: a script that refuses its arguments must not first import a library that takes seconds
# (torchmetrics pulls in transformers, torchvision's models and dynamo; a quick start typo waited 10 s for its one line)

HEAVY = ("torchmetrics", "pytorch_lightning", "transformers", "diffusers")
IMPORTS_AFTER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    print("exit", exc.code, sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "argv, status",
    [
        (["scripts/quickstart.py", "--outdir", "{tmp}", "--start-t", "1000"], 2),
        (["scripts/quickstart.py", "--outdir", "{tmp}", "--degradations", "jpg"], 2),
        (["scripts/degrade.py", "--input", "{tmp}", "--output", "{tmp}/out", "--degradation", "jpg"], 2),
        (["scripts/evaluate.py", "--help"], 0),
    ],
)
def test_usage_errors_import_no_heavy_library(argv, status, tmp_path):
    code = IMPORTS_AFTER.format(heavy=HEAVY)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == f"exit {status} []", proc.stdout[-2000:] + proc.stderr[-2000:]
