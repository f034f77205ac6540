"""The source tree never shadows a dependency: nothing in the repository root is importable under
a top-level name an installed distribution provides (transformers 5.x imports the hub package
`kernels`; the Triton kernels' folder `kernels/` once won that import from the repository root)."""

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
