"""Build the C++/CUDA extension of dualpipe-overlap; the rest is declared in pyproject.toml.

Build without build isolation so the installed torch is used (the extension is compiled
against it)::

    pip install --no-build-isolation .         # into your environment (torch installed first)
    python setup.py build_ext --inplace        # in a checkout (what ./run does)

The extension ``overlap._C`` (ops in ``torch.ops.dualpipe_ext``) is:

* a CUDA build (csrc/cuda/*.cu + csrc/cpu + csrc/bindings.cpp) when the installed torch
  has CUDA (``torch.version.cuda``) and nvcc is found (``$CUDA_HOME/bin/nvcc`` or PATH);
* a CPU build (csrc/cpu + csrc/bindings.cpp) otherwise: on CPU-only torch, when nvcc
  is missing (a warning; ``python -m dualpipe --version`` says so later) or when
  ``DUALPIPE_NO_CUDA=1``;
* nothing with ``DUALPIPE_NO_EXT=1``; dualpipe/overlap then run on their pure-torch
  fallbacks.

Without torch importable (plain ``pip install .`` builds in an isolated environment that
has none) the build stops with a message saying what to run instead: an install that
silently lacks its extension is worse than one that fails.

Other knobs: ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs' archs, else ``9.0``),
``DUALPIPE_EXT_OPTIONAL=1`` (a compile error warns and installs without the extension
instead of failing), ``MAX_JOBS`` (parallel compile jobs with ninja).
"""
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "overlap._C"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(msg: str) -> None:
    # setup.py output is the user's only channel here; pip shows stderr with -v or on error.
    sys.stderr.write(f"[dualpipe-overlap setup] WARNING: {msg}\n")


def _macro_safe(value: str) -> str:
    """'9.0;10.0+PTX' -> '9.0,10.0+PTX': keep [A-Za-z0-9.+_-], separators become commas."""
    out = []
    for ch in value.strip():
        out.append(ch if ch.isalnum() or ch in ".+_-" else ",")
    return "".join(out).strip(",")


def _find_nvcc(cuda_home):
    candidates = []
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        candidates.append(found)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _cuda_arch_list(torch) -> str:
    """The arch list the CUDA build targets; exported as TORCH_CUDA_ARCH_LIST for torch."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in caps)
    except Exception as exc:  # a broken driver must not break a CPU-capable install
        _warn(f"could not query GPUs for the arch list ({exc}); defaulting to 9.0")
    return "9.0"  # Hopper: what the project targets (H800/H100/H200)


def _extension_build():
    """Return (ext_modules, cmdclass) for setup(); ([], {}) when nothing is built."""
    if _flag("DUALPIPE_NO_EXT"):
        _warn("DUALPIPE_NO_EXT is set: not building the extension (pure-torch fallbacks)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(
            f"[dualpipe-overlap setup] ERROR: torch is not importable here ({exc}), and the "
            "C++/CUDA extension is compiled against the installed torch. Install torch "
            "first, then build without build isolation:\n"
            "    pip install --no-build-isolation .\n"
            "(plain `pip install .` builds in an isolated environment without torch). To "
            "install without the extension (pure-torch fallbacks, no shared-memory "
            "transport, no CUDA kernels) set DUALPIPE_NO_EXT=1.") from None

    cpu_sources = ["csrc/bindings.cpp", "csrc/cpu/sm_ops.cpp", "csrc/cpu/shm.cpp"]
    cuda_sources = [os.path.join("csrc", "cuda", f) for f in
                    sorted(os.listdir(os.path.join(ROOT, "csrc", "cuda"))) if f.endswith(".cu")]
    # No -std flag: torch adds the standard its headers need (C++17 or C++20 by version).
    # Macro values stay free of quotes and shell metacharacters (ninja runs a shell);
    # bindings.cpp stringifies them.
    cxx = ["-O3", f"-DDUALPIPE_TORCH_VERSION={_macro_safe(torch.__version__)}"]

    use_cuda = torch.version.cuda is not None and not _flag("DUALPIPE_NO_CUDA")
    if torch.version.cuda is not None and _flag("DUALPIPE_NO_CUDA"):
        _warn("DUALPIPE_NO_CUDA is set: building the CPU extension only")
    nvcc = _find_nvcc(cpp_extension.CUDA_HOME) if use_cuda else None
    if use_cuda and nvcc is None:
        _warn(f"torch has CUDA {torch.version.cuda} but nvcc was not found (CUDA_HOME="
              f"{cpp_extension.CUDA_HOME}); building the CPU extension only. Set CUDA_HOME "
              "to a CUDA toolkit to build the CUDA kernels.")
        use_cuda = False

    if use_cuda:
        archs = _cuda_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch reads it to emit -gencode flags
        ext = cpp_extension.CUDAExtension(
            name=EXT_NAME,
            sources=cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("DUALPIPE_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx + [f"-DDUALPIPE_CUDA_ARCHS={_macro_safe(archs)}"],
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
        )
    else:
        ext = cpp_extension.CppExtension(
            name=EXT_NAME,
            sources=cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtension(base):
        """torch's BuildExtension, optionally turning a compile failure into a warning."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:
                if not _flag("DUALPIPE_EXT_OPTIONAL"):
                    raise
                _warn(f"building {extension.name} failed ({exc}); DUALPIPE_EXT_OPTIONAL is set, "
                      "installing without it (pure-torch fallbacks)")

    return [ext], {"build_ext": BuildExtension}


def main() -> None:
    ext_modules, cmdclass = _extension_build()
    # name, version, packages, dependencies and extras: pyproject.toml
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


# pip's build backend executes this file as __main__; tests import it to check the
# extension selection without building.
if __name__ == "__main__":
    main()
