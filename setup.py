"""Builds the one Cython extension, realtime._core._core.

REALTIME_ANNOTATE=1 writes Cython's HTML annotation next to the sources;
REALTIME_DEBUG=1 builds with bounds checks and line tracing (a build mode,
not a runtime branch, as uvloop does).
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("REALTIME_DEBUG") == "1"
directives = {
    "language_level": "3",
    "boundscheck": debug,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": debug,
    "linetrace": debug,
}
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if debug:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

ext = Extension(
    "realtime._core._core",
    ["realtime/_core/_core.pyx"],
    include_dirs=[numpy.get_include()],
    define_macros=macros,
    extra_compile_args=["-O3"] if not debug else ["-O0", "-g"],
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives=directives,
        annotate=os.environ.get("REALTIME_ANNOTATE") == "1",
    ),
)
