"""Setting the project up as users do: ./run on an interpreter that already has torch
(offline), scripts/env.sh in a user's shell, a wheel installed outside the checkout, and
plain `pip install .` without torch.

Each test works on a copy of the checkout (tracked and untracked-not-ignored files: what a
clone has), so the copy's own build and setup are what is tested, including the clean
route (a new .venv with the CPU build of torch from the package index), at the end.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _checkout_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: skip built things
        skip = {".venv", "build", ".git", "out", ".pytest_cache", ".hypothesis", "__pycache__"}
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
                and p.suffix not in (".so", ".pyc")]


def copy_checkout(dest: pathlib.Path) -> pathlib.Path:
    for rel in _checkout_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    return dest


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a machine with no package index: any pip install fails at once.
    The outer checkout is taken off PYTHONPATH so only the copy can be imported."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DUALPIPE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="",
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_CONFIG_FILE=os.devnull,
               PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def explain(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def asis(tmp_path_factory):
    """A copy set up with ./run on this interpreter (it has torch and the test
    dependencies: a GPU image, a conda env) and no package index."""
    repo = copy_checkout(tmp_path_factory.mktemp("asis") / "repo")
    env = offline_env(PYTHON=sys.executable)
    t0 = time.monotonic()
    p = run(["./run", "setup"], repo, env)
    assert p.returncode == 0, explain(p)
    return repo, env, p, time.monotonic() - t0


def test_preinstalled_torch_is_used_as_it_is_offline(asis):
    repo, env, p, _ = asis
    assert "as it is" in p.stderr, p.stderr
    assert "extension: cpu build" in p.stderr or "extension: cuda build" in p.stderr, p.stderr
    assert not (repo / ".venv").exists(), "a .venv was made although the Python has torch"
    assert list((repo / "overlap").glob("_C*.so")), "the extension was not built in place"
    # the copy, its extension and its kernels are what gets imported
    q = run(["./run", "python", "-c",
             "import torch, overlap, overlap._C, overlap.kernels, dualpipe, sys;"
             "print(overlap.__file__); print(overlap.kernels.__file__); print(sys.executable)"],
            repo, env)
    assert q.returncode == 0, explain(q)
    lines = q.stdout.split()
    assert lines[0].startswith(str(repo)) and lines[1].startswith(str(repo)), q.stdout
    assert lines[2] == sys.executable


def test_second_setup_is_cheap_and_builds_nothing(asis):
    repo, env, _, first = asis
    so = sorted((repo / "overlap").glob("_C*.so"))
    mtime = so[0].stat().st_mtime
    t0 = time.monotonic()
    p = run(["./run", "setup"], repo, env)
    assert p.returncode == 0, explain(p)
    assert "building" not in p.stderr, p.stderr
    assert so[0].stat().st_mtime == mtime
    # a second setup only probes (one interpreter start); it must stay well below a build
    assert time.monotonic() - t0 < max(first, 5.0), (time.monotonic() - t0, first)


def test_offline_test_and_demo_commands_work(asis, tmp_path):
    repo, env, _, _ = asis
    p = run(["./run", "test", "tests/test_schedules.py", "-k", "published or golden",
             "-p", "no:cacheprovider"], repo, env)
    assert p.returncode == 0, explain(p)
    assert "5 passed" in p.stdout, p.stdout
    out = tmp_path / "demo"
    d = run(["./run", "demo", "--schedule", "dualpipev", "--ranks", "2", "--steps", "3",
             "--out", str(out)], repo, env, timeout=300)
    assert d.returncode == 0, explain(d)
    assert "bit-identical" in d.stdout and "falling" in d.stdout, d.stdout
    assert (out / "summary.json").is_file()


def test_edited_sources_are_rebuilt(asis):
    repo, env, _, _ = asis
    src = repo / "csrc" / "cpu" / "sm_ops.cpp"
    src.write_text(src.read_text() + "\n// edited\n")
    p = run(["./run", "setup"], repo, env)
    assert p.returncode == 0, explain(p)
    assert "building the extension" in p.stderr, p.stderr


def test_a_missing_test_dependency_offline_warns_and_setup_goes_on(asis, tmp_path):
    """An interpreter used as it is, offline, without one test dependency: setup says
    so and still builds and checks the extension (a GPU window is not lost to it)."""
    repo, env, _, _ = asis
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hypothesis':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Hide())\n")
    for stamp in (repo / "build").glob("setup-*.stamp"):
        stamp.unlink()
    p = run(["./run", "setup"], repo, {**env, "PYTHONPATH": str(block)})
    assert p.returncode == 0, explain(p)
    assert "lacks: hypothesis" in p.stderr and "WARNING: hypothesis still not importable" in p.stderr, \
        p.stderr
    assert "extension: cpu build" in p.stderr or "extension: cuda build" in p.stderr, p.stderr


def test_env_sh_leaves_the_users_shell_alone(asis):
    repo, env, _, _ = asis
    script = ('set +euo pipefail; source scripts/env.sh >/dev/null 2>&1; rc=$?; '
              'echo "rc=$rc opts=$- $(set -o | grep pipefail)"; '
              'echo "py=$DUALPIPE_PYTHON"; python -c "import overlap; print(overlap.__file__)"')
    p = run(["bash", "-c", script], repo, env)
    assert p.returncode == 0, explain(p)
    first = p.stdout.splitlines()[0]
    assert first.startswith("rc=0"), p.stdout
    opts = first.split("opts=")[1].split()[0]
    assert "e" not in opts and "u" not in opts and "off" in first, first
    assert str(repo) in p.stdout.splitlines()[-1]
    # a failing setup returns 1 to the sourcing shell instead of ending it
    bad = run(["bash", "-c", "source scripts/env.sh; echo survived rc=$?"], repo,
              {**env, "PYTHON": "/nonexistent/python3"})
    assert "survived rc=1" in bad.stdout, explain(bad)
    assert "PYTHON=/nonexistent/python3 is not an executable" in bad.stderr


def test_run_without_a_command_prints_usage(asis):
    repo, env, _, _ = asis
    p = run(["./run"], repo, env, timeout=30)
    assert p.returncode == 2 and "usage:" in p.stderr and "gpu-check" in p.stderr, explain(p)


def test_every_package_of_the_checkout_is_in_the_wheel():
    """``[tool.setuptools] packages`` lists packages one by one: a subpackage missing from
    it (``overlap.fb``, a package split out of a module) would be left out of the wheel."""
    text = (ROOT / "pyproject.toml").read_text()
    line = re.search(r"^packages\s*=\s*\[(.*?)\]", text, re.M | re.S)
    assert line is not None, "pyproject.toml: no [tool.setuptools] packages list"
    listed = set(re.findall(r'"([\w.]+)"', line.group(1)))
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("dualpipe", "overlap") for p in (ROOT / top).rglob("__init__.py")}
    assert found and found <= listed, f"packages not listed in pyproject.toml: {found - listed}"


def test_wheel_built_without_isolation_works_outside_the_checkout(tmp_path):
    """`pip install --no-build-isolation .`: the wheel carries the extension and the
    kernels as overlap.kernels, and works from any directory."""
    repo = copy_checkout(tmp_path / "repo")
    env = offline_env()
    w = run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
             "-w", str(tmp_path / "wheels"), str(repo)], tmp_path, env, timeout=600)
    assert w.returncode == 0, explain(w)
    wheels = list((tmp_path / "wheels").glob("dualpipe_overlap-*.whl"))
    assert len(wheels) == 1, wheels
    site = tmp_path / "site"
    i = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
             str(wheels[0])], tmp_path, env)
    assert i.returncode == 0, explain(i)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import overlap, overlap.kernels, dualpipe; from overlap import build_info;"
            "i = build_info(); print(overlap.__file__); print(overlap.kernels.__file__);"
            "print(i['extension'], i['extension_error'])")
    q = run([sys.executable, "-c", code], elsewhere, {**env, "PYTHONPATH": str(site)})
    assert q.returncode == 0, explain(q)
    lines = q.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site / "overlap")), q.stdout
    assert lines[2].split()[0] in ("cpu", "cuda"), q.stdout
    v = run([sys.executable, "-m", "dualpipe", "--version"], elsewhere,
            {**env, "PYTHONPATH": str(site)})
    assert v.returncode == 0 and "hint:" not in v.stdout, explain(v)


def test_build_without_torch_stops_and_says_what_to_run(tmp_path):
    """Plain `pip install .` builds in an isolated environment without torch: the build
    must stop with the command to use, not install without the extension."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', 'bdist_wheel'];"
            f"runpy.run_path({str(ROOT / 'setup.py')!r}, run_name='__main__')")
    p = run([sys.executable, "-c", code], tmp_path, offline_env())
    assert p.returncode != 0, explain(p)
    assert "pip install --no-build-isolation ." in p.stderr and "DUALPIPE_NO_EXT=1" in p.stderr, \
        explain(p)
    # with the explicit opt-out it goes on (without building anything)
    ok = run([sys.executable, "-c", code.replace("'bdist_wheel'", "'--name'")], ROOT,
             offline_env(DUALPIPE_NO_EXT="1"))
    assert ok.returncode == 0 and "dualpipe-overlap" in ok.stdout, explain(ok)


def _this_suite_took_the_clean_route() -> bool:
    """This suite runs from the .venv that ./run's clean route made in this checkout:
    the interpreter is ROOT/.venv's and the Python it was made from has no torch (CI: a
    clean clone on a machine whose python3 has none)."""
    if pathlib.Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        return False
    base = getattr(sys, "_base_executable", None)
    return bool(base) and run([base, "-c", "import torch"], ROOT, offline_env()).returncode != 0


def test_clean_venv_route(tmp_path):
    """The route of a machine with no Python that has torch: a new .venv with the pip
    that venv ships (no editable install, so the pip version does not matter), the CPU
    build of torch, the extension built and checked; then the tests run from it.

    When this very suite runs from such a .venv (CI's case), the route was taken by this
    run's own setup minutes ago, on a clean clone: its results are checked in place
    (CPU torch, the extension built for it and loaded, setup's build log) instead of
    taking the route a second time on a copy, which costs ~100 s of a CI budget of 20
    minutes. ``DUALPIPE_TEST_CLEAN_ROUTE=1`` takes it on a copy anyway."""
    if _this_suite_took_the_clean_route() and not os.environ.get("DUALPIPE_TEST_CLEAN_ROUTE"):
        import torch

        from overlap import build_info
        assert torch.version.cuda is None, "the .venv got a CUDA build of torch"
        info = build_info()
        assert info["extension"] in ("cpu", "cuda"), info
        assert info["extension_torch_version"] == torch.__version__, info
        assert (ROOT / "build" / "ext-build.log").is_file()
        return
    base = getattr(sys, "_base_executable", None) or shutil.which("python3")
    repo = copy_checkout(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DUALPIPE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHON")}
    # python3 on PATH must be a Python without torch, as on a fresh machine
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").symlink_to(base)
    env["PATH"] = f"{shim}:{env.get('PATH', '')}"
    s = run(["./run", "setup"], repo, env, timeout=1200)
    assert s.returncode == 0, explain(s)
    assert "creating" in s.stderr and ".venv" in s.stderr, s.stderr
    assert "extension: cpu build" in s.stderr or "extension: cuda build" in s.stderr, s.stderr
    vpy = repo / ".venv" / "bin" / "python"
    q = run([str(vpy), "-c", "import torch; print(torch.version.cuda)"], repo, env)
    assert q.stdout.strip() == "None", "the .venv got a CUDA build of torch"
    t = run(["./run", "test", "tests/test_ext.py", "-p", "no:cacheprovider"], repo, env,
            timeout=600)
    assert t.returncode == 0 and "passed" in t.stdout, explain(t)


def test_version_hints_say_what_to_do():
    from overlap._build import build_hint, format_build_info
    base = {"extension": "cpu", "extension_error": None, "torch_cuda": None}
    assert build_hint(base) is None
    none = dict(base, extension="none", extension_error="overlap._C is not importable")
    assert "./run setup" in build_hint(none) and "--no-build-isolation" in build_hint(none)
    assert format_build_info(none).splitlines()[-1].startswith("hint: ")
    cpu_on_cuda = dict(base, torch_cuda="13.0")
    assert "nvcc" in build_hint(cpu_on_cuda) and "CUDA_HOME" in build_hint(cpu_on_cuda)
