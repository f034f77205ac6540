"""Run an existing script with AlphaEdit's code patched onto alphaedit_fast, unchanged:

    python -m alphaedit_fast.patch original -- -m experiments.evaluate --alg_name=AlphaEdit ...
    python -m alphaedit_fast.patch easyedit -- my_edit_script.py --hparams hparams/AlphaEdit/llama3-8b.yaml
    python -m alphaedit_fast.patch alphaedit -- -m alphaedit.cli --model Qwen/Qwen2.5-7B-Instruct ...

After `--` comes what would follow `python`: a script path or `-m module`, then its arguments
(a leading `python` is dropped). The script's directory (or, for `-m`, the current directory)
goes first on sys.path before the patch imports the code base, as `python` itself would do.
`alphaedit.cli` has no `__main__` block: its `main()` is called, as a console script would.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys

CODE_BASES = ("original", "easyedit", "alphaedit")
MAIN_WITHOUT_GUARD = {"alphaedit": "alphaedit.cli"}  # modules run by calling their main()


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """(code base, command) from `original|easyedit -- <command>`; SystemExit(2) with usage otherwise."""
    usage = f"usage: python -m alphaedit_fast.patch {{{','.join(CODE_BASES)}}} -- (SCRIPT.py | -m MODULE) [ARGS...]"
    if len(argv) < 3 or argv[0] not in CODE_BASES or argv[1] != "--":
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    command = argv[2:]
    if os.path.basename(command[0]).startswith("python"):
        command = command[1:]
    if not command or (command[0] == "-m" and len(command) < 2):
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    return argv[0], command


def main(argv: list[str] | None = None) -> None:
    code_base, command = split_command(sys.argv[1:] if argv is None else argv)
    if command[0] == "-m":
        module, args = command[1], command[2:]
        sys.path.insert(0, os.getcwd())
        sys.argv = [module, *args]
    else:
        script, args = command[0], command[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        sys.argv = [script, *args]
    from . import integrations
    from .errors import AlphaEditError

    try:
        getattr(integrations, f"patch_{code_base}")()
    except AlphaEditError as err:
        print(f"python -m alphaedit_fast.patch: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if command[0] == "-m" and MAIN_WITHOUT_GUARD.get(code_base) == module:
        importlib.import_module(module).main()
    elif command[0] == "-m":
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
