"""The set-up a newcomer and CI get: pinned installs from the constraints files, the newest releases in
their own venv, every environment in CI, and a README that names the versions the suite passed with."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
COMPAT_CONSTRAINTS = ROOT / "requirements" / "constraints-tf446.txt"


def pinned(path: Path) -> dict[str, str]:
    """{distribution (lower case): version} of a `pip freeze` file."""
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_ci_runs_lint_and_all_three_environments_and_stops_on_failure():
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    steps = [line.strip() for line in script.splitlines() if line.startswith("make ")]
    assert steps == ["make lint", "make test", "make test-compat", "make test-latest"]


def test_make_installs_from_the_constraints_files():
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS ?= requirements/constraints.txt" in makefile
    assert "COMPAT_CONSTRAINTS ?= requirements/constraints-tf446.txt" in makefile
    assert "$(call venv,$(VENV),-c $(CONSTRAINTS))" in makefile
    assert "$(call venv,$(COMPAT_VENV),-c $(COMPAT_CONSTRAINTS)," in makefile
    latest = makefile[makefile.index("\ntest-latest:"):].split("\n\n")[0]
    assert "$(call venv,$(LATEST_VENV),--upgrade --upgrade-strategy eager)" in latest  # no constraints


def test_constraints_pin_every_dependency_exactly():
    for path, transformers_major in ((CONSTRAINTS, "5"), (COMPAT_CONSTRAINTS, "4.46")):
        pins = pinned(path)
        required = {"torch", "transformers", "tokenizers", "numpy", "safetensors", "triton", "pytest", "setuptools"}
        assert required <= set(pins), f"{path.name} misses {required - set(pins)}"
        assert pins["transformers"].startswith(transformers_major)
        assert pins["torch"].split("+")[0] == "2.13.0"  # the CPU build on local disk
        assert "alphaedit-fast" not in pins


def test_readme_names_the_tested_versions():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Tested versions"):]
    section = section[: section.index("\n## ") if "\n## " in section else None]
    latest, compat = pinned(CONSTRAINTS), pinned(COMPAT_CONSTRAINTS)
    assert f"torch {latest['torch'].split('+')[0]}" in section
    assert re.search(rf"transformers {re.escape(compat['transformers'])}\b", section)
    assert re.search(rf"transformers {re.escape(latest['transformers'])}\b", section)
