"""Build script for earlytom_ext.

C++ sources (schemas + CPU kernels) are always built. CUDA sources are built when a CUDA
toolkit is found through ``CUDA_HOME`` (a GPU is not needed to compile them).

Environment overrides:
  EARLYTOM_FORCE_CUDA=1   build the CUDA sources (fails if no toolkit is found)
  EARLYTOM_SKIP_CUDA=1    never build the CUDA sources
  TORCH_CUDA_ARCH_LIST    target architectures (default: 8.0;9.0)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("EARLYTOM_SKIP_CUDA"):
        return False
    if _flag("EARLYTOM_FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError(
                "EARLYTOM_FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the "
                "toolkit root (e.g. /usr/local/cuda)."
            )
        return True
    return CUDA_HOME is not None


def _cuda_library_headers():
    """Include dirs for CUDA library headers (cusparse.h, cublas.h, ...) that ATen's CUDA headers
    need but a compiler-only toolkit lacks: taken from the NVIDIA wheels torch depends on."""
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []

    def cuda_version(include_dir):
        try:
            with open(os.path.join(include_dir, "cuda.h")) as f:
                return next((line.split()[2] for line in f if line.startswith("#define CUDA_VERSION")), None)
        except OSError:
            return None

    toolkit = cuda_version(os.path.join(CUDA_HOME, "include")) if CUDA_HOME else None
    for root in roots:
        for header in sorted(glob.glob(os.path.join(root, "*", "include", "cusparse.h"))):
            found = os.path.dirname(header)
            if toolkit is None or cuda_version(found) == toolkit:  # same CUDA release only
                return [found]
    return []


def _extension():
    def rel(pattern):
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/ops/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(HERE, "csrc")]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += rel("csrc/cuda/*.cu")
        include_dirs += _cuda_library_headers()
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "earlytom_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "earlytom_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


class _BuildExt(BuildExtension):
    """BuildExtension that says what it compiles and about how long it takes (pip shows it with -v)."""

    def build_extensions(self):
        sources = [s for ext in self.extensions for s in ext.sources]
        cuda = [s for s in sources if s.endswith(".cu")]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        if cuda:
            what = (
                f"{len(sources)} sources, {len(cuda)} of them CUDA for TORCH_CUDA_ARCH_LIST="
                f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '')} (about 4 min on 2 cores)"
            )
        else:
            what = f"{len(sources)} C++ sources, CUDA kernels skipped (about a minute on 2 cores)"
        print(
            f"earlytom_ext: compiling {what} with {jobs} jobs; ninja prints [n/N] per file", file=sys.stderr, flush=True
        )
        super().build_extensions()


# Metadata (name, version, dependencies, extras, the earlytom script, packages) is in pyproject.toml.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
)
