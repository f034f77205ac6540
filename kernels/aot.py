"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

Compiling all the way to a cubin (Triton's bundled ptxas) checks that every kernel lowers for a
target arch, for each dtype of ``hidden``, on a machine with no GPU. The interpreter replaces
JITFunctions, so this must run without ``TRITON_INTERPRET=1``.

    python -m alphaedit_fast.kernels.aot --arch 80 --arch 90
"""

from __future__ import annotations

import argparse
import os
import sys

HIDDEN_DTYPES = ("fp32", "bf16", "fp16")
BLOCK_D = 256
NUM_WARPS = 4


def _signatures(hidden_ty: str) -> dict[str, dict[str, str]]:
    """Kernel name -> Triton signature (arg name -> type) for a hidden dtype."""
    h = f"*{hidden_ty}"
    return {
        "_gather_segment_mean_kernel": {
            "hidden_ptr": h, "pos_ptr": "*i64", "order_ptr": "*i64", "offsets_ptr": "*i64",
            "weight_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "P": "i32", "D": "i32",
            "stride_hb": "i32", "stride_ht": "i32", "stride_hd": "i32", "BLOCK_D": "constexpr",
        },
        "_add_at_positions_kernel": {
            "hidden_ptr": h, "out_ptr": h, "pos_ptr": "*i64", "req_ptr": "*i64", "delta_ptr": "*fp32",
            "T": "i32", "D": "i32", "stride_hb": "i32", "stride_ht": "i32", "stride_hd": "i32",
            "BLOCK_D": "constexpr",
        },
    }


def _jit_function(obj):
    """The plain JITFunction under an Autotuner (or the JITFunction itself)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def compile_all(arch: int) -> list[str]:
    """Compile every kernel of ``alphaedit_fast.kernels.gather`` to a cubin for sm_<arch>.

    One block size (BLOCK_D), for hidden in fp32/bf16/fp16. Returns the kernel names compiled;
    raises on any failure, or if gather.py has a ``*_kernel`` this module does not know.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (the interpreter replaces kernels)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from alphaedit_fast.kernels import gather

    known = set(_signatures("fp32"))
    found = {name for name in dir(gather) if name.endswith("_kernel") and name.startswith("_")}
    if found != known:
        raise RuntimeError(f"kernels in gather.py {sorted(found)} != kernels compiled here {sorted(known)}")

    target = GPUTarget("cuda", int(arch), 32)
    names = []
    for name in sorted(known):
        fn = _jit_function(getattr(gather, name))
        for hidden_ty in HIDDEN_DTYPES:
            signature = _signatures(hidden_ty)[name]
            if list(signature) != fn.arg_names:
                raise RuntimeError(f"{name}: signature {list(signature)} != kernel args {fn.arg_names}")
            # 16-byte aligned pointers, as the JIT assumes for freshly allocated tensors.
            attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
            src = ASTSource(fn=fn, signature=signature, constexprs={"BLOCK_D": BLOCK_D}, attrs=attrs)
            try:
                compiled = triton.compile(src, target=target, options={"num_warps": NUM_WARPS})
            except Exception as e:
                raise RuntimeError(f"AOT compile of {name} (hidden {hidden_ty}, sm_{arch}) failed: {e}") from e
            if not compiled.asm.get("cubin"):
                raise RuntimeError(f"AOT compile of {name} (hidden {hidden_ty}, sm_{arch}) produced no cubin")
            print(f"compiled {name} hidden={hidden_ty} sm_{arch} BLOCK_D={BLOCK_D} num_warps={NUM_WARPS} "
                  f"cubin={len(compiled.asm['cubin'])}B", flush=True)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alphaedit_fast.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", required=True,
                        help="compute capability as an integer, e.g. 80 or 90; repeatable")
    args = parser.parse_args(argv)
    for arch in args.arch:
        names = compile_all(arch)
        print(f"sm_{arch}: {len(names)} kernels OK: {' '.join(names)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
