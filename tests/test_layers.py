"""The packages import one way: ``dualpipe`` -> ``overlap`` <- ``kernels``.

Rules (ARCHITECTURE / issue 13, "one-way layers"):

1. ``overlap`` imports nothing from ``dualpipe``.  Checked twice: every ``overlap``
   module (``overlap/*.py`` and the kernels, ``overlap.kernels.*``) imports in a fresh
   interpreter where ``dualpipe`` cannot be imported (``sys.modules['dualpipe'] = None``);
   and no ``.py`` file under ``overlap/`` or ``kernels/`` names ``dualpipe`` in an import
   statement (at any depth, function-local and ``TYPE_CHECKING`` ones included) or in a
   string-based lookup (see 3), which a run-time import check cannot see.
2. ``kernels`` and ``dualpipe`` use only **public** names of ``overlap``.  A reference
   from a file under ``dualpipe/`` or ``kernels/`` to ``overlap`` is public when

   a. the module it names is ``overlap`` or a submodule none of whose dotted components
      after ``overlap`` starts with ``_`` (``overlap.p2p`` yes, ``overlap._ext`` no);
   b. every name it takes from that module (``from M import name``, or ``alias.name``
      where ``alias`` is bound to ``M`` by an import in the same file) does not start
      with ``_``;
   c. when ``M`` defines ``__all__``, that name is in it (submodules reached as
      attributes are checked as modules, by a.); ``from M import *`` takes ``__all__``.

   Relative imports (``from .x import y``) stay inside their own package and are not
   references to another layer.
3. String-based lookups count as imports: a literal module name passed to
   ``importlib.import_module``, ``__import__`` or ``importlib.util.find_spec``, used as
   ``sys.modules[...]``, ``sys.modules.get(...)`` or in ``... in sys.modules``.

The files are found by globbing, so the test follows the tree as it changes (for example
``dualpipe/runtime.py`` becoming a package).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _py_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _overlap_modules() -> list[str]:
    """Every importable module of the ``overlap`` namespace, the kernels included."""
    out = []
    for folder, pkg in (("overlap", "overlap"), ("kernels", "overlap.kernels")):
        for p in _py_files(folder):
            rel = p.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out.append(".".join((pkg, *rel)))
    return out


# ------------------------------------------------------------------ static scan

def _literal_lookups(tree: ast.AST):
    """(line, module name) for each string-based module lookup in ``tree`` (rule 3)."""
    def is_sys_modules(node):
        return (isinstance(node, ast.Attribute) and node.attr == "modules"
                and isinstance(node.value, ast.Name) and node.value.id == "sys")

    def dotted(node):
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            inner = dotted(node.value)
            return None if inner is None else f"{inner}.{node.attr}"
        return None

    def literal(node):
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) \
            else None

    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Call) and node.args:
            fn = dotted(node.func)
            if fn in ("importlib.import_module", "import_module", "__import__",
                      "importlib.util.find_spec", "find_spec") or (
                    isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and is_sys_modules(node.func.value)):
                name = literal(node.args[0])
        elif isinstance(node, ast.Subscript) and is_sys_modules(node.value):
            name = literal(node.slice)
        elif isinstance(node, ast.Compare) and any(is_sys_modules(c) for c in node.comparators):
            name = literal(node.left)
        if name is not None:
            yield node.lineno, name


def _names_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _dualpipe_refs(path: Path) -> list[str]:
    """Rule 1 (static) and rule 3 for one file of overlap/ or kernels/."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        out += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {m}" for m in mods
                if _names_package(m, "dualpipe")]
    out += [f"{path.relative_to(ROOT)}:{line}: looks up {m} by name"
            for line, m in _literal_lookups(tree) if _names_package(m, "dualpipe")]
    return out


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package
        return False


def _private_module(module: str) -> bool:
    return any(part.startswith("_") for part in module.split(".")[1:])


def _check_name(module: str, name: str) -> str | None:
    """Why taking ``name`` from overlap module ``module`` is not public (rules a-c)."""
    if _private_module(module):
        return f"uses the private module {module}"
    if name == "*":
        return None
    if name.startswith("_"):
        return f"uses the private name {module}.{name}"
    public = getattr(importlib.import_module(module), "__all__", None)
    if public is not None and name not in public:
        return f"uses {module}.{name}, which is not in {module}.__all__"
    return None


def _overlap_refs(path: Path) -> list[str]:
    """Rules 2 and 3 for one file of dualpipe/ or kernels/."""
    tree = ast.parse(path.read_text(), str(path))
    where = str(path.relative_to(ROOT))
    bad: list[str] = []
    aliases: dict[str, str] = {}  # local name -> the overlap module it is bound to

    def check_module(line, module):
        if _private_module(module):
            bad.append(f"{where}:{line}: uses the private module {module}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _names_package(a.name, "overlap"):
                    check_module(node.lineno, a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases["overlap"] = "overlap"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and _names_package(node.module, "overlap"):
            for a in node.names:
                why = _check_name(node.module, a.name)
                if why is not None:
                    bad.append(f"{where}:{node.lineno}: {why}")
                elif a.name != "*" and _is_module(f"{node.module}.{a.name}"):
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for line, m in _literal_lookups(tree):
        if _names_package(m, "overlap"):
            check_module(line, m)

    # attribute access through a bound module: alias.sub.name
    def chain(node):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in aliases:
            return aliases[node.id], parts[::-1]
        return None

    seen = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        found = chain(node)
        if found is None:
            continue
        module, parts = found
        for attr in parts:
            if _is_module(f"{module}.{attr}"):
                module = f"{module}.{attr}"
                check_module(node.lineno, module)
                continue
            why = _check_name(module, attr)
            if why is not None and (node.lineno, why) not in seen:
                seen.add((node.lineno, why))
                bad.append(f"{where}:{node.lineno}: {why}")
            break
    return bad


# ------------------------------------------------------------------ tests

def test_overlap_imports_with_dualpipe_blocked():
    mods = _overlap_modules()
    assert "overlap.p2p" in mods and "overlap.kernels.moe_permute" in mods
    code = ("import importlib, sys\n"
            "sys.modules['dualpipe'] = None  # any import of dualpipe[.x] now raises\n"
            f"for name in {mods!r}:\n"
            "    importlib.import_module(name)\n"
            "leaked = sorted(m for m in sys.modules if m.startswith('dualpipe.'))\n"
            "print('ok', leaked)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []", out.stdout


def test_overlap_and_kernels_never_name_dualpipe():
    files = _py_files("overlap") + _py_files("kernels")
    assert files
    bad = [v for p in files for v in _dualpipe_refs(p)]
    assert not bad, "overlap must not depend on dualpipe:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["dualpipe", "kernels"])
def test_only_public_overlap_names_are_used(folder):
    files = _py_files(folder)
    assert files
    bad = [v for p in files for v in _overlap_refs(p)]
    assert not bad, f"{folder} uses overlap internals:\n" + "\n".join(bad)


# ------------------------------------------------------------------ the checker itself

@pytest.fixture
def probe(tmp_path, monkeypatch):
    """Scan a probe file with ``refs`` (messages name it relative to its folder)."""
    def scan(text, refs):
        p = tmp_path / "probe.py"
        p.write_text(text)
        monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
        return refs(p)
    return scan


def test_checker_catches_each_kind_of_private_use(probe):
    text = ("import overlap._ext\n"
            "import overlap.p2p as p\n"
            "from overlap import p2p, sm_budget\n"
            "from overlap._ext import gather_rows\n"
            "from overlap.p2p import _lost, P2P\n"
            "from overlap.shm import _Ring\n"
            "from overlap.p2p import contextlib\n"
            "def f():\n"
            "    from overlap.shm import ShmP2P, _flat\n"
            "    import importlib, sys\n"
            "    importlib.import_module('overlap._build')\n"
            "    return p._short, p2p._DTYPES, p.Handle, sys.modules.get('overlap._ext')\n")
    bad = probe(text, _overlap_refs)
    joined = "\n".join(bad)
    for needle in ("probe.py:1: uses the private module overlap._ext",
                   "probe.py:4: uses the private module overlap._ext",
                   "probe.py:5: uses the private name overlap.p2p._lost",
                   "probe.py:6: uses the private name overlap.shm._Ring",
                   "probe.py:7: uses overlap.p2p.contextlib, which is not in overlap.p2p.__all__",
                   "probe.py:9: uses the private name overlap.shm._flat",
                   "probe.py:11: uses the private module overlap._build",
                   "probe.py:12: uses the private name overlap.p2p._short",
                   "probe.py:12: uses the private name overlap.p2p._DTYPES",
                   "probe.py:12: uses the private module overlap._ext"):
        assert needle in joined, joined
    assert len(bad) == 10, joined


def test_checker_catches_each_kind_of_dualpipe_reference(probe):
    text = ("import sys\n"
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from dualpipe.schedules import Action\n"
            "def f():\n"
            "    import dualpipe\n"
            "    store = sys.modules.get('dualpipe.weight_grad')\n"
            "    return 'dualpipe.api' in sys.modules, sys.modules['dualpipe'], __import__('dualpipe')\n"
            "ring = f'dualpipe-{0}-board'  # a file name, not a module\n")
    bad = probe(text, _dualpipe_refs)
    assert sorted(b.split(": ", 1)[0] for b in bad) == [
        "probe.py:4", "probe.py:6", "probe.py:7", "probe.py:8", "probe.py:8", "probe.py:8"], bad
