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

from setuptools import find_packages, setup
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
                return next((l.split()[2] for l in f if l.startswith("#define CUDA_VERSION")), None)
        except OSError:
            return None

    toolkit = cuda_version(os.path.join(CUDA_HOME, "include")) if CUDA_HOME else None
    for root in roots:
        for header in sorted(glob.glob(os.path.join(root, "*", "include", "cusparse.h"))):
            found = os.path.dirname(header)
            if toolkit is None or cuda_version(found) == toolkit:  # same CUDA release only
                return [found]
    return []


def _version() -> str:
    about = {}
    with open(os.path.join(HERE, "earlytom_ext", "_version.py")) as f:
        exec(f.read(), about)
    return about["__version__"]


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
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
            "earlytom_ext._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "earlytom_ext._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    name="earlytom_ext",
    version=_version(),
    description="EarlyTom video-token compression inside the vision encoder (CUDA/C++ ops + HF integration)",
    packages=find_packages(include=["earlytom_ext", "earlytom_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"hf": ["transformers>=4.57"], "demo": ["matplotlib", "av"], "test": ["pytest"]},
    entry_points={"console_scripts": ["earlytom=earlytom_ext.__main__:main"]},
)
