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


def blocks() -> list[tuple[str, str]]:
    return [(lang, code) for lang, code in FENCE.findall(README.read_text(encoding="utf-8"))]


def test_every_block_is_python_or_bash():
    found = blocks()
    assert len(found) >= 7
    assert {lang for lang, _ in found} == {"python", "bash"}  # no block is left out as "text"


@pytest.mark.skipif(not (Path(sys.executable).parent / "alphaedit-fast").exists(),
                    reason="the alphaedit-fast script is not installed next to this Python")
def test_readme_blocks_run_in_order(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    for index, (lang, code) in enumerate(blocks()):
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README block {index} ({lang}) failed:\n{code}\n{result.stderr[-3000:]}"
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "edited2" / "config.json").is_file()
