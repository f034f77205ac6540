"""The source tree never shadows a dependency: nothing in the repository root is importable under
a top-level name an installed distribution provides (transformers 5.x imports the hub package
`kernels`; the Triton kernels' folder `kernels/` once won that import from the repository root).
And the package stays layered: nothing imports the command line, and no import circles."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def installed_top_level_names() -> dict[str, str]:
    """Top-level import name -> distribution, for every installed distribution but ours."""
    names = {}
    for dist in importlib.metadata.distributions():
        project = dist.metadata["Name"] or ""
        if project.lower().replace("_", "-") == "alphaedit-fast":
            continue
        top_level = dist.read_text("top_level.txt")
        candidates = top_level.split() if top_level else []
        for file in dist.files or []:
            parts = Path(file).parts
            if len(parts) > 1 and parts[-1] == "__init__.py" and not parts[0].endswith((".dist-info", ".data")):
                candidates.append(parts[0])
        for name in candidates:
            names.setdefault(name, project)
    return names


def test_no_root_package_shadows_a_dependency():
    regular = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a plain folder (no __init__.py)"
    shadowing = {name: dist for name, dist in installed_top_level_names().items() if name in regular}
    assert not shadowing, f"repository folders shadow installed packages: {shadowing}"
    assert "kernels" not in regular


def test_kernels_reach_the_package_only_as_alphaedit_fast_kernels():
    from alphaedit_fast.kernels import aot

    assert Path(aot.__file__).resolve().parent == (ROOT / "kernels").resolve()


def run_in_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def hub_kernels():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the hub package `kernels` is not installed (transformers < 5 does not need it)")


def test_hub_kernels_imports_from_the_repository_root(hub_kernels):
    proc = run_in_root("-c", "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert "site-packages" in proc.stdout, proc.stdout


def test_python_m_cli_runs_from_the_repository_root(hub_kernels):
    proc = run_in_root("-m", "alphaedit_fast.cli", "demo", "--tiny", "llama")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "p after" in proc.stdout


PACKAGE = ROOT / "alphaedit_fast"


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (its Triton kernels' folder excluded: a
    link to the repository's kernels/, no module of it imports the package)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[1] == "kernels":
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def bound_names(path: Path) -> set[str]:
    """The names a module binds at its top level (definitions, assignments, imports)."""
    names = set()

    def visit(node) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).partition(".")[0] for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    """The package's modules that `name` imports; `top_level_only`: only the imports that run when
    the module is imported (not those inside functions, nor under `if TYPE_CHECKING:`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def resolve(target: str) -> None:
        while target and target not in modules:  # `from .x import y`: y a name in module x
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    def visit(node) -> None:
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if top_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from . import x`: x may be a module of its own
                if f"{source}.{alias.name}" in modules:
                    resolve(f"{source}.{alias.name}")
                elif source not in modules or alias.name in bound_names(modules[source]):
                    resolve(source)
                # else a compiled submodule (`from . import _C`): no module of the package runs
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    found.discard(name)
    return found


def test_nothing_imports_the_command_line():
    """`cli` is the top of the package: the fact world, the engine and the helpers never import from
    it (what commands share, such as `run_reporting_errors`, lives lower down)."""
    modules = package_modules()
    assert "alphaedit_fast.cli" in modules
    importers = sorted(name for name, path in modules.items() if name != "alphaedit_fast.cli"
                       and "alphaedit_fast.cli" in imports_of(name, path, modules, top_level_only=False))
    assert not importers, f"these modules import from alphaedit_fast.cli: {importers}"


def test_the_module_level_import_graph_has_no_cycle():
    """No module imports (at import time) a module that imports it back, directly or through
    others: every module can be imported first, and the layers of DESIGN.md stay layers."""
    modules = package_modules()
    graph = {name: imports_of(name, path, modules, top_level_only=True) for name, path in modules.items()}
    state: dict[str, str] = {}  # "open" on the current path, "done" once every import is explored
    stack: list[str] = []
    cycles = []

    def explore(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                explore(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            explore(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_two_modules_import_each_other():
    """Not even inside functions: a lazy import that answers an import at the top of the other module
    is a circle that only moves (what both need belongs in one of them, or lower)."""
    modules = package_modules()
    graph = {name: imports_of(name, path, modules, top_level_only=False) for name, path in modules.items()}
    mutual = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())})
    assert not mutual, f"modules importing each other: {mutual}"


def test_the_import_graph_sees_relative_imports():
    """The two tests above parse what they check: a known import and a known function-level one."""
    modules = package_modules()
    top = imports_of("alphaedit_fast.loading", modules["alphaedit_fast.loading"], modules, top_level_only=True)
    assert {"alphaedit_fast.checkpoints", "alphaedit_fast.errors"} <= top
    everywhere = imports_of("alphaedit_fast.demo", modules["alphaedit_fast.demo"], modules, top_level_only=False)
    assert {"alphaedit_fast.stats", "alphaedit_fast.factworld", "alphaedit_fast.factworld.editing"} <= everywhere
    assert "alphaedit_fast.stats" not in imports_of("alphaedit_fast.demo", modules["alphaedit_fast.demo"], modules,
                                                    top_level_only=True)
