"""The README's code blocks run as written: every ```python and ```bash block, in order, in one
fresh directory (later blocks use the files earlier ones write), on the shipped model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


SET_UP = "# set-up, in the clone's root (tests/test_readme.py does not run this block)"


def blocks() -> list[tuple[str, str]]:
    return [(lang, code) for lang, code in FENCE.findall(README.read_text(encoding="utf-8"))]


def runnable_blocks() -> list[tuple[str, str]]:
    """Every block but the set-up one (make install and activating the venv: the suite runs inside it)."""
    return [(lang, code) for lang, code in blocks() if not code.startswith(SET_UP)]


def test_every_block_is_python_or_bash():
    found = blocks()
    assert len(found) >= 7
    assert {lang for lang, _ in found} == {"python", "bash"}  # no block is left out as "text"


def test_the_set_up_block_comes_first_and_installs_and_activates():
    lang, code = blocks()[0]
    assert lang == "bash" and code.startswith(SET_UP)
    assert code.splitlines()[1:3] == ["make install",
                                      "source .venv/bin/activate          # puts alphaedit-fast on PATH in this shell"]
    assert len(runnable_blocks()) == len(blocks()) - 1


@pytest.mark.skipif(not (Path(sys.executable).parent / "alphaedit-fast").exists(),
                    reason="the alphaedit-fast script is not installed next to this Python")
def test_readme_blocks_run_in_order(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    for index, (lang, code) in enumerate(runnable_blocks()):
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README block {index} ({lang}) failed:\n{code}\n{result.stderr[-3000:]}"
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "edited2" / "config.json").is_file()
    # run in the clone's root, the examples leave nothing git would list as untracked
    outputs = sorted(p.name + ("/" if p.is_dir() else "") for p in tmp_path.iterdir())
    ignored = [line.strip() for line in (README.parent / ".gitignore").read_text().splitlines()]
    assert [name for name in outputs if f"/{name}" not in ignored] == []
