"""Builds the Cython extensions realtime._core._core, _fanout and _ingest.

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

exts = [
    Extension(
        f"realtime._core.{name}",
        [f"realtime/_core/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=macros,
        extra_compile_args=["-O3"] if not debug else ["-O0", "-g"],
    )
    # _core: the kernels (no I/O); _fanout: per-client envelopes and socket writes
    for name in ("_core", "_fanout")
] + [
    # _ingest: a Kafka poll's records straight into the core's columns (C++ for its maps)
    Extension(
        "realtime._core._ingest",
        ["realtime/_core/_ingest.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=macros,
        language="c++",
        extra_compile_args=["-O3"] if not debug else ["-O0", "-g"],
    )
]

# one compiler per core: the three extensions build side by side (the
# wheel's build and `make build` took ~22 s one after the other)
jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

setup(
    options={"build_ext": {"parallel": jobs}},
    ext_modules=cythonize(
        exts,
        nthreads=jobs if jobs > 1 else 0,
        compiler_directives=directives,
        annotate=os.environ.get("REALTIME_ANNOTATE") == "1",
    ),
)
