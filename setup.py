"""Build the compiled core: every src/dsvpn/*.pyx becomes an extension module."""

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
PKG = Path("src") / "dsvpn"

# -O3 lets gcc/clang unroll the Xoodoo rounds; SIMD kernels pick their own instruction
# sets at run time through target attributes, so the baseline stays generic x86-64/arm64.
extra = [] if sys.platform == "win32" else ["-O3", "-fno-strict-aliasing"]
if os.environ.get("DSVPN_DEBUG_BUILD"):
    extra = ["-O0", "-g"]

extensions = [
    Extension(
        f"dsvpn.{pyx.stem}",
        [str(pyx)],
        include_dirs=[str(PKG)],
        extra_compile_args=extra,
    )
    for pyx in sorted((HERE / PKG).glob("*.pyx"))
    for pyx in [pyx.relative_to(HERE)]
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
