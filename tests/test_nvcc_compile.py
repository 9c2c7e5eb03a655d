"""The CUDA sources compile for Hopper with nvcc alone (no torch, no GPU needed).

csrc/cuda/*.cu are framework-free by design, so CI without a GPU still proves they
compile (`nvcc -arch=sm_90 -c`), link into a shared library against the CUDA runtime
only (the driver API is resolved at run time, so no libcuda at link time), and export
the extern "C" API that csrc/bindings.cpp calls. The CUDA half of bindings.cpp is
syntax-checked against the installed torch headers when they are present.
Skipped, with the reason, where nvcc is absent.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (pathlib.Path(home) / "bin" / "nvcc").is_file():
        return str(pathlib.Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _nvcc_include_dir(tmp_path):
    """The toolkit's include directory, as nvcc itself reports it (nvcc may be a wrapper)."""
    probe = tmp_path / "empty.cu"
    probe.write_text("")
    dry = subprocess.run([NVCC, "--dryrun", "-c", str(probe)], capture_output=True, text=True, timeout=60)
    match = re.search(r'INCLUDES="-I([^"]+?)"', dry.stdout + dry.stderr)
    return pathlib.Path(match.group(1).strip()) if match else pathlib.Path(NVCC).resolve().parents[1] / "include"


def test_there_are_cuda_sources():
    names = {p.name for p in SOURCES}
    assert {"sm_copy.cu", "smid_probe.cu", "green_ctx.cu", "errors.cu"} <= names


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Compile every .cu once (`nvcc -arch=sm_90 -c`): {file name: (returncode, log, object)}."""
    out = tmp_path_factory.mktemp("nvcc")
    results = {}
    for source in SOURCES:
        obj = out / (source.stem + ".o")
        proc = subprocess.run([NVCC, "-arch=sm_90", "-Xcompiler", "-fPIC", "-c", str(source), "-o", str(obj)],
                              cwd=CUDA_DIR, capture_output=True, text=True, timeout=300)
        results[source.name] = (proc.returncode, proc.stdout + proc.stderr, obj)
    return results


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cu_file_compiles_for_sm90(source, objects):
    returncode, log, obj = objects[source.name]
    assert returncode == 0 and obj.is_file(), f"nvcc -arch=sm_90 -c {source.name} failed:\n{log}"


def test_cu_files_link_without_the_driver_library(objects, tmp_path):
    if any(code for code, _, _ in objects.values()):
        pytest.skip("a source failed to compile (reported above)")
    lib = tmp_path / "libdualpipe_cuda.so"
    _run([NVCC, "-arch=sm_90", "-shared", *(str(o) for _, _, o in objects.values()), "-o", str(lib),
          "-cudart", "shared"], cwd=tmp_path)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found: cannot inspect the library's symbols")
    undefined = _run([nm, "-D", "--undefined-only", str(lib)], cwd=tmp_path).stdout
    driver_calls = sorted(set(re.findall(r"\b(cu[A-Z]\w*)", undefined)))
    assert driver_calls == [], f"driver API linked directly (needs libcuda at load): {driver_calls}"
    exported = _run([nm, "-D", "--defined-only", str(lib)], cwd=tmp_path).stdout
    declared = set(re.findall(r"\b(dp_\w+)\s*\(", (CUDA_DIR / "dp_api.h").read_text()))
    missing = sorted(name for name in declared if not re.search(rf"\b{name}\b", exported))
    assert missing == [], f"declared in dp_api.h but not exported: {missing}"


def test_bindings_cuda_branch_compiles_against_torch_headers(tmp_path):
    """csrc/bindings.cpp with DUALPIPE_WITH_CUDA, as the CUDA build compiles it (syntax only)."""
    include = pathlib.Path(torch.__file__).parent / "include"
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    cuda_include = _nvcc_include_dir(tmp_path)
    if cxx is None or not (include / "c10" / "cuda" / "CUDAStream.h").is_file():
        pytest.skip("no C++ compiler or torch's CUDA headers are not installed")
    if not (cuda_include / "cuda_runtime_api.h").is_file():
        pytest.skip(f"CUDA runtime headers not found under {cuda_include}")
    stub = tmp_path / "stub"
    macros = include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.is_file():  # generated only in CUDA builds of torch; CPU wheels lack it
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    from torch.utils import cpp_extension

    std = "-std=c++20" if "-std=c++20" in pathlib.Path(cpp_extension.__file__).read_text() else "-std=c++17"
    _run([cxx, std, "-fsyntax-only", "-DDUALPIPE_WITH_CUDA", "-DDUALPIPE_CUDA_ARCHS=9.0",
          f"-DDUALPIPE_TORCH_VERSION={torch.__version__}", "-I", str(ROOT / "csrc"), "-I", str(stub),
          "-isystem", str(include), "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
          "-isystem", str(cuda_include), "-isystem", sysconfig.get_paths()["include"],
          str(ROOT / "csrc" / "bindings.cpp")], cwd=tmp_path)
