"""Every Triton kernel compiles ahead of time to a cubin for sm_80 and sm_90, with no GPU needed."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

KERNELS = ["_gather_segment_mean_kernel", "_add_at_positions_kernel"]


def test_compile_all_for_ampere_and_hopper(tmp_path):
    # A fresh process without the interpreter (it replaces JITFunctions), and a fresh Triton cache
    # so that the kernels are really compiled, not read back.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-m", "alphaedit_fast.kernels.aot", "--arch", "80", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arch in (80, 90):
        for name in KERNELS:
            assert name in proc.stdout
            for dtype in ("fp32", "bf16", "fp16"):
                assert f"compiled {name} hidden={dtype} sm_{arch}" in proc.stdout, proc.stdout
        assert f"sm_{arch}: {len(KERNELS)} kernels OK" in proc.stdout, proc.stdout
