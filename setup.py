"""Builds the optional compiled extension `alphaedit_fast._C` (DESIGN.md, conventions).

- nothing with ALPHAEDIT_NO_EXT=1, or when csrc/ holds no sources, or without torch;
- the CPU part (csrc/*.cpp) when a C++ compiler is present;
- the CUDA part (csrc/*.cu) only when torch was built with CUDA and a CUDA toolkit exists.
Package metadata lives in pyproject.toml.
"""

import os
import shutil
from glob import glob

from setuptools import setup


def extensions():
    cpp_sources = sorted(glob("csrc/*.cpp"))
    if os.environ.get("ALPHAEDIT_NO_EXT") == "1" or not cpp_sources or shutil.which("c++") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cuda_sources = sorted(glob("csrc/*.cu"))
    if cuda_sources and torch.version.cuda and CUDA_HOME:
        ext = CUDAExtension("alphaedit_fast._C", cpp_sources + cuda_sources,
                            define_macros=[("WITH_CUDA", None)],
                            extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("alphaedit_fast._C", cpp_sources, extra_compile_args=["-O3", "-fopenmp"],
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
