from alphaedit_fast.cli import main
from alphaedit_fast.demo import run_demo


def test_demo_edits_raise_every_target(capsys):
    rows = run_demo("gpt2")
    assert all(after > 10 * before for _, before, after in rows), rows
    assert "p after" in capsys.readouterr().out


def test_cli_demo_and_version(capsys):
    assert main(["demo", "--family", "qwen2"]) == 0
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert "edits in" in out and "alphaedit_fast 0.1.0" in out
