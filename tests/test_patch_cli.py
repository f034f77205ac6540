"""`python -m alphaedit_fast.patch original|easyedit -- <command>` runs an unchanged script with
the code base patched (on the EasyEdit stand-in, tests/standins/easyedit)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alphaedit_fast.patch import split_command

STANDIN = Path(__file__).parent / "standins" / "easyedit"
SCRIPT = """import sys
import easyeditor.models.alphaedit.AlphaEdit_main as main
print(main.apply_AlphaEdit_to_model.__module__, sys.argv[1:])
"""


def run(args, cwd, extra_path=()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, extra_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "alphaedit_fast.patch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_script_runs_with_easyedit_patched(tmp_path):
    (tmp_path / "edit_script.py").write_text(SCRIPT)
    result = run(["easyedit", "--", "python", "edit_script.py", "--hparams", "x.yaml"], tmp_path, [STANDIN])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "alphaedit_fast.integrations.easyedit ['--hparams', 'x.yaml']"
    unpatched = subprocess.run([sys.executable, "edit_script.py"], cwd=tmp_path, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(STANDIN)}, timeout=300)
    assert unpatched.stdout.startswith("easyeditor.models.alphaedit.AlphaEdit_main")


def test_a_module_runs_with_the_current_directory_on_the_path(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "__init__.py").write_text("")
    (tmp_path / "experiments" / "run.py").write_text(SCRIPT)
    result = run(["easyedit", "--", "-m", "experiments.run", "a"], tmp_path, [STANDIN])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "alphaedit_fast.integrations.easyedit ['a']"


def test_a_missing_code_base_is_one_clear_error(tmp_path):
    (tmp_path / "edit_script.py").write_text(SCRIPT)
    result = run(["easyedit", "--", "edit_script.py"], tmp_path)
    assert result.returncode == 2
    assert "easyeditor" in result.stderr and "PYTHONPATH" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [[], ["easyedit"], ["easyedit", "script.py"], ["other", "--", "x.py"],
                                  ["original", "--", "-m"], ["original", "--", "python"]])
def test_bad_command_lines_print_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        split_command(argv)
    assert exit_.value.code == 2 and "usage: python -m alphaedit_fast.patch" in capsys.readouterr().err
